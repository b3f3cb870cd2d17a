"""Training on CPU: a few steps, MultiWorkerMirroredStrategy agreement, kill-and-resume,
preemption, bad input, and the embedded default's accuracy. (MirroredStrategy against one
device: tests/training/test_distributed.py.)

Processes of their own only where a fresh process is the point: TF_CONFIG workers, SIGTERM
and SIGKILL, the README's command. The tests of the loop around the steps (checkpoints,
SIGTERM, errors) train with stand-in steps (`_count_steps_only`, `read_batches_only`)."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    RUN_XLA_FLAGS,
    TRAIN_MODEL,
    export_cli,
    read_batches_only,
    register_tiny_releases,
    shared_folder,
)
from conftest import random_examples as _random_examples
from conftest import tiny_train_config as tiny_config

from keras_t2t.imagenet import resize_and_center_crop
from training import build_tfrecords, data, distribute, evaluation, optim, trainer
from training import checkpoints as checkpoints_lib
from training.config import Config, checkpoint_interval, recipe, resolve
from training.errors import Preempted, TrainingError, is_data_error

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).resolve().parent / "_train_worker.py"  # beside this file
TRAIN = ROOT / "training" / "train_imagenet.py"
TRAIN_CLI = pathlib.Path(__file__).resolve().parent / "_train_cli.py"  # TRAIN, TRAIN_MODEL known
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
pytestmark = pytest.mark.usefixtures("tiny_variants")  # TRAIN_MODEL, in this process


@pytest.fixture(scope="session")
def two_checkpoints(tiny_records, tmp_path_factory):
    """The model_dir of a finished run with XLA and the full augmentation (train_and_eval, 2
    epochs of 3 steps): ckpt-3 and ckpt-6, its results, weights, summaries and record; the
    results `run()` returned in ../results.json. Trained once per session (`shared_folder`)
    for the tests that check, resume (a copy) or export such a run: read only."""

    def build(folder):
        aug = data.Augmentation(
            randaugment_ops=2, mixup_alpha=0.8, cutmix_alpha=1.0, random_erasing=0.25
        )
        config = Config(**tiny_config(tiny_records, folder / "run", jit_compile=True), aug=aug)
        with pytest.MonkeyPatch.context() as patch:  # built before the tests' own fixtures
            register_tiny_releases(patch)
            results = trainer.Trainer(config).run()
        (folder / "results.json").write_text(json.dumps(results))

    return shared_folder(tmp_path_factory, "two_checkpoints", build) / "run"


def test_a_few_steps_with_xla_and_the_full_augmentation(two_checkpoints):
    run = two_checkpoints  # trained with jit_compile=True and every augmentation
    results = json.loads((run.parent / "results.json").read_text())
    assert results["step"] == 6 and results["examples"] == 20
    for key in ("top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss"):
        assert np.isfinite(results[key])
    saved = json.loads((run / "eval_results.json").read_text())
    assert saved["top1"] == pytest.approx(results["top1"])
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["jit_compile"] is True and resolved["aug"]["random_erasing"] == 0.25
    defaults = recipe(TRAIN_MODEL)
    assert resolved["learning_rate"] == defaults["learning_rate"]
    assert resolved["weight_decay"] == defaults["weight_decay"]
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.index")) == [
        "ckpt-3.index",
        "ckpt-6.index",
    ]
    assert list((run / "train").glob("events.out.tfevents.*"))
    assert list((run / "eval").glob("events.out.tfevents.*"))


def test_training_batches_are_static_and_mixed(tiny_records):
    # (Random erasing fills with unclipped noise, as timm's: off here for the range check.)
    aug = data.Augmentation(randaugment_ops=2, mixup_alpha=0.8, cutmix_alpha=1.0, random_erasing=0)
    files = data.list_files(tiny_records, "train")
    dataset = data.train_dataset(files, 8, 32, 4, aug, seed=1)
    images, targets = next(iter(dataset))
    assert images.shape == (8, 32, 32, 3) and targets.shape == (8, 4)
    assert dataset.element_spec[0].shape == (8, 32, 32, 3)  # static, as a TPU needs
    np.testing.assert_allclose(targets.numpy().sum(-1), 1.0, atol=1e-5)
    smoothed = 0.1 / 4
    assert targets.numpy().min() >= smoothed - 1e-6  # label smoothing under the mixing
    assert 0 <= images.numpy().min() and images.numpy().max() <= 255


def test_evaluation_preprocessing_is_the_official_resize_and_crop():
    # torchvision's Resize(248) on 500x375 (w x h) gives 330x248: the long side truncated.
    image = tf.cast(tf.random.uniform((375, 500, 3), 0, 255, seed=1), tf.uint8)
    crop = resize_and_center_crop(image, 224, 0.9)
    assert crop.shape == (224, 224, 3)
    resized = tf.clip_by_value(
        tf.round(tf.image.resize(image, (248, 330), "bicubic", antialias=True)), 0, 255
    )
    top, left = round((248 - 224) / 2), round((330 - 224) / 2)
    np.testing.assert_array_equal(crop.numpy(), resized[top : top + 224, left : left + 224])
    assert resize_and_center_crop(image, 384, 1.0).shape == (384, 384, 3)


def test_eval_dataset_pads_the_last_batch(tiny_records):
    files = data.list_files(tiny_records, "validation")
    batches = list(data.eval_dataset(files, 8, 32, 4))
    assert len(batches) == 3
    assert sum(float(mask.numpy().sum()) for _, _, mask in batches) == 20


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(config, out_dir, count=2):
    """`count` MultiWorkerMirroredStrategy workers of `_train_worker.py` with `config`, on
    local ports."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(count)]}
    processes = []
    for index in range(count):
        env = dict(
            ENV,
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        )
        command = [sys.executable, str(WORKER), json.dumps(config), str(out_dir / f"w{index}.npz")]
        processes.append(
            subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return processes


def _finish(processes, timeout=300):
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout)[0])
        finally:
            process.kill()
    return outputs


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_then_both_resume_from_the_chiefs_checkpoint(
    tiny_records, tmp_path
):
    # --checkpoint_every=2: the chief's first checkpoint (step 2) says training is under way.
    config = tiny_config(
        tiny_records,
        tmp_path / "run",
        strategy="multi_worker",
        seed=5,
        epochs=1,
        steps_per_epoch=30,
        steps_per_loop=1,
        warmup_epochs=0,
        checkpoint_every="2",
        aug=dict(mixup_alpha=0.8, cutmix_alpha=1.0),  # the batch-level random draws
    )
    processes = _start_workers(config, tmp_path)
    try:
        _wait_for_checkpoint(tmp_path / "run", processes[0])
        processes[1].send_signal(signal.SIGTERM)  # not the chief
        start = time.time()
        outputs = _finish(processes, timeout=180)
        stopped = time.time() - start
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs):
        # Before: the chief died in the next collective (exit 1), its work since the last
        # save lost; on a real cluster it could hang.
        assert process.returncode == 143, output[-3000:]
    assert stopped < 180  # a hang detector: the suite runs two tests at a time
    steps = {int(s) for o in outputs for s in re.findall(r"stopped by SIGTERM at step (\d+)", o)}
    assert len(steps) == 1
    step = steps.pop()
    assert _latest_step(tmp_path / "run") == step < 30

    # The same two workers then finish the run (in loops of 10 steps, to be quick) from the
    # chief's checkpoint, although worker 1 keeps no checkpoint of its own (its save failed,
    # or it is a new worker): it restored its own scratch copy before, and started from
    # step 0 while the chief went on.
    shutil.rmtree(tmp_path / "run" / "workers" / "worker_1" / "checkpoints", ignore_errors=True)
    processes = _start_workers(dict(config, steps_per_loop=10), tmp_path)
    outputs = _finish(processes)
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
        assert "REPLICAS 2 STEP 30" in output
        assert "Resumed from" in output and f"ckpt-{step} at step {step}" in output
    a, b = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
    # Only the chief writes the results and keeps checkpoints; the other worker's copies
    # are deleted right after each save.
    assert (tmp_path / "run" / "eval_results.json").exists()
    assert _latest_step(tmp_path / "run") == 30
    assert not (tmp_path / "run" / "workers" / "worker_1" / "checkpoints").exists()


