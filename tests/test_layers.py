"""Each layer alone: shapes, numerics against independent references, config round trips."""

import math

import keras
import numpy as np
import pytest

from keras_t2t import layers


def numpy_unfold(x, k, s, p):
    """Reference soft split in TF order, by loops: patch index (i * k + j) * C + c."""
    b, h, w, c = x.shape
    x = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = np.zeros((b, oh * ow, k * k * c), x.dtype)
    for oy in range(oh):
        for ox in range(ow):
            for i in range(k):
                for j in range(k):
                    out[:, oy * ow + ox, (i * k + j) * c : (i * k + j + 1) * c] = x[
                        :, oy * s + i, ox * s + j, :
                    ]
    return out


@pytest.mark.parametrize("implementation", ["patches", "slices", "conv"])
@pytest.mark.parametrize("k,s,p,side,channels", [(7, 4, 2, 32, 3), (3, 2, 1, 8, 5)])
def test_soft_split_matches_loop_reference(implementation, k, s, p, side, channels):
    x = np.random.default_rng(0).normal(size=(2, side, side, channels)).astype("float32")
    split = layers.SoftSplit(k, s, p, implementation=implementation)
    np.testing.assert_array_equal(np.asarray(split(x)), numpy_unfold(x, k, s, p))


def test_soft_split_symmetric_padding_differs_from_tf_same():
    """The trap of the reference: TF "SAME" pads (1, 2) and shifts the windows."""
    import tensorflow as tf

    x = np.random.default_rng(1).normal(size=(1, 16, 16, 3)).astype("float32")
    ours = np.asarray(layers.SoftSplit(7, 4, 2)(x)).reshape(1, 4, 4, -1)
    same = tf.image.extract_patches(x, [1, 7, 7, 1], [1, 4, 4, 1], [1, 1, 1, 1], "SAME").numpy()
    assert ours.shape == same.shape
    assert not np.allclose(ours, same)


def test_patch_permutation_maps_torch_unfold_order():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).normal(size=(2, 12, 12, 4)).astype("float32")
    torch_patches = (
        torch.nn.functional.unfold(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), 3, stride=2, padding=1
        )
        .transpose(1, 2)
        .numpy()
    )
    ours = np.asarray(layers.SoftSplit(3, 2, 1)(x))
    np.testing.assert_array_equal(ours, torch_patches[..., layers.patch_permutation(4, 3)])


def test_restructure_is_row_major():
    tokens = np.arange(2 * 9 * 4, dtype="float32").reshape(2, 9, 4)
    image = np.asarray(layers.Restructure()(tokens))
    assert image.shape == (2, 3, 3, 4)
    np.testing.assert_array_equal(image[:, 1, 2], tokens[:, 1 * 3 + 2])
    with pytest.raises(ValueError, match="square number of tokens"):
        layers.Restructure()(np.zeros((1, 8, 4), "float32"))


def performer_reference(x, layer):
    """The official Token_performer formula in NumPy, from the layer's weights."""

    def ln(v, norm):
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-5) * norm.gamma.numpy() + norm.beta.numpy()

    def dense(v, d):
        return v @ d.kernel.numpy() + d.bias.numpy()

    def gelu(v):
        return 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))

    k, q, v = np.split(dense(ln(x, layer.norm1), layer.kqv), 3, axis=-1)
    w = layer.w.numpy()
    m = w.shape[0]

    def phi(u):
        return np.exp(u @ w.T - (u * u).sum(-1, keepdims=True) / 2) / math.sqrt(m)

    kp, qp = phi(k), phi(q)
    d = np.einsum("bti,bi->bt", qp, kp.sum(1))[..., None]
    kptv = np.einsum("bin,bim->bnm", v, kp)
    y = np.einsum("bti,bni->btn", qp, kptv) / (d + 1e-8)
    y = v + dense(y, layer.proj)
    return y + dense(gelu(dense(ln(y, layer.norm2), layer.mlp.fc1)), layer.mlp.fc2)


def test_token_performer_matches_official_formula():
    x = np.random.default_rng(3).normal(size=(2, 16, 27)).astype("float32")
    layer = layers.TokenPerformer(token_dim=16)
    out = np.asarray(layer(x))
    assert out.shape == (2, 16, 16)
    assert layer.w.shape == (8, 16) and not layer.w.trainable
    np.testing.assert_allclose(out, performer_reference(x.astype("float64"), layer), atol=1e-4)


