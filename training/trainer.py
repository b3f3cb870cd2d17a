"""The T2T-ViT training library: one custom loop for every `tf.distribute` strategy.

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy, and `steps_per_execution > 1`
fails under MirroredStrategy, so this loop drives `strategy.run` itself, several steps per
`tf.function` call (as a TPU wants), with the forward and backward pass compiled by XLA.

Sections: config and recipe -> strategy -> data -> model, optimizer, EMA -> checkpoints ->
steps -> the loop -> evaluation.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import signal
import time

import keras
import numpy as np
import tensorflow as tf
from keras import ops

import keras_t2t
from keras_t2t import layers as t2t_layers
from keras_t2t import pretrained
from keras_t2t import weights as weights_lib
from keras_t2t.imagenet import IMAGENET_MEAN, IMAGENET_STD
from training import data as data_lib

logger = logging.getLogger("keras_t2t.training")

RUN_WEIGHTS = weights_lib.RUN_WEIGHTS  # the weights a run leaves in its model_dir
RECORD_KEY = weights_lib.RUN_RECORD_KEY  # config.json's record of them
MODES = ("train", "eval", "train_and_eval")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "bfloat16", "float16")


class TrainingError(RuntimeError):
    """A run stopped for a reason the user can act on; the message says which."""


# --- config and recipe ----------------------------------------------------------------------


RECIPES = ("imagenet", "finetune")


def recipe(model, name="imagenet"):
    """The training defaults of recipe `name` for a variant: the `Config` fields (and the
    augmentation) a recipe sets. The one place that defines them; `Config`, the flags of
    train_imagenet.py and its --help all take them from here.

    "imagenet": the paper's recipe (lr and weight decay by variant, for batch 512).
    "finetune": fine-tuning (from `--weights`) and small datasets: a lower learning rate, a
    one-epoch warmup, a short cosine, crop, flip and label smoothing only (no RandAugment,
    mixup, cutmix or erasing), and a shorter EMA (warmed up, as on every recipe).
    """
    if name == "imagenet":
        small = model in ("t2t_vit_7", "t2t_vit_10", "t2t_vit_12")
        large = any(model.endswith(s) for s in ("_19", "_24"))
        return dict(
            learning_rate=1e-3 if small else 5e-4,
            weight_decay=0.03 if small else (0.065 if large else 0.05),
            epochs=310,
            warmup_epochs=5,
            cooldown_epochs=10,
            warmup_lr=1e-6,
            min_lr=1e-5,
            drop_path_rate=0.1,
            ema_decay=0.99996,
            aug=data_lib.Augmentation(),
        )
    if name == "finetune":
        return dict(
            learning_rate=1e-4,
            weight_decay=0.05,
            epochs=30,
            warmup_epochs=1,
            cooldown_epochs=0,
            warmup_lr=1e-6,
            min_lr=1e-6,
            drop_path_rate=0.1,
            ema_decay=0.9998,
            aug=data_lib.Augmentation(
                randaugment_ops=0, mixup_alpha=0.0, cutmix_alpha=0.0, random_erasing=0.0
            ),
        )
    raise TrainingError(f"--recipe must be one of {RECIPES}, received {name!r}.")


@dataclasses.dataclass
class Config:
    """Everything a run needs; `None` fields take their value from `recipe` (see there)."""

    model: str = "t2t_vit_14"
    model_dir: str = "runs/t2t_vit_14"
    data_dir: str = None
    data_source: str = "tfrecord"  # or "tfds"
    mode: str = "train_and_eval"
    strategy: str = "default"
    tpu: str = None
    recipe: str = "imagenet"  # the defaults of the None fields below: RECIPES
    image_size: int = 224
    num_classes: int = 1000
    label_offset: int = 1
    batch_size: int = 512  # global
    epochs: int = None  # including the cooldown
    warmup_epochs: int = None
    cooldown_epochs: int = None
    learning_rate: float = None  # for batch 512, scaled linearly with batch_size
    warmup_lr: float = None
    min_lr: float = None
    weight_decay: float = None
    grad_clip: float = None
    drop_path_rate: float = None
    ema_decay: float = None
    mixed_precision: str = None  # None: bfloat16 on TPU, float32 elsewhere
    weights: str = None  # start from: "imagenet" (a release), a file or a run's model_dir
    crop_pct: float = 0.9
    eval_batch_size: int = None
    steps_per_loop: int = 100
    steps_per_epoch: int = None  # default: train examples // batch_size
    train_examples: int = None  # default: counted (ImageNet: 1,281,167)
    eval_every_epochs: int = 10
    jit_compile: bool = True
    seed: int = 0
    deterministic_data: bool = False  # reproducible input order (slower); for tests
    max_checkpoints: int = 3
    checkpoint_every: str = "10m"  # also save every N minutes ("10m") or steps ("2000"); "0": off
    skip_bad_records: bool = False  # skip (and log) unreadable records instead of stopping
    aug: data_lib.Augmentation = None

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _positive(value):
    """A positive number that float32 holds (1e41 would overflow the schedule's tensors)."""
    return isinstance(value, (int, float)) and 0 < value < 1e38


def resolve(config):
    """Fills the recipe defaults and checks the config; returns a new Config."""
    config = dataclasses.replace(config)
    min_lr_given = config.min_lr is not None
    if config.model not in keras_t2t.MODEL_CONFIGS:
        raise TrainingError(
            f"Unknown --model {config.model!r}. "
            f"Known variants: {', '.join(keras_t2t.list_models())}."
        )
    for field, value in recipe(config.model, config.recipe).items():
        if getattr(config, field) is None:
            setattr(config, field, value)
    if config.mixed_precision is None:
        config.mixed_precision = "bfloat16" if config.strategy == "tpu" else "float32"
    for flag, value, allowed in (
        ("--mode", config.mode, MODES),
        ("--strategy", config.strategy, STRATEGIES),
        ("--mixed_precision", config.mixed_precision, PRECISIONS),
        ("--data_source", config.data_source, ("tfrecord", "tfds")),
    ):
        if value not in allowed:
            raise TrainingError(f"{flag} must be one of {allowed}, received {value!r}.")
    checks = [
        (config.image_size >= 16 and config.image_size % 16 == 0,
         f"--image_size must be a multiple of 16 (224, 384, 32, ...), "
         f"received {config.image_size}."),
        (config.batch_size >= 1, f"--batch_size must be >= 1, received {config.batch_size}."),
        (config.epochs >= 1, f"--epochs must be >= 1, received {config.epochs}."),
        (0 <= config.warmup_epochs < config.epochs,
         f"--warmup_epochs must be in [0, --epochs), received {config.warmup_epochs}."),
        (config.steps_per_loop >= 1,
         f"--steps_per_loop must be >= 1, received {config.steps_per_loop}."),
        (_positive(config.learning_rate),
         f"--learning_rate must be a positive number below 1e38, received "
         f"{config.learning_rate}."),
        (_positive(config.min_lr) and _positive(config.warmup_lr),
         f"--min_lr and the warmup LR must be positive numbers below 1e38, received "
         f"{config.min_lr} and {config.warmup_lr}."),
        (config.weight_decay >= 0 and _positive(config.weight_decay + 1),
         f"--weight_decay must be >= 0, received {config.weight_decay}."),
        (config.grad_clip is None or _positive(config.grad_clip),
         f"--grad_clip must be a positive number, received {config.grad_clip}."),
        (0 <= config.ema_decay < 1, f"--ema_decay must be in [0, 1), received {config.ema_decay}."),
        (0 <= config.drop_path_rate < 1,
         f"--drop_path_rate must be in [0, 1), received {config.drop_path_rate}."),
        (config.eval_every_epochs >= 1,
         f"--eval_every_epochs must be >= 1, received {config.eval_every_epochs}."),
        *((value is None or value >= 1, f"--{name} must be >= 1 (or unset), received {value}.")
          for name, value in (("steps_per_epoch", config.steps_per_epoch),
                              ("eval_batch_size", config.eval_batch_size),
                              ("train_examples", config.train_examples))),
        (0 < config.crop_pct <= 1, f"--crop_pct must be in (0, 1], received {config.crop_pct}."),
        (not min_lr_given or config.min_lr <= config.learning_rate * config.batch_size / 512,
         f"--min_lr={config.min_lr} is above the peak learning rate, --learning_rate "
         f"{config.learning_rate} scaled to --batch_size={config.batch_size} "
         f"({config.learning_rate * config.batch_size / 512:.3g}); lower it."),
        *augmentation_checks(config.aug),
        (not (config.grad_clip and config.mixed_precision == "float16"),
         "--grad_clip with --mixed_precision=float16 is not supported (the loss scale hides the "
         "gradient norm); use bfloat16, or no clipping."),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)
    checkpoint_interval(config.checkpoint_every)  # refuses a malformed value now
    config.cooldown_epochs = min(config.cooldown_epochs, config.epochs - config.warmup_epochs - 1)
    config.cooldown_epochs = max(config.cooldown_epochs, 0)
    return config


def augmentation_checks(aug):
    """(ok, message) of each field of an `Augmentation`, named by its flag."""
    return [
        (0 < aug.crop_scale_min <= 1,
         f"--crop_scale_min must be in (0, 1], received {aug.crop_scale_min}."),
        (aug.randaugment_ops >= 0,
         f"--randaugment_ops must be >= 0, received {aug.randaugment_ops}."),
        (0 <= aug.randaugment_magnitude <= 10,
         f"--randaugment_magnitude must be in [0, 10], received {aug.randaugment_magnitude}."),
        (aug.randaugment_magnitude_std >= 0,
         f"--randaugment_magnitude_std must be >= 0, received "
         f"{aug.randaugment_magnitude_std}."),
        (aug.mixup_alpha >= 0, f"--mixup must be >= 0 (0: off), received {aug.mixup_alpha}."),
        (aug.cutmix_alpha >= 0, f"--cutmix must be >= 0 (0: off), received {aug.cutmix_alpha}."),
        (0 <= aug.mix_switch_prob <= 1,
         f"The mixup/cutmix switch probability must be in [0, 1], received "
         f"{aug.mix_switch_prob}."),
        (0 <= aug.label_smoothing < 1,
         f"--label_smoothing must be in [0, 1), received {aug.label_smoothing}."),
        (0 <= aug.random_erasing <= 1,
         f"--random_erasing must be in [0, 1], received {aug.random_erasing}."),
    ]  # fmt: skip


def checkpoint_interval(value):
    """`--checkpoint_every` as `(minutes, steps)`, one of them None: "10m" is every 10
    minutes, "2000" every 2,000 steps, "0" only at the ends of epochs (None, None)."""
    text = str(value).strip().lower()
    try:
        number = float(text[:-1]) if text.endswith("m") else int(text)
    except ValueError:
        number = -1
    if number < 0:
        raise TrainingError(
            f"--checkpoint_every must be minutes ending in m (10m), a number of steps (2000) "
            f"or 0 (at the ends of epochs only), received {value!r}."
        )
    if number == 0:
        return None, None
    return (number, None) if text.endswith("m") else (None, number)


# --- strategy -------------------------------------------------------------------------------


def make_strategy(config):
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
                "variable, which is not set. See the README for an example."
            )
        # NCCL all-reduces between GPUs (AUTO may pick ring); CPU workers use ring.
        gpus = tf.config.list_physical_devices("GPU")
        implementation = tf.distribute.experimental.CommunicationImplementation
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementation.NCCL if gpus else implementation.AUTO
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    return tf.distribute.get_strategy()


