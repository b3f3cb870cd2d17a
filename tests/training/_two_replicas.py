"""Checks that need two replicas, in a fresh process with two logical CPU devices (TF's
device list is fixed at its first use). Prints one JSON object;
`tests/training/test_distributed.py` reads it. Usage:
python tests/training/_two_replicas.py [JOBS_JSON]

JOBS_JSON: {"mirrored": [CONFIG, OUT_NPZ], "indivisible": [CONFIG, OUT_NPZ]}, training jobs of
`tests/training/_train_worker.py` (CONFIG as there) under the two replicas: "mirrored" is
trained (its weights saved as there), "indivisible" is expected to be refused."""

import argparse
import json
import pathlib
import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository's root

import keras  # noqa: E402

from keras_t2t import layers  # noqa: E402
from tests.conftest import register_tiny_releases  # noqa: E402
from training import distribute, optim  # noqa: E402

register_tiny_releases()  # the tests' TRAIN_MODEL (tiny_train_config) is a variant here

# One MirroredStrategy for the whole process, the one --strategy=mirrored makes over the two
# logical CPUs: the collectives of two instances would share their keys (and mismatch).
STRATEGY = distribute.make_strategy(argparse.Namespace(strategy="mirrored", tpu=None))
assert STRATEGY.num_replicas_in_sync == 2, STRATEGY.extended.worker_devices
_make_strategy = distribute.make_strategy
distribute.make_strategy = lambda config: (
    STRATEGY if config.strategy == "mirrored" else _make_strategy(config)
)


def per_replica(function, *args):
    """`function(replica_id, *args)` on each replica; its results as numpy, one per replica."""

    @tf.function
    def run():
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            return function(replica, *args)

        return STRATEGY.run(replica_fn)

    return [
        tf.nest.map_structure(lambda t: t.numpy().tolist(), value)
        for value in STRATEGY.experimental_local_results(run())
    ]


def loss_scale_overflow_on_one_replica():
    """Float16 loss scaling: an inf in replica 1's gradients only."""
    with STRATEGY.scope():
        variable = keras.Variable(np.ones(4, np.float32), name="w")
        optimizer = optim.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        optimizer.build([variable])
    scale = float(optimizer.dynamic_scale.numpy())

    def step(replica, inf_on):
        overflow = tf.equal(replica, inf_on) & tf.equal(tf.range(4), 2)
        gradient = tf.where(overflow, np.inf, scale)  # scaled gradients of 1 (or inf)
        optimizer.apply_gradients([(gradient, variable)])
        return tf.identity(variable.value)

    overflow = per_replica(step, 1)  # replica 1 overflows: skipped everywhere
    after_overflow = float(optimizer.dynamic_scale.numpy())
    finite = per_replica(step, 5)  # no replica overflows: a normal step
    return dict(
        overflow_weights=overflow,
        scale_before=scale,
        scale_after_overflow=after_overflow,
        finite_weights=finite,
    )


def drop_path_masks():
    """The samples StochasticDepth keeps on each replica, twice from the same seed."""
    runs = []
    for _ in range(2):
        with STRATEGY.scope():
            layer = layers.StochasticDepth(0.5, seed=7)

        def masks(replica, layer=layer):
            return layer(tf.ones((32, 3, 2)), training=True)[:, 0, 0] > 0

        runs.append(per_replica(masks))
    return runs


def ema_per_replica():
    """Three EMA updates under two replicas, against the same on one device (numpy), and the
    merge_calls the update makes (each one is a cross-replica synchronization)."""
    with STRATEGY.scope():
        weights = keras.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="w")
        ema = optim.ExponentialMovingAverage([weights], decay=0.5)
        step = tf.Variable(0, dtype=tf.int64)
    calls = []
    merge_call = tf.distribute.ReplicaContext.merge_call

    def counting(self, *args, **kwargs):
        calls.append(1)
        return merge_call(self, *args, **kwargs)

    @tf.function
    def update(values):
        def replica_fn(values):
            weights.assign(values)
            ema.update(step)

        STRATEGY.run(replica_fn, args=(values,))

    expected = np.arange(6, dtype=np.float32).reshape(2, 3)
    tf.distribute.ReplicaContext.merge_call = counting
    try:
        for i in range(3):
            values = np.full((2, 3), 10.0 * (i + 1), np.float32)
            update(tf.constant(values))
            decay = min(0.5, 1.0 / 10.0)  # decay_at(0): the warmed-up decay
            expected = decay * expected + (1 - decay) * values
    finally:
        tf.distribute.ReplicaContext.merge_call = merge_call
    replica_copies = [
        v.numpy().tolist() for v in STRATEGY.experimental_local_results(ema.averages[0])
    ]
    before = weights.numpy().copy()
    ema.swap()
    swapped = weights.numpy().tolist()
    ema.swap()
    return dict(
        ema=np.asarray(ema.averages[0].read_value()).tolist(),
        expected=expected.tolist(),
        replica_copies=replica_copies,
        merge_calls=len(calls),
        swapped=swapped,
        restored=bool(np.array_equal(weights.numpy(), before)),
    )


def training_jobs(jobs):
    """The jobs of JOBS_JSON; run first, in a process where nothing else was built yet."""
    from _train_worker import run_job

    from training.errors import TrainingError

    results = {}
    if "mirrored" in jobs:
        job = run_job(*jobs["mirrored"])
        results["mirrored"] = dict(
            replicas=job.strategy.num_replicas_in_sync, step=int(job.step.numpy())
        )
    if "indivisible" in jobs:
        try:
            run_job(*jobs["indivisible"])
            results["indivisible"] = "accepted"
        except TrainingError as error:
            results["indivisible"] = f"TrainingError: {error}"
    return results


if __name__ == "__main__":
    jobs = training_jobs(json.loads(sys.argv[1])) if len(sys.argv) > 1 else {}
    results = dict(
        jobs=jobs,
        loss_scale=loss_scale_overflow_on_one_replica(),
        drop_path=drop_path_masks(),
        ema=ema_per_replica(),
    )
    print("RESULTS " + json.dumps(results), flush=True)