def _distinct_outputs_under_dropout(mlp):
    """fc1 gives the same activation to every hidden unit and fc2 sums them: without dropout
    between the two, each output is 0 or one fixed value; with it, the sums vary."""
    x = np.ones((4, 16, 8), "float32")
    mlp.build(x.shape)
    mlp.fc1.set_weights([np.zeros((8, 64), "float32"), np.ones(64, "float32")])
    mlp.fc2.set_weights([np.ones((64, 64), "float32"), np.zeros(64, "float32")])
    out = np.asarray(mlp(x, training=True))
    return len(np.unique(np.round(out[out != 0], 3)))


def test_performer_mlp_drops_out_only_after_its_second_linear():
    # The official Token_performer.mlp is Linear, GELU, Linear, Dropout.
    performer = layers.TokenPerformer(token_dim=64, dropout_rate=0.5)
    assert not performer.mlp.hidden_dropout
    assert _distinct_outputs_under_dropout(performer.mlp) == 1
    # The backbone's (timm's Mlp) drops out after the activation too.
    backbone = layers.Mlp(64, 64, dropout_rate=0.5)
    assert _distinct_outputs_under_dropout(backbone) > 1


def test_token_performer_random_features_are_orthogonal_rows():
    layer = layers.TokenPerformer(token_dim=64)
    layer.build((None, 10, 147))
    w = layer.w.numpy()
    np.testing.assert_allclose(w @ w.T, 32 * np.eye(32), atol=1e-3)


