"""Keras layers of T2T-ViT, each usable, testable and serializable on its own.

The data path is one-way: image -> `SoftSplit` -> `TokenPerformer` / `TokenTransformer`
-> `Restructure` -> ... (all inside `T2TModule`) -> `ClassToken` -> `PositionEmbedding`
-> `TransformerBlock` x depth -> LayerNorm -> head.

Layouts are TensorFlow's: images are NHWC, tokens are (batch, tokens, channels) in
row-major order, and a soft-split patch vector is ordered `(i * k + j) * C + c` (the order of
`tf.image.extract_patches`). Official PyTorch weights, whose patch vectors are channel-major,
are permuted once when they are loaded (`keras_t2t.weights`), so inference pays nothing.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_t2t.configs import SOFT_SPLITS

LAYER_NORM_EPSILON = 1e-5

_register = keras.saving.register_keras_serializable(package="keras_t2t")


def official_init():
    """The official weight initialization, timm's `trunc_normal_(std=.02)`.

    timm truncates at the absolute values +-2 (its defaults a=-2, b=2), which is 100 standard
    deviations: no draw is ever cut, so it is a plain normal of std 0.02. Keras'
    `TruncatedNormal(stddev=0.02)` would cut at 2 std (+-0.04) and give a std of 0.0176.
    """
    return keras.initializers.RandomNormal(stddev=0.02)


def _dense(units, name, use_bias=True, dtype=None):
    """A Dense layer with the official initialization (normal 0.02, zero bias).

    `dtype`: the parent's dtype policy (`dtype=self.dtype_policy`), so that a layer made with
    `dtype="mixed_float16"` computes in float16 throughout, not only its own ops."""
    return keras.layers.Dense(
        units,
        use_bias=use_bias,
        kernel_initializer=official_init(),
        bias_initializer="zeros",
        name=name,
        dtype=dtype,
    )


def _layer_norm(name, epsilon=LAYER_NORM_EPSILON, dtype=None):
    return LayerNorm(epsilon=epsilon, name=name, dtype=dtype)


def _tensorflow():
    """The `tensorflow` module on the TensorFlow backend, else None (never imported there)."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf


def _dim(x, axis):
    """The size of `x` along `axis`: its static int where known (the graph then holds no
    shape op, as in a model of fixed size), else a scalar tensor (a dynamic image size)."""
    size = x.shape[axis]
    return size if size is not None else ops.shape(x)[axis]


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, received {value!r}.")
    return int(value)


