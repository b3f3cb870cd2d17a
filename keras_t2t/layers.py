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

    def _out_size(self, size):
        return (size + 2 * self.padding - self.kernel_size) // self.strides + 1

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        if height is None or width is None or channels is None:
            raise ValueError(
                f"SoftSplit needs a static height, width and channel count, received input "
                f"shape {tuple(input_shape)}."
            )
        tokens = self._out_size(height) * self._out_size(width)
        return (batch, tokens, self.kernel_size * self.kernel_size * channels)

    def call(self, inputs):
        _, height, width, channels = inputs.shape
        k, s, p = self.kernel_size, self.strides, self.padding
        out_h, out_w = self._out_size(height), self._out_size(width)
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
            # reading the top-left corner.
            def window(offset):
                end = offset - (k - 1)
                return slice(offset, end if end < 0 else None, s)

            patches = ops.concatenate(
                [x[:, window(i), window(j), :] for i in range(k) for j in range(k)], axis=-1
            )
        # The batch is given, not inferred (-1): an image larger than the graph's static size
        # (an exported graph receives any size) makes more patches, which a -1 would fold into
        # extra rows of the batch, a wrong answer; this way the reshape refuses them.
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

    The token grid must be square (as every T2T-ViT grid is).
    """

    def _side(self, tokens):
        side = math.isqrt(tokens) if tokens is not None else None
        if side is None or side * side != tokens:
            raise ValueError(
                f"Restructure needs a square number of tokens, received {tokens} tokens."
            )
        return side

    def compute_output_shape(self, input_shape):
        side = self._side(input_shape[1])
        return (input_shape[0], side, side, input_shape[2])

    def call(self, inputs):
        side = self._side(inputs.shape[1])
        return ops.reshape(inputs, (ops.shape(inputs)[0], side, side, inputs.shape[2]))


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
        shape = self.soft_split0.compute_output_shape(input_shape)
        self.attention1.build(shape)
        shape = self.restructure.compute_output_shape(self.attention1.compute_output_shape(shape))
        shape = self.soft_split1.compute_output_shape(shape)
        self.attention2.build(shape)
        shape = self.restructure.compute_output_shape(self.attention2.compute_output_shape(shape))
        self.project.build(self.soft_split2.compute_output_shape(shape))

    def call(self, inputs, training=None, return_feature_maps=False):
        map1 = self.restructure(self.attention1(self.soft_split0(inputs), training=training))
        map2 = self.restructure(self.attention2(self.soft_split1(map1), training=training))
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
        shape = (-1, t.shape[1], self.num_heads, self.head_dim)
        return ops.transpose(ops.reshape(t, shape), (0, 2, 1, 3))

    def _stacked_heads(self, t, parts):
        """(B, T, parts * heads * head_dim) -> `parts` tensors (B, heads, T, head_dim), with
        one transpose."""
        t = ops.reshape(t, (-1, t.shape[1], parts, self.num_heads, self.head_dim))
        return ops.unstack(ops.transpose(t, (2, 0, 3, 1, 4)), parts, axis=0)

    def _weights(self, q, k):
        return _softmax(ops.matmul(q * self.scale, ops.transpose(k, (0, 1, 3, 2))))

    def _project(self, attention, v):
        """The heads' outputs, joined again to (B, T, dim), through `proj`."""
        y = ops.transpose(ops.matmul(attention, v), (0, 2, 1, 3))  # (B, T, heads, head_dim)
        y = ops.reshape(y, (-1, y.shape[1], self.num_heads * self.head_dim))
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


@_register
class PositionEmbedding(keras.layers.Layer):
    """Adds the fixed sinusoid position table (a frozen weight, row 0 for the class token).

    The table is a non-trainable weight, so that it is saved and loaded with the model (the
    official checkpoints store it as `pos_embed`); its length follows the input.
    """

    def build(self, input_shape):
        if input_shape[1] is None:
            raise ValueError("PositionEmbedding needs a static number of tokens.")
        self.pos_embed = self.add_weight(
            shape=(1, input_shape[1], input_shape[2]),
            initializer=_sinusoid_initializer,
            trainable=False,
            name="pos_embed",
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, inputs):
        return inputs + ops.cast(self.pos_embed, inputs.dtype)

    def get_config(self):
        # Written out: Keras' automatic config refuses a layer made with a DTypePolicyMap.
        return super().get_config()