def test_token_transformer_scales_by_input_width():
    x = np.random.default_rng(4).normal(size=(1, 9, 36)).astype("float32")
    layer = layers.TokenTransformer(token_dim=8)
    out = np.asarray(layer(x))
    assert layer.scale == pytest.approx(36**-0.5)
    # Reference: one-head softmax attention scaled by the input width, v residual, MLP.
    h = np.asarray(layer.norm1(x))
    q, k, v = np.split(h @ layer.qkv.kernel.numpy(), 3, axis=-1)
    logits = q @ k.transpose(0, 2, 1) * 36**-0.5
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = v + np.asarray(layer.proj(attn @ v))
    expected = y + np.asarray(layer.mlp(layer.norm2(y)))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_attention_scale_is_head_dim():
    layer = layers.MultiHeadSelfAttention(num_heads=4)
    layer.build((None, 5, 64))
    assert layer.scale == pytest.approx(16**-0.5)
    x = np.random.default_rng(5).normal(size=(2, 5, 64)).astype("float32")
    qkv = (x @ layer.qkv.kernel.numpy()).reshape(2, 5, 3, 4, 16)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / 4.0
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(2, 5, 64)
    expected = y @ layer.proj.kernel.numpy() + layer.proj.bias.numpy()
    np.testing.assert_allclose(np.asarray(layer(x)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by `num_heads`"):
        layers.MultiHeadSelfAttention(num_heads=5).build((None, 5, 64))


def test_stochastic_depth_drops_whole_samples():
    layer = layers.StochasticDepth(0.5, seed=1)
    x = np.ones((2000, 3, 4), "float32")
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    y = np.asarray(layer(x, training=True))
    per_sample = y.reshape(2000, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))  # all or nothing per sample
    assert abs(per_sample.mean() - 1.0) < 0.1


def test_sinusoid_table_follows_reference_formula():
    table = layers.sinusoid_table(197, 384)
    for p, j in [(0, 0), (0, 1), (5, 10), (196, 383), (37, 200)]:
        angle = p / 10000 ** (2 * (j // 2) / 384)
        expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
        assert table[p, j] == pytest.approx(expected, abs=1e-6)


def test_class_token_and_position_embedding():
    x = np.zeros((3, 4, 8), "float32")
    with_token = layers.ClassToken()(x)
    assert tuple(with_token.shape) == (3, 5, 8)
    pos = layers.PositionEmbedding()
    out = np.asarray(pos(with_token))
    assert not pos.pos_embed.trainable
    np.testing.assert_allclose(out[0, 1:], layers.sinusoid_table(5, 8)[1:], atol=1e-6)


LAYER_CASES = [
    (
        layers.SoftSplit,
        dict(kernel_size=3, strides=2, padding=1, implementation="slices"),
        (2, 8, 8, 4),
    ),
    (layers.Restructure, {}, (2, 16, 4)),
    (layers.Mlp, dict(hidden_units=12, output_units=6, dropout_rate=0.1), (2, 5, 8)),
    (layers.TokenPerformer, dict(token_dim=16, kernel_ratio=0.5, dropout_rate=0.1), (2, 16, 27)),
    (layers.TokenTransformer, dict(token_dim=16, mlp_ratio=1.0), (2, 16, 27)),
    (layers.T2TModule, dict(tokens_type="performer", embed_dim=32, token_dim=16), (2, 32, 32, 3)),
    (layers.T2TModule, dict(tokens_type="transformer", embed_dim=32, token_dim=16), (2, 32, 32, 3)),
    (layers.MultiHeadSelfAttention, dict(num_heads=2, qkv_bias=True, qk_scale=0.3), (2, 5, 8)),
    (layers.StochasticDepth, dict(rate=0.2, seed=3), (2, 5, 8)),
    (layers.TransformerBlock, dict(num_heads=2, mlp_ratio=3.0, drop_path_rate=0.1), (2, 5, 8)),
    (layers.ClassToken, {}, (2, 5, 8)),
    (layers.PositionEmbedding, {}, (2, 5, 8)),
]


@pytest.mark.parametrize(
    "cls,kwargs,shape", LAYER_CASES, ids=lambda c: getattr(c, "__name__", None)
)
def test_layer_config_round_trip(cls, kwargs, shape):
    x = np.random.default_rng(6).normal(size=shape).astype("float32")
    layer = cls(**kwargs, name="under_test")
    expected = np.asarray(layer(x))
    config = layer.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config
    clone(x)  # build
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(np.asarray(clone(x)), expected)
    # Also through Keras' own (de)serialization, by registered name.
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is cls and revived.get_config() == config


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: layers.SoftSplit(3, 2, 1, implementation="unfold"), "implementation"),
        (lambda: layers.SoftSplit(0, 2, 1), "kernel_size"),
        (lambda: layers.T2TModule(tokens_type="convolution"), "tokens_type"),
        (lambda: layers.TransformerBlock(num_heads=2, drop_path_rate=1.5), "drop_path_rate"),
        (lambda: layers.TokenPerformer(kernel_ratio=0.0), "kernel_ratio"),
    ],
)
def test_layer_arguments_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_performer_stays_float32_under_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    layer = layers.TokenPerformer(token_dim=64)
    # Large activations: the 1e-8 of the denominator underflows in float16.
    x = np.random.default_rng(7).normal(size=(2, 64, 147)).astype("float32") * 4
    out = np.asarray(layer(x))
    assert layer.compute_dtype == "float16" and layer.w.dtype == "float32"
    assert np.all(np.isfinite(out))


def test_t2t_module_feature_maps():
    t2t = layers.T2TModule("performer", embed_dim=32)
    tokens, (map1, map2) = t2t(np.zeros((1, 64, 64, 3), "float32"), return_feature_maps=True)
    assert tuple(tokens.shape) == (1, 16, 32)
    assert tuple(map1.shape) == (1, 16, 16, 64) and tuple(map2.shape) == (1, 8, 8, 64)


def test_layer_norm_matches_keras():
    x = np.random.default_rng(8).normal(size=(2, 7, 147)).astype("float32") * 3 + 1
    ours, reference = layers.LayerNorm(epsilon=1e-5), keras.layers.LayerNormalization(epsilon=1e-5)
    ours.build(x.shape)
    reference.build(x.shape)
    weights = [np.random.default_rng(9).normal(size=(147,)).astype("float32") for _ in range(2)]
    ours.set_weights(weights)
    reference.set_weights(weights)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(reference(x)), atol=1e-5)
    assert [w.path for w in ours.weights] == ["layer_norm/gamma", "layer_norm/beta"]


def _graph_ops(fn, *args):

    graph = fn.get_concrete_function(*args).graph
    ops_ = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        ops_ |= {node.op for node in function.node_def}
    return ops_