def is_chief(strategy):
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


# --- data -----------------------------------------------------------------------------------


def data_sources(config, split, cache=None):
    """(source, examples, `{shard: records}` or None) of `split`, checked before training.

    TFRecords are checked by `data.check_shards` (the manifest of build_tfrecords.py, or
    every record header; `cache` keeps the counts between restarts); TFDS needs no check.
    """
    if config.data_source == "tfds":
        # Opened by each input pipeline (host) in its dataset_fn, which reads its own files.
        source = data_lib.TFDSSource(split, config.data_dir)
        return source, source.num_examples, None
    files = data_lib.list_files(config.data_dir, split)
    counts = data_lib.check_shards(
        files, split, config.num_classes, config.skip_bad_records, cache=cache
    )
    return files, sum(counts.values()), counts


# --- model, optimizer, EMA ------------------------------------------------------------------


class ExponentialMovingAverage(tf.Module):
    """EMA of the trainable weights (timm's ModelEma), saved with the checkpoints.

    Keras' optimizer EMA (`use_ema`) keeps its averages private and can only overwrite the
    model with them, so evaluating both the raw and the EMA weights needs this small class.
    """

    def __init__(self, variables, decay):
        super().__init__(name="ema")
        self.decay = decay
        self.sources = list(variables)
        # One copy per replica, each updated from its own (identical) weights with no
        # communication: a mirrored average would cost a merge_call and a broadcast of the
        # whole model every step. Reads (checkpoints, evaluation) take the first replica's.
        self.averages = [
            tf.Variable(
                v.value,
                trainable=False,
                name=f"ema_{i}",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            for i, v in enumerate(self.sources)
        ]

    def decay_at(self, step):
        """The decay at `step`: warmed up as Model Garden's dynamic decay, min(decay,
        (1 + step) / (10 + step)), so a short run's average is not stuck at the initial
        weights (0.99996 alone needs ~25k steps to forget them)."""
        step = tf.cast(step, tf.float32)
        return tf.minimum(tf.cast(self.decay, tf.float32), (1.0 + step) / (10.0 + step))

    def update(self, step):
        """Called in the replica context of the train step: updates this replica's copy."""
        decay = self.decay_at(step)
        for average, source in zip(self.averages, self.sources):
            value = tf.cast(source.value, average.dtype)
            average.assign(decay * average + (1.0 - decay) * value)

    @tf.function
    def swap(self):
        """Exchanges the model weights and the averages (call twice to undo), in one graph."""
        currents = [tf.identity(source.value) for source in self.sources]
        averages = [tf.identity(average) for average in self.averages]
        for average, source, current, value in zip(self.averages, self.sources, currents, averages):
            source.assign(value)
            average.assign(current)


def build_model(config):
    return keras_t2t.create_model(
        config.model,
        input_shape=(config.image_size, config.image_size, 3),
        classes=config.num_classes,
        classifier_activation=None,
        drop_path_rate=config.drop_path_rate,
        weights=config.weights,
    )


def no_weight_decay(model):
    """The official groups (timm's add_weight_decay with `no_weight_decay() = {"cls_token"}`):
    no decay on 1-D tensors (norms, biases), biases and the class token.

    Chosen by variable, not by Keras' `var_names`: those patterns are searched in the backend
    variable's name, which is the whole path under TensorFlow, so "token" would also match
    every weight of `tokens_to_token`, which then went undecayed.
    """
    return [
        v
        for v in model.trainable_variables
        if len(v.shape) <= 1 or v.path.endswith("/bias") or v.path.endswith("cls_token/token")
    ]


class AdamW(keras.optimizers.AdamW):
    """Keras' AdamW with PyTorch's epsilon: the update is
    `lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`, as `torch.optim.AdamW`
    (which trained the released weights) computes it.

    Keras adds epsilon to the uncorrected `sqrt(v)`, which is the torch update with an
    epsilon of `eps / sqrt(1 - beta2^t)`: 32x larger at the first step and still 2x at step
    290, so small gradients move their weights less than the official code moves them. The
    decoupled weight decay (`w -= lr * wd * w` before the update) is Keras' and torch's alike.
    """

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        beta_1_power = ops.power(ops.cast(self.beta_1, dtype), step)
        beta_2_power = ops.power(ops.cast(self.beta_2, dtype), step)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2))
        denominator = ops.add(
            ops.divide(ops.sqrt(v), ops.sqrt(1 - beta_2_power)), ops.cast(self.epsilon, dtype)
        )
        self.assign_sub(variable, ops.divide(ops.multiply(m, lr / (1 - beta_1_power)), denominator))


