import http.server
import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# XLA's quickest compiles: the tests compile much and run little (the JAX process, which
# compiles each new eager op and shape, 91 -> 63 s: a small op's compile 37 -> 17 ms, of which
# the classic CPU emitters instead of the fusion emitters 30 -> 17; benchmark --short 91 ->
# 74 s). With no LLVM optimization programs run slower: the README's training took 80 s,
# and 172 s so, which is why its test runs with RUN_XLA_FLAGS. XLA aborts on a flag it does
# not know: TensorFlow 2.20 and 2.21 and jax 0.6.2 to 0.10 (setup.py's test extra) know these.
QUICK_XLA_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)
# (This module runs twice in a worker, as `conftest` and as `tests.conftest`: the second time
# it finds its own flags in the environment.)
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in QUICK_XLA_FLAGS]
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= (os.cpu_count() or 1):
    # As many test workers as cores (CI: -n 2 on 2 cores): one thread per op in each worker
    # and in the processes its tests start (the env is inherited), as threads beyond the
    # cores only contend (three test files ran 14% faster so). JAX, torch and OpenMP too.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "--xla_cpu_multi_thread_eigen=false" not in _flags:
        _flags.append("--xla_cpu_multi_thread_eigen=false")
RUN_XLA_FLAGS = " ".join(_flags)
os.environ["XLA_FLAGS"] = " ".join([*_flags, *QUICK_XLA_FLAGS])

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The scripts that tests run as processes of their own (`--doctest-modules` would import them,
# and _two_replicas.py sets up TensorFlow's devices when imported).
collect_ignore_glob = ["training/_*.py"]
DATA = pathlib.Path(__file__).parent / "data"
GOLDEN = json.loads((DATA / "MANIFEST.json").read_text())
TINY_ARCH = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)
# The start of a `python -c` script in which torch cannot be imported, as where it is absent.
WITHOUT_TORCH = """
import sys


class NoTorch:  # any import of torch now fails, as where it is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, NoTorch())
"""


def pytest_collection_modifyitems(config, items):
    """The slow tests first (a stable sort: the same order in every xdist worker). With
    `-n 2` and `--dist=worksteal` (pyproject.toml) the first worker starts on the long tests
    and the other takes the short ones from the end of its queue when it runs out: both end
    on short tests. (xdist's default `load` sends each worker a first chunk of an eighth of
    the suite, so one worker got every slow test: 927 against 739 s.)"""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(params=sorted(GOLDEN))
def golden(request):
    """One golden model: its manifest entry, checkpoint path, NHWC images and logits."""
    entry = GOLDEN[request.param]
    io = np.load(DATA / entry["io"])
    return dict(
        entry,
        name=request.param,
        checkpoint=str(DATA / entry["checkpoint"]),
        images=io["images_nchw"].transpose(0, 2, 3, 1),
        images_nchw=io["images_nchw"],
        logits=io["logits"],
    )


def tiny_model(tokens_type="performer", **kwargs):
    """The golden models' architecture (embed 64, depth 2, 2 heads), 64x64 by default."""
    import keras_t2t

    kwargs.setdefault("input_shape", (64, 64, 3))
    kwargs.setdefault("classes", 10)
    return keras_t2t.T2TViT(tokens_type=tokens_type, **TINY_ARCH, **kwargs)


def tiny_releases(data_dir=DATA, **overrides):
    """Release entries (keras_t2t.pretrained.Release) for the golden checkpoints, as if they
    were official releases named "imagenet", with their size and sha384 as integrity data."""
    import hashlib

    from keras_t2t.pretrained import Release

    releases = []
    for name, entry in GOLDEN.items():
        path = pathlib.Path(data_dir) / entry["checkpoint"]
        fields = dict(
            file_size=path.stat().st_size,
            sha384=hashlib.sha384(path.read_bytes()).hexdigest(),
            image_size=entry["image_size"],
            classes=entry["num_classes"],
        )
        fields.update(overrides)
        releases.append(Release(name, "imagenet", entry["checkpoint"], 0.0, **fields))
    return releases


def register_tiny_releases(monkeypatch=None, **overrides):
    """Makes the golden architectures variants (`t2t_tiny_performer`, ...) with "imagenet"
    releases; through `monkeypatch` in the tests, for good in a subprocess."""
    from keras_t2t import models, pretrained

    releases = tuple(pretrained.RELEASES) + tuple(tiny_releases(**overrides))
    configs = {
        name: dict(tokens_type=entry["tokens_type"], **TINY_ARCH) for name, entry in GOLDEN.items()
    }
    if monkeypatch is None:
        models.MODEL_CONFIGS.update(configs)
        pretrained.RELEASES = releases
        return
    for name, config in configs.items():
        monkeypatch.setitem(models.MODEL_CONFIGS, name, config)
    monkeypatch.setattr(pretrained, "RELEASES", releases)