def test_auto_soft_split_follows_xla_compilation():
    import tensorflow as tf

    split = layers.SoftSplit(3, 2, 1)
    spec = tf.TensorSpec((1, 8, 8, 4))

    def traced(xla, jit_compile, layer=split, at=spec):
        def call(t):
            with layers.xla_compilation(xla):
                return layer(t)

        return _graph_ops(tf.function(call, jit_compile=jit_compile), at)

    assert "ExtractImagePatches" in traced(False, jit_compile=False)
    # The image (3 channels): a one-hot convolution in plain graphs, slices under XLA.
    image = dict(layer=layers.SoftSplit(7, 4, 2), at=tf.TensorSpec((1, 16, 16, 3)))
    plain_ops, xla_image_ops = traced(False, False, **image), traced(True, True, **image)
    assert "Conv2D" in plain_ops and "ExtractImagePatches" not in plain_ops
    assert "Conv2D" not in xla_image_ops and "StridedSlice" in xla_image_ops
    xla_ops = traced(True, jit_compile=True)
    assert "ExtractImagePatches" not in xla_ops and "StridedSlice" in xla_ops
    # No scope: XLA is assumed only where TensorFlow sees a GPU or TPU (none in CI).
    assert not tf.config.list_logical_devices("GPU")
    assert "ExtractImagePatches" in _graph_ops(tf.function(lambda t: split(t)), spec)
    # The scope is restored on exit, nested or not.
    with layers.xla_compilation(True):
        with layers.xla_compilation(False):
            assert layers._tf_graph_without_xla()
        assert not layers._tf_graph_without_xla()
    assert layers._tf_graph_without_xla()
    x = np.random.default_rng(10).normal(size=(2, 8, 8, 4)).astype("float32")

    def under_xla(t):
        with layers.xla_compilation():
            return split(t)

    np.testing.assert_array_equal(
        np.asarray(tf.function(under_xla, jit_compile=True)(x)), np.asarray(split(x))
    )