class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras' dynamic loss scaling, with the overflow check agreed by all replicas.

    Keras checks the gradients of replica 0 alone, before they are summed: an inf on another
    replica then enters the update (NaN weights), and under MultiWorkerMirroredStrategy the
    workers can take different branches and hang in the next collective. Here every replica
    all-reduces its finite flag first; when any replica overflowed, every replica's
    gradients are made NaN, so every replica (replica 0 included) skips the step and halves
    the scale.
    """

    def apply(self, grads, trainable_variables=None):
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            overflowed = tf.cast(tf.logical_not(self.check_finite(grads)), tf.float32)
            overflowed = context.all_reduce(tf.distribute.ReduceOp.SUM, overflowed)
            poison = tf.where(overflowed > 0, float("nan"), 1.0)
            grads = [g if g is None else g * tf.cast(poison, g.dtype) for g in grads]
        return super().apply(grads, trainable_variables)


def build_optimizer(config, steps_per_epoch, model):
    peak = config.learning_rate * config.batch_size / 512.0
    warmup = config.warmup_epochs * steps_per_epoch
    decay = max((config.epochs - config.cooldown_epochs) * steps_per_epoch - warmup, 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.warmup_lr if warmup else peak,
        decay_steps=decay,
        alpha=min(config.min_lr / peak, 1.0),
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )
    optimizer = AdamW(
        learning_rate=schedule,
        weight_decay=config.weight_decay,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
    )
    optimizer.exclude_from_weight_decay(var_list=no_weight_decay(model))
    if config.mixed_precision == "float16":
        optimizer = LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer, schedule


# --- the run --------------------------------------------------------------------------------


class Trainer:
    def __init__(self, config):
        self.config = config = resolve(config)
        self.strategy = make_strategy(config)
        replicas = self.strategy.num_replicas_in_sync
        if config.batch_size % replicas:
            raise TrainingError(
                f"--batch_size={config.batch_size} is not divisible by the {replicas} replicas; "
                f"use a multiple of {replicas}."
            )
        self.eval_batch_size = config.eval_batch_size or config.batch_size
        if self.eval_batch_size % replicas:
            raise TrainingError(
                f"--eval_batch_size={self.eval_batch_size} is not divisible by the "
                f"{replicas} replicas."
            )
        _check_tensorboard()
        _check_pod_paths(config, self.strategy)
        self.chief = is_chief(self.strategy)
        self.dir = worker_dir(config.model_dir, self.strategy)
        try:
            tf.io.gfile.makedirs(self.dir)
        except tf.errors.OpError as error:
            raise TrainingError(
                f"Cannot create --model_dir {config.model_dir!r}: {_first_line(error)}"
            ) from None
        # Every worker restores from the chief's checkpoints (see `restore` and `save`).
        checkpoint_dir = os.path.join(config.model_dir, "checkpoints")
        # Before anything is written: a model_dir of another model or recipe is refused, its
        # record kept. The record is rewritten once a checkpoint is restored (`_resume`).
        self._previous = check_compatible(config, checkpoint_dir)
        self._origin = config.weights  # what the run started from: kept when it resumes

        keras.utils.set_random_seed(config.seed)  # the same initial weights on every worker
        keras.mixed_precision.set_global_policy(
            "float32" if config.mixed_precision == "float32" else f"mixed_{config.mixed_precision}"
        )
        self.train_source = self.eval_source = None
        self.shards = {}  # split -> {shard: records}, for naming a bad record

        def sources(split):
            cache = os.path.join(self.dir, f"data_check-{split}.json") if self.chief else None
            source, examples, self.shards[split] = data_sources(config, split, cache)
            return source, examples

        if config.mode != "eval":
            self.train_source, train_examples = sources("train")
            train_examples = config.train_examples or train_examples
            self.steps_per_epoch = config.steps_per_epoch or train_examples // config.batch_size
            if self.steps_per_epoch < 1:
                raise TrainingError(
                    f"{train_examples} training examples make no full batch of "
                    f"{config.batch_size}; "
                    f"lower --batch_size."
                )
        else:
            self.steps_per_epoch = config.steps_per_epoch or 1
        if config.mode != "train":
            self.eval_source, self.eval_examples = sources("validation")
        self.total_steps = config.epochs * self.steps_per_epoch

        with self.strategy.scope():
            self.model = build_model(config)
            self.optimizer, self.schedule = build_optimizer(
                config, self.steps_per_epoch, self.model
            )
            self.ema = ExponentialMovingAverage(self.model.trainable_variables, config.ema_decay)
            self.step = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self.loss_sum = tf.Variable(
                0.0,
                trainable=False,
                name="loss_sum",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
            )
            self.data_rng = tf.random.Generator.from_seed(config.seed)
        self.checkpoint = tf.train.Checkpoint(
            model_variables=list(self.model.variables),  # frozen tensors and RNG states too
            optimizer=self.optimizer,
            ema=self.ema,
            step=self.step,
            data_rng=self.data_rng,
        )
        self.manager = self._checkpoint_manager(checkpoint_dir)
        self.multi_worker = is_multi_worker(self.strategy)
        self.preempted = False
        self._agree_fn = None
        self._exported_step = None
        self._eval_step = None

    # --- checkpoints ----------------------------------------------------------------------

    def _checkpoint_manager(self, directory):
        return tf.train.CheckpointManager(
            self.checkpoint, directory, max_to_keep=self.config.max_checkpoints
        )

    def restore(self):
        """Restores the newest checkpoint that can be read; returns its path, or None.

        A checkpoint proven corrupt (`classify_checkpoint_error`: a checksum, truncation or
        format error, files missing) is not deleted: its files are renamed `corrupt-ckpt-N.*`,
        with a warning that names it, and the next newest is tried. Checkpoints are found on
        disk as well as in the `checkpoint` state file, so a state file that names missing
        files, or none, is handled too. Any other error (storage unavailable, a timeout,
        permission denied) proves nothing about the checkpoint: a transient one is tried
        again (`RESTORE_RETRY_DELAYS`), then the run stops with a `TrainingError`, every file
        kept as it was. A checkpoint that reads but does not fit the model stops the run too.
        """
        directory = self.manager.directory
        candidates = self._read_checkpoint_files(
            "the checkpoints in", directory, lambda: list_checkpoints(directory)
        )
        restored = None
        quarantined = []
        for path in candidates:
            if not self._read_checkpoint_files(
                "the checkpoint",
                path,
                lambda path=path: tf.io.gfile.exists(path + ".index"),
                quarantined,
            ):
                logger.warning(
                    "The checkpoint state in %s names %s, whose files are missing; skipping it.",
                    directory, path,
                )  # fmt: skip
                continue
            # Every tensor is read (and its checksum checked) before anything is restored: a
            # restore that fails halfway leaves deferred restorations in the live objects.
            corrupt = self._read_checkpoint_files(
                "the checkpoint", path, lambda path=path: verify_checkpoint(path), quarantined,
                corrupt_ok=True,
            )  # fmt: skip
            if isinstance(corrupt, BaseException):
                # Only the chief renames files; the other workers read the same ones, and
                # skip the same checkpoint.
                kept = quarantine_checkpoint(path) if self.chief else "they are"
                quarantined.append(path)
                logger.warning(
                    "The checkpoint %s cannot be read (%s: %s); its files are kept as %s. "
                    "Trying the previous one.",
                    path, type(corrupt).__name__, _first_line(corrupt), kept,
                )  # fmt: skip
                continue
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except (ValueError, AssertionError) as error:
                raise TrainingError(
                    f"The checkpoint {path} does not fit this run ({_first_line(error)}). It "
                    f"was written by another model, image size, number of classes or "
                    f"--mixed_precision=float16; use another --model_dir, or the same flags."
                ) from None
            except tf.errors.OpError as error:  # read a moment ago: storage, not the file
                raise TrainingError(
                    _unreadable_message("the checkpoint", path, error, 1, quarantined)
                ) from None
            restored = path
            break
        if candidates and restored != self.manager.latest_checkpoint and self.chief:
            rewrite_checkpoint_state(directory, restored)
            self.manager = self._checkpoint_manager(directory)
        if self.multi_worker:
            self._check_same_step()
        if restored:
            skipped = candidates.index(restored)
            logger.info(
                "Resumed from %s at step %d%s.",
                restored,
                int(self.step.numpy()),
                f" (the {skipped} newer could not be read)" if skipped else "",
            )
        elif candidates:
            logger.warning("No checkpoint in %s could be read: starting from scratch.", directory)
        return restored

    def _read_checkpoint_files(self, what, path, read, quarantined=(), corrupt_ok=False):
        """`read()`, tried again after each transient error (`classify_checkpoint_error`)
        with the delays of `RESTORE_RETRY_DELAYS`. Returns what `read` returns, or, with
        `corrupt_ok`, the error that proves `path` corrupt. Otherwise (a fatal error, a
        transient one that lasts) raises a TrainingError naming `path` and the error; no file
        has been changed for it."""
        delays = list(RESTORE_RETRY_DELAYS)
        tries = 0
        while True:
            tries += 1
            try:
                return read()
            except CHECKPOINT_READ_ERRORS as error:
                kind = classify_checkpoint_error(error, path)
                if kind == CORRUPT and corrupt_ok:
                    return error
                if kind != TRANSIENT or not delays:
                    raise TrainingError(
                        _unreadable_message(what, path, error, tries, quarantined)
                    ) from None
                delay = delays.pop(0)
                logger.warning(
                    "Reading %s %s failed (%s: %s), which proves nothing about the checkpoint: "
                    "trying again in %g s (%d more tries).",
                    what, path, type(error).__name__, _first_line(error), delay, len(delays) + 1,
                )  # fmt: skip
                _sleep(delay)

    def _resume(self):
        """Restores the newest readable checkpoint (`restore`), then writes config.json: a
        run that cannot go on (a checkpoint of another model, storage errors) leaves the
        record as it was, and a resumed run keeps the `weights` it started from (a resume
        needs none; the release decides the normalization of the run's exports)."""
        restored = self.restore()
        if restored and self._previous and "weights" in self._previous:
            self._origin = self._previous["weights"]
        if self.chief:
            record = self._record()
            if self._previous and RECORD_KEY in self._previous:  # the weights written so far
                record[RECORD_KEY] = self._previous[RECORD_KEY]
            self._write_record(record)
        return restored

    def _record(self):
        record = json.loads(self.config.to_json())
        record["weights"] = self._origin
        return record

    def _write_record(self, record):
        path = os.path.join(self.config.model_dir, "config.json")
        with self._writing(path, "it is as it was"):
            _write_whole(path, lambda partial: _write_json(partial, record, sort_keys=True))

    def _check_same_step(self):
        """Every worker must have restored the same checkpoint: TF does not re-synchronize
        the variables after a restore, so workers that differ would diverge, then hang."""
        step = float(self.step.numpy())
        low, high = self._agree([-step, step])
        if -low != high:
            raise TrainingError(
                f"The workers restored different checkpoints (steps {int(-low)} to "
                f"{int(high)}): a worker cannot read {self.manager.directory} as the chief "
                f"does. Give every worker the same --model_dir (on storage they all read, "
                f"such as gs://) and start them again."
            )

    def _agree(self, values):
        """The maximum of each of `values` over all workers (one all-reduce; every worker
        must call it at the same point). Without workers, `values` themselves."""
        if not self.multi_worker:
            return [float(v) for v in values]
        if self._agree_fn is None:
            strategy = self.strategy

            @tf.function
            def agree(values):
                def replica(values):  # (all_reduce has no MAX: gather, then reduce)
                    context = tf.distribute.get_replica_context()
                    return tf.reduce_max(context.all_gather(values[None], axis=0), axis=0)

                return strategy.experimental_local_results(strategy.run(replica, (values,)))[0]

            self._agree_fn = agree
        return [float(v) for v in self._agree_fn(tf.constant(values, tf.float32)).numpy()]

    def save(self):
        """Saves a checkpoint (every worker must call it: a save is collective). The chief's
        goes to --model_dir; another worker's to its scratch folder, deleted right after."""
        number = int(self.step.numpy())
        if self.chief:
            prefix = os.path.join(self.manager.directory, f"ckpt-{number}")
            note = f"the partial {os.path.basename(prefix)} was removed"
            with self._writing(f"the checkpoint {prefix}", note), _no_partial_checkpoint(prefix):
                path = self.manager.save(checkpoint_number=number)
            logger.info("Saved checkpoint %s.", path)
            return path
        scratch = os.path.join(self.dir, "checkpoints")
        try:
            with self._writing(f"this worker's copy of the checkpoint, in {scratch}"):
                tf.train.CheckpointManager(self.checkpoint, scratch, max_to_keep=1).save(number)
        finally:
            _remove_quietly(scratch)
        return None

    @contextlib.contextmanager
    def _writing(self, what, note=None):
        """Turns a full disk (`is_disk_full`) while writing `what` into a TrainingError that
        says so, where, and which checkpoint is kept (`note`: what else was kept or undone)."""
        latest = self.manager.latest_checkpoint  # read first: a failed save may change it
        try:
            yield
        except Exception as error:
            if isinstance(error, TrainingError) or not is_disk_full(error):
                raise
            text = getattr(error, "message", None) or str(error)
            full = (
                "the disk quota is exceeded (Disk quota exceeded)"
                if "quota" in text.lower() or getattr(error, "errno", None) == errno.EDQUOT
                else "the disk is full (No space left on device)"
            )
            kept = (
                f"The last good checkpoint, {latest}, is kept" if latest
                else "No checkpoint had been saved yet"
            )  # fmt: skip
            raise TrainingError(
                f"Cannot write {what}: {full}. {kept}{f'; {note}' if note else ''}. Free some "
                f"space on the disk of --model_dir {self.config.model_dir} (or move the run to "
                f"another --model_dir), then run the same command again to "
                f"{'resume' if latest else 'start again'}."
            ) from None

    # --- steps ----------------------------------------------------------------------------

    def _build_train_loop(self):
        model, optimizer, strategy, config = self.model, self.optimizer, self.strategy, self.config
        global_batch = float(config.batch_size)
        scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

        xla = bool(config.jit_compile) or isinstance(strategy, tf.distribute.TPUStrategy)

        @tf.function(jit_compile=config.jit_compile)
        def gradients(images, targets):
            with tf.GradientTape() as tape, t2t_layers.xla_compilation(xla):
                logits = tf.cast(model(images, training=True), tf.float32)
                per_example = keras.losses.categorical_crossentropy(
                    targets, logits, from_logits=True
                )
                loss = tf.reduce_sum(per_example) / global_batch
                scaled_loss = optimizer.scale_loss(loss) if scaled else loss
            grads = tape.gradient(scaled_loss, model.trainable_variables)
            return grads, loss

        def replica_step(images, targets):
            grads, loss = gradients(images, targets)
            if config.grad_clip:
                context = tf.distribute.get_replica_context()
                grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
                grads, _ = tf.clip_by_global_norm(grads, config.grad_clip)
                # The optimizer sums the gradients over replicas again: hand it a share each.
                grads = [g / strategy.num_replicas_in_sync for g in grads]
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            self.ema.update(self.step)
            self.step.assign_add(1)
            self.loss_sum.assign_add(loss)

        @tf.function
        def train_loop(iterator, steps):
            for _ in tf.range(steps):
                strategy.run(replica_step, args=next(iterator))

        return train_loop

    # --- data -----------------------------------------------------------------------------

    def _train_iterator(self):
        config = self.config
        seed = int(self.data_rng.uniform_full_int((), dtype=tf.int64).numpy() % (2**31))

        def dataset_fn(context):
            return data_lib.train_dataset(
                self.train_source,
                context.get_per_replica_batch_size(config.batch_size),
                config.image_size,
                config.num_classes,
                config.aug,
                label_offset=config.label_offset,
                input_context=context,
                seed=seed,
                deterministic=config.deterministic_data,
                skip_bad_records=self._skip("train"),
                # bfloat16 runs take bfloat16 images: half the bytes to the device.
                image_dtype=tf.bfloat16 if config.mixed_precision == "bfloat16" else tf.float32,
            )

        return iter(self.strategy.distribute_datasets_from_function(dataset_fn))

    def _eval_dataset(self):
        config = self.config

        def dataset_fn(context):
            batch_size = context.get_per_replica_batch_size(self.eval_batch_size)
            # Every input pipeline (host) gives the same number of batches, a multiple of the
            # replicas it feeds: with static shapes (TPU) a host that ran out first would end
            # the pass early on the others, or hang them.
            return data_lib.eval_dataset(
                self.eval_source,
                batch_size,
                config.image_size,
                config.num_classes,
                crop_pct=config.crop_pct,
                label_offset=config.label_offset,
                input_context=context,
                skip_bad_records=self._skip("validation"),
                num_batches=data_lib.eval_batches(
                    self.shards.get("validation")
                    or getattr(self.eval_source, "shard_lengths", None)  # TFDS
                    or self.eval_examples,
                    context.num_input_pipelines,
                    batch_size,
                    context.num_replicas_in_sync // context.num_input_pipelines,
                ),
            )

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def _skip(self, split):
        """The shard counts when --skip_bad_records (see `data.train_dataset`), else None."""
        return self.shards.get(split) if self.config.skip_bad_records else None

    def _input_error(self, error, split):
        """The TrainingError for an error of the input pipeline (`DATA_ERRORS`): a shard that
        cannot be opened any more, or bad data (`_bad_data`)."""
        if not isinstance(error, DATA_READ_ERRORS):
            return self._bad_data(error, split)
        latest = self.manager.latest_checkpoint
        kept = (
            f"The last checkpoint, {latest}, is kept" if latest
            else "No checkpoint had been saved yet"
        )  # fmt: skip
        then = (
            f"{kept}: put the shard back (or rebuild the TFRecords with "
            f"training/build_tfrecords.py), then run the same command again to "
            f"{'resume' if latest else 'start again'}."
        )
        return TrainingError(unreadable_data_message(error, split, then))

    def _bad_data(self, error, split):
        """A TrainingError for a data error, naming the bad record where it can be found."""
        message = _data_error_message(error)
        if self.shards.get(split) and "label out of range" not in message:
            logger.info("Looking for the bad %s record (at most 5 minutes)...", split)
            found = data_lib.find_bad_record(list(self.shards[split]), self.shards[split])
            if found:
                shard, index, filename, problem = found
                named = f" (image/filename {filename!r})" if filename else ""
                message += (
                    f" The bad record: number {index} of {shard}{named}, which {problem}. "
                    f"Replace it, or pass --skip_bad_records to skip such records."
                )
        return TrainingError(message)

    # --- evaluation -----------------------------------------------------------------------

    def evaluate(self, ema=False, stop=None):
        """top1, top5, loss over the validation set (of the EMA weights with `ema=True`).

        The step function is built once per run (the raw and EMA passes share it), and the
        number of examples evaluated is checked against the validation set's. `stop`: see
        `evaluate_model`."""
        if self._eval_step is None:
            self._eval_step = make_eval_step(self.model, self.strategy)
        if ema:
            self.ema.swap()
        try:
            results = evaluate_model(
                self.model, self._eval_dataset(), self.strategy, step_fn=self._eval_step,
                stop=stop,
            )  # fmt: skip
        except DATA_ERRORS as error:
            if not is_data_error(error):
                raise
            raise self._input_error(error, "validation") from None
        finally:
            if ema:
                self.ema.swap()
        self._check_count(results["examples"])
        return results

    def _check_count(self, evaluated):
        expected = self.eval_examples
        if evaluated == expected:
            return
        message = (
            f"The evaluation saw {evaluated:,} examples, but the validation set holds {expected:,}"
        )
        if self.config.skip_bad_records and evaluated < expected:
            logger.warning("%s: --skip_bad_records left out the other %d.", message,
                           expected - evaluated)  # fmt: skip
            return
        raise TrainingError(
            f"{message}: the accuracy would be over the wrong set. The validation files "
            f"changed during the run, or their record counts are wrong; check them (or "
            f"rebuild them with training/build_tfrecords.py) and run again. Checkpoints are kept."
        )

    def evaluate_both(self, stop=None):
        raw, averaged = self.evaluate(stop=stop), self.evaluate(ema=True, stop=stop)
        results = dict(raw, step=int(self.step.numpy()))
        results.update({f"ema_{k}": v for k, v in averaged.items() if k != "examples"})
        return results

    # --- the loop -------------------------------------------------------------------------

    def train(self):
        config = self.config
        self._resume()
        train_loop = self._build_train_loop()
        iterator = self._train_iterator()
        with self._writing(f"the TensorBoard summaries in {self.dir}"):
            writer = tf.summary.create_file_writer(os.path.join(self.dir, "train"))
            eval_writer = tf.summary.create_file_writer(os.path.join(self.dir, "eval"))
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        step = int(self.step.numpy())
        start_step, start_time = step, time.time()
        every_minutes, every_steps = checkpoint_interval(config.checkpoint_every)
        saved_step, saved_time = step, time.time()
        results = None
        try:
            while step < self.total_steps:
                epoch_end = (step // self.steps_per_epoch + 1) * self.steps_per_epoch
                steps = min(config.steps_per_loop, epoch_end - step)
                tick = time.time()
                try:
                    train_loop(iterator, tf.constant(steps))
                except DATA_ERRORS as error:
                    if not is_data_error(error):
                        raise
                    raise self._input_error(error, "train") from None
                loss = float(self.loss_sum.read_value().numpy()) / steps
                self.loss_sum.assign(0.0)
                step = int(self.step.numpy())
                if not math.isfinite(loss):
                    latest = self.manager.latest_checkpoint
                    kept = (
                        f"the last good checkpoint, {latest}, is kept"
                        if latest
                        else "no checkpoint had been saved yet"
                    )
                    raise TrainingError(
                        f"The loss is {loss} at step {step}: training diverged. Stopped without "
                        f"saving; {kept}. Lower --learning_rate, set --grad_clip, or use "
                        f"--mixed_precision=bfloat16."
                    )
                self._log(writer, step, steps, loss, time.time() - tick, start_step, start_time)
                due = (every_steps is not None and step - saved_step >= every_steps) or (
                    every_minutes is not None and time.time() - saved_time >= every_minutes * 60
                )
                # One all-reduce: a SIGTERM to any worker stops them all, and they all save
                # at the same step (a worker's clock alone must not start a collective save).
                preempted, due = self._agree([self.preempted, due])
                if preempted:
                    self._save_when_preempted(step)
                    raise Preempted(step)
                if step % self.steps_per_epoch == 0 or due:
                    self.save()
                    saved_step, saved_time = step, time.time()
                if step % self.steps_per_epoch == 0:
                    epoch = step // self.steps_per_epoch
                    if config.mode == "train_and_eval" and (
                        epoch % config.eval_every_epochs == 0 or step >= self.total_steps
                    ):
                        # A SIGTERM is acted on between evaluation batches, and after the
                        # export: the checkpoint of this step is saved (just above).
                        try:
                            results = self.evaluate_both(stop=self._preempted_now)
                        except EvaluationStopped:
                            raise Preempted(step) from None
                        self._log_eval(eval_writer, results)
                        self.export_weights(results)
                        if self._preempted_now():
                            raise Preempted(step)
        finally:
            signal.signal(signal.SIGTERM, previous)
        return results

    def _save_when_preempted(self, step):
        """The save after SIGTERM. A peer or the storage may already be gone: a failed save
        is reported, and the last good checkpoint (which a failed save never replaces) kept."""
        try:
            self.save()
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                tf.errors.CancelledError, tf.errors.AbortedError) as error:  # fmt: skip
            latest = self.manager.latest_checkpoint
            logger.error(
                "SIGTERM: the checkpoint at step %d could not be saved (%s: %s); the last good "
                "one, %s, is kept: the run resumes from there.",
                step, type(error).__name__, _first_line(error), latest or "none yet",
            )  # fmt: skip

    def _preempted_now(self):
        """Whether a SIGTERM reached any worker (an all-reduce: every worker calls it at the
        same points)."""
        return self._agree([self.preempted])[0] > 0

    def _on_sigterm(self, signum, frame):
        logger.warning(
            "SIGTERM: saving a checkpoint after the current steps (or evaluation batch), then "
            "stopping."
        )
        self.preempted = True

    def _log(self, writer, step, steps, loss, seconds, start_step, start_time):
        images_per_second = steps * self.config.batch_size / max(seconds, 1e-9)
        lr = float(self.schedule(step))
        done = step - start_step
        eta = (time.time() - start_time) / max(done, 1) * (self.total_steps - step)
        epoch = step / self.steps_per_epoch
        logger.info(
            "step %d/%d (epoch %.2f) loss %.4f lr %.3g %.1f images/s ETA %s",
            step, self.total_steps, epoch, loss, lr, images_per_second, _duration(eta),
        )  # fmt: skip
        if self.chief:
            with self._writing(f"the TensorBoard summaries in {self.dir}"):
                self._write_scalars(writer, step, loss, lr, images_per_second)

    @staticmethod
    def _write_scalars(writer, step, loss, lr, images_per_second):
        with writer.as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("learning_rate", lr)
            tf.summary.scalar("images_per_second", images_per_second)

    def _log_eval(self, writer, results):
        logger.info(
            "eval at step %d: top1 %.4f top5 %.4f loss %.4f | EMA top1 %.4f top5 %.4f loss %.4f",
            results["step"], results["top1"], results["top5"], results["loss"],
            results["ema_top1"], results["ema_top5"], results["ema_loss"],
        )  # fmt: skip
        if self.chief:
            with self._writing(f"the TensorBoard summaries in {self.dir}"):
                with writer.as_default(step=results["step"]):
                    for key in ("top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss"):
                        tf.summary.scalar(key, results[key])

    def write_results(self, results):
        if self.chief and results is not None:
            path = os.path.join(self.config.model_dir, "eval_results.json")
            with self._writing(path, "it is as it was"):
                _write_whole(path, lambda partial: _write_json(partial, results))
            logger.info("Wrote %s.", path)

    def run(self):
        """Trains and/or evaluates as `--mode` says; returns the evaluation results."""
        config = self.config
        results = None
        if config.mode != "eval":
            results = self.train()
        elif not self._resume() and not config.weights:
            raise TrainingError(
                f"--mode=eval found no checkpoint in {self.manager.directory} and no --weights; "
                f"train first, or pass --weights."
            )
        if config.mode != "train" and results is None:
            results = self.evaluate_both()
            with self._writing(f"the TensorBoard summaries in {self.dir}"):
                writer = tf.summary.create_file_writer(os.path.join(self.dir, "eval"))
            self._log_eval(writer, results)
        if self._exported_step != int(self.step.numpy()):
            self.export_weights(results)
        self.write_results(results)
        return results

    def export_weights(self, results=None):
        """Writes the raw and the EMA weights as `.weights.h5` files in --model_dir, and in
        config.json which scored better (the chief only; overwritten at each evaluation).

        `keras_t2t`'s builders, `savedmodels/export.py --weights` and
        `training/evaluate_imagenet.py --weights` take the model_dir itself.
        """
        step = int(self.step.numpy())
        self._exported_step = step
        if not self.chief:
            return
        folder = self.config.model_dir
        # Each file is written whole or not at all: config.json never names a partial one.
        with self._writing(f"the weights in {folder}", "the weights files are as they were"):
            _write_whole(os.path.join(folder, RUN_WEIGHTS["raw"]), self.model.save_weights)
            self.ema.swap()
            try:
                _write_whole(os.path.join(folder, RUN_WEIGHTS["ema"]), self.model.save_weights)
            finally:
                self.ema.swap()
        record = self._record()
        record[RECORD_KEY] = dict(RUN_WEIGHTS, step=step, best=None)
        if results:
            best = "ema" if results["ema_top1"] > results["top1"] else "raw"
            record[RECORD_KEY].update(best=best, top1=results["top1"], ema_top1=results["ema_top1"])
        self._write_record(record)
        logger.info(
            "Wrote the raw and EMA weights to %s (%s).",
            folder, f"the {record[RECORD_KEY]['best']} weights scored better" if results
            else "not evaluated",
        )  # fmt: skip


def make_eval_step(model, strategy):
    """The evaluation step: one `tf.function`, traced once, for every evaluation of a run."""

    xla = isinstance(strategy, tf.distribute.TPUStrategy)  # TPUs compile every graph

    @tf.function
    def eval_step(images, labels, mask):
        def replica(images, labels, mask):
            with t2t_layers.xla_compilation(xla):
                logits = tf.cast(model(images, training=False), tf.float32)
            loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            top5 = tf.math.in_top_k(labels, logits, k=min(5, logits.shape[-1]))
            top1 = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
            return tf.stack([
                tf.reduce_sum(loss * mask),
                tf.reduce_sum(tf.cast(top1, tf.float32) * mask),
                tf.reduce_sum(tf.cast(top5, tf.float32) * mask),
                tf.reduce_sum(mask),
            ])  # fmt: skip

        sums = strategy.run(replica, args=(images, labels, mask))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    return eval_step


def evaluate_model(model, dataset, strategy, step_fn=None, stop=None):
    """top1, top5, mean loss and count over a distributed `(images, labels, mask)` dataset.

    `step_fn`: from `make_eval_step` (made here when None). `stop`: called before each batch
    (on every worker alike); when it returns True, raises `EvaluationStopped` at once."""
    step_fn = step_fn or make_eval_step(model, strategy)
    totals = np.zeros(4)
    for images, labels, mask in dataset:  # data errors go to the caller, which names them
        if stop is not None and stop():
            raise EvaluationStopped()
        totals += np.asarray(step_fn(images, labels, mask))
    count = max(totals[3], 1.0)
    return dict(
        loss=totals[0] / count,
        top1=totals[1] / count,
        top5=totals[2] / count,
        examples=int(totals[3]),
    )


class EvaluationStopped(Exception):
    """An evaluation ended early by its `stop` callback (after SIGTERM)."""


class Preempted(Exception):
    """Raised after SIGTERM, once the checkpoint is saved."""

    def __init__(self, step):
        super().__init__(
            f"stopped by SIGTERM at step {step}; a checkpoint was saved, run the "
            f"same command again to resume."
        )
        self.step = step


# --- run directory ----------------------------------------------------------------------------

# Config fields that fix the shapes of what a checkpoint holds.
IDENTITY_FIELDS = ("model", "image_size", "num_classes")
_CHECKPOINT_INDEX = re.compile(r"^ckpt-(\d+)\.index$")


def list_checkpoints(directory):
    """Checkpoint prefixes in `directory`, newest first: those on disk and those the state
    file names (even if their files are missing)."""
    numbers = {}
    if tf.io.gfile.isdir(directory):
        for name in tf.io.gfile.listdir(directory):
            match = _CHECKPOINT_INDEX.match(name)
            if match:
                numbers[os.path.join(directory, f"ckpt-{match.group(1)}")] = int(match.group(1))
    state = tf.train.get_checkpoint_state(directory)
    for path in getattr(state, "all_model_checkpoint_paths", []) or []:
        path = path if os.path.isabs(path) or "://" in path else os.path.join(directory, path)
        match = re.search(r"ckpt-(\d+)$", path)
        numbers.setdefault(path, int(match.group(1)) if match else -1)
    return sorted(numbers, key=numbers.get, reverse=True)


def verify_checkpoint(path):
    """Reads every tensor of checkpoint `path`; raises what a truncated or altered file gives."""
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
        reader.get_tensor(name)


# What reading a checkpoint can raise. TF's checkpoint reader keeps the type of few errors:
# DataLoss (a bad index), IndexError (a truncated file: OUT_OF_RANGE), NotFound, ...; the
# others (a checksum mismatch, a storage error) come as a plain OpError (UNKNOWN) whose
# message alone tells, hence the message markers below.
CHECKPOINT_READ_ERRORS = (tf.errors.OpError, IndexError, OSError, ValueError)
CORRUPT, TRANSIENT, FATAL = "corrupt", "transient", "fatal"
# The waits, in seconds, before each new try of a read that failed with a transient error.
RESTORE_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)
_sleep = time.sleep  # (tests make the waits instant)
_TRANSIENT_TYPES = (
    tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
    tf.errors.ResourceExhaustedError, tf.errors.AbortedError, tf.errors.CancelledError,
    tf.errors.InternalError,
)  # fmt: skip
_PERMISSION_TYPES = (tf.errors.PermissionDeniedError, tf.errors.UnauthenticatedError)
# Not corruption, and trying again does not help: "is a directory", a data type or layout
# that this TensorFlow cannot read (a newer writer), ...
_FATAL_TYPES = (
    *_PERMISSION_TYPES, tf.errors.FailedPreconditionError, tf.errors.UnimplementedError,
    tf.errors.AlreadyExistsError,
)  # fmt: skip
# The error types that say the bytes are bad (when the message says nothing else).
_CORRUPT_TYPES = (
    tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.NotFoundError,
    tf.errors.InvalidArgumentError, IndexError, ValueError,
)  # fmt: skip
# What the reader says of bad bytes, whatever the error's type.
_CORRUPT_TEXT = re.compile(
    r"checksum does not match|checksum mismatch|bad magic number|too short to be an sstable|"
    r"read less bytes than requested|corrupted",
    re.IGNORECASE,
)
_PERMISSION_TEXT = re.compile(
    r"permission denied|access denied|forbidden|unauthenticated|unauthorized|credentials|"
    r"\b40[13]\b",
    re.IGNORECASE,
)
_TRANSIENT_TEXT = re.compile(
    r"unavailable|deadline exceeded|timed? ?out|connection|socket|try again|temporar|"
    r"resource exhausted|too many requests|rate limit|http request|curl|broken pipe|"
    r"reset by peer|input/output error|failed to get matching files|\b(?:429|50[0-4])\b",
    re.IGNORECASE,
)
# Weaker signs of bad or missing files, taken when nothing above matched.
_MISSING_OR_BAD_TEXT = re.compile(
    r"unable to read file|corrupt|sstable|truncated|no such file|not found in checkpoint|"
    r"failed to find any matching files",
    re.IGNORECASE,
)


