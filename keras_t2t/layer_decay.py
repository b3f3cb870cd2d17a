"""Layer-wise learning-rate decay for fine-tuning (BEiT; timm's `layer_decay`).

A model of `depth` blocks has `num_layers = depth + 1` layers: the T2T module
(`tokens_to_token`), the class token and the position table are layer 0, block `i`
(`blocks_<i>`) is layer `i + 1`, and the final norm and the head (and anything else after
the blocks) are layer `num_layers`. A variable of layer `l` learns at
`decay ** (num_layers - l)` times the learning rate: the head at the full rate, each block
below it `decay` times slower than the one above.

Keras 3 optimizers have one learning rate for all variables, so `LayerDecay` (a mixin for any
Keras optimizer) and `LayerDecayAdamW` (the one fine-tuning uses) take the multipliers of
`layer_decay_multipliers` and scale the learning rate of each variable's update, as timm does
with one param group per layer: for AdamW the decoupled weight decay `lr * wd * w` is scaled
with it. Scaling the gradients instead would be wrong for Adam, whose update does not change
when its gradients are scaled.

>>> import keras_t2t
>>> model = keras_t2t.T2TViT7(input_shape=(32, 32, 3), classes=10)  # 7 blocks: 8 layers
>>> multipliers = keras_t2t.layer_decay_multipliers(model, 0.5)
>>> [multipliers[path] for path in ("head/kernel", "blocks_6/mlp/fc1/kernel", "cls_token/token")]
[1.0, 0.5, 0.00390625]
>>> optimizer = keras_t2t.LayerDecayAdamW(
...     learning_rate=1e-4, weight_decay=0.05, lr_multipliers=multipliers
... )
>>> model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
"""

import re

import keras
from keras import ops

# The path components of layer 0: the T2T module, the class token, the position table.
STEM_LAYERS = ("tokens_to_token", "cls_token", "pos_embed")
_BLOCK = re.compile(r"blocks_(\d+)")


def layer_id(path, num_layers):
    """The layer of the variable at `path` (e.g. `"blocks_3/attn/qkv/kernel"`: 4), for a model
    of `num_layers - 1` blocks. The first path component that names a layer decides, so a
    T2T-ViT nested in another model (`"t2t_vit_7/blocks_3/..."`) is read alike."""
    for part in path.split("/"):
        if part in STEM_LAYERS:
            return 0
        match = _BLOCK.fullmatch(part)
        if match:
            return int(match.group(1)) + 1
    return num_layers


def layer_decay_multipliers(model, decay):
    """`{variable.path: decay ** (num_layers - layer_id)}` for every weight of `model`, a
    keras_t2t T2T-ViT (with or without its head, or nested in a larger model).

    Args:
        model: the model to fine-tune; its blocks are the layers named `blocks_<i>`.
        decay: in (0, 1]; 1 gives every variable the multiplier 1 (no decay). Fine-tuning
            recipes use 0.65 to 0.85 (BEiT: 0.65 for ViT-B; MAE: 0.75).

    Returns:
        A dict from `variable.path` to a float, for `LayerDecayAdamW(lr_multipliers=...)`,
        `LayerDecay`, or the trainer's `--layer_decay`.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ValueError(
            f"The layer decay must be a number in (0, 1] (e.g. 0.75; 1 is no decay), received "
            f"{decay!r}."
        )
    weights = getattr(model, "weights", None)
    blocks = set()
    for variable in weights or ():
        for part in variable.path.split("/"):
            match = _BLOCK.fullmatch(part)
            if match:
                blocks.add(int(match.group(1)))
                break
    if not isinstance(model, keras.Model) or not blocks:
        raise ValueError(
            f"Expected a keras_t2t T2T-ViT model (e.g. keras_t2t.T2TViT14()) with its blocks "
            f"(layers named blocks_0, blocks_1, ...), received {type(model).__name__} with no "
            f"such weights."
        )
    num_layers = max(blocks) + 2  # depth + 1
    return {
        v.path: float(decay) ** (num_layers - layer_id(v.path, num_layers)) for v in model.weights
    }


class LayerDecay:
    """Mixin that gives a Keras optimizer a learning-rate multiplier per variable.

    `class MyOptimizer(LayerDecay, keras.optimizers.Lion): pass` makes an optimizer that takes
    `lr_multipliers` (a dict `{variable.path: multiplier}`, from `layer_decay_multipliers`)
    besides the base class' arguments. Each variable's `update_step` gets the learning rate
    times its multiplier, and the decoupled weight decay (`w -= lr * weight_decay * w`,
    Keras' formula) uses that same learning rate, per variable. This is exact for optimizers
    whose update is linear in the learning rate (SGD with or without momentum, Adam, AdamW,
    Nadam, Adamax, Lion, RMSprop, Adagrad, Adadelta), where it is timm's param groups; not for
    Ftrl. Every trainable variable the optimizer is built for needs an entry.
    """

    def __init__(self, *args, lr_multipliers, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(lr_multipliers, dict) or not all(
            isinstance(m, (int, float)) and not isinstance(m, bool) and m >= 0
            for m in lr_multipliers.values()
        ):
            raise ValueError(
                f"`lr_multipliers` must be a dict from variable paths to numbers >= 0 (see "
                f"keras_t2t.layer_decay_multipliers), received {type(lr_multipliers).__name__}."
            )
        self.lr_multipliers = {str(k): float(m) for k, m in lr_multipliers.items()}
        self._lr_scales = []

    def build(self, variables):
        super().build(variables)
        missing = [v.path for v in self._trainable_variables if v.path not in self.lr_multipliers]
        if missing:
            raise ValueError(
                f"`lr_multipliers` has no entry for {len(missing)} of the variables to train, "
                f"e.g. {missing[:3]}. Compute them from the model being trained: "
                f"lr_multipliers=keras_t2t.layer_decay_multipliers(model, decay)."
            )
        # By the optimizer's own variable index (`_get_variable_index`).
        self._lr_scales = [self.lr_multipliers[v.path] for v in self._trainable_variables]

    def update_step(self, gradient, variable, learning_rate):
        scale = self._lr_scales[self._get_variable_index(variable)]
        if scale != 1.0:
            learning_rate = ops.multiply(learning_rate, scale)
        if self.weight_decay is not None and self._use_weight_decay(variable):
            lr = ops.cast(learning_rate, variable.dtype)
            wd = ops.cast(self.weight_decay, variable.dtype)
            self.assign_sub(variable, variable * wd * lr)
        return super().update_step(gradient, variable, learning_rate)

    def _apply_weight_decay(self, variables):
        """Nothing: `update_step` decays each variable with its own learning rate."""

    def get_config(self):
        config = super().get_config()
        config["lr_multipliers"] = dict(self.lr_multipliers)
        return config


@keras.saving.register_keras_serializable(package="keras_t2t")
class LayerDecayAdamW(LayerDecay, keras.optimizers.AdamW):
    """Keras' AdamW with a learning-rate multiplier per variable (`LayerDecay`): the
    optimizer of layer-wise learning-rate decay. Takes `keras.optimizers.AdamW`'s arguments
    and `lr_multipliers=keras_t2t.layer_decay_multipliers(model, decay)`; the multiplier scales
    the Adam step and the weight decay of each variable."""
