"""Correctness with more than one replica (issue #10): loss-scale overflow on one replica,
per-replica drop-path masks, the per-replica EMA, MirroredStrategy training against one
device, per-pipeline input seeds and equal evaluation batches on every host. The replica
checks run in one fresh process with two logical CPU devices
(`tests/training/_two_replicas.py`), once per session."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from _train_worker import run_job
from conftest import shared_folder, tiny_train_config

from training import build_tfrecords, data

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("tiny_variants")  # tiny_train_config's model, here
TWO_REPLICAS = pathlib.Path(__file__).resolve().parent / "_two_replicas.py"  # beside this file
# The same training on one device and on two replicas: the same data and initial weights.
SAME_RUN = dict(
    mode="train",
    deterministic_data=True,
    seed=3,
    learning_rate=0.1,
    warmup_epochs=0,
    _no_dropout=True,
)


@pytest.fixture(scope="module")
def two_replicas(tiny_records, tmp_path_factory):
    """The results of `tests/training/_two_replicas.py`, with "folder" (where its jobs wrote)."""

    def build(folder):
        jobs = dict(
            mirrored=[
                tiny_train_config(tiny_records, folder / "two", strategy="mirrored", **SAME_RUN),
                str(folder / "two.npz"),
            ],
            indivisible=[
                tiny_train_config(
                    tiny_records, folder / "seven", strategy="mirrored", batch_size=7
                ),
                str(folder / "seven.npz"),
            ],
        )
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
        result = subprocess.run(
            [sys.executable, str(TWO_REPLICAS), json.dumps(jobs)],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
        assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
        (folder / "results.json").write_text(lines[0][len("RESULTS ") :])

    folder = shared_folder(tmp_path_factory, "two_replicas", build)
    return dict(json.loads((folder / "results.json").read_text()), folder=folder)


@pytest.mark.slow
def test_float16_overflow_on_one_replica_skips_the_step_on_all(two_replicas):
    # Keras checks replica 0 alone: the inf of replica 1 entered the sum (NaN weights).
    result = two_replicas["loss_scale"]
    for weights in result["overflow_weights"]:
        np.testing.assert_array_equal(weights, [1.0] * 4)  # skipped, on both replicas
    assert result["scale_after_overflow"] == result["scale_before"] / 2
    # The next, finite step is applied: both replicas' unscaled gradients (2 each, at the
    # old scale over the halved one) summed, times the learning rate 0.1.
    for weights in result["finite_weights"]:
        np.testing.assert_allclose(weights, [1.0 - 0.1 * 4] * 4, rtol=1e-6)


def test_replicas_drop_different_samples_reproducibly(two_replicas):
    first, second = two_replicas["drop_path"]
    replica0, replica1 = np.array(first[0]), np.array(first[1])
    assert replica0.shape == (32,)
    assert (replica0 != replica1).sum() >= 4  # identical masks on every replica before
    assert 4 <= replica0.sum() <= 28 and 4 <= replica1.sum() <= 28  # rate 0.5
    assert first == second  # the same seed, the same masks


def test_ema_is_per_replica_without_synchronization_and_matches_one_replica(two_replicas):
    result = two_replicas["ema"]
    np.testing.assert_allclose(result["ema"], result["expected"], rtol=1e-6)
    for copy in result["replica_copies"]:
        np.testing.assert_allclose(copy, result["expected"], rtol=1e-6)
    # A mirrored average made a merge_call (and a broadcast) per variable per step.
    assert result["merge_calls"] == 0
    np.testing.assert_allclose(result["swapped"], result["expected"], rtol=1e-6)
    assert result["restored"]


def test_mirrored_over_two_devices_matches_one_device(two_replicas, tiny_records, tmp_path):
    # The one-device run here, in this process; the two-replica one in _two_replicas.py.
    assert two_replicas["jobs"]["mirrored"] == dict(replicas=2, step=6)
    one = run_job(
        tiny_train_config(tiny_records, tmp_path / "one", **SAME_RUN), tmp_path / "one.npz"
    )
    assert one.strategy.num_replicas_in_sync == 1 and int(one.step.numpy()) == 6
    two = two_replicas["folder"]
    a, b = np.load(tmp_path / "one.npz"), np.load(two / "two.npz")
    init = np.load(tmp_path / "one_init.npz")
    assert len(a.files) == len(b.files)
    for key in a.files:  # the same start: the seed makes the same initial weights
        np.testing.assert_array_equal(init[key], np.load(two / "two_init.npz")[key])
    # Adam normalizes each update, so float noise in near-zero gradients can flip a few
    # signs: compare the updates as a whole. Different data or no all-reduce gives ~100%.
    update_a = np.concatenate([(a[k] - init[k]).ravel() for k in a.files])
    update_b = np.concatenate([(b[k] - init[k]).ravel() for k in a.files])
    assert np.linalg.norm(update_a) > 1e-2
    assert np.linalg.norm(update_a - update_b) / np.linalg.norm(update_a) < 0.02
    np.testing.assert_allclose(update_a, update_b, atol=1e-3)


def test_batch_not_divisible_by_replicas(two_replicas):
    refused = two_replicas["jobs"]["indivisible"]
    assert refused.startswith("TrainingError: ")
    assert "--batch_size=7 is not divisible by the 2 replicas" in refused


@pytest.fixture(scope="module")
def one_shard_twice(tmp_path_factory):
    """The same shard under two names: two input pipelines then read identical records."""
    folder = tmp_path_factory.mktemp("same")
    rng = np.random.default_rng(0)
    examples = [
        build_tfrecords.make_example(
            build_tfrecords.to_jpeg(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)),
            1 + i % 3,
            "c",
            f"{i}.jpg",
            48,
            40,
        )
        for i in range(24)
    ]
    build_tfrecords.write_shards(iter(examples), str(folder), "train", 1)
    first = data.list_files(str(folder), "train")[0]
    second = first.replace("train-00000-of-00001", "train-00001-of-00002")
    tf.io.gfile.copy(first, second)
    return [first, second]


def _first_batch(files, pipeline, seed):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline)
    aug = data.Augmentation(randaugment_ops=2, mixup_alpha=0.0, cutmix_alpha=0.0)
    dataset = data.train_dataset(
        files,
        8,
        32,
        3,
        aug,
        input_context=context,
        seed=seed,
        shuffle_buffer=1,
        deterministic=True,
    )
    return next(iter(dataset))[0].numpy()


def test_input_pipelines_draw_different_augmentations_reproducibly(one_shard_twice):
    # Both pipelines read the same records in the same order (shuffle buffer 1, one file
    # each): only their random crops, flips and RandAugment can differ.
    a, b = _first_batch(one_shard_twice, 0, seed=3), _first_batch(one_shard_twice, 1, seed=3)
    assert np.abs(a - b).mean() > 5.0  # identical before: every pipeline had the same seed
    np.testing.assert_array_equal(a, _first_batch(one_shard_twice, 0, seed=3))


def test_every_pipeline_gives_the_same_number_of_evaluation_batches(tmp_path):
    # Three shards of 5, 9 and 2 records over two hosts: 7 and 9 examples.
    counts = {"a": 5, "b": 9, "c": 2}
    assert data.eval_batches(counts, 2, 4) == 3  # ceil(9 / 4)
    assert data.eval_batches(counts, 2, 4, replicas_per_pipeline=2) == 4  # a multiple of 2
    assert data.eval_batches(16, 1, 4) == 4 and data.eval_batches(17, 2, 4) == 3  # TFDS
    rng = np.random.default_rng(1)
    for name, count in (("x", 5), ("y", 9), ("z", 2)):
        examples = [
            build_tfrecords.make_example(
                build_tfrecords.to_jpeg(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)),
                1,
                "c",
                f"{name}{i}.jpg",
                20,
                20,
            )
            for i in range(count)
        ]
        build_tfrecords.write_shards(iter(examples), str(tmp_path / name), "validation", 1)
    files = [data.list_files(str(tmp_path / n), "validation")[0] for n in "xyz"]
    batches, seen = [], 0
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline)
        dataset = data.eval_dataset(
            files, 4, 16, 2, input_context=context, num_batches=3, label_offset=1
        )
        masks = [mask.numpy() for _, _, mask in dataset]
        batches.append(len(masks))
        seen += int(sum(m.sum() for m in masks))
    assert batches == [3, 3] and seen == 16
