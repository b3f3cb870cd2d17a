"""Where a run runs: the `tf.distribute` strategy of `--strategy`, which worker is the chief,
where each worker writes, and what every worker must agree on.

Sections: the strategy -> workers -> TPU pods.
"""

import os

import tensorflow as tf

from training.errors import TrainingError

# --- the strategy ---------------------------------------------------------------------------


def make_strategy(config):
    """The strategy of `config.strategy`: "tpu" (connects to `config.tpu`), "mirrored" (all
    GPUs, else the logical CPUs), "multi_worker" (the cluster of TF_CONFIG), or the default."""
    if config.strategy == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if config.strategy == "mirrored":
        # All GPUs; without GPUs, every logical CPU device (one, unless configured otherwise).
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])
    if config.strategy == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise TrainingError(
                "--strategy=multi_worker reads the cluster from the TF_CONFIG environment "
                "variable, which is not set. See docs/training.md for an example."
            )
        # NCCL all-reduces between GPUs (AUTO may pick ring); CPU workers use ring.
        gpus = tf.config.list_physical_devices("GPU")
        implementation = tf.distribute.experimental.CommunicationImplementation
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementation.NCCL if gpus else implementation.AUTO
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    return tf.distribute.get_strategy()


# --- workers --------------------------------------------------------------------------------


def is_chief(strategy):
    """Whether this process is the chief: the one that writes the checkpoints, the record and
    the weights (every process but the other workers of MultiWorkerMirroredStrategy)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type is None or task_type == "chief" or (task_type == "worker" and task_id == 0)


def is_multi_worker(strategy):
    """Whether `strategy` spans more than one worker process (MultiWorkerMirroredStrategy)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    spec = strategy.cluster_resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs) > 1


def worker_dir(model_dir, strategy):
    """Non-chief workers write their summaries, and the checkpoint copies that every worker
    must write (a save is collective), to a scratch folder; their checkpoints are deleted
    right after each save, and every worker restores the chief's."""
    if is_chief(strategy):
        return model_dir
    resolver = strategy.cluster_resolver
    return os.path.join(model_dir, "workers", f"{resolver.task_type}_{resolver.task_id}")


def max_over_workers(strategy):
    """A function that takes a list of numbers and returns the maximum of each over all workers,
    as floats (one all-reduce; every worker must call it at the same point). Without workers
    (`is_multi_worker`), the numbers themselves."""
    if not is_multi_worker(strategy):
        return lambda values: [float(v) for v in values]

    @tf.function
    def agree(values):
        def replica(values):  # (all_reduce has no MAX: gather, then reduce)
            context = tf.distribute.get_replica_context()
            return tf.reduce_max(context.all_gather(values[None], axis=0), axis=0)

        return strategy.experimental_local_results(strategy.run(replica, (values,)))[0]

    return lambda values: [float(v) for v in agree(tf.constant(values, tf.float32)).numpy()]


# --- TPU pods -------------------------------------------------------------------------------


def check_pod_paths(config, strategy):
    """On a TPU pod every host reads the data and writes the checkpoints itself: paths on the
    client's local disk (the embedded digits cache among them) cannot work there."""
    hosts = getattr(strategy.extended, "num_hosts", 1) if config.strategy == "tpu" else 1
    local = [
        f"--{flag}={path}"
        for flag, path in (("data_dir", config.data_dir), ("model_dir", config.model_dir))
        if config.data_source == "tfrecord" or flag == "model_dir"
        if path and "://" not in path
    ]
    if hosts > 1 and local:
        raise TrainingError(
            f"This TPU slice has {hosts} hosts, which read the data and write the checkpoints "
            f"themselves; {' and '.join(local)} is on this machine's disk. Put them on storage "
            f"every host reads (gs://bucket/...). (Without --data_dir the run uses the "
            f"embedded digits, a local cache: give a gs:// --data_dir on a pod.)"
        )