def classify_checkpoint_error(error, path=None):
    """What an error from reading checkpoint `path` proves: `CORRUPT` (its bytes are bad or
    its files missing: set it aside and try the previous one), `TRANSIENT` (the storage
    failed, or nothing is proven: try again, never set it aside) or `FATAL` (permission
    denied, a format this TensorFlow cannot read: stop, never set it aside)."""
    kind = _error_kind(error, path)
    return FATAL if kind == _PERMISSION else kind


_PERMISSION = "permission"  # a FATAL kind, with its own advice


def _error_kind(error, path):
    if isinstance(error, _TRANSIENT_TYPES):
        return TRANSIENT
    if isinstance(error, (*_PERMISSION_TYPES, PermissionError)):
        return _PERMISSION
    if isinstance(error, _FATAL_TYPES):
        return FATAL
    if isinstance(error, OSError):
        if isinstance(error, (IsADirectoryError, NotADirectoryError)):
            return FATAL
        return CORRUPT if isinstance(error, FileNotFoundError) else TRANSIENT
    text = getattr(error, "message", None) or str(error)
    if path:  # its words ("runs/timeout_503") are no evidence
        text = text.replace(os.path.dirname(os.path.normpath(path)), "")
    if _CORRUPT_TEXT.search(text):
        return CORRUPT
    # The reader calls a failed open "DataLoss: Unable to open table file ...", whatever
    # the cause: the cause's words come first.
    if _PERMISSION_TEXT.search(text):
        return _PERMISSION
    if _TRANSIENT_TEXT.search(text):
        return TRANSIENT
    if isinstance(error, _CORRUPT_TYPES) or _MISSING_OR_BAD_TEXT.search(text):
        return CORRUPT
    return TRANSIENT  # unknown (UNKNOWN): not proven corrupt