@pytest.fixture
def tiny_variants(monkeypatch):
    """The golden architectures as variants with "imagenet" releases, for this test
    (`register_tiny_releases`)."""
    register_tiny_releases(monkeypatch)


class QuietHTTPHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server's request handler that logs nothing."""

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server of a folder (a copy of tests/data), a release mirror for
    KERAS_T2T_WEIGHTS_URL (test_pretrained.py, test_finetune_deploy.py): yields (url, folder)."""
    import functools
    import shutil
    import threading

    folder = tmp_path / "mirror"
    shutil.copytree(DATA, folder)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHTTPHandler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", folder
    server.shutdown()
    server.server_close()


def tflite_op_names(flatbuffer):
    """The operator names of a TFLite model (Flex or custom ops would show here)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def export_cli():
    """`savedmodels/export.py` as a module, to call its `main(argv)` in this process (its own
    process is tested by the CLI tests of test_export.py)."""
    from savedmodels import export

    return export


def shared_folder(tmp_path_factory, name, build):
    """A folder that `build(folder)` fills once per test session, for every xdist worker: the
    first worker to ask builds it (under a lock), the others wait for it and reuse it, where a
    module- or session-scoped fixture alone is built again by each worker. Tests must only
    read it (copy it to change it)."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's folder, above each worker's own (popen-gw0, ...)
    shared = base / "shared"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed on another worker
            folder.mkdir()
            build(folder)
            done.write_text("")
    return folder


def random_examples(count, classes, seed, label=None):
    """`count` serialized ImageNet-layout examples: random 40x36 JPEGs, labels 1..classes in
    turn (or all `label`)."""
    from training import build_tfrecords

    rng = np.random.default_rng(seed)
    for i in range(count):
        image = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
        y = label if label is not None else 1 + i % classes
        yield build_tfrecords.make_example(
            build_tfrecords.to_jpeg(image), y, str(y), f"{i}.jpg", 40, 36
        )


@pytest.fixture(scope="session")
def tiny_records(tmp_path_factory):
    """4 classes, 64 training and 20 validation JPEGs (40x36) in the ImageNet layout, 2 shards
    each; built once per session (`shared_folder`): read only."""
    from training import build_tfrecords

    def build(folder):
        build_tfrecords.write_shards(random_examples(64, 4, 0), str(folder), "train", 2)
        build_tfrecords.write_shards(random_examples(20, 4, 1), str(folder), "validation", 2)

    return str(shared_folder(tmp_path_factory, "tiny_records", build))


# The variant that the training tests train: the golden performer's architecture (embed 64,
# depth 2), registered by `register_tiny_releases` (the `tiny_variants` fixture; the training
# tests' own processes call it). The loop around the model is what they test; a run of
# `tiny_train_config` took 6.1 s so, 12.6 s with T2T-ViT-7 (9.6 and 16.6 s with XLA).
TRAIN_MODEL = "t2t_tiny_performer"


def tiny_train_config(data_dir, model_dir, **overrides):
    """The fields of a training `Config` for `tiny_records`: `TRAIN_MODEL` at 32x32, 2 epochs
    of 3 steps of 8 images, in loops of 2; evaluated after each epoch."""
    config = dict(
        model=TRAIN_MODEL,
        data_dir=data_dir,
        model_dir=str(model_dir),
        image_size=32,
        num_classes=4,
        batch_size=8,
        epochs=2,
        warmup_epochs=1,
        cooldown_epochs=0,
        steps_per_epoch=3,
        steps_per_loop=2,
        eval_every_epochs=1,
        ema_decay=0.9,
        drop_path_rate=0.0,
        jit_compile=False,
        eval_batch_size=8,
    )
    config.update(overrides)
    return config


def read_batches_only(monkeypatch, before_first_loop=None):
    """Train loops that read their batches (in a tf.function, as the real one: the input
    pipeline runs as in training) and advance the step, without a gradient graph;
    `before_first_loop()`, if given, is called once, before the first loop reads."""
    import tensorflow as tf

    from training import trainer

    pending = [before_first_loop] if before_first_loop else []

    def build(self):
        @tf.function
        def read(iterator, steps):
            for _ in tf.range(steps):
                next(iterator)
                self.step.assign_add(1)

        def loop(iterator, steps):
            while pending:
                pending.pop()()
            read(iterator, steps)

        return loop

    monkeypatch.setattr(trainer.Trainer, "_build_train_loop", build)