def _cli(args, model_dir, data_dir):
    return [
        sys.executable,
        str(TRAIN_CLI),
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        f"--model={TRAIN_MODEL}",
        "--image_size=32",
        "--num_classes=4",
        "--batch_size=8",
        "--steps_per_epoch=4",
        "--steps_per_loop=2",
        "--warmup_epochs=1",
        "--cooldown_epochs=0",
        "--eval_batch_size=8",
        "--nojit_compile",
        "--randaugment_ops=0",
        "--mixup=0",
        "--cutmix=0",
        *args,
    ]


def _wait_for_checkpoint(model_dir, process, timeout=180):
    index = pathlib.Path(model_dir) / "checkpoints" / "checkpoint"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if index.exists():
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    raise AssertionError("no checkpoint was written in time")


def _latest_step(model_dir):
    latest = tf.train.latest_checkpoint(str(pathlib.Path(model_dir) / "checkpoints"))
    return int(latest.rsplit("-", 1)[1])


@pytest.mark.slow
def test_kill_and_resume_continues_from_the_checkpoint(tiny_records, tmp_path):
    # 40 steps, 4 an epoch: the first checkpoint comes after 4, the kill 1 s (~10 steps) later.
    args = ["--epochs=10", "--mode=train_and_eval", "--eval_every_epochs=10"]
    process = subprocess.Popen(
        _cli(args, tmp_path, tiny_records),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_checkpoint(tmp_path, process)
        time.sleep(1.0)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    killed_at = _latest_step(tmp_path)
    assert killed_at % 4 == 0 and 0 < killed_at < 40
    # The kill can land inside a save: after the next checkpoint's index is written and before
    # the state file names it (the run resumes from that newer one), or while the index is
    # being written (the run reports it unreadable and resumes from `killed_at`).
    on_disk = sorted(
        int(index.name[len("ckpt-") : -len(".index")])
        for index in (tmp_path / "checkpoints").glob("ckpt-*.index")
    )
    assert killed_at in on_disk and on_disk[-1] <= killed_at + 4, on_disk
    resumed = subprocess.run(
        _cli(args, tmp_path, tiny_records), env=ENV, capture_output=True, text=True, timeout=600
    )
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    match = re.search(
        r"Resumed from \S+ckpt-(\d+) at step (\d+)( \(the 1 newer could not be read\))?\.", log
    )
    assert match, log[-3000:]
    at = int(match.group(1))
    assert int(match.group(2)) == at and at in (killed_at, on_disk[-1]), (match.group(0), on_disk)
    # A newer checkpoint than the one resumed from is skipped only when it cannot be read.
    assert bool(match.group(3)) == (at < on_disk[-1]), (match.group(0), on_disk)
    first = re.search(r"step (\d+)/40", log)
    assert first and int(first.group(1)) == at + 2, log[-3000:]  # the next loop after it
    assert json.loads((tmp_path / "eval_results.json").read_text())["step"] == 40


def test_sigterm_saves_and_stops(tiny_records, tmp_path):
    args = ["--epochs=200", "--mode=train"]
    process = subprocess.Popen(
        _cli(args, tmp_path, tiny_records),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_checkpoint(tmp_path, process)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert process.returncode == 143, output[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", output).group(1))
    assert _latest_step(tmp_path) == stopped and stopped % 2 == 0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_records, two_checkpoints, tmp_path, capsys
):
    from training import train_imagenet

    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)  # ckpt-6
    flags = train_imagenet.FLAGS
    try:  # resumed at step 6, it diverges in the next loop
        flags(
            _cli(
                [
                    "--epochs=4",
                    "--mode=train",
                    "--learning_rate=1e30",
                    "--warmup_epochs=0",
                    "--steps_per_epoch=3",
                ],
                tmp_path,
                tiny_records,
            )[1:]
        )
        assert train_imagenet.main([]) == 2
    finally:
        flags.unparse_flags()
    error = capsys.readouterr().err
    assert "training diverged" in error and "last good checkpoint" in error
    assert _latest_step(tmp_path) == 6


def _run_config(data_dir, model_dir, **overrides):
    return trainer.Trainer(
        Config(**tiny_config(data_dir, model_dir, **overrides), aug=data.Augmentation.none())
    ).run()


def test_no_matching_files(tmp_path):
    with pytest.raises(data.DataError, match="No train TFRecords found in .*build_tfrecords"):
        _run_config(str(tmp_path), tmp_path / "run")


def test_corrupt_records(tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "train-00000-of-00001").write_bytes(b"this is not a TFRecord file at all" * 10)
    build_tfrecords.write_shards(_random_examples(8, 4, 0), str(folder), "validation", 1)
    with pytest.raises(
        data.DataError, match=r"damaged: \S+train-00000-of-00001: the file ends inside record 0"
    ):
        _run_config(str(folder), tmp_path / "run")


def test_undecodable_image(tmp_path):
    folder = tmp_path / "bad_image"
    examples = [build_tfrecords.make_example(b"not a jpeg", 1, "1", "x.jpg", 4, 4)] * 16
    build_tfrecords.write_shards(iter(examples), str(folder), "train", 1)
    with pytest.raises(
        TrainingError,
        match=r"Bad data: a record could not be read or decoded \(InvalidArgumentError: [^)]*"
        r"Unknown image file format.*The bad record: number \d+ of \S+train-00000-of-00001 "
        r"\(image/filename 'x.jpg'\)",
    ) as caught:
        _run_config(str(folder), tmp_path / "run", mode="train")
    assert "Graph execution error" not in str(caught.value)


def test_label_out_of_range(tmp_path, monkeypatch):
    folder = tmp_path / "labels"
    build_tfrecords.write_shards(_random_examples(16, 4, 0, label=9), str(folder), "train", 1)
    read_batches_only(monkeypatch)  # (test_undecodable_image: the same through the real steps)
    with pytest.raises(TrainingError, match="label out of range.*--num_classes"):
        _run_config(str(folder), tmp_path / "run", mode="train")


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(image_size=200), "--image_size must be a multiple of 16"),
        (dict(model="t2t_vit_15"), "Unknown --model"),
        (dict(mode="predict"), "--mode must be one of"),
        (
            dict(grad_clip=1.0, mixed_precision="float16"),
            "--grad_clip with --mixed_precision=float16",
        ),
        (dict(learning_rate=1e41), "--learning_rate must be a positive number below 1e38"),
        (dict(learning_rate=0.0), "--learning_rate must be a positive number"),
        (dict(ema_decay=1.5), r"--ema_decay must be in \[0, 1\)"),
        (dict(drop_path_rate=1.0), r"--drop_path_rate must be in \[0, 1\)"),
        (dict(grad_clip=-1.0), "--grad_clip must be a positive number"),
        (dict(weight_decay=-0.1), "--weight_decay must be >= 0"),
        (dict(layer_decay=0.0), r"--layer_decay must be in \(0, 1\]"),
        (dict(layer_decay=1.5), r"--layer_decay must be in \(0, 1\].*received 1.5"),
    ],
)
def test_bad_flags(tmp_path, overrides, match):
    with pytest.raises(TrainingError, match=match):
        resolve(Config(**{**tiny_config(str(tmp_path), tmp_path), **overrides}))


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    """train_imagenet.py's main, in this process (its command runs in the SIGTERM tests and
    test_embedded_default_learns): rc 2 and one line."""
    from training import train_imagenet

    flags = train_imagenet.FLAGS
    try:
        flags(_cli(["--epochs=2"], tmp_path / "run", tmp_path)[1:])
        code = train_imagenet.main([])
    finally:
        flags.unparse_flags()
    error = capsys.readouterr().err
    assert code == 2
    assert "error: No train TFRecords found" in error and "Traceback" not in error