def _unreadable_message(what, path, error, tries, quarantined=()):
    """The message of a run stopped by an error that does not prove a checkpoint corrupt."""
    kind = _error_kind(error, path)
    cause = f"{type(error).__name__}: {_first_line(error)}"
    kept = "no checkpoint was renamed or deleted, and config.json is unchanged"
    if quarantined:
        kept = (
            f"only the corrupt {', '.join(os.path.basename(p) for p in quarantined)} "
            f"{'was' if len(quarantined) == 1 else 'were'} set aside as corrupt-*; nothing "
            f"else was renamed or deleted"
        )
    if kind == TRANSIENT:
        return (
            f"Reading {what} {path} failed{f' {tries} times' if tries > 1 else ''} ({cause}). "
            f"That is a storage error (unavailable, a timeout, a quota), not a corrupt "
            f"checkpoint: {kept}. Run the same command again once the storage answers."
        )
    if kind == _PERMISSION:
        return (
            f"Cannot read {what} {path}: permission denied ({cause}). Give this job read and "
            f"write access to its --model_dir and run the same command again; {kept}."
        )
    return (
        f"Cannot read {what} {path} ({cause}). That does not prove the checkpoint corrupt: {kept}."
    )


def quarantine_checkpoint(path):
    """Renames the files of checkpoint `path` to `corrupt-<name>.*` (never deletes them)."""
    folder, name = os.path.split(path)
    for file in tf.io.gfile.glob(path + ".*"):
        suffix = os.path.basename(file)[len(name) :]
        tf.io.gfile.rename(file, os.path.join(folder, f"corrupt-{name}{suffix}"), overwrite=True)
    return os.path.join(folder, f"corrupt-{name}.*")


