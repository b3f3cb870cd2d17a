"""Inference-only subclasses of the model's layers: the same outputs, computed faster where a
deployment allows it. `keras_t2t.inference.prepare` puts them into a twin of a model; none of
them is ever part of a model the builders make, or of a training graph.

Each subclass adds no weights and no constructor arguments, so a twin built from the model's
config takes the model's weights as they are.
"""

import functools

import keras
import numpy as np
from keras import ops

from keras_t2t import layers as t2t_layers

_register = keras.saving.register_keras_serializable(package="keras_t2t.inference")


def _tensorflow():
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf


def _column_block(dense, start, stop):
    """`dense` cut to its output columns `start:stop`, as a function of its input. Converters
    slice the constant kernel once; no split of the output runs."""

    def affine(x):
        columns = slice(start, stop)
        y = ops.matmul(x, ops.cast(dense.kernel[:, columns], dense.compute_dtype))
        if dense.use_bias:
            y = y + ops.cast(dense.bias[columns], dense.compute_dtype)
        return y

    return affine


def _unquantized(dense):
    return dense.quantization_mode is None


@_register
class ClassTokenBlock(t2t_layers.TransformerBlock):
    """A `TransformerBlock` that returns the class token's row only: `block(x)[:, :1]`.

    Every step of a block is per token except the attention, whose class-token row needs the
    keys and values of every token. So this computes k and v for every token, and q, the
    attention, `proj` and the MLP for the class token alone: in the last block of a classifier
    that reads the class token, about 5% of T2T-ViT-14's FLOPs. Inference only (no dropout).
    """

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1, input_shape[2])

    def call(self, inputs, training=None):
        attn = self.attn
        x = self.norm1(inputs)
        dim = inputs.shape[-1]
        if _unquantized(attn.qkv):  # q, k and v each from its own matmul: no split
            q = _column_block(attn.qkv, 0, dim)(x[:, :1])
            k, v = (attn._heads(_column_block(attn.qkv, i * dim, (i + 1) * dim)(x)) for i in (1, 2))
        else:  # a quantized Dense has no float kernel to cut: project every row
            qkv = attn.qkv(x)
            q = qkv[:, :1, :dim]
            k, v = attn._stacked_heads(qkv[:, :, dim:], 2)
        x = inputs[:, :1] + attn._project(attn._weights(attn._heads(q), k), v)
        return x + self.mlp(self.norm2(x))


class SplitQKVAttention(t2t_layers.MultiHeadSelfAttention):
    """q, k and v from their own matmuls on column blocks of `qkv`: no split of a tensor at
    run time, which OpenVINO runs with a slow reference kernel (about 1 ms per attention of
    T2T-ViT-14 at batch 8). The same values."""

    def _projections(self, inputs):
        dense = self.qkv
        if not _unquantized(dense):
            return super()._projections(inputs)
        dim = dense.units // 3
        return [self._heads(_column_block(dense, i * dim, (i + 1) * dim)(inputs)) for i in range(3)]


class _SplitProjections:
    """For the Tokens-to-Token layers: their three projections from their own matmuls (see
    `SplitQKVAttention`)."""

    def _projections(self, x):
        dense = getattr(self, "kqv", None) or self.qkv
        if not _unquantized(dense):
            return super()._projections(x)
        width = dense.units // 3
        return [_column_block(dense, i * width, (i + 1) * width)(x) for i in range(3)]


class SplitQKVPerformer(_SplitProjections, t2t_layers.TokenPerformer):
    """`TokenPerformer` with k, q and v from their own matmuls (see `SplitQKVAttention`)."""


class SplitQKVTokenTransformer(_SplitProjections, t2t_layers.TokenTransformer):
    """`TokenTransformer` with q, k and v from their own matmuls (see `SplitQKVAttention`)."""


@_register
class OneDNNLayerNorm(t2t_layers.LayerNorm):
    """`LayerNorm` in the form that TensorFlow with oneDNN runs as one fused op.

    TensorFlow has no fused LayerNorm of its own; where it is built with oneDNN and oneDNN is
    on (the x86-64 Linux packages and TF Serving, by default), grappler rewrites a
    training-mode FusedBatchNormV3 over the rows (its batch statistics are each row's mean and
    biased variance), followed by the scale and the offset, into one `_MklLayerNorm`: 2x to 5x
    faster than the plain form's reductions on T2T-ViT-14's LayerNorms at batch 8. Where
    oneDNN is off, the same form runs as an unfused batch norm over transposed rows, 4x slower
    than the plain one: `tensorflow_fuses_layer_norm()` says which this TensorFlow does.
    Only inputs of an unknown dimension (a SavedModel's batch) take it: with a static shape,
    grappler folds the form's Fill ops into constants first and no longer recognizes it. The
    plain form runs elsewhere (other backends, other configurations, static shapes).
    """

    def call(self, inputs):
        tf = _tensorflow()
        axes = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        last = axes in ([-1], [len(inputs.shape) - 1])
        plain = self.center and self.scale and not getattr(self, "rms_scaling", False)
        if tf is None or not (last and plain) or None not in inputs.shape:
            return super().call(inputs)
        if self.compute_dtype == "bfloat16":
            # oneDNN takes bfloat16 rows and computes their statistics in float32: no casts.
            x = ops.cast(inputs, "bfloat16")
            gamma, beta = ops.cast(self.gamma, "bfloat16"), ops.cast(self.beta, "bfloat16")
            return onednn_layer_norm(x, gamma, beta, self.epsilon)
        x = ops.cast(inputs, "float32")
        gamma, beta = ops.cast(self.gamma, "float32"), ops.cast(self.beta, "float32")
        return ops.cast(onednn_layer_norm(x, gamma, beta, self.epsilon), self.compute_dtype)