PAPER = dict(  # the released weights' recipe (docs/training.md, "Training recipe")
    epochs=310,
    warmup_epochs=5,
    cooldown_epochs=10,
    warmup_lr=1e-6,
    min_lr=1e-5,
    drop_path_rate=0.1,
    ema_decay=0.99996,
)


def test_recipe_defaults():
    for model, lr, wd in [
        ("t2t_vit_14", 5e-4, 0.05),
        ("t2t_vit_t_24", 5e-4, 0.065),
        ("t2t_vit_12", 1e-3, 0.03),
    ]:
        values = recipe(model)
        assert values["learning_rate"] == lr and values["weight_decay"] == wd
        assert {k: values[k] for k in PAPER} == PAPER
        aug = values["aug"]
        assert (aug.randaugment_ops, aug.mixup_alpha, aug.cutmix_alpha) == (2, 0.8, 1.0)
        assert (aug.random_erasing, aug.label_smoothing, aug.crop_scale_min) == (0.25, 0.1, 0.08)
    config = resolve(Config(strategy="tpu"))
    assert config.mixed_precision == "bfloat16" and config.epochs == 310
    assert config.aug == data.Augmentation() and config.learning_rate == 5e-4


def test_finetune_recipe():
    config = resolve(Config(model="t2t_vit_7", recipe="finetune", epochs=12))
    assert config.epochs == 12  # what is given wins
    assert config.learning_rate < recipe("t2t_vit_7")["learning_rate"]
    assert config.warmup_epochs <= 1 and config.cooldown_epochs == 0
    aug = config.aug
    assert (aug.randaugment_ops, aug.mixup_alpha, aug.cutmix_alpha, aug.random_erasing) == (
        0,
        0.0,
        0.0,
        0.0,
    )
    assert aug.hflip and aug.label_smoothing == 0.1
    with pytest.raises(TrainingError, match="--recipe must be one of"):
        resolve(Config(recipe="cifar"))


def test_weight_decay_exclusions_layer_decay_and_gradient_checkpointing(tmp_path):
    """The official weight-decay groups with and without --layer_decay; with it, AdamW with
    torch's epsilon takes the multipliers (T2T-ViT-7: 8 layers); --gradient_checkpointing
    reaches the blocks."""
    fields = tiny_config(str(tmp_path), tmp_path, model="t2t_vit_7")  # built, not trained
    config = resolve(Config(**fields, gradient_checkpointing=True))
    model = trainer.build_model(config)
    assert model.get_layer("blocks_6").gradient_checkpointing is True
    for layer_decay in (None, 0.5):
        config = resolve(Config(**fields, layer_decay=layer_decay))
        optimizer, _ = optim.build_optimizer(config, 10, model)
        decayed = {v.path for v in model.trainable_variables if optimizer._use_weight_decay(v)}
        assert "blocks_0/attn/qkv/kernel" in decayed and "head/kernel" in decayed
        for path in ("blocks_0/attn/proj/bias", "blocks_0/norm1/gamma", "norm/beta"):
            assert path not in decayed
        assert "cls_token/token" not in decayed
        assert isinstance(optimizer, optim.AdamW)
        assert isinstance(optimizer, optim.LayerDecayAdamW) == (layer_decay is not None)
    multipliers = optimizer.lr_multipliers
    assert multipliers["head/kernel"] == 1.0 and multipliers["blocks_6/mlp/fc1/kernel"] == 0.5
    assert multipliers["blocks_0/attn/qkv/kernel"] == 0.5**7
    assert multipliers["tokens_to_token/project/kernel"] == 0.5**8


def test_schedule_warmup_cosine_cooldown(tmp_path):
    config = resolve(
        Config(
            **tiny_config(
                str(tmp_path),
                tmp_path,
                epochs=10,
                warmup_epochs=2,
                cooldown_epochs=3,
                learning_rate=1e-3,
                batch_size=512,
            )
        )
    )
    _, schedule = optim.build_optimizer(config, 100, trainer.build_model(config))
    assert float(schedule(0)) == pytest.approx(1e-6)
    assert float(schedule(200)) == pytest.approx(1e-3, rel=1e-4)  # peak after warmup
    assert float(schedule(700)) == pytest.approx(1e-5, rel=1e-3)  # cosine ends at min_lr
    assert float(schedule(999)) == pytest.approx(1e-5, rel=1e-3)  # cooldown


def test_build_tfrecords_from_folders(tmp_path):
    for name, count in (("cat", 2), ("dog", 3)):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(count):
            image = np.full((20, 30, 3), 40 * i, np.uint8)
            encode = tf.io.encode_png if i % 2 else tf.io.encode_jpeg
            suffix = "png" if i % 2 else "jpg"
            (tmp_path / "photos" / name / f"{i}.{suffix}").write_bytes(encode(image).numpy())
    (tmp_path / "photos" / "dog" / "notes.txt").write_text("not an image")
    out = tmp_path / "records"
    assert (
        build_tfrecords.main(
            ["--input_dir", str(tmp_path / "photos"), "--output_dir", str(out), "--num_shards", "2"]
        )
        == 0
    )
    assert (out / "labels.txt").read_text().split() == ["cat", "dog"]
    records = data._examples(data.list_files(str(out), "train"), None, False, None, 2, 1)
    labels = sorted(int(label) for _, label in records)
    assert labels == [0, 0, 1, 1, 1]
    assert (
        build_tfrecords.main(["--input_dir", str(tmp_path / "nothing"), "--output_dir", str(out)])
        == 2
    )


