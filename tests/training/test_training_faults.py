"""Faults while a run goes on, and the messages they give (red team 2026-12: F9, F10, F19):
a shard deleted mid-run, a full disk, a label out of range; and the messages of
evaluate_imagenet.py --output and build_tfrecords.py. The train steps are stand-ins (no
gradient graph is traced): only what happens around them is tested."""

import errno
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from conftest import read_batches_only

from training import build_tfrecords, data, trainer
from training.config import Config
from training.errors import (
    TrainingError,
    data_error_message,
    is_data_error,
    is_disk_full,
    unreadable_data_message,
)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """4 classes, 32 training JPEGs in 2 shards (ImageNet layout, labels 1..4)."""
    folder = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(0)

    def example(i):
        jpeg = build_tfrecords.to_jpeg(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8))
        return build_tfrecords.make_example(jpeg, 1 + i % 4, str(1 + i % 4), f"{i}.jpg", 40, 36)

    examples = (example(i) for i in range(32))
    build_tfrecords.write_shards(examples, str(folder), "train", 2)
    return folder


def _train(records, model_dir, capsys, *args):
    """train_imagenet.py's main, in this process: (return code, stderr)."""
    from training import train_imagenet

    flags = train_imagenet.FLAGS
    try:
        flags(
            [
                "train_imagenet.py",
                f"--data_dir={records}",
                f"--model_dir={model_dir}",
                "--model=t2t_vit_7",
                "--image_size=32",
                "--num_classes=4",
                "--batch_size=8",
                "--warmup_epochs=0",
                "--steps_per_epoch=2",
                "--steps_per_loop=2",
                "--mode=train",
                "--recipe=finetune",
                "--nojit_compile",
                "--checkpoint_every=0",
                *args,
            ]
        )
        code = train_imagenet.main([])
    finally:
        flags.unparse_flags()
    return code, capsys.readouterr().err


def _count_steps_only(monkeypatch):
    """Train loops that only advance the step (they read no data)."""

    def build(self):
        def loop(iterator, steps):
            self.step.assign_add(tf.cast(steps, tf.int64))

        return loop

    monkeypatch.setattr(trainer.Trainer, "_build_train_loop", build)


def _checkpoints(model_dir):
    return sorted(os.listdir(os.path.join(model_dir, "checkpoints")))


CKPT_2 = ["checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index"]


# --- F9: a shard deleted while the run goes on ----------------------------------------------


def test_a_shard_deleted_during_the_run_is_a_clear_error(records, tmp_path, monkeypatch, capsys):
    """TF's NotFoundError from IteratorGetNext (a shard deleted after the files were checked)
    becomes one line that names the file, keeps the checkpoint and says how to resume."""
    shards = tmp_path / "records"
    shards.mkdir()
    for shard in records.iterdir():
        (shards / shard.name).write_bytes(shard.read_bytes())
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _count_steps_only(patch)
        assert _train(shards, run, capsys, "--epochs=1")[0] == 0
    assert _checkpoints(run) == CKPT_2

    deleted = shards / "train-00001-of-00002"
    read_batches_only(monkeypatch, deleted.unlink)  # checked at the start, then deleted
    code, err = _train(shards, run, capsys, "--epochs=2")
    assert code == 2 and "Traceback" not in err
    message = err[err.index("error: ") :].strip()
    assert re.fullmatch(
        r"error: Cannot read the train TFRecords: (\S+); No such file or directory "
        r"\(NotFoundError\)\. A shard was deleted or moved after the files were checked at the "
        r"start\. The last checkpoint, (\S+), is kept: put the shard back \(or rebuild the "
        r"TFRecords with training/build_tfrecords\.py\), then run the same command again to "
        r"resume\.",
        message,
    ), message
    assert re.search(rf"TFRecords: {re.escape(str(deleted))};", message)
    assert re.search(rf"checkpoint, {re.escape(str(run / 'checkpoints' / 'ckpt-2'))}, is", message)
    assert _checkpoints(run) == CKPT_2

    # The eager form of the error (node names in {{...}}, the op after it) reads the same.
    eager = tf.errors.NotFoundError(
        None,
        None,
        "{{function_node __wrapped__IteratorGetNext_output_types_2_device_/job:localhost/"
        "replica:0/task:0/device:CPU:0}} /data/train-00001-of-00002; No such file or "
        "directory [Op:IteratorGetNext] name: ",
    )
    assert is_data_error(eager)
    assert unreadable_data_message(eager, "validation", "Then.") == (
        "Cannot read the validation TFRecords: /data/train-00001-of-00002; No such file or "
        "directory (NotFoundError). A shard was deleted or moved after the files were "
        "checked at the start. Then."
    )