def _check_rate(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a float in [0, 1), received {value!r}.")
    return float(value)


@_register
class LayerNorm(keras.layers.LayerNormalization):
    """LayerNormalization over the last axis, computed in float32, in one form everywhere.

    The same weights (`gamma`, `beta`) and results as Keras' layer, written as
    `(x - mean) / sqrt(variance + epsilon) * gamma + beta` over a 1-D axes list: the form that
    OpenVINO fuses into one MVN and ONNX Runtime into one LayerNormalization (as they do the
    official model's), and faster in TensorFlow graphs than Keras' own (see
    `benchmarks/benchmark.py --ablations`). Other axes or configurations take Keras' own.
    """

    def call(self, inputs):
        axes = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        last = axes in ([-1], [len(inputs.shape) - 1])
        plain = self.center and self.scale and not getattr(self, "rms_scaling", False)
        if not (last and plain):
            return super().call(inputs)
        x = ops.cast(inputs, "float32")
        mean = ops.mean(x, axis=[-1], keepdims=True)
        centered = x - mean
        variance = ops.mean(ops.square(centered), axis=[-1], keepdims=True)
        x = centered / ops.sqrt(variance + self.epsilon)
        x = x * ops.cast(self.gamma, "float32") + ops.cast(self.beta, "float32")
        return ops.cast(x, self.compute_dtype)


def patch_permutation(channels, kernel_size):
    """Index map from TF patch order to PyTorch `nn.Unfold` order.

    `tf.image.extract_patches` orders a patch vector `(i * k + j) * C + c`; PyTorch's unfold
    orders it `c * k * k + i * k + j`. Entry `t` of the result is the PyTorch index of TF
    index `t`, so `torch_vector[perm]` is the TF vector.

    >>> patch_permutation(2, 2).tolist()
    [0, 4, 1, 5, 2, 6, 3, 7]
    """
    kk = kernel_size * kernel_size
    return np.arange(channels * kk).reshape(channels, kk).T.reshape(-1)


def gelu(x):
    """The exact GELU, `0.5 * x * (1 + erf(x / sqrt(2)))`: the official model's form, one
    Gelu op (or a post-op of the Linear before it) in ONNX Runtime and OpenVINO, and fused
    into the matmul by oneDNN in TensorFlow graphs. (TensorFlow's own `tf.nn.gelu` writes
    `erfc`, which ONNX lacks.)"""
    return 0.5 * x * (1.0 + ops.erf(x / math.sqrt(2.0)))


def _policy(layer):
    """`layer`'s own dtype policy (its entry where it was given a DTypePolicyMap)."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy[layer.path] if layer.path else policy.default_policy
    return policy


class _Composite(keras.layers.Layer):
    """A layer made of sublayers that it creates itself, whose configs are not saved.

    Where `model.quantize` (or a dtype policy set on a sublayer) changed a sublayer's policy,
    `get_config` records it in a `DTypePolicyMap` keyed by the sublayers' paths, which the
    layer passes down as `dtype` and each sublayer reads by its path when it is made again (as
    KerasHub's backbones do): a quantized model round-trips through `.keras`.
    """

    def get_config(self):
        config = super().get_config()
        own = _policy(self)
        changed = {
            layer.path: _policy(layer)
            for layer in self._flatten_layers(include_self=False)
            if layer.path and _policy(layer).name != own.name
        }
        if changed:
            policies = keras.dtype_policies.DTypePolicyMap(own, changed)
            config["dtype"] = keras.dtype_policies.serialize(policies)
        return config


@_register
class SoftSplit(keras.layers.Layer):
    """Soft split: overlapping patches of an NHWC map, as tokens.

    Pads `padding` zeros on every side (symmetric, as PyTorch's `nn.Unfold`; TF's "SAME"
    would pad (1, 2) and shift every window), then takes `kernel_size` x `kernel_size`
    windows every `strides` pixels. Output: `(batch, out_h * out_w, k * k * C)`, row-major
    tokens, each patch ordered `(i * k + j) * C + c`.

    Args:
        kernel_size: window side.
        strides: step between windows.
        padding: zeros added on each side.
        implementation: how the windows are gathered; every choice gives identical outputs.
            `"slices"` (default): k*k strided slices and a concatenation, pure `keras.ops`,
            which every backend, XLA and every converter (TFLite builtins, ONNX, OpenVINO)
            take. `"conv"`: a convolution with a one-hot kernel (each output channel copies
            one input value: exact for finite inputs), which TensorFlow runs 2x faster than
            extract_patches on the 3-channel image and 3-4x slower on the 64-channel maps.
            `"patches"`: `tf.image.extract_patches`, fast in TensorFlow graphs but converted
            to no TFLite builtin and to an ONNX Reshape that ONNX Runtime refuses (the
            slices on the JAX and PyTorch backends). `T2TModule` chooses per split.

    >>> import numpy as np
    >>> split = SoftSplit(kernel_size=3, strides=2, padding=1)
    >>> tuple(split(np.zeros((1, 8, 8, 4), "float32")).shape)
    (1, 16, 36)
    """

    IMPLEMENTATIONS = ("slices", "conv", "patches")

    def __init__(self, kernel_size, strides, padding, implementation="slices", **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = _check_int("kernel_size", kernel_size)
        self.strides = _check_int("strides", strides)
        self.padding = _check_int("padding", padding, minimum=0)
        if implementation not in self.IMPLEMENTATIONS:
            raise ValueError(
                f"`implementation` must be one of {self.IMPLEMENTATIONS}, "
                f"received {implementation!r}."
            )
        self.implementation = implementation

    def output_size(self, size):
        """Windows along an axis of `size` pixels, `(size + 2p - k) // s + 1`: for a Python
        int (None stays None) or a scalar tensor (a dynamic side)."""
        if size is None:
            return None
        return (size + 2 * self.padding - self.kernel_size) // self.strides + 1

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        if channels is None:
            raise ValueError(
                f"SoftSplit needs a static channel count, received input shape "
                f"{tuple(input_shape)}."
            )
        out_h, out_w = self.output_size(height), self.output_size(width)
        tokens = None if out_h is None or out_w is None else out_h * out_w
        return (batch, tokens, self.kernel_size * self.kernel_size * channels)

    def call(self, inputs):
        height, width, channels = _dim(inputs, 1), _dim(inputs, 2), inputs.shape[-1]
        k, s, p = self.kernel_size, self.strides, self.padding
        out_h, out_w = self.output_size(height), self.output_size(width)
        x = ops.pad(inputs, [[0, 0], [p, p], [p, p], [0, 0]]) if p else inputs
        implementation = self.implementation
        if implementation == "patches" and _tensorflow() is None:
            implementation = "slices"  # the same values; extract_patches is TensorFlow's
        if implementation == "patches":
            patches = _tensorflow().image.extract_patches(
                x, sizes=[1, k, k, 1], strides=[1, s, s, 1], rates=[1, 1, 1, 1], padding="VALID"
            )
        elif implementation == "conv":
            # Output channel (i * k + j) * C + c takes input (i, j, c): the patch order of
            # extract_patches. A kernel entry of 1 times a value, plus zeros, is that value.
            kernel = np.eye(k * k * channels, dtype="float32").reshape(k, k, channels, -1)
            patches = ops.conv(x, ops.cast(kernel, x.dtype), strides=s, padding="valid")
        else:
            # Each slice ends k - 1 - i rows before the end of the padded map, not at an index
            # computed from the static size: on a larger map than the graph was built for, the
            # slices grow with it (and the reshape below refuses it) instead of silently
            # reading the top-left corner; and a map of dynamic size takes the same slices.
            def window(offset):
                end = offset - (k - 1)
                return slice(offset, end if end < 0 else None, s)

            patches = ops.concatenate(
                [x[:, window(i), window(j), :] for i in range(k) for j in range(k)], axis=-1
            )
        # The batch is given, not inferred (-1): an image larger than the graph's static size
        # (an exported graph receives any size) makes more patches, which a -1 would fold into
        # extra rows of the batch, a wrong answer; this way the reshape refuses them. Where the
        # height and width are dynamic, the token count is computed from them in the graph.
        return ops.reshape(patches, (ops.shape(inputs)[0], out_h * out_w, k * k * channels))

    def get_config(self):
        config = super().get_config()
        config.update(
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            implementation=self.implementation,
        )
        return config


@_register
class Restructure(keras.layers.Layer):
    """Re-structurization: row-major tokens `(batch, h * w, C)` back to a map `(batch, h, w, C)`.

    Call it with `grid_size=(h, w)` (Python ints, or scalar tensors where the map's size is
    dynamic, as `T2TModule` does); without it, the grid is the square of a static token count.

    >>> import numpy as np
    >>> tuple(Restructure()(np.zeros((1, 6, 4), "float32"), grid_size=(2, 3)).shape)
    (1, 2, 3, 4)
    """

    def _side(self, tokens):
        side = math.isqrt(tokens) if tokens is not None else None
        if side is None or side * side != tokens:
            raise ValueError(
                f"Restructure needs a square number of tokens, received {tokens} tokens; pass "
                f"`grid_size=(height, width)` for another grid."
            )
        return side

    def compute_output_shape(self, input_shape):
        side = self._side(input_shape[1])
        return (input_shape[0], side, side, input_shape[2])

    def call(self, inputs, grid_size=None):
        height, width = (self._side(inputs.shape[1]),) * 2 if grid_size is None else grid_size
        return ops.reshape(inputs, (ops.shape(inputs)[0], height, width, inputs.shape[2]))


@_register
class Mlp(_Composite):
    """Linear -> exact (erf) GELU -> dropout -> Linear -> dropout (sublayers `fc1`, `fc2`).

    Args:
        hidden_units: width of `fc1`.
        output_units: width of `fc2`; defaults to the input width.
        dropout_rate: dropout after `fc2`, and after the activation if `hidden_dropout`.
        hidden_dropout: also drop out after the activation (timm's Mlp, the backbone's);
            the performer's official MLP (Linear, GELU, Linear, Dropout) does not.
    """

    def __init__(
        self, hidden_units, output_units=None, dropout_rate=0.0, hidden_dropout=True, **kwargs
    ):
        super().__init__(**kwargs)
        self.hidden_units = _check_int("hidden_units", hidden_units)
        self.output_units = (
            None if output_units is None else _check_int("output_units", output_units)
        )
        self.dropout_rate = _check_rate("dropout_rate", dropout_rate)
        self.hidden_dropout = bool(hidden_dropout)
        self.fc1 = _dense(self.hidden_units, "fc1", dtype=self.dtype_policy)
        self.dropout = keras.layers.Dropout(
            self.dropout_rate, name="dropout", dtype=self.dtype_policy
        )
        self.fc2 = None

    def build(self, input_shape):
        units = self.output_units or input_shape[-1]
        self.fc2 = _dense(units, "fc2", dtype=self.dtype_policy)
        self.fc1.build(input_shape)
        self.fc2.build((*input_shape[:-1], self.hidden_units))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.output_units or input_shape[-1])

    def call(self, inputs, training=None):
        x = gelu(self.fc1(inputs))
        if self.hidden_dropout:
            x = self.dropout(x, training=training)
        return self.dropout(self.fc2(x), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_units=self.hidden_units,
            output_units=self.output_units,
            dropout_rate=self.dropout_rate,
            hidden_dropout=self.hidden_dropout,
        )
        return config


@_register
class TokenPerformer(_Composite):
    """The "performer" T2T layer: linear attention with positive random features.

    Pre-norm LayerNorm over the input width; `kqv` Dense(3 * token_dim) with bias, split
    k, q, v; phi(u) = exp(u w^T - |u|^2 / 2) / sqrt(m) with a frozen random matrix `w`
    (m = token_dim * kernel_ratio); y = phi(q) (v^T phi(k))^T / (phi(q) . sum_t phi(k_t) + 1e-8);
    out = v + dropout(proj(y)) (a "v" residual, since the width changes), then
    out + Mlp(LayerNorm(out)), whose only dropout is after its second Linear (as the official).

    The random-feature attention is computed in float32 whatever the dtype policy: in float16
    the 1e-8 underflows and training turns to NaN (a known problem of the official code).
    `w` is a frozen weight loaded from the official checkpoints: it cannot be regenerated.
    """

    def __init__(
        self,
        token_dim=64,
        kernel_ratio=0.5,
        dropout_rate=0.1,
        epsilon=1e-8,
        layer_norm_epsilon=LAYER_NORM_EPSILON,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.token_dim = _check_int("token_dim", token_dim)
        if not 0.0 < kernel_ratio <= 1.0:
            raise ValueError(f"`kernel_ratio` must be in (0, 1], received {kernel_ratio!r}.")
        self.kernel_ratio = float(kernel_ratio)
        self.num_features = int(self.token_dim * self.kernel_ratio)
        self.dropout_rate = _check_rate("dropout_rate", dropout_rate)
        self.epsilon = float(epsilon)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        policy = self.dtype_policy
        self.norm1 = _layer_norm("norm1", self.layer_norm_epsilon, dtype=policy)
        self.kqv = _dense(3 * self.token_dim, "kqv", dtype=policy)
        self.proj = _dense(self.token_dim, "proj", dtype=policy)
        self.proj_dropout = keras.layers.Dropout(
            self.dropout_rate, name="proj_dropout", dtype=policy
        )
        self.norm2 = _layer_norm("norm2", self.layer_norm_epsilon, dtype=policy)
        # The official Token_performer.mlp: Linear, GELU, Linear, Dropout (one dropout).
        self.mlp = Mlp(
            self.token_dim,
            self.token_dim,
            self.dropout_rate,
            hidden_dropout=False,
            name="mlp",
            dtype=policy,
        )

    def build(self, input_shape):
        self.norm1.build(input_shape)
        self.kqv.build(input_shape)
        token_shape = (*input_shape[:-1], self.token_dim)
        self.proj.build(token_shape)
        self.norm2.build(token_shape)
        self.mlp.build(token_shape)
        m = self.num_features
        self.w = self.add_weight(
            shape=(m, self.token_dim),
            initializer=keras.initializers.Orthogonal(gain=math.sqrt(m)),
            trainable=False,
            dtype="float32",
            autocast=False,
            name="w",
        )

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.token_dim)

    # phi is computed scaled by FEATURE_SCALE, and the epsilon by FEATURE_SCALE**2: y is the
    # same in float32, but the constant becomes 1e-4 instead of 1e-8, which survives a
    # converter that stores constants in float16 (1e-8 flushes to 0 there, and in the
    # epsilon-dominated regime that changes the output).
    FEATURE_SCALE = 100.0

    def _feature_map(self, u):
        # exp(u w^T - |u|^2 / 2) / sqrt(m), times FEATURE_SCALE, in float32.
        wtu = ops.matmul(u, ops.transpose(self.w))
        half_norm = 0.5 * ops.sum(u * u, axis=-1, keepdims=True)
        return ops.exp(wtu - half_norm) * (self.FEATURE_SCALE / math.sqrt(self.num_features))

    def _kernel(self, inputs):
        """(phi(q), phi(k), v, normalizer + epsilon), phi in float32 and scaled."""
        k, q, v = self._projections(self.norm1(inputs))
        kp = self._feature_map(ops.cast(k, "float32"))  # (B, T, m)
        qp = self._feature_map(ops.cast(q, "float32"))  # (B, T, m)
        denominator = ops.matmul(qp, ops.sum(kp, axis=1)[:, :, None])  # (B, T, 1)
        return qp, kp, v, denominator + self.epsilon * self.FEATURE_SCALE**2

    def _projections(self, x):
        """k, q, v (the official order) from the one `kqv` Dense."""
        return ops.split(self.kqv(x), 3, axis=-1)

    def attention_weights(self, inputs):
        """The kernel attention made explicit, `(batch, T, T)`: phi(q) phi(k)^T divided by the
        layer's normalizer, so that `y = A v` and rows sum to 1 (less the epsilon).
        For inspection (`keras_t2t.explain`); the layer itself never forms this matrix."""
        qp, kp, _, denominator = self._kernel(inputs)
        return ops.matmul(qp, ops.transpose(kp, (0, 2, 1))) / denominator

    def call(self, inputs, training=None):
        qp, kp, v, denominator = self._kernel(inputs)
        kptv = ops.matmul(ops.transpose(kp, (0, 2, 1)), ops.cast(v, "float32"))  # (B, m, D)
        y = ops.matmul(qp, kptv) / denominator  # (B, T, token_dim)
        y = ops.cast(y, self.compute_dtype)
        x = v + self.proj_dropout(self.proj(y), training=training)
        return x + self.mlp(self.norm2(x), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            token_dim=self.token_dim,
            kernel_ratio=self.kernel_ratio,
            dropout_rate=self.dropout_rate,
            epsilon=self.epsilon,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


@_register
class TokenTransformer(_Composite):
    """The "transformer" T2T layer (the `_t` variants): one-head softmax attention.

    Pre-norm; `qkv` Dense(3 * token_dim) without bias, split q, k, v; the scale is
    `input_width ** -0.5` (147 or 576 in T2T-ViT, not `token_dim ** -0.5`, as in the official
    code); out = v + proj(softmax(q k^T * scale) v); then out + Mlp(LayerNorm(out)).
    """

    def __init__(
        self, token_dim=64, mlp_ratio=1.0, layer_norm_epsilon=LAYER_NORM_EPSILON, **kwargs
    ):
        super().__init__(**kwargs)
        self.token_dim = _check_int("token_dim", token_dim)
        self.mlp_ratio = float(mlp_ratio)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        policy = self.dtype_policy
        self.norm1 = _layer_norm("norm1", self.layer_norm_epsilon, dtype=policy)
        self.qkv = _dense(3 * self.token_dim, "qkv", use_bias=False, dtype=policy)
        self.proj = _dense(self.token_dim, "proj", dtype=policy)
        self.norm2 = _layer_norm("norm2", self.layer_norm_epsilon, dtype=policy)
        self.mlp = Mlp(
            int(self.token_dim * self.mlp_ratio), self.token_dim, name="mlp", dtype=policy
        )
        self.scale = None

    def build(self, input_shape):
        self.scale = float(input_shape[-1]) ** -0.5
        self.norm1.build(input_shape)
        self.qkv.build(input_shape)
        token_shape = (*input_shape[:-1], self.token_dim)
        self.proj.build(token_shape)
        self.norm2.build(token_shape)
        self.mlp.build(token_shape)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.token_dim)

    def _projections(self, x):
        """q, k, v from the one `qkv` Dense."""
        return ops.split(self.qkv(x), 3, axis=-1)

    def _attention(self, inputs):
        q, k, v = self._projections(self.norm1(inputs))
        return _softmax(ops.matmul(q * self.scale, ops.transpose(k, (0, 2, 1)))), v

    def attention_weights(self, inputs):
        """The softmax attention, `(batch, T, T)` (for `keras_t2t.explain`)."""
        return self._attention(inputs)[0]

    def call(self, inputs, training=None):
        attention, v = self._attention(inputs)
        x = v + self.proj(ops.matmul(attention, v))
        return x + self.mlp(self.norm2(x), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            token_dim=self.token_dim,
            mlp_ratio=self.mlp_ratio,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


T2T_LAYERS = {"performer": TokenPerformer, "transformer": TokenTransformer}


def _softmax(logits):
    """Softmax over the last axis in float32 (under mixed precision too), cast back."""
    return ops.cast(ops.softmax(ops.cast(logits, "float32"), axis=-1), logits.dtype)


@_register
class T2TModule(_Composite):
    """The Tokens-to-Token module: image (NHWC) -> `(batch, (side / 16) ** 2, embed_dim)`.

    soft split (7, 4, 2) -> T2T layer -> re-structurize -> soft split (3, 2, 1) -> T2T layer
    -> re-structurize -> soft split (3, 2, 1) -> Linear `project`. There is no T2T layer after
    the third split.

    Call with `return_feature_maps=True` to also get the two intermediate maps,
    `(side / 4, side / 4, token_dim)` and `(side / 8, side / 8, token_dim)`.

    Args:
        tokens_type: `"performer"` or `"transformer"`.
        embed_dim: width of the output tokens.
        token_dim: width of the T2T layers (64 in every official variant).
        soft_split_implementation: the three soft splits' `SoftSplit` implementations, a
            list of three, or one name for all three. `"auto"` (default) is resolved here,
            from the backend only: on TensorFlow the one-hot convolution for the image and
            strided slices for the token maps, elsewhere slices throughout. Each of these
            converts to every format (TFLite builtins, ONNX, OpenVINO); the fast TensorFlow
            form for the maps, extract_patches, is a deployment transform
            (`keras_t2t.inference.prepare`). The resolved list is
            `soft_split_implementations`.
    """

    def __init__(
        self,
        tokens_type="performer",
        embed_dim=384,
        token_dim=64,
        soft_split_implementation="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if tokens_type not in T2T_LAYERS:
            raise ValueError(
                f"`tokens_type` must be one of {tuple(T2T_LAYERS)}, received {tokens_type!r}."
            )
        self.tokens_type = tokens_type
        self.embed_dim = _check_int("embed_dim", embed_dim)
        self.token_dim = _check_int("token_dim", token_dim)
        self.soft_split_implementation = (
            soft_split_implementation
            if isinstance(soft_split_implementation, str)
            else list(soft_split_implementation)
        )
        self.soft_split_implementations = self.resolve_soft_splits(soft_split_implementation)
        policy = self.dtype_policy
        self.soft_split0, self.soft_split1, self.soft_split2 = (
            SoftSplit(*geometry, implementation=implementation, dtype=policy, name=f"soft_split{i}")
            for i, (geometry, implementation) in enumerate(
                zip(SOFT_SPLITS, self.soft_split_implementations)
            )
        )
        t2t_layer = T2T_LAYERS[tokens_type]
        self.attention1 = t2t_layer(token_dim=self.token_dim, name="attention1", dtype=policy)
        self.attention2 = t2t_layer(token_dim=self.token_dim, name="attention2", dtype=policy)
        self.restructure = Restructure(name="restructure", dtype=policy)
        self.project = _dense(self.embed_dim, "project", dtype=policy)

    @staticmethod
    def resolve_soft_splits(implementation):
        """The three soft splits' implementations for a `soft_split_implementation` value
        (see the class's Args), from the backend only.

        >>> T2TModule.resolve_soft_splits(["conv", "patches", "patches"])
        ('conv', 'patches', 'patches')
        """
        if implementation == "auto":
            first = "conv" if _tensorflow() is not None else "slices"
            return (first, "slices", "slices")
        implementations = (
            (implementation,) * 3 if isinstance(implementation, str) else tuple(implementation)
        )
        if len(implementations) != 3 or not all(
            i in SoftSplit.IMPLEMENTATIONS for i in implementations
        ):
            raise ValueError(
                f"`soft_split_implementation` must be 'auto', one of "
                f"{SoftSplit.IMPLEMENTATIONS} or a list of three of them, received "
                f"{implementation!r}."
            )
        return implementations

    def build(self, input_shape):
        self.attention1.build(self.soft_split0.compute_output_shape(input_shape))
        token_map = (input_shape[0], None, None, self.token_dim)  # weights need the width only
        self.attention2.build(self.soft_split1.compute_output_shape(token_map))
        self.project.build(self.soft_split2.compute_output_shape(token_map))

    def grid_sizes(self, height, width):
        """The `(height, width)` of the two T2T maps and of the token grid, for an image of
        `height` x `width` (Python ints, or scalar tensors in a graph of dynamic size): the
        soft splits' `output_size`, one after the other.

        >>> T2TModule().grid_sizes(224, 160)
        ((56, 40), (28, 20), (14, 10))
        """
        if ops.is_tensor(height) or ops.is_tensor(width):  # both tensors: Keras takes no mix
            height, width = (ops.convert_to_tensor(side, "int32") for side in (height, width))
        sizes = []
        for split in (self.soft_split0, self.soft_split1, self.soft_split2):
            height, width = split.output_size(height), split.output_size(width)
            sizes.append((height, width))
        return tuple(sizes)

    def call(self, inputs, training=None, return_feature_maps=False):
        # The maps' sizes flow through from the image's: static ints in a graph of fixed size
        # (the same reshapes as a square token count gives), scalar tensors otherwise.
        grid1, grid2, _ = self.grid_sizes(_dim(inputs, 1), _dim(inputs, 2))
        x = self.attention1(self.soft_split0(inputs), training=training)
        map1 = self.restructure(x, grid_size=grid1)
        x = self.attention2(self.soft_split1(map1), training=training)
        map2 = self.restructure(x, grid_size=grid2)
        tokens = self.project(self.soft_split2(map2))
        return (tokens, (map1, map2)) if return_feature_maps else tokens

    def get_config(self):
        config = super().get_config()
        config.update(
            tokens_type=self.tokens_type,
            embed_dim=self.embed_dim,
            token_dim=self.token_dim,
            soft_split_implementation=self.soft_split_implementation,
        )
        return config


@_register
class MultiHeadSelfAttention(_Composite):
    """Backbone attention: `qkv` Dense(3D) (q, k, v, heads contiguous), softmax, `proj`.

    The default scale is `head_dim ** -0.5`, as the released weights were evaluated (the
    official `pretrained=True` branch sets `embed_dim ** -0.5`; pass `qk_scale` to copy it).
    The softmax runs in float32 under mixed precision.
    """

    def __init__(self, num_heads, qkv_bias=False, qk_scale=None, dropout_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = _check_int("num_heads", num_heads)
        self.qkv_bias = bool(qkv_bias)
        self.qk_scale = None if qk_scale is None else float(qk_scale)
        self.dropout_rate = _check_rate("dropout_rate", dropout_rate)
        self.qkv = None
        self.proj = None
        self.proj_dropout = keras.layers.Dropout(
            self.dropout_rate, name="proj_dropout", dtype=self.dtype_policy
        )

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"The width {dim} must be divisible by `num_heads`={self.num_heads}.")
        self.head_dim = dim // self.num_heads
        self.scale = self.qk_scale or self.head_dim**-0.5
        self.qkv = _dense(3 * dim, "qkv", use_bias=self.qkv_bias, dtype=self.dtype_policy)
        self.proj = _dense(dim, "proj", dtype=self.dtype_policy)
        self.qkv.build(input_shape)
        self.proj.build(input_shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def _attention(self, inputs):
        # One transpose to (3, batch, heads, tokens, head_dim), plain batched matmuls, one
        # transpose back: faster on CPU than `ops.dot_product_attention`'s einsums. The scale
        # is applied to q (cheaper than to the logits; exact for the power-of-two 0.125).
        q, k, v = self._projections(inputs)
        return self._weights(q, k), v

    def _projections(self, inputs):
        """q, k, v, each (B, heads, T, head_dim), from the one `qkv` Dense."""
        return self._stacked_heads(self.qkv(inputs), 3)

    def _heads(self, t):
        """(B, T, heads * head_dim) -> (B, heads, T, head_dim)."""
        shape = (-1, _dim(t, 1), self.num_heads, self.head_dim)
        return ops.transpose(ops.reshape(t, shape), (0, 2, 1, 3))

    def _stacked_heads(self, t, parts):
        """(B, T, parts * heads * head_dim) -> `parts` tensors (B, heads, T, head_dim), with
        one transpose."""
        t = ops.reshape(t, (-1, _dim(t, 1), parts, self.num_heads, self.head_dim))
        return ops.unstack(ops.transpose(t, (2, 0, 3, 1, 4)), parts, axis=0)

    def _weights(self, q, k):
        return _softmax(ops.matmul(q * self.scale, ops.transpose(k, (0, 1, 3, 2))))

    def _project(self, attention, v):
        """The heads' outputs, joined again to (B, T, dim), through `proj`."""
        y = ops.transpose(ops.matmul(attention, v), (0, 2, 1, 3))  # (B, T, heads, head_dim)
        y = ops.reshape(y, (-1, _dim(y, 1), self.num_heads * self.head_dim))
        return self.proj(y)

    def attention_weights(self, inputs):
        """The softmax attention, `(batch, heads, T, T)` (for `keras_t2t.explain`)."""
        return self._attention(inputs)[0]

    def call(self, inputs, training=None):
        return self.proj_dropout(self._project(*self._attention(inputs)), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            qkv_bias=self.qkv_bias,
            qk_scale=self.qk_scale,
            dropout_rate=self.dropout_rate,
        )
        return config


def _replica():
    """(replicas in sync, this replica's id) inside a `tf.distribute` replica context, else
    (1, 0) (always on the JAX and PyTorch backends)."""
    tf = _tensorflow()
    if tf is None:
        return 1, 0
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 1, 0
    return context.num_replicas_in_sync, context.replica_id_in_sync_group


@_register
class StochasticDepth(keras.layers.Layer):
    """Drop the whole residual branch per sample with probability `rate` while training.

    Kept samples are scaled by `1 / (1 - rate)`, as timm's `DropPath`.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = _check_rate("rate", rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.built = True  # no weights (as Keras' Dropout): `model.quantize` needs it built

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        batch = ops.shape(inputs)[0]
        shape = (batch,) + (1,) * (len(inputs.shape) - 1)
        replicas, replica = _replica()
        # Under a tf.distribute strategy the seed state is the same on every replica: draw a
        # row per replica and keep this replica's, so that replicas drop different samples.
        uniform = keras.random.uniform((replicas, batch), seed=self.seed_generator)
        uniform = ops.reshape(ops.take(uniform, replica, axis=0), shape)
        mask = ops.floor(keep + uniform)
        return inputs / ops.cast(keep, inputs.dtype) * ops.cast(mask, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config


@_register
class TransformerBlock(_Composite):
    """Pre-norm backbone block: x + DropPath(MHSA(LN(x))), x + DropPath(MLP(LN(x))).

    `gradient_checkpointing=True` wraps the two branches, `MHSA(LN(x))` and `MLP(LN(x))`, in
    `keras.remat` when called with `training=True`: their activations (the attention
    weights, the MLP's hidden layer) are not kept for the backward pass but computed again
    in it, which saves most of a block's training memory for a second forward pass of the
    branches. The outputs and gradients are the same; inference is not changed. Stochastic
    depth stays outside the recomputed branches (its mask is drawn once); dropout inside
    them would be drawn anew in the recomputation, so the two cannot be combined.
    """

    def __init__(
        self,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=False,
        qk_scale=None,
        dropout_rate=0.0,
        drop_path_rate=0.0,
        layer_norm_epsilon=LAYER_NORM_EPSILON,
        gradient_checkpointing=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = _check_int("num_heads", num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.qk_scale = None if qk_scale is None else float(qk_scale)
        self.dropout_rate = _check_rate("dropout_rate", dropout_rate)
        self.drop_path_rate = _check_rate("drop_path_rate", drop_path_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.gradient_checkpointing = _check_gradient_checkpointing(
            gradient_checkpointing, self.dropout_rate
        )
        policy = self.dtype_policy
        self.norm1 = _layer_norm("norm1", self.layer_norm_epsilon, dtype=policy)
        self.attn = MultiHeadSelfAttention(
            self.num_heads,
            self.qkv_bias,
            self.qk_scale,
            self.dropout_rate,
            name="attn",
            dtype=policy,
        )
        self.drop_path = StochasticDepth(self.drop_path_rate, name="drop_path", dtype=policy)
        self.norm2 = _layer_norm("norm2", self.layer_norm_epsilon, dtype=policy)
        self.mlp = None

    def build(self, input_shape):
        dim = input_shape[-1]
        self.mlp = Mlp(
            int(dim * self.mlp_ratio), dim, self.dropout_rate, name="mlp", dtype=self.dtype_policy
        )
        for layer in (self.norm1, self.attn, self.norm2, self.mlp):
            layer.build(input_shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, inputs, training=None):
        def attention(x):
            return self.attn(self.norm1(x), training=training)

        def mlp(x):
            return self.mlp(self.norm2(x), training=training)

        if training and self.gradient_checkpointing:
            attention, mlp = keras.remat(attention), keras.remat(mlp)
        x = inputs + self.drop_path(attention(inputs), training=training)
        return x + self.drop_path(mlp(x), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            qk_scale=self.qk_scale,
            dropout_rate=self.dropout_rate,
            drop_path_rate=self.drop_path_rate,
            layer_norm_epsilon=self.layer_norm_epsilon,
            gradient_checkpointing=self.gradient_checkpointing,
        )
        return config


def _check_gradient_checkpointing(value, dropout_rate):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`gradient_checkpointing` must be True or False, received {value!r}.")
    if value and dropout_rate:
        raise ValueError(
            f"`gradient_checkpointing=True` needs `dropout_rate=0`, received dropout_rate="
            f"{dropout_rate}: the recomputed forward pass would draw new dropout masks, so the "
            f"gradients would not be those of the loss. Stochastic depth (`drop_path_rate`) "
            f"is fine with it."
        )
    return bool(value)


@_register
class ClassToken(keras.layers.Layer):
    """Prepends a learned class token (the official init: `official_init`) to
    `(batch, tokens, dim)`."""

    def build(self, input_shape):
        self.token = self.add_weight(
            shape=(1, 1, input_shape[-1]),
            initializer=official_init(),
            name="token",
        )

    def compute_output_shape(self, input_shape):
        tokens = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], tokens, input_shape[2])

    def call(self, inputs):
        token = ops.broadcast_to(
            ops.cast(self.token, inputs.dtype), (ops.shape(inputs)[0], 1, inputs.shape[-1])
        )
        return ops.concatenate([token, inputs], axis=1)

    def get_config(self):
        # Written out: Keras' automatic config refuses a layer made with a DTypePolicyMap.
        return super().get_config()


def sinusoid_table(length, dim):
    """The official fixed position table, `(length, dim)` float32.

    angle(p, j) = p / 10000 ** (2 * (j // 2) / dim); sin on even j, cos on odd j.

    >>> sinusoid_table(3, 4)[1].astype(float).round(3).tolist()
    [0.841, 0.54, 0.01, 1.0]
    """
    positions = np.arange(length, dtype=np.float64)[:, None]
    exponents = 2 * (np.arange(dim) // 2) / dim
    angles = positions / np.power(10000.0, exponents)[None, :]
    angles[:, 0::2] = np.sin(angles[:, 0::2])
    angles[:, 1::2] = np.cos(angles[:, 1::2])
    return angles.astype("float32")


def _sinusoid_initializer(shape, dtype=None):
    return ops.cast(sinusoid_table(shape[-2], shape[-1])[None], dtype or "float32")


# PyTorch's bicubic (`F.interpolate(mode="bicubic")`) is Keys' cubic convolution with this
# coefficient (TensorFlow's and PIL's take -0.5): the official fine-tuning resize of the
# position table. `bicubic_matrix` is its graph form, `weights.bicubic_resize` its NumPy one.
TORCH_BICUBIC_A = -0.75


def bicubic_matrix(out_size, in_size, a=TORCH_BICUBIC_A):
    """The `(out_size, in_size)` float32 matrix of PyTorch's bicubic resize along one axis.

    `matrix @ x` resizes the first axis of `x` from `in_size` to `out_size` as
    `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`: the source
    coordinate of output `o` is `(o + 0.5) * in_size / out_size - 0.5`, its four taps
    `floor - 1 .. floor + 2` are clamped to `[0, in_size - 1]` and weighted by Keys' cubic
    convolution with coefficient `a`. `in_size` is a Python int; `out_size` an int or a scalar
    integer tensor (a size known only at run time): the matrix is built of `keras.ops`
    (arange, floor, a one-hot by comparison), on every backend and in ONNX.

    >>> import numpy as np
    >>> np.asarray(bicubic_matrix(3, 2)).astype(float).round(4).tolist()
    [[1.0868, -0.0868], [0.5, 0.5], [-0.0868, 1.0868]]
    """
    out_float = ops.cast(out_size, "float32")
    positions = ops.cast(ops.arange(out_size), "float32")
    # (o + 0.5) * in / out - 0.5 with one rounding: the numerator is an exact integer.
    source = ((2.0 * positions + 1.0) * in_size - out_float) / (2.0 * out_float)
    base = ops.floor(source)
    t = source - base
    base = ops.cast(base, "int32")
    columns = ops.expand_dims(ops.arange(in_size, dtype="int32"), 0)

    def near(d):  # |d| <= 1
        return ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a

    matrix = 0.0
    for offset, weight in ((-1, far(t + 1.0)), (0, near(t)), (1, near(1.0 - t)), (2, far(2.0 - t))):
        tap = ops.expand_dims(ops.clip(base + offset, 0, in_size - 1), 1)
        one_hot = ops.cast(ops.equal(tap, columns), "float32")
        matrix = matrix + ops.expand_dims(weight, 1) * one_hot
    return matrix


def bicubic_resize_grid(grid, size):
    """`grid` `(height, width, channels)` resized to `size` `(out_height, out_width)` (ints
    or scalar tensors) as PyTorch's bicubic does (`bicubic_matrix`): two matmuls, float32."""
    in_height, in_width, channels = grid.shape
    out_height, out_width = size
    grid = ops.reshape(ops.cast(grid, "float32"), (in_height, in_width * channels))
    grid = ops.matmul(bicubic_matrix(out_height, in_height), grid)
    grid = ops.reshape(grid, (-1, in_width, channels))  # (out_height, in_width, channels)
    # (1, out_width, in_width) @ (out_height, in_width, channels), broadcast over the rows.
    return ops.matmul(ops.expand_dims(bicubic_matrix(out_width, in_width), 0), grid)


def _check_grid_size(grid_size):
    if grid_size is None:
        return None
    if (
        isinstance(grid_size, (str, bytes))
        or not hasattr(grid_size, "__len__")
        or len(grid_size) != 2
    ):
        raise ValueError(
            f"`grid_size` must be None or (height, width) of the token grid, received "
            f"{grid_size!r}."
        )
    return tuple(_check_int("grid_size", side) for side in grid_size)


@_register
class PositionEmbedding(keras.layers.Layer):
    """Adds the fixed sinusoid position table (a frozen weight, row 0 for the class token).

    The table is a non-trainable weight, so that it is saved and loaded with the model (the
    official checkpoints store it as `pos_embed`): `(1, 1 + h * w, dim)` for the token grid
    `grid_size=(h, w)`, or as long as the input it is built for where `grid_size` is None.

    Tokens of another grid (a model built with `input_shape=(None, None, 3)` takes any image
    size): call the layer with the images too, `layer(tokens, images)`, and the table's grid
    is resized in the graph to the images' token grid `(height / patch_size, width /
    patch_size)` with the official fine-tuning resize, PyTorch's bicubic with the class row
    kept (`bicubic_matrix`; `weights.interpolate_pos_embed` does the same to a file at load
    time). Where the token count is static and the table's, the table is added as it is: a
    graph of fixed size holds no resize. Images whose sides are not multiples of
    `patch_size` are refused (a ValueError where the sizes are static; on TensorFlow, an
    assertion in the graph where they are dynamic).

    Args:
        grid_size: `(h, w)` of the table's token grid, or None: the token count of the input
            that builds the layer.
        patch_size: the pixels per token along each side of the images (16 in T2T-ViT: the
            product of its soft splits' strides); required to take `images`.

    >>> import numpy as np
    >>> layer = PositionEmbedding(grid_size=(2, 2), patch_size=16)
    >>> tokens = np.zeros((1, 1 + 3 * 4, 8), "float32")  # class token and a 3 x 4 grid
    >>> tuple(layer(tokens, np.zeros((1, 48, 64, 3), "float32")).shape)
    (1, 13, 8)
    """

    def __init__(self, grid_size=None, patch_size=None, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = _check_grid_size(grid_size)
        self.patch_size = None if patch_size is None else _check_int("patch_size", patch_size)

    def build(self, input_shape):
        if self.grid_size is not None:
            rows = 1 + self.grid_size[0] * self.grid_size[1]
        elif input_shape[1] is None:
            raise ValueError(
                "PositionEmbedding needs a static number of tokens, or `grid_size` (the "
                "table's token grid) for tokens of any number."
            )
        else:
            rows = input_shape[1]
        self.pos_embed = self.add_weight(
            shape=(1, rows, input_shape[2]),
            initializer=_sinusoid_initializer,
            trainable=False,
            name="pos_embed",
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def token_grid(self, images):
        """`(height, width)` of the token grid of `images` (NHWC): their sides divided by
        `patch_size`, ints or scalar tensors; sides that are not multiples of it are refused."""
        if self.patch_size is None:
            raise ValueError(
                "This PositionEmbedding has no `patch_size`: it cannot read a token grid from "
                "images. Make it with patch_size=16 (T2T-ViT's) to take them."
            )
        p = self.patch_size
        height, width = _dim(images, 1), _dim(images, 2)
        if any(isinstance(side, int) and side % p for side in (height, width)):
            raise ValueError(
                f"The image height and width must be multiples of {p}, received "
                f"{height} x {width}. Resize or crop the images to such sides (224, 288, "
                f"384, ...)."
            )
        tf = _tensorflow()
        if tf is not None and not all(isinstance(side, int) for side in (height, width)):
            # Dynamic sizes in a TensorFlow graph (a SavedModel's): checked when it runs.
            check = tf.debugging.Assert(
                tf.logical_and(tf.equal(height % p, 0), tf.equal(width % p, 0)),
                [f"The image height and width must be multiples of {p}, received", height]
                + ["x", width],
                name="image_sides_are_multiples_of_patch_size",
            )
            with tf.control_dependencies([check]):
                height, width = tf.identity(height), tf.identity(width)
        return height // p, width // p

    def table(self, grid=None):
        """The position table `(1, 1 + h * w, dim)` for the token grid `grid`: the table
        itself (in its dtype) where `grid` is None or its own grid, else its grid resized in
        float32 (PyTorch's bicubic, class row kept)."""
        static = grid is not None and all(isinstance(side, int) for side in grid)
        if grid is None or static and tuple(grid) == self.grid_size:
            return self.pos_embed
        table = ops.cast(self.pos_embed, "float32")
        if self.grid_size is None:
            raise ValueError(
                "This PositionEmbedding has no `grid_size`: its table cannot be resized to "
                "another grid. Make it with grid_size=(h, w) of its table."
            )
        dim = table.shape[-1]
        source = ops.reshape(table[0, 1:], (*self.grid_size, dim))
        resized = ops.reshape(bicubic_resize_grid(source, grid), (-1, dim))
        return ops.expand_dims(ops.concatenate([table[0, :1], resized], axis=0), 0)

    def call(self, inputs, images=None):
        if images is not None:  # the table for the images' grid (itself where it is its own)
            return inputs + ops.cast(self.table(self.token_grid(images)), inputs.dtype)
        if inputs.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(
                f"PositionEmbedding has a table of {self.pos_embed.shape[1]} rows and received "
                f"{inputs.shape[1]} tokens: call it with the images too, `layer(tokens, "
                f"images)`, to resize its table to their token grid."
            )
        return inputs + ops.cast(self.pos_embed, inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(grid_size=self.grid_size, patch_size=self.patch_size)
        return config
