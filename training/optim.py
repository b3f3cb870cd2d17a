"""How the weights move: the AdamW optimizer (PyTorch's epsilon, no decay on norms, biases
and the class token, layer-wise learning-rate decay when asked), float16 loss scaling, the
warmup-cosine schedule, and the EMA of the weights.

Sections: the optimizer -> the EMA.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_t2t.layer_decay import LayerDecay, layer_decay_multipliers

# --- the optimizer --------------------------------------------------------------------------


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


class LayerDecayAdamW(LayerDecay, AdamW):
    """The AdamW above with a learning-rate multiplier per variable (`--layer_decay`; see
    `keras_t2t.layer_decay`): each variable's step and weight decay use its own rate."""


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
    """(optimizer, schedule) of a run, built for `model`: AdamW with `no_weight_decay` (in a
    LossScaleOptimizer under float16), and a learning rate that rises linearly from
    `config.warmup_lr` to the peak (`config.learning_rate` scaled from batch 512), then follows
    a cosine down to `config.min_lr`, held there for the cooldown epochs. With
    `config.layer_decay` (below 1), each variable's rate is that times its
    `layer_decay_multipliers`."""
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
    arguments = dict(
        learning_rate=schedule,
        weight_decay=config.weight_decay,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
    )
    if config.layer_decay is not None and config.layer_decay != 1:
        multipliers = layer_decay_multipliers(model, config.layer_decay)
        optimizer = LayerDecayAdamW(lr_multipliers=multipliers, **arguments)
    else:
        optimizer = AdamW(**arguments)
    optimizer.exclude_from_weight_decay(var_list=no_weight_decay(model))
    if config.mixed_precision == "float16":
        optimizer = LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer, schedule


# --- the EMA --------------------------------------------------------------------------------


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