# --- F10: a full disk ---------------------------------------------------------------------


def _disk_full(op, path):
    return tf.errors.ResourceExhaustedError(
        None,
        None,
        f"{{{{function_node __wrapped__{op}_device_/job:localhost/replica:0/task:0/device:CPU:0}}}}"
        f" {path}; No space left on device [Op:{op}]",
    )


def test_a_full_disk_while_saving_a_checkpoint(records, tmp_path, monkeypatch, capsys):
    """SaveV2 fails as on a full disk after writing part of `ckpt-4_temp/`: one line that
    says so and where, the partial checkpoint removed, ckpt-2 kept. The restart then fails
    at the summary writers as clearly."""
    _count_steps_only(monkeypatch)
    save = tf.train.CheckpointManager.save

    def save_until_the_disk_is_full(self, checkpoint_number=None, **kwargs):
        if checkpoint_number == 4:
            temp = os.path.join(self.directory, "ckpt-4_temp")
            os.makedirs(temp)
            part = os.path.join(temp, "part-00000-of-00001.data-00000-of-00001.tempstate1")
            with open(part, "wb") as f:
                f.write(b"\0" * 1000)
            raise _disk_full("SaveV2_dtypes_12", part)
        return save(self, checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save_until_the_disk_is_full)
    run = tmp_path / "run"
    code, err = _train(records, run, capsys, "--epochs=2")
    assert code == 2 and "Traceback" not in err
    ckpt_2 = re.escape(str(run / "checkpoints" / "ckpt-2"))
    assert re.search(
        rf"error: Cannot write the checkpoint {re.escape(str(run / 'checkpoints' / 'ckpt-4'))}: "
        rf"the disk is full \(No space left on device\)\. The last good checkpoint, {ckpt_2}, is "
        rf"kept; the partial ckpt-4 was removed\. Free some space on the disk of --model_dir "
        rf"{re.escape(str(run))} \(or move the run to another --model_dir\), then run the same "
        rf"command again to resume\.",
        err,
    ), err
    assert _checkpoints(run) == CKPT_2  # no ckpt-4_temp/ left behind
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-2")

    # The restart, the disk still full: the summary writers cannot be created.
    def no_writer(logdir, *args, **kwargs):
        raise _disk_full("CreateSummaryFileWriter", os.path.join(logdir, "events.out.tfevents.1"))

    monkeypatch.setattr(tf.summary, "create_file_writer", no_writer)
    code, err = _train(records, run, capsys, "--epochs=2")
    assert code == 2 and "Traceback" not in err
    assert re.search(
        rf"error: Cannot write the TensorBoard summaries in {re.escape(str(run))}: the disk is "
        rf"full \(No space left on device\)\. The last good checkpoint, {ckpt_2}, is kept\. "
        rf"Free some space .*run the same command again to resume\.",
        err,
    ), err
    assert _checkpoints(run) == CKPT_2


