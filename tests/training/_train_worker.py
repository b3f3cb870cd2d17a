"""Runs one training job in its own process, for the tests that need a fresh TensorFlow
(TF_CONFIG: the workers of tests/training/test_training.py). Usage:
python tests/training/_train_worker.py CONFIG_JSON OUT_NPZ

Prints "REPLICAS r STEP s" when the job ends, or "TrainingError: ..." (exit 3), or the
`Preempted` message after a SIGTERM (exit 143, as train_imagenet.py). `run_job` is the job
itself, also called in the tests' own process (tests/training/test_distributed.py) and by
tests/training/_two_replicas.py."""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository's root


def run_job(config, out):
    """Trains `config` (a dict of `Config` fields, "aug" a dict of `Augmentation` fields;
    "_no_dropout": the model's dropout off); saves the initial weights to OUT_init.npz and
    the final ones to `out`; returns the Trainer."""
    import keras
    import numpy as np

    from training import data, trainer
    from training.config import Config

    config = dict(config)
    no_dropout = config.pop("_no_dropout", False)
    build = trainer.build_model

    def build_model(config):
        model = build(config)
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = 0.0
        return model

    if no_dropout:  # the performer's official dropout (0.1) differs between runs
        trainer.build_model = build_model
    try:
        aug = data.Augmentation(**config.pop("aug")) if "aug" in config else None
        job = trainer.Trainer(Config(**config, aug=aug or data.Augmentation.none()))
        np.savez(str(out).replace(".npz", "_init.npz"), *[v.numpy() for v in job.model.weights])
        job.run()
    finally:
        trainer.build_model = build
    np.savez(str(out), *[v.numpy() for v in job.model.weights])
    return job


def main():
    config = json.loads(sys.argv[1])
    out = sys.argv[2]
    import logging

    from tests.conftest import register_tiny_releases

    register_tiny_releases()  # the tests' TRAIN_MODEL (tiny_train_config) is a variant here

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # "Resumed from ..."
    from training.errors import Preempted, TrainingError

    try:
        job = run_job(config, out)
    except TrainingError as error:
        print(f"TrainingError: {error}", flush=True)
        return 3
    except Preempted as stop:
        print(f"Preempted: {stop}", flush=True)
        return 143
    print(f"REPLICAS {job.strategy.num_replicas_in_sync} STEP {int(job.step.numpy())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