def rewrite_checkpoint_state(directory, latest):
    """Makes the `checkpoint` state file list the readable checkpoints on disk, `latest` last,
    so that the manager neither saves over nor counts those that were skipped. With none
    left, the old state file is kept aside as `corrupt-checkpoint`."""
    state = os.path.join(directory, "checkpoint")
    if latest is None:
        if tf.io.gfile.exists(state):
            tf.io.gfile.rename(state, os.path.join(directory, "corrupt-checkpoint"), True)
        return
    older = [
        p for p in list_checkpoints(directory) if p != latest and tf.io.gfile.exists(p + ".index")
    ]
    tf.compat.v1.train.update_checkpoint_state(
        directory, latest, all_model_checkpoint_paths=[*older[::-1], latest]
    )


@contextlib.contextmanager
def _no_partial_checkpoint(prefix):
    """Undoes a failed save of checkpoint `prefix` (a full disk, a storage error): removes the
    `<prefix>_temp` folder of its shards and the files of `prefix` that were not there before
    it. The state file, written last, still names the previous checkpoint."""
    before = set(tf.io.gfile.glob(prefix + ".*"))
    try:
        yield
    except BaseException:
        partial = [path for path in tf.io.gfile.glob(prefix + ".*") if path not in before]
        for path in (prefix + "_temp", *partial):
            _remove_quietly(path)
        raise