def test_a_full_disk_while_writing_the_weights_or_config_json(records, tmp_path, monkeypatch):
    """A weights file or config.json that cannot be written whole: a clear error, and the
    previous file as it was (config.json never names a half-written weights file)."""
    _count_steps_only(monkeypatch)
    run_dir = tmp_path / "run"
    config = Config(
        model="t2t_vit_7",
        data_dir=str(records),
        model_dir=str(run_dir),
        image_size=32,
        num_classes=4,
        batch_size=8,
        epochs=1,
        warmup_epochs=0,
        steps_per_epoch=2,
        steps_per_loop=2,
        mode="train",
        jit_compile=False,
        checkpoint_every="0",
        aug=data.Augmentation.none(),
    )
    run = trainer.Trainer(config)
    run.run()  # ckpt-2, the weights and config.json
    before = {
        name: (run_dir / name).read_bytes()
        for name in os.listdir(run_dir)
        if name.endswith((".weights.h5", ".json"))
    }
    assert {"model.weights.h5", "model_ema.weights.h5", "config.json"} <= set(before)

    def save_half_then_fail(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(type(run.model), "save_weights", save_half_then_fail)
        with pytest.raises(
            TrainingError,
            match=rf"Cannot write the weights in {re.escape(str(run_dir))}: the disk is full "
            r"\(No space left on device\)\. The last good checkpoint, \S+ckpt-2, is kept; the "
            r"weights files are as they were\.",
        ):
            run.export_weights()

    def dump_half_then_fail(value, f, **kwargs):
        f.write(json.dumps(value)[:10])
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(json, "dump", dump_half_then_fail)
        with pytest.raises(
            TrainingError,
            match=rf"Cannot write {re.escape(str(run_dir / 'config.json'))}: the disk is full "
            r".*ckpt-2, is kept; it is as it was\.",
        ):
            run._write_record(run._record())
        with pytest.raises(TrainingError, match="eval_results.json: the disk is full"):
            run.write_results(dict(top1=0.5))
    after = {name: (run_dir / name).read_bytes() for name in before}
    assert after == before
    assert not [name for name in os.listdir(run_dir) if name.startswith("partial-")]
    assert not (run_dir / "eval_results.json").exists()

    # An out-of-memory error is no full disk: it keeps its type.
    assert not is_disk_full(
        tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    )
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))


# --- F19: messages --------------------------------------------------------------------------


def _label_error(label, num_classes, label_offset, graph):
    dataset = tf.data.Dataset.from_tensors(tf.constant(label)).map(
        lambda x: data.check_label(x - label_offset, num_classes, label_offset)
    )
    iterator = iter(dataset)
    try:
        tf.function(lambda it: next(it))(iterator) if graph else next(iterator)
    except tf.errors.InvalidArgumentError as error:
        assert is_data_error(error)
        return error
    raise AssertionError("no error")


@pytest.mark.parametrize("graph", [False, True])
def test_the_label_out_of_range_message_is_one_clean_sentence(graph):
    too_large = data_error_message(_label_error(3, 2, 1, graph))
    assert too_large == (
        "Bad data: label out of range: a record's label is >= num_classes + label_offset "
        "(2 + 1); check --num_classes and --label_offset."
    )
    # As a training loop's step raised it (red team 2026-12, F19).
    review = tf.errors.InvalidArgumentError(
        None,
        None,
        "Graph execution error:\n\nDetected at node assert_less/Assert/Assert defined at (most "
        "recent call last):\n<stack traces unavailable>\nError in user-defined function passed "
        "to MapDataset:1 transformation with iterator: Iterator::Root::ParallelMapV2: assertion "
        "failed: [label out of range: a record\\'s label is >= num_classes + label_offset (2 + "
        "1); check --num_classes and --label_offset] [Condition x < y did not hold "
        "element-wise:] [x (sub:0) = ] [2] [y (assert_less/y:0) = ] [2]\n\t [[{{node "
        "assert_less/Assert/Assert}}]]\n\t [[while/IteratorGetNext]] [Op:__inference_loop_45]",
    )
    assert is_data_error(review)
    assert data_error_message(review) == too_large
    negative = data_error_message(_label_error(0, 2, 1, graph))
    assert negative == (
        "Bad data: label out of range: a record's label is < --label_offset (1); ImageNet "
        "TFRecords use labels 1..1000 (--label_offset=1), zero-based data needs "
        "--label_offset=0."
    )


def test_evaluate_output_under_a_file_says_so(tmp_path, capsys):
    from training import evaluate_imagenet

    afile = tmp_path / "afile"
    afile.write_text("")
    base = ["--weights", str(tmp_path), "--data_dir", str(tmp_path)]
    for output in (afile / "x.json", afile / "sub" / "x.json"):
        assert evaluate_imagenet.main([*base, "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"error: cannot write --output {str(output)!r}: {afile} is a file, not a folder\n"
        )
    assert evaluate_imagenet.main([*base, "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith(": it is a folder\n")


def test_build_tfrecords_names_an_undecodable_image_without_node_names(tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "cat").mkdir(parents=True)
    (photos / "cat" / "0.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    code = build_tfrecords.main([f"--input_dir={photos}", f"--output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.fullmatch(
        r"error: '\S+cat/0\.jpg' is not a readable image: Unknown image file format\. One of "
        r"[^.]+ required\. Nothing was written; remove or replace the file and run again\.\n",
        err,
    ), err