def onednn_layer_norm(x, gamma, beta, epsilon):
    """LayerNorm over the last axis of float32 or bfloat16 `x` (`gamma` and `beta` of its
    dtype) as FusedBatchNormV3 over its rows (raw_ops:
    tf.nn's wrapper raises epsilon to 1.001e-5), then `gamma` and `beta`."""
    tf = _tensorflow()
    shape = tf.shape(x)
    rows = tf.reduce_prod(shape[:-1], keepdims=True)
    y = tf.raw_ops.FusedBatchNormV3(
        x=tf.reshape(x, tf.concat([[1], rows, [x.shape[-1], 1]], axis=0)),
        scale=tf.fill(rows, 1.0),
        offset=tf.fill(rows, 0.0),
        mean=tf.constant([], tf.float32),
        variance=tf.constant([], tf.float32),
        epsilon=epsilon,
        data_format="NCHW",
        is_training=True,
    )[0]
    return tf.reshape(y, shape) * gamma + beta


@functools.cache
def tensorflow_fuses_layer_norm():
    """Whether this TensorFlow, on the CPU, runs `OneDNNLayerNorm`'s form as one
    `_MklLayerNorm` op: asked of grappler itself, by running a small graph in that form and
    reading the graph that ran (oneDNN is on by default in TensorFlow's x86-64 Linux packages;
    off elsewhere, or with TF_ENABLE_ONEDNN_OPTS=0). For choosing a `prepare` runtime on the
    serving machine; nothing calls it implicitly."""
    tf = _tensorflow()
    if tf is None:
        return False
    graph = tf.Graph()
    with graph.as_default(), tf.device("/CPU:0"):
        x = tf.compat.v1.placeholder(tf.float32, [None, 4, 8])
        gamma, beta = (tf.compat.v1.placeholder(tf.float32, [8]) for _ in range(2))
        y = onednn_layer_norm(x, gamma, beta, t2t_layers.LAYER_NORM_EPSILON)
    options = tf.compat.v1.RunOptions(output_partition_graphs=True)
    metadata = tf.compat.v1.RunMetadata()
    feed = {
        x: np.zeros((2, 4, 8), np.float32),
        gamma: np.ones(8, np.float32),
        beta: np.zeros(8, np.float32),
    }
    with tf.compat.v1.Session(graph=graph) as session:
        session.run(y, feed, options, metadata)
    return any(
        node.op == "_MklLayerNorm" for part in metadata.partition_graphs for node in part.node
    )


@_register
class RowsDense(keras.layers.Dense):
    """A Dense layer that computes on the tokens as 2-D rows `(batch * tokens, channels)`: one
    MatMul with its bias add beside it, which TensorFlow's oneDNN build fuses into one op
    (a 3-D input goes through a reshape between the two)."""

    def call(self, inputs, training=None):
        if len(inputs.shape) <= 2:
            return super().call(inputs, training=training)
        shape = ops.shape(inputs)
        rows = ops.reshape(inputs, (-1, inputs.shape[-1]))
        outputs = super().call(rows, training=training)
        return ops.reshape(outputs, (*shape[:-1], self.units))


@_register
class RowsMlp(t2t_layers.Mlp):
    """`Mlp` on 2-D rows: fc1, its bias and the GELU, then fc2, with no reshape between them,
    so that TensorFlow's oneDNN build fuses each MatMul with its bias (and the GELU)."""

    def call(self, inputs, training=None):
        shape = ops.shape(inputs)
        x = ops.reshape(inputs, (-1, inputs.shape[-1]))
        x = t2t_layers.gelu(self.fc1(x))  # through __call__: a quantized fc1 takes its own call
        if self.hidden_dropout:
            x = self.dropout(x, training=training)
        x = self.fc2(x)
        x = ops.reshape(x, (*shape[:-1], self.fc2.units))
        return self.dropout(x, training=training)