def _remove_quietly(path):
    """Removes file or folder `path` if it exists; a failure is logged, not raised."""
    try:
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        elif tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)
    except (tf.errors.OpError, OSError) as error:
        logger.warning("Could not remove %s (%s).", path, _first_line(error))


def _write_whole(path, write):
    """`write(partial)`, then `partial` renamed to `path`: a write that fails (a full disk)
    leaves `path` as it was and no partial file. (`partial` keeps the name's ending, which
    Keras checks.)"""
    folder, name = os.path.split(path)
    partial = os.path.join(folder, f"partial-{name}")
    try:
        write(partial)
        tf.io.gfile.rename(partial, path, overwrite=True)
    except BaseException:
        _remove_quietly(partial)
        raise


def _write_json(path, value, **kwargs):
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(value, f, indent=2, **kwargs)


def check_compatible(config, checkpoint_dir):
    """Refuses a run whose model differs from the one that wrote the checkpoints; returns the
    previous run's record (config.json) when it goes on from it, else None."""
    previous_path = os.path.join(config.model_dir, "config.json")
    if not list_checkpoints(checkpoint_dir) or not tf.io.gfile.exists(previous_path):
        return None
    try:
        with tf.io.gfile.GFile(previous_path) as f:
            previous = json.load(f)
    except (ValueError, tf.errors.OpError):
        return None  # an unreadable record: the restore itself checks the shapes
    ours = dataclasses.asdict(config)
    differ = [k for k in IDENTITY_FIELDS if k in previous and previous[k] != ours[k]]
    if differ:
        was = ", ".join(f"--{k}={previous[k]}" for k in differ)
        now = ", ".join(f"--{k}={ours[k]}" for k in differ)
        raise TrainingError(
            f"--model_dir {config.model_dir} holds checkpoints of another model ({was}); this "
            f"run asks for {now}. Use another --model_dir to start anew, or the same flags to "
            f"resume; nothing in {config.model_dir} was changed."
        )
    # A resumed run keeps its recipe: another one would change the schedule and the
    # augmentation in mid-run, without a word in the record.
    if "recipe" in previous and previous["recipe"] != config.recipe:
        raise TrainingError(
            f"--model_dir {config.model_dir} holds checkpoints of a run with "
            f"--recipe={previous['recipe']}; this run asks for --recipe={config.recipe}. A run "
            f"resumes with its own recipe: pass --recipe={previous['recipe']} to resume (flags "
            f"such as --epochs may change), or use another --model_dir to start anew; nothing "
            f"in {config.model_dir} was changed."
        )
    # The normalization is built into the model from the release it started from, and a
    # checkpoint does not hold it: a run fine-tuned from "cifar10" resumes with CIFAR's.
    started = previous.get("weights")
    if config.weights is None and started and _normalization(previous, started) != (
        _normalization(previous, None)
    ):
        raise TrainingError(
            f"--model_dir {config.model_dir} holds checkpoints of a run that started from "
            f"--weights={started}, whose images are normalized with that release's mean and "
            f"std; this run gives no --weights and would use ImageNet's. Pass "
            f"--weights={started} to resume (the checkpoint's weights replace the release's); "
            f"nothing in {config.model_dir} was changed."
        )
    return previous


