"""Runs one training job in its own process, for the tests that need a fresh TensorFlow
(logical devices, TF_CONFIG). Usage: python tests/_train_worker.py CONFIG_JSON OUT_NPZ"""

import json
import os
import sys


def main():
    config = json.loads(sys.argv[1])
    out = sys.argv[2]
    logical_cpus = config.pop("_logical_cpus", 1)
    no_dropout = config.pop("_no_dropout", False)
    import logging

    import numpy as np
    import tensorflow as tf

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # "Resumed from ..."

    if logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus
        )
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from training import data, trainer
    from training.config import Config
    from training.errors import TrainingError

    if no_dropout:  # the performer's official dropout (0.1) differs between runs
        import keras

        build = trainer.build_model

        def build_model(config):
            model = build(config)
            for layer in model._flatten_layers():
                if isinstance(layer, keras.layers.Dropout):
                    layer.rate = 0.0
            return model

        trainer.build_model = build_model
    aug = data.Augmentation(**config.pop("aug")) if "aug" in config else data.Augmentation.none()
    try:
        job = trainer.Trainer(Config(**config, aug=aug))
        np.savez(out.replace(".npz", "_init.npz"), *[v.numpy() for v in job.model.weights])
        job.run()
    except TrainingError as error:
        print(f"TrainingError: {error}", flush=True)
        return 3
    np.savez(out, *[v.numpy() for v in job.model.weights])
    print(f"REPLICAS {job.strategy.num_replicas_in_sync} STEP {int(job.step.numpy())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