def test_layer_norm_and_mlp_take_their_xla_paths_in_the_scope(monkeypatch):
    import tensorflow as tf

    calls = []
    keras_call = keras.layers.LayerNormalization.call
    monkeypatch.setattr(
        keras.layers.LayerNormalization,
        "call",
        lambda self, x: calls.append(1) or keras_call(self, x),
    )
    norm, mlp = layers.LayerNorm(epsilon=1e-5), layers.Mlp(8)
    spec = tf.TensorSpec((2, 5, 4))
    x = np.random.default_rng(11).normal(size=(2, 5, 4)).astype("float32")
    outputs = {}
    for xla in (False, True):

        def call(t, xla=xla):
            with layers.xla_compilation(xla):
                return norm(t), mlp(t)

        function = tf.function(call)
        ops_ = _graph_ops(function, spec)
        outputs[xla] = [np.asarray(o) for o in function(x)]
        # Keras' LayerNormalization is traced only for XLA; the MLP's 2-D rows only without.
        assert (len(calls) > 0) == xla, xla
        # On 3-D inputs, Dense contracts through a Tensordot; the 2-D rows need none.
        graph = function.get_concrete_function(spec).graph
        tensordot = any("mlp" in op.name and "Tensordot" in op.name
                        for op in graph.get_operations())  # fmt: skip
        assert tensordot == xla, (xla, sorted(ops_))
    for ours, portable in zip(outputs[False], outputs[True]):
        np.testing.assert_allclose(ours, portable, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_every_dense_runs_on_2d_rows_in_plain_graphs_only(tokens_type):
    """In plain TF graphs every Dense of the model (T2T layers, projection, attention, MLPs)
    runs on 2-D rows, so that oneDNN fuses its bias (and GELU): no Tensordot is traced.
    Under XLA the 3-D Dense stays (its training step is faster so). The outputs agree."""
    import tensorflow as tf

    from tests.conftest import tiny_model

    model = tiny_model(tokens_type, input_shape=(32, 32, 3))
    for variable in model.weights:  # biases away from zero, as in trained weights
        if variable.path.endswith("bias"):
            variable.assign(np.full(variable.shape, 0.1, "float32"))
    spec = tf.TensorSpec((2, 32, 32, 3))
    x = np.random.default_rng(12).normal(size=(2, 32, 32, 3)).astype("float32")
    outputs = {}
    for xla in (False, True):

        def call(t, xla=xla):
            with layers.xla_compilation(xla):
                return model(t, training=False)

        function = tf.function(call)
        graph = function.get_concrete_function(spec).graph
        dense_3d = sorted({op.name.rsplit("/Tensordot", 1)[0]
                           for op in graph.get_operations() if "Tensordot" in op.name})  # fmt: skip
        if xla:
            assert any("attn" in name for name in dense_3d), dense_3d
            assert any("attention1" in name for name in dense_3d), dense_3d
        else:
            assert dense_3d == [], dense_3d
        outputs[xla] = np.asarray(function(x))
    np.testing.assert_allclose(outputs[False], outputs[True], rtol=1e-5, atol=1e-5)


def _traced_for_tensorflow_and_converter(fn, spec, x):
    """({False: ops, True: ops}, {False: outputs, True: outputs}) of `fn` traced as a plain
    TensorFlow graph (False) and for a converter (True, `converter_graph`), run on `x`."""
    import tensorflow as tf

    traced, outputs = {}, {}
    for converter in (False, True):

        def call(t, converter=converter):
            with layers.xla_compilation(False), layers.converter_graph(converter):
                return fn(t)

        function = tf.function(call)
        traced[converter] = _graph_ops(function, spec)
        outputs[converter] = tf.nest.map_structure(np.asarray, function(x))
    return traced, outputs


def test_converter_graph_writes_gelu_with_erf_and_layer_norm_with_sqrt():
    """Traced for a converter (`converter_graph`), the exact GELU is `0.5 x (1 + erf(x / sqrt 2))`
    and LayerNorm divides by a square root (the forms ONNX Runtime and OpenVINO fuse into one op);
    for TensorFlow they stay erfc and rsqrt (which oneDNN fuses). The values agree."""
    import tensorflow as tf

    norm, mlp = layers.LayerNorm(epsilon=1e-5), layers.Mlp(8)
    x = np.random.default_rng(13).normal(scale=3.0, size=(2, 5, 4)).astype("float32")
    traced, outputs = _traced_for_tensorflow_and_converter(
        lambda t: (norm(t), mlp(t)), tf.TensorSpec((2, 5, 4)), x
    )
    assert {"Erfc", "Rsqrt"} <= traced[False] and not {"Erf", "Sqrt"} & traced[False]
    assert {"Erf", "Sqrt", "RealDiv"} <= traced[True] and not {"Erfc", "Rsqrt"} & traced[True]
    for tf_form, converter_form in zip(outputs[False], outputs[True]):
        np.testing.assert_allclose(converter_form, tf_form, rtol=1e-6, atol=1e-6)
    # The reference GELU, from its definition.
    erf = np.vectorize(math.erf)
    h = x.reshape(-1, 4) @ mlp.fc1.kernel.numpy() + mlp.fc1.bias.numpy()
    expected = (0.5 * h * (1 + erf(h / math.sqrt(2)))) @ mlp.fc2.kernel.numpy()
    expected = expected + mlp.fc2.bias.numpy()
    np.testing.assert_allclose(outputs[True][1].reshape(-1, 4), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_class_token_call_is_the_class_tokens_row(qkv_bias):
    """TransformerBlock.class_token_call (k and v of every token; q, attention, proj and MLP
    for row 0 only) gives row 0 of the block's output, eagerly and in a TF graph."""
    import tensorflow as tf

    block = layers.TransformerBlock(4, mlp_ratio=2.0, qkv_bias=qkv_bias)
    rng = np.random.default_rng(17)
    x = rng.normal(size=(3, 10, 16)).astype("float32")
    block(x)
    for weight in block.weights:  # every bias and norm offset away from zero
        weight.assign(rng.normal(scale=0.3, size=weight.shape).astype("float32"))
    expected = np.asarray(block(x, training=False))[:, :1]
    assert expected.shape == (3, 1, 16)
    np.testing.assert_allclose(np.asarray(block.class_token_call(x)), expected, atol=1e-5)
    graph = tf.function(block.class_token_call, input_signature=[tf.TensorSpec((None, 10, 16))])
    np.testing.assert_allclose(graph(x).numpy(), expected, atol=1e-5)
    # Row 0 depends on the other tokens too (through k and v).
    moved = x.copy()
    moved[:, 5] += rng.normal(size=16).astype("float32")  # (not a constant: LN removes it)
    assert np.abs(np.asarray(block.class_token_call(moved)) - expected).max() > 1e-3


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_onednn_layer_norm_form_is_layer_norm(policy):
    """In `onednn_layer_norm`, LayerNorm traces a training-mode FusedBatchNormV3 over its rows
    (what grappler fuses into _MklLayerNorm) where a dimension is unknown, and its plain form
    where the shape is static or for a converter; each is layer normalization, by a float64
    reference, with the layer's epsilon (not tf.nn's 1.001e-5 floor)."""
    import tensorflow as tf

    norm = layers.LayerNorm(epsilon=1e-5, dtype=policy)
    rng = np.random.default_rng(16)
    # Rows of small variance, where the epsilon shows: 1e-5 against 1.001e-5 moves them 2e-5.
    x = rng.normal(size=(3, 5, 8)) * [[[1.0]], [[30.0]], [[3e-3]]] + [[[2.0]], [[-5.0]], [[0.0]]]
    x = x.astype("float32")
    norm.build(x.shape)
    norm.gamma.assign(rng.normal(size=8).astype("float32"))
    norm.beta.assign(rng.normal(size=8).astype("float32"))
    mean = x.astype("float64").mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(variance + 1e-5) * norm.gamma.numpy() + norm.beta.numpy()

    def traced(spec, fused=True, converter=False):
        def call(t):
            with layers.xla_compilation(False), layers.onednn_layer_norm(fused), \
                    layers.converter_graph(converter):  # fmt: skip
                return norm(t)

        function = tf.function(call)
        return _graph_ops(function, spec), function(x)

    dynamic = tf.TensorSpec((None, 5, 8))
    for spec, fused, converter, form in [
        (dynamic, True, False, "FusedBatchNormV3"),
        (dynamic, False, False, "Rsqrt"),
        (tf.TensorSpec((3, 5, 8)), True, False, "Rsqrt"),
        (dynamic, True, True, "Sqrt"),
    ]:
        ops_, y = traced(spec, fused, converter)
        assert form in ops_ and ("FusedBatchNormV3" in ops_) == (form == "FusedBatchNormV3")
        assert y.dtype == norm.compute_dtype
        tolerance = 1e-5 if policy == "float32" else 3e-2
        np.testing.assert_allclose(np.asarray(tf.cast(y, tf.float32)), expected,
                                   rtol=tolerance, atol=tolerance)  # fmt: skip


def test_tensorflow_fuses_layer_norm_is_false_where_onednn_is_off():
    """The probe reads what grappler did: with oneDNN off (TF_ENABLE_ONEDNN_OPTS=0) nothing
    is fused; with it on (TensorFlow's default on x86-64 Linux) the form is one op."""
    import os
    import pathlib
    import platform
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    probe = "from keras_t2t import layers; print('fuses', layers.tensorflow_fuses_layer_norm())"
    answers = {}
    for setting in ("0", "1"):
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=str(root))  # fmt: skip
        result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        answers[setting] = result.stdout.split("fuses")[-1].strip()
    assert answers["0"] == "False"
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        assert answers["1"] == "True"


@pytest.mark.parametrize(
    "layer",
    [lambda: layers.MultiHeadSelfAttention(2, qkv_bias=True), lambda: layers.TokenPerformer(8),
     lambda: layers.TokenTransformer(8)],
    ids=["attention", "performer", "transformer"],
)  # fmt: skip
def test_converter_graph_computes_q_k_v_without_splitting_a_tensor(layer):
    """In a converter graph q, k and v come from their own matmuls on column blocks of the
    kernel (constants for a converter), so no Split / Unpack runs; the values are the same."""
    import tensorflow as tf

    layer = layer()
    spec = tf.TensorSpec((2, 9, 8))
    x = np.random.default_rng(14).normal(size=(2, 9, 8)).astype("float32")
    layer(x)
    for weight in layer.weights:  # biases away from zero, so that a lost bias shows
        if weight.path.endswith("bias"):
            weight.assign(np.random.default_rng(15).normal(size=weight.shape).astype("float32"))
    traced, outputs = _traced_for_tensorflow_and_converter(layer, spec, x)
    assert {"Split", "Unpack"} & traced[False]
    assert not {"Split", "SplitV", "Unpack"} & traced[True], sorted(traced[True])
    np.testing.assert_allclose(outputs[True], outputs[False], rtol=1e-5, atol=1e-6)