def _normalization(record, weights):
    """(mean, std) of a run of `record`'s model started from `weights` (a release name, or
    anything else: ImageNet's)."""
    if weights and pretrained.is_release_name(weights) and record.get("model"):
        try:
            release = pretrained.find_release(record["model"], weights, record.get("image_size"))
            return tuple(release.mean), tuple(release.std)
        except ValueError:
            pass
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def _check_pod_paths(config, strategy):
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


def _check_tensorboard():
    """The summaries need tensorboard (the `train` extra): say so now, not at the first log."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise TrainingError(
            "Training writes TensorBoard summaries and needs the tensorboard package: "
            "pip install keras-t2t[train] (or pip install tensorboard)."
        ) from None


def _first_line(error):
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0][:300]


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# Where TF says an error came from the input pipeline: the iterator op of the step, or the
# tf.data iterator chain ("Iterator::Root::Prefetch::...").
_INPUT_PIPELINE_MARKERS = ("IteratorGetNext", "Iterator::", "MultiDeviceIterator")


def is_data_error(error):
    """Whether an error raised by a step comes from reading, parsing or decoding the data.

    Only those become "Bad data" messages; anything else (an XLA or TPU compilation failure,
    a shape error in the model) keeps its own type, message and traceback.
    """
    if isinstance(error, tf.errors.DataLossError):
        return True
    text = getattr(error, "message", None) or str(error)
    return any(marker in text for marker in _INPUT_PIPELINE_MARKERS)


# What TF puts around an op's own words: "Graph execution error:", the node's trace, the
# names of graph nodes ({{function_node ...}}, [[{{node ...}}]]) and the op ([Op:...]).
_NOISE_LINES = ("Graph execution error", "Detected at node", "<stack traces", "[[", "File ", "}}")
_NODE_NAMES = re.compile(r"\{\{[^}]*\}\}|\s*\[\[[^\]]*\]\]|\s*\[Op:[^\]]*\].*$")


def _error_detail(error):
    """The op's own words in a TF error's message (its first line that is not noise)."""
    text = getattr(error, "message", None) or str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    detail = next((line for line in lines if not line.startswith(_NOISE_LINES)), lines[0])
    return _NODE_NAMES.sub("", detail).strip()[:300]


def _data_error_message(error):
    text = getattr(error, "message", str(error))
    if "label out of range" in text:
        # The assertion's message, without the brackets and the values TF prints after it
        # ("] [Condition x < y did not hold element-wise:] [x (sub:0) = ] [2] ..."), nor the
        # escaped quote of its summary.
        detail = text[text.index("label out of range") :].split("\n")[0].split("]")[0]
        detail = detail.replace("\\'", "'").rstrip(" .")
        return f"Bad data: {detail}."
    return (
        f"Bad data: a record could not be read or decoded ({type(error).__name__}: "
        f"{_error_detail(error)}). The TFRecords are corrupt or not in the ImageNet "
        f"layout (image/encoded JPEG, image/class/label); rewrite them with "
        f"training/build_tfrecords.py. Checkpoints already saved are kept."
    )


# What the input pipeline raises for a file that is gone or cannot be opened, not for its
# bytes: a shard deleted, moved or made unreadable after the files were checked.
DATA_READ_ERRORS = (tf.errors.NotFoundError, tf.errors.PermissionDeniedError)
# Every error of the input pipeline that becomes a one-line message (see `is_data_error`).
DATA_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError, *DATA_READ_ERRORS)


def unreadable_data_message(error, split, then):
    """The message for a TFRecord shard that could not be opened in the middle of a pass
    (`DATA_READ_ERRORS`); `then` says what is kept and how to go on."""
    how = "deleted or moved" if isinstance(error, tf.errors.NotFoundError) else "made unreadable"
    return (
        f"Cannot read the {split} TFRecords: {_error_detail(error)} ({type(error).__name__}). "
        f"A shard was {how} after the files were checked at the start. {then}"
    )


# A full disk: ENOSPC or EDQUOT, as TF, h5py and Python word it.
_DISK_FULL_TEXT = re.compile(r"no space left on device|disk quota exceeded", re.IGNORECASE)


def is_disk_full(error):
    """Whether `error` says that the disk (or the quota) is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = getattr(error, "message", None) or str(error)
    return bool(_DISK_FULL_TEXT.search(text))
