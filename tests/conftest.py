import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

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


def export_cli():
    """`savedmodels/export.py` imported as a module, to call its `main(argv)` in this process
    (its own process is tested by the CLI tests of test_export.py)."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "savedmodels" / "export.py"
    spec = importlib.util.spec_from_file_location("export_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