@pytest.mark.slow
def test_embedded_default_learns(tmp_path):
    """The README's first command: digits, T2T-ViT-7, a few minutes on 2 cores, >= 95% top-1.
    Its XLA programs optimized, as a user's are (RUN_XLA_FLAGS: it runs more than it compiles)."""
    env = dict(ENV, KERAS_T2T_CACHE=str(tmp_path / "cache"), XLA_FLAGS=RUN_XLA_FLAGS)
    result = subprocess.run(
        [sys.executable, str(TRAIN), f"--model_dir={tmp_path / 'run'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["examples"] == 359  # the held-out 20% of the 1,797 digits
    assert results["top1"] >= 0.95 and results["ema_top1"] >= 0.95


# --- reliability: corrupt checkpoints, another model, messages ------------------------------


def _corrupt(checkpoints, how):
    data = checkpoints / "ckpt-6.data-00000-of-00001"
    if how == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif how == "flipped_byte":
        content = bytearray(data.read_bytes())
        content[len(content) // 3] ^= 0xFF
        data.write_bytes(bytes(content))
    elif how == "truncated_index":
        index = checkpoints / "ckpt-6.index"
        index.write_bytes(index.read_bytes()[:40])
    elif how == "deleted_by_hand":  # the state file still names them
        for file in checkpoints.glob("ckpt-6.*"):
            file.unlink()
    elif how == "garbage_state_file":
        data.write_bytes(b"")
        (checkpoints / "checkpoint").write_text("garbage {{{")


def _count_steps_only(monkeypatch):
    """Train loops that only advance the step: for the tests of the loop around them
    (checkpoints, SIGTERM), which then need no gradient graph to be traced."""

    def build(self):
        def loop(iterator, steps):
            self.step.assign_add(tf.cast(steps, tf.int64))

        return loop

    monkeypatch.setattr(trainer.Trainer, "_build_train_loop", build)


@pytest.mark.parametrize(
    "how", ["truncated", "flipped_byte", "truncated_index", "deleted_by_hand", "garbage_state_file"]
)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(
    tiny_records, two_checkpoints, tmp_path, how, caplog, monkeypatch
):
    _count_steps_only(monkeypatch)
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    checkpoints = tmp_path / "checkpoints"
    before = {p.name: p.read_bytes() for p in checkpoints.glob("ckpt-6.*")}
    _corrupt(checkpoints, how)
    corrupted = {p.name: p.read_bytes() for p in checkpoints.glob("ckpt-6.*")}
    caplog.set_level("INFO", logger="keras_t2t.training")
    _run_config(tiny_records, tmp_path, mode="train", epochs=3)
    assert re.search(
        r"Resumed from \S+ckpt-3 at step 3 \(the 1 newer could not be read\)", caplog.text
    )
    if how == "deleted_by_hand":
        assert re.search(r"names \S+ckpt-6, whose files are missing", caplog.text)
    else:
        assert re.search(
            r"checkpoint \S+ckpt-6 cannot be read .* kept as \S+corrupt-ckpt-6", caplog.text
        )
        kept = {p.name[8:]: p.read_bytes() for p in checkpoints.glob("corrupt-ckpt-6.*")}
        assert kept == corrupted and kept != before  # renamed aside, never deleted or overwritten
    assert _latest_step(tmp_path) == 9  # it trained to the end
    assert sorted(p.name for p in checkpoints.glob("ckpt-*.index")) == [
        "ckpt-3.index",
        "ckpt-6.index",
        "ckpt-9.index",
    ]


def test_no_readable_checkpoint_starts_anew(
    tiny_records, two_checkpoints, tmp_path, caplog, monkeypatch
):
    _count_steps_only(monkeypatch)
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    for name in ("ckpt-3", "ckpt-6"):
        (tmp_path / "checkpoints" / f"{name}.data-00000-of-00001").write_bytes(b"")
    caplog.set_level("INFO", logger="keras_t2t.training")
    _run_config(tiny_records, tmp_path, mode="train", epochs=1, warmup_epochs=0)
    assert "could be read: starting from scratch" in caplog.text
    assert _latest_step(tmp_path) == 3
    for name in ("corrupt-ckpt-3.index", "corrupt-ckpt-6.index", "corrupt-checkpoint"):
        assert (tmp_path / "checkpoints" / name).exists()


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _unavailable(path):
    return tf.errors.UnavailableError(None, None, f"simulated: 503 reading {path}")


@pytest.mark.parametrize(
    "error,kind",
    [
        (tf.errors.DataLossError(None, None, "corrupted record at 12"), "corrupt"),
        (IndexError("Read less bytes than requested"), "corrupt"),  # truncated (OUT_OF_RANGE)
        # What TF's checkpoint reader raises for bad bytes: an OpError (UNKNOWN) that says so.
        (
            tf.errors.OpError(
                None,
                None,
                "TensorBundle at r/ckpt-6 shard 0 (360000 bytes): "
                "Checksum does not match: stored 4044512794 vs. calculated",
                2,
            ),
            "corrupt",
        ),
        (
            tf.errors.OpError(
                None,
                None,
                "Unable to read file (r/ckpt-6.index). Perhaps the file "
                "is corrupt (failed to seek): block checksum mismatch",
                2,
            ),
            "corrupt",
        ),
        (
            tf.errors.OpError(
                None,
                None,
                "/runs/503_timeout/checkpoints/ckpt-6.data-00000-of-00001"
                "; No such file or directory",
                2,
            ),
            "corrupt",
        ),  # the path tells nothing
        (tf.errors.UnavailableError(None, None, "503"), "transient"),
        (tf.errors.DeadlineExceededError(None, None, "deadline"), "transient"),
        (tf.errors.ResourceExhaustedError(None, None, "429 rate limit"), "transient"),
        (tf.errors.AbortedError(None, None, "aborted"), "transient"),
        (
            tf.errors.OpError(
                None, None, "Error executing an HTTP request: HTTP response code 503", 2
            ),
            "transient",
        ),
        (tf.errors.OpError(None, None, "something never seen before", 2), "transient"),
        (tf.errors.PermissionDeniedError(None, None, "denied"), "fatal"),
        (PermissionError(13, "Permission denied"), "fatal"),
        # The reader calls every failed open "DataLoss: Unable to open table file", whatever
        # the cause.
        (
            tf.errors.DataLossError(
                None,
                None,
                "Unable to open table file gs://b/r/ckpt-6: PERMISSION_DENIED: Permission denied",
            ),
            "fatal",
        ),
    ],
)
def test_checkpoint_read_errors_are_classified(error, kind):
    path = "/runs/503_timeout/checkpoints/ckpt-6"
    assert checkpoints_lib.classify_checkpoint_error(error, path) == kind


def test_a_storage_error_while_restoring_sets_nothing_aside(
    tiny_records, two_checkpoints, tmp_path, monkeypatch, capsys, caplog
):
    """A transient error is tried again, then stops the run (rc 2) with every file kept; a
    permission error stops it at once; only a corrupt checkpoint is set aside."""
    from training import train_imagenet

    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    waits = []
    monkeypatch.setattr(checkpoints_lib, "RESTORE_RETRY_DELAYS", (0.25, 0.5, 1.0))
    monkeypatch.setattr(checkpoints_lib, "_sleep", waits.append)
    real_verify, calls, failures = checkpoints_lib.verify_checkpoint, [], {}

    def flaky(path):  # the fault each checkpoint gets, from `failures`: [error, times left]
        calls.append(os.path.basename(path))
        error, times = failures.get(os.path.basename(path), (None, 0))
        if times:
            failures[os.path.basename(path)][1] -= 1
            raise error
        real_verify(path)

    monkeypatch.setattr(checkpoints_lib, "verify_checkpoint", flaky)
    before = _files(tmp_path)
    # Storage unavailable for good: the command line stops with a message, all kept.
    failures["ckpt-6"] = [_unavailable("ckpt-6"), 99]
    flags = train_imagenet.FLAGS
    try:
        flags(
            [
                "train_imagenet.py",
                f"--data_dir={tiny_records}",
                f"--model_dir={tmp_path}",
                f"--model={TRAIN_MODEL}",
                "--image_size=32",
                "--num_classes=4",
                "--batch_size=8",
                "--steps_per_epoch=3",
                "--eval_batch_size=8",
                "--nojit_compile",
                "--epochs=1",
                "--warmup_epochs=0",
                "--mode=train",
            ]
        )
        assert train_imagenet.main([]) == 2
    finally:
        flags.unparse_flags()
    error = capsys.readouterr().err
    assert re.search(
        r"error: Reading the checkpoint \S+ckpt-6 failed 4 times \(UnavailableError: simulated: "
        r"503 .*not a corrupt checkpoint: no checkpoint was renamed or deleted, and config.json "
        r"is unchanged",
        error,
    ), error
    assert calls == ["ckpt-6"] * 4 and waits == [0.25, 0.5, 1.0]
    assert _files(tmp_path) == before  # nothing renamed, rewritten or trained from scratch

    # Permission denied: no retry.
    run = trainer.Trainer(
        Config(**tiny_config(tiny_records, tmp_path), aug=data.Augmentation.none())
    )
    calls.clear()
    failures["ckpt-6"] = [tf.errors.PermissionDeniedError(None, None, "403 Forbidden"), 1]
    with pytest.raises(TrainingError, match=r"read the checkpoint \S+ckpt-6: permission"):
        run.restore()
    assert calls == ["ckpt-6"] and _files(tmp_path) == before

    # Unavailable twice, then the storage answers: resumed from the newest.
    calls.clear()
    failures["ckpt-6"] = [_unavailable("ckpt-6"), 2]
    caplog.set_level("INFO", logger="keras_t2t.training")
    assert run.restore().endswith("ckpt-6") and int(run.step.numpy()) == 6
    assert calls == ["ckpt-6"] * 3 and "trying again in 0.5 s" in caplog.text
    assert _files(tmp_path) == before

    # The newest corrupt, the previous unreachable: only the corrupt one is set aside.
    calls.clear()
    failures["ckpt-6"] = [tf.errors.DataLossError(None, None, "checksum does not match"), 1]
    failures["ckpt-3"] = [_unavailable("ckpt-3"), 99]
    with pytest.raises(TrainingError, match=r"only the corrupt ckpt-6 was set aside"):
        run.restore()
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("corrupt-*")) == [
        "corrupt-ckpt-6.data-00000-of-00001",
        "corrupt-ckpt-6.index",
    ]
    after = _files(tmp_path)
    assert {k: v for k, v in after.items() if "ckpt-6" not in k} == {
        k: v for k, v in before.items() if "ckpt-6" not in k
    }  # ckpt-3 and the state file as they were


def test_another_model_in_the_same_model_dir_is_refused_first(
    tiny_records, two_checkpoints, tmp_path
):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    record = (tmp_path / "config.json").read_text()
    with pytest.raises(
        TrainingError,
        match=rf"checkpoints of another model \(--model={TRAIN_MODEL}\); this run asks for "
        r"--model=t2t_vit_10\. Use another --model_dir",
    ):
        _run_config(tiny_records, tmp_path, mode="train", model="t2t_vit_10")
    with pytest.raises(TrainingError, match=r"--num_classes=4.*--num_classes=5"):
        _run_config(tiny_records, tmp_path, mode="train", num_classes=5)
    with pytest.raises(
        TrainingError,
        match=r"a run with --recipe=imagenet; this run asks for --recipe=finetune\. A run resumes "
        r"with its own recipe: pass --recipe=imagenet to resume",
    ):
        _run_config(tiny_records, tmp_path, mode="train", recipe="finetune")
    assert (tmp_path / "config.json").read_text() == record  # the run's record is kept


def test_a_resumed_run_keeps_the_weights_it_started_from(tiny_records, two_checkpoints, tmp_path):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    record = json.loads((tmp_path / "config.json").read_text())
    record["weights"] = "cifar10"  # as a run fine-tuned from a release records it
    (tmp_path / "config.json").write_text(json.dumps(record))
    run = trainer.Trainer(  # resumed without --weights (a resume needs none)
        Config(**tiny_config(tiny_records, tmp_path), aug=data.Augmentation.none())
    )
    assert run._resume().endswith("ckpt-6")
    assert json.loads((tmp_path / "config.json").read_text())["weights"] == "cifar10"
    run.export_weights()
    again = json.loads((tmp_path / "config.json").read_text())
    assert again["weights"] == "cifar10" and again["saved_weights"]["step"] == 6


def test_a_checkpoint_that_does_not_fit_is_not_taken_for_corrupt(
    tiny_records, two_checkpoints, tmp_path
):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").unlink()  # no record to compare with: the restore tells
    with pytest.raises(TrainingError, match=r"ckpt-6 does not fit this run"):
        _run_config(tiny_records, tmp_path, mode="train", image_size=48)
    assert (tmp_path / "checkpoints" / "ckpt-6.index").exists()
    assert not list((tmp_path / "checkpoints").glob("corrupt-*"))
    # The failed run wrote no record, so the right flags are then taken (not refused as
    # "another model": the record would name the wrong run's --image_size=48).
    assert not (tmp_path / "config.json").exists()
    run = trainer.Trainer(
        Config(**tiny_config(tiny_records, tmp_path), aug=data.Augmentation.none())
    )
    assert run._resume().endswith("ckpt-6")
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == 32


def test_missing_tensorboard_is_reported_at_start(tiny_records, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(TrainingError, match=r"tensorboard.*pip install keras-t2t\[train\]"):
        _run_config(tiny_records, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_a_model_dir_that_cannot_be_created(tiny_records, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainingError, match=r"Cannot create --model_dir .*file/run"):
        _run_config(tiny_records, tmp_path / "file" / "run")


def test_nan_without_any_checkpoint_says_so(tiny_records, tmp_path, monkeypatch):
    """(A real divergence: test_nan_loss_stops_and_keeps_the_last_good_checkpoint.)"""

    def diverging(self):  # the first loop's loss is NaN
        def loop(iterator, steps):
            self.step.assign_add(tf.cast(steps, tf.int64))
            self.loss_sum.assign_add(float("nan"))

        return loop

    monkeypatch.setattr(trainer.Trainer, "_build_train_loop", diverging)
    with pytest.raises(TrainingError, match="diverged.*no checkpoint had been saved yet"):
        _run_config(tiny_records, tmp_path, mode="train", learning_rate=1e30, warmup_epochs=0)
    assert not (tmp_path / "checkpoints" / "checkpoint").exists()


# --- reliability: shards, bad records, builds ----------------------------------------------


def _rewrite(path, records):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


def test_a_shard_truncated_at_a_record_boundary_is_found_by_the_manifest(tmp_path):
    build_tfrecords.write_shards(_random_examples(16, 4, 0), str(tmp_path), "train", 2, "abcd")
    shard = tmp_path / "train-00001-of-00002"
    records = list(tf.data.TFRecordDataset(str(shard)).as_numpy_iterator())
    _rewrite(shard, records[:4])  # 4 of its 8 records, cut cleanly: a reader sees no error
    files = data.list_files(str(tmp_path), "train")
    with pytest.raises(data.DataError, match=r"train-00001-of-00002 is \d+ bytes, the manifest"):
        data.check_shards(files, "train", 4)
    (tmp_path / "train-00001-of-00002").unlink()
    with pytest.raises(data.DataError, match=r"1 listed shards are missing \(train-00001"):
        data.check_shards(data.list_files(str(tmp_path), "train"), "train", 4)
    with pytest.raises(data.DataError, match=r"lists 4 classes, more than --num_classes=3"):
        build_tfrecords.write_shards(_random_examples(8, 4, 0), str(tmp_path), "train", 1, "abcd")
        data.check_shards(data.list_files(str(tmp_path), "train"), "train", 3)


def test_imagenet_layout_without_manifest_must_hold_imagenet_totals(tmp_path):
    record = next(_random_examples(1, 1, 0))
    for i in range(128):
        _rewrite(tmp_path / f"validation-{i:05d}-of-00128", [record] * (3 if i != 7 else 1))
    files = data.list_files(str(tmp_path), "validation")
    with pytest.raises(
        data.DataError,
        match=r"128 validation shards look like ImageNet's, but hold 382 records instead of "
        r"50,000; .*typical 3: validation-00007-of-00128 \(1\)",
    ):
        data.check_shards(files, "validation", 1000)
    assert sum(data.check_shards(files, "validation", 10).values()) == 382  # not ImageNet


def test_header_walk_counts_and_names_a_shard_cut_inside_a_record(tmp_path):
    build_tfrecords.write_shards(_random_examples(12, 4, 0), str(tmp_path), "train", 3)
    (tmp_path / "manifest-train.json").unlink()
    shard = tmp_path / "train-00002-of-00003"
    content = shard.read_bytes()
    shard.write_bytes(content[: len(content) - 100])
    files = data.list_files(str(tmp_path), "train")
    assert data.walk_records(files[0]) == (4, None)
    count, problem = data.walk_records(files[2])
    assert count == 3 and "ends inside record 3" in problem
    with pytest.raises(
        data.DataError, match=r"train-00002-of-00003: the file ends inside record 3"
    ):
        data.check_shards(files, "train", 4)
    cache = tmp_path / "counts.json"
    counts = data.check_shards(files, "train", 4, skip_bad_records=True, cache=str(cache))
    assert list(counts.values()) == [4, 4, 3]
    cached = json.loads(cache.read_text())
    assert cached[files[2]][2:] == [3, problem]
    cached[files[0]][2] = 99  # a cached entry is used while the file's size and time match
    cache.write_text(json.dumps(cached))
    counts = data.check_shards(files, "train", 4, skip_bad_records=True, cache=str(cache))
    assert list(counts.values()) == [99, 4, 3]


def _flip_inside_record(shard, record_index):
    records = list(tf.data.TFRecordDataset(str(shard)).as_numpy_iterator())
    offset = sum(16 + len(r) for r in records[:record_index]) + 12 + len(records[record_index]) // 2
    content = bytearray(shard.read_bytes())
    content[offset] ^= 0xFF
    shard.write_bytes(bytes(content))


@pytest.fixture
def bad_records(tmp_path):
    """Train shards with an undecodable image (record 2 of shard 0) and a corrupt record
    (record 5 of shard 1), and clean validation shards."""
    folder = tmp_path / "bad_records"
    examples = list(_random_examples(32, 4, 0))
    examples[4] = build_tfrecords.make_example(b"not a jpeg", 1, "1", "broken.jpg", 4, 4)
    build_tfrecords.write_shards(iter(examples), str(folder), "train", 2)
    _flip_inside_record(folder / "train-00001-of-00002", 5)
    (folder / "manifest-train.json").unlink()  # the flip keeps the size; no manifest to tell
    build_tfrecords.write_shards(_random_examples(8, 4, 1), str(folder), "validation", 1)
    return str(folder)


def test_a_bad_record_is_named(bad_records, tmp_path, monkeypatch):
    read_batches_only(monkeypatch)  # (test_undecodable_image: the same through the real steps)
    with pytest.raises(
        TrainingError,
        match=r"The bad record: number (2 of \S+train-00000-of-00002 \(image/filename "
        r"'broken.jpg'\), which cannot be parsed or decoded|5 of \S+train-00001-of-00002, "
        r"which cannot be read)",
    ):
        _run_config(bad_records, tmp_path / "run", mode="train")
    counts = data.check_shards(data.list_files(bad_records, "train"), "train")
    found = data.find_bad_record(list(counts), counts)
    assert found[:3] in [
        (f"{bad_records}/train-00000-of-00002", 2, "broken.jpg"),
        (f"{bad_records}/train-00001-of-00002", 5, ""),
    ]


def test_skip_bad_records_skips_counts_and_names_them(bad_records, tmp_path, capfd, monkeypatch):
    files = data.list_files(bad_records, "train")
    counts = data.check_shards(files, "train", 4)
    records = list(data._examples(files, None, False, None, 4, 1, skip_bad_records=counts))
    assert len(records) == 32 - 1 - 11  # the broken image; record 5 of shard 1 and the 10 after
    log = capfd.readouterr().err
    assert re.search(
        r"skipped record 2 of \S*train-00000-of-00002 \(image/filename broken.jpg\)", log
    )
    assert re.search(r"skipped record 5 of \S*train-00001-of-00002\S* - \S*cannot be read", log)
    assert "2 skipped in this pass over the data" in log
    read_batches_only(monkeypatch)  # the training pipeline gets past them
    results = _run_config(bad_records, tmp_path / "run", skip_bad_records=True)
    assert results["step"] == 6 and results["examples"] == 8


def _photo_folder(root, classes=("cat", "dog"), count=3):
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = np.full((20, 30, 3), 40 * i, np.uint8)
            (root / name / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
    return root


def _build(capsys, *args):
    """build_tfrecords.py's main in this process: (return code, stderr). (Its command runs in
    test_embedded_default_learns, which builds the digits' TFRecords.)"""
    code = build_tfrecords.main(list(args))
    return code, capsys.readouterr().err


def test_build_tfrecords_writes_all_or_nothing(tmp_path, capsys):
    photos = _photo_folder(tmp_path / "photos")
    jpeg = (photos / "dog" / "1.jpg").read_bytes()
    (photos / "dog" / "1.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    out = tmp_path / "records"
    code, err = _build(capsys, f"--input_dir={photos}", f"--output_dir={out}", "--num_shards=2")
    assert code == 2 and "Traceback" not in err
    assert re.search(r"dog/1\.jpg' is not a readable image.*Nothing was written", err)
    assert list(out.iterdir()) == []  # no shard, no staging folder


def test_a_rebuild_replaces_the_old_shards(tmp_path, capsys):
    photos = _photo_folder(tmp_path / "photos")
    out = tmp_path / "records"
    assert _build(capsys, f"--input_dir={photos}", f"--output_dir={out}", "--num_shards=3")[0] == 0
    assert (
        _build(
            capsys,
            f"--input_dir={photos}",
            f"--output_dir={out}",
            "--split=validation",
            "--num_shards=1",
        )[0]
        == 0
    )
    assert _build(capsys, f"--input_dir={photos}", f"--output_dir={out}", "--num_shards=2")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "labels.txt",
        "manifest-train.json",
        "manifest-validation.json",
        "train-00000-of-00002",
        "train-00001-of-00002",
        "validation-00000-of-00001",
    ]
    assert sum(data.check_shards(data.list_files(str(out), "train"), "train", 2).values()) == 6


def test_build_tfrecords_warns_and_names_bad_names(tmp_path, capsys):
    photos = _photo_folder(tmp_path / "photos")
    (photos / "empty").mkdir()
    _photo_folder(photos / "cat" / "more", classes=("nested",))
    code, err = _build(
        capsys, f"--input_dir={photos}", f"--output_dir={tmp_path / 'out'}", "--num_shards=1"
    )
    assert code == 0, err
    assert re.search(r"warning: the class folder \S+empty holds no images", err)
    assert re.search(r"warning: \S+cat has subfolders \(more\) whose images are not read", err)
    latin1 = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name, not UTF-8
    (photos / "dog" / "0.jpg").rename(photos / "dog" / latin1)
    code, err = _build(capsys, f"--input_dir={photos}", f"--output_dir={tmp_path / 'out2'}")
    assert code == 2 and "Traceback" not in err
    assert "caf\\xe9.jpg' has a name that is not UTF-8" in err
    assert not (tmp_path / "out2").exists() or not list((tmp_path / "out2").iterdir())


def test_ema_warms_up():
    """A short run's EMA follows the weights: 0.99996 alone would still hold the initial ones."""
    import keras

    weight = keras.Variable(0.0)  # as the model's weights
    ema = optim.ExponentialMovingAverage([weight], decay=0.99996)
    weight.assign(1.0)
    for step in range(100):
        ema.update(tf.constant(step, tf.int64))
    assert float(ema.averages[0].numpy()) > 0.9  # without the warm-up: 1 - 0.99996**100 = 0.004
    assert float(ema.decay_at(0)) == pytest.approx(0.1)
    assert float(ema.decay_at(10**6)) == pytest.approx(0.99996)


def test_a_run_leaves_weights_that_export_and_evaluate(tiny_records, two_checkpoints, tmp_path):
    """The model_dir is what export.py, evaluate_imagenet.py and the builders take."""
    import keras_t2t
    from training import evaluate_imagenet

    run = two_checkpoints  # train_and_eval, 2 epochs
    results = json.loads((run.parent / "results.json").read_text())
    assert results["step"] == 6
    record = json.loads((run / "config.json").read_text())["saved_weights"]
    best = "ema" if results["ema_top1"] > results["top1"] else "raw"
    assert record["best"] == best and record["step"] == 6
    assert (run / "model.weights.h5").exists() and (run / "model_ema.weights.h5").exists()
    # The evaluation script on the run's best weights scores what the run scored.
    again = evaluate_imagenet.evaluate(str(run), tiny_records, batch_size=8)
    assert again["top1"] == pytest.approx(results["ema_top1" if best == "ema" else "top1"])
    assert again["examples"] == results["examples"]
    # The export script takes the model_dir alone: variant, size and classes from the run.
    # (Its main in this process: test_export.py runs it as a command.)
    args = [f"--weights={run}", f"--output={tmp_path / 'exports'}", "--format=saved_model"]
    assert export_cli().main(args) == 0
    model = keras_t2t.create_model(TRAIN_MODEL, input_shape=(32, 32, 3), weights=str(run))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    loaded = tf.saved_model.load(str(tmp_path / "exports" / TRAIN_MODEL / "1"))
    served = loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"]
    np.testing.assert_allclose(served.numpy(), model.predict(images, verbose=0), atol=1e-5)
    # A run that never finished is refused with a message.
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text(json.dumps({"model": "t2t_vit_7"}))
    with pytest.raises(ValueError, match="training run without a finished model"):
        keras_t2t.T2TViT7(weights=str(tmp_path / "unfinished"))


def test_flags_take_their_defaults_from_the_recipe(tmp_path):
    from training import train_imagenet

    flags = train_imagenet.FLAGS
    try:
        flags(
            [
                "train_imagenet.py",
                f"--data_dir={tmp_path}",
                "--recipe=finetune",
                "--mixup=0.2",
                "--model=t2t_vit_7",
                "--epochs=7",
                "--layer_decay=0.75",
                "--gradient_checkpointing",
            ]
        )
        config = resolve(train_imagenet.config_from_flags())
    finally:
        flags.unparse_flags()
    finetune = recipe("t2t_vit_7", "finetune")
    assert config.recipe == "finetune" and config.epochs == 7
    assert config.layer_decay == 0.75 and config.gradient_checkpointing is True
    assert Config().layer_decay is None and Config().gradient_checkpointing is False  # off
    assert config.learning_rate == finetune["learning_rate"]
    assert config.aug.mixup_alpha == 0.2 and config.aug.randaugment_ops == 0
    assert config.aug.cutmix_alpha == finetune["aug"].cutmix_alpha
    defaults = Config()
    assert (config.batch_size, config.image_size) == (defaults.batch_size, defaults.image_size)


def test_only_input_pipeline_errors_become_bad_data(tiny_records, tmp_path, monkeypatch):
    """An InvalidArgumentError from the model's side (an XLA or TPU compilation failure, a
    shape error) keeps its type and message: it is not blamed on the TFRecords."""
    failure = tf.errors.InvalidArgumentError(
        None, None, "XLA compilation failed: Unsupported op in the cluster [Op:train_loop]"
    )

    def failing_loop(self):
        def loop(iterator, steps):
            raise failure

        return loop

    def failing_evaluation(model, dataset, strategy, **kwargs):
        raise failure

    with monkeypatch.context() as patch:
        _count_steps_only(patch)  # (the steps are no part of it)
        patch.setattr(evaluation, "evaluate_model", failing_evaluation)
        with pytest.raises(tf.errors.InvalidArgumentError, match="XLA compilation failed"):
            _run_config(tiny_records, tmp_path / "run_eval", epochs=1, warmup_epochs=0)
    monkeypatch.setattr(trainer.Trainer, "_build_train_loop", failing_loop)
    with pytest.raises(tf.errors.InvalidArgumentError, match="XLA compilation failed"):
        _run_config(tiny_records, tmp_path / "run", mode="train")
    # What the input pipeline raises still becomes a one-line "Bad data" message.
    assert is_data_error(tf.errors.DataLossError(None, None, "corrupted record at 12"))
    decoding = "Unknown image file format\n [[while/body/_1/while/IteratorGetNext]]"
    assert is_data_error(tf.errors.InvalidArgumentError(None, None, decoding))
    assert not is_data_error(failure)


def test_checkpoint_every_steps_and_a_failed_save_after_sigterm(
    tiny_records, tmp_path, caplog, monkeypatch
):
    # Between the ends of epochs too (#10, item 10): every 2 steps here, in loops of 1.
    _count_steps_only(monkeypatch)
    config = Config(
        **tiny_config(
            tiny_records,
            tmp_path,
            mode="train",
            epochs=1,
            warmup_epochs=0,
            steps_per_epoch=7,
            steps_per_loop=1,
            checkpoint_every="2",
        ),
        aug=data.Augmentation.none(),
    )
    run = trainer.Trainer(config)
    caplog.set_level("INFO", logger="keras_t2t.training")
    run.run()
    saved = re.findall(r"Saved checkpoint \S+ckpt-(\d+)\.", caplog.text)
    assert saved == ["2", "4", "6", "7"]  # 7: the end of the epoch

    # A save after SIGTERM whose storage (or peer) is gone keeps the last good checkpoint.
    def unavailable(*args, **kwargs):
        raise tf.errors.UnavailableError(None, None, "Socket closed")

    run.manager.save = unavailable
    run.step.assign(9)
    run._save_when_preempted(9)
    assert _latest_step(tmp_path) == 7
    assert re.search(
        r"checkpoint at step 9 could not be saved \(UnavailableError: Socket closed\); the last "
        r"good one, \S+ckpt-7, is kept",
        caplog.text,
    )


@pytest.mark.parametrize("during", ["evaluation", "export"])
def test_sigterm_during_an_evaluation_stops_at_once(tiny_records, tmp_path, monkeypatch, during):
    """SIGTERM in an evaluation (between its batches) or in the export after it stops the run
    there: the checkpoint of the epoch is saved before the evaluation, so nothing is trained
    after it. (The steps and the evaluation step are stand-ins: only the loop is tested.)"""
    run = None
    evaluated = []

    def sigterm():
        assert signal.getsignal(signal.SIGTERM) == run._on_sigterm  # (never the test's own)
        os.kill(os.getpid(), signal.SIGTERM)

    def fake_eval_step(model, strategy):
        def step(images, labels, mask):
            evaluated.append(int(run.step.numpy()))
            if during == "evaluation" and len(evaluated) == 1:
                sigterm()
            return tf.stack([0.0, 0.0, 0.0, tf.reduce_sum(mask)])

        return step

    export = trainer.Trainer.export_weights

    def export_then_sigterm(self, results=None):
        export(self, results)
        if during == "export":
            sigterm()

    _count_steps_only(monkeypatch)
    monkeypatch.setattr(evaluation, "make_eval_step", fake_eval_step)
    monkeypatch.setattr(trainer.Trainer, "export_weights", export_then_sigterm)
    config = tiny_config(
        tiny_records, tmp_path, epochs=3, warmup_epochs=0, steps_per_epoch=2, checkpoint_every="0"
    )
    run = trainer.Trainer(Config(**config, aug=data.Augmentation.none()))
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 2;"):
        run.run()
    assert _latest_step(tmp_path) == 2 and int(run.step.numpy()) == 2
    # 3 batches a pass: SIGTERM in the evaluation ends it at the next batch; in the export
    # the evaluation (raw and EMA) was over.
    assert evaluated == ([2] if during == "evaluation" else [2] * 6)
    assert (tmp_path / "model.weights.h5").exists() == (during == "export")
    assert signal.getsignal(signal.SIGTERM) is not run._on_sigterm  # the handler is put back


@pytest.mark.parametrize("value", ["ten", "-2", "5s", "m", ""])
def test_checkpoint_every_is_checked(value):
    with pytest.raises(TrainingError, match="--checkpoint_every must be minutes"):
        checkpoint_interval(value)


def test_checkpoint_every_forms():
    assert checkpoint_interval("10m") == (10.0, None)
    assert checkpoint_interval("2000") == (None, 2000)
    assert checkpoint_interval("0") == (None, None)


def test_a_tpu_pod_refuses_paths_on_the_local_disk(tmp_path):
    pod = types.SimpleNamespace(extended=types.SimpleNamespace(num_hosts=4))
    config = Config(strategy="tpu", data_dir=str(tmp_path), model_dir="gs://b/run")
    with pytest.raises(TrainingError, match=r"4 hosts.*--data_dir=\S+ is on this machine"):
        distribute.check_pod_paths(config, pod)
    config.model_dir = str(tmp_path / "run")
    with pytest.raises(TrainingError, match="--data_dir=.* and --model_dir=.*gs://"):
        distribute.check_pod_paths(config, pod)
    config.data_dir, config.model_dir = "gs://b/imagenet", "gs://b/run"
    distribute.check_pod_paths(config, pod)  # accepted
    # One host (a single TPU VM, --tpu=local) reads its own disk.
    config.data_dir = str(tmp_path)
    distribute.check_pod_paths(config, types.SimpleNamespace(extended=types.SimpleNamespace()))


@pytest.mark.parametrize(
    "script,args,match",
    [
        ("embedded", ["--image_size=0"], "--image_size must be a multiple of 16"),
        ("train", ["--eval_every_epochs=0"], "--eval_every_epochs must be >= 1, received 0"),
        ("train", ["--crop_pct=0"], r"--crop_pct must be in \(0, 1\], received 0.0"),
        ("train", ["--crop_pct=5"], r"--crop_pct must be in \(0, 1\], received 5.0"),
        ("train", ["--crop_scale_min=0"], r"--crop_scale_min must be in \(0, 1\]"),
        ("train", ["--mixup=-1"], "--mixup must be >= 0"),
        ("train", ["--cutmix=-0.5"], "--cutmix must be >= 0"),
        ("train", ["--label_smoothing=1.5"], r"--label_smoothing must be in \[0, 1\)"),
        ("train", ["--randaugment_magnitude=50"], r"--randaugment_magnitude must be in \[0, 10\]"),
        ("train", ["--random_erasing=2"], r"--random_erasing must be in \[0, 1\]"),
        ("train", ["--min_lr=1"], r"--min_lr=1.0 is above the peak learning rate"),
        ("train", ["--steps_per_epoch=0"], r"--steps_per_epoch must be >= 1 \(or unset\)"),
        ("train", ["--eval_batch_size=0"], r"--eval_batch_size must be >= 1 \(or unset\)"),
        ("evaluate", ["--batch_size=0"], "--batch_size must be >= 1, received 0"),
        ("evaluate", ["--crop_pct=0"], r"--crop_pct must be in \(0, 1\], received 0.0"),
    ],
)
def test_flag_values_are_checked_first(tmp_path, monkeypatch, capsys, script, args, match):
    """Each is refused with rc 2 and one line, before any data is read or built (the
    embedded digits included) and before the model_dir is made."""
    from training import evaluate_imagenet, train_imagenet

    monkeypatch.setenv("KERAS_T2T_CACHE", str(tmp_path / "cache"))
    if script == "evaluate":
        code = evaluate_imagenet.main([f"--weights={tmp_path}", f"--data_dir={tmp_path}", *args])
    else:
        data_dir = [f"--data_dir={tmp_path}"] if script == "train" else []
        flags = train_imagenet.FLAGS
        try:
            flags(["train_imagenet.py", *data_dir, f"--model_dir={tmp_path}/run", *args])
            code = train_imagenet.main([])
        finally:
            flags.unparse_flags()
    assert code == 2
    assert re.search(f"error: {match}", capsys.readouterr().err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_resume_without_the_weights_that_set_the_normalization_is_refused(tmp_path):
    """A run fine-tuned from a release normalizes with that release's mean and std, which the
    model is built with and no checkpoint holds: resuming without --weights would change it."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-4.index").write_bytes(b"")
    config = dict(model="t2t_vit_14", image_size=224, num_classes=10, model_dir=str(tmp_path))
    record = json.loads(Config(**config, weights="cifar10").to_json())
    (tmp_path / "config.json").write_text(json.dumps(record))
    checkpoints = str(tmp_path / "checkpoints")
    with pytest.raises(TrainingError, match=r"started from --weights=cifar10.*Pass"):
        checkpoints_lib.check_compatible(Config(**config), checkpoints)
    assert json.loads((tmp_path / "config.json").read_text()) == record
    assert checkpoints_lib.check_compatible(Config(**config, weights="cifar10"), checkpoints)
    # A release normalized as ImageNet (and any file) resumes without --weights.
    record["weights"] = "imagenet"
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert checkpoints_lib.check_compatible(Config(**config), checkpoints)
