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


def test_soft_splits_restructure_and_t2t_module_take_dynamic_sizes():
    """In a TensorFlow graph of unknown height and width (a SavedModel's), every soft split
    implementation gives the loop reference's tokens, Restructure takes the grid as tensors,
    and the T2T module gives what it gives at a static size, on a non-square image."""
    import tensorflow as tf

    x = np.random.default_rng(3).normal(size=(2, 10, 14, 5)).astype("float32")
    dynamic = [tf.TensorSpec([None, None, None, 5])]
    for implementation in layers.SoftSplit.IMPLEMENTATIONS:
        split = layers.SoftSplit(3, 2, 1, implementation=implementation)
        tokens = tf.function(split, input_signature=dynamic)(x).numpy()
        np.testing.assert_array_equal(tokens, numpy_unfold(x, 3, 2, 1), err_msg=implementation)

    @tf.function(input_signature=dynamic)
    def restructure(images):
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        tokens = tf.reshape(images, [2, -1, 5])
        return layers.Restructure()(tokens, grid_size=(height, width))

    np.testing.assert_array_equal(restructure(x).numpy(), x)
    module = layers.T2TModule("transformer", embed_dim=32, token_dim=16)
    image = np.random.default_rng(4).normal(size=(2, 48, 80, 3)).astype("float32")
    expected = np.asarray(module(image))  # (2, 3 * 5, 32)
    traced = tf.function(module, input_signature=[tf.TensorSpec([None, None, None, 3])])
    assert expected.shape == (2, 15, 32)
    np.testing.assert_allclose(traced(image).numpy(), expected, atol=1e-5)


SIZE_PAIRS = [(4, 6), (6, 4), (14, 24), (24, 14), (4, (2, 9)), ((1, 5), (4, 3)), (7, 3)]


def _grid_and_size(old, new, seed):
    old = (old, old) if isinstance(old, int) else old
    new = (new, new) if isinstance(new, int) else new
    return np.random.default_rng(seed).normal(size=(*old, 6)), new


@pytest.mark.parametrize("old,new", SIZE_PAIRS)
def test_in_graph_bicubic_is_the_reference_resize(old, new):
    """`bicubic_resize_grid` (keras.ops, the any-size model's) against the NumPy reference
    that loads checkpoints at another size, up and down, square or not; with the output size
    as a tensor known only when the graph runs; and against torch where it is installed."""
    import tensorflow as tf

    from keras_t2t import weights

    grid, new = _grid_and_size(old, new, seed=len(str((old, new))))
    expected = weights.bicubic_resize(grid, new)
    ours = np.asarray(layers.bicubic_resize_grid(grid.astype("float32"), new))
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    traced = tf.function(
        lambda g, h, w: layers.bicubic_resize_grid(g, (h, w)),
        input_signature=[tf.TensorSpec(grid.shape)] + [tf.TensorSpec([], "int32")] * 2,
    )
    ours = traced(grid.astype("float32"), *new).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    try:
        import torch
    except ImportError:
        return  # no torch here: the NumPy reference is torch's (test_weights.py)
    official = torch.nn.functional.interpolate(
        torch.tensor(grid).permute(2, 0, 1)[None], size=new, mode="bicubic", align_corners=False
    )
    np.testing.assert_allclose(ours, official[0].permute(1, 2, 0).numpy(), atol=1e-5)


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


def test_position_embedding_resizes_its_table_to_the_images_grid():
    """A table of a 2x8 grid, called with images: at 32x128 (its own grid) the table as it is;
    at 64x64 its grid resized to 4x4 (though 4x4 holds its 16 tokens too) as the NumPy
    reference resizes a checkpoint's; a side of 72 and tokens without images are refused."""
    from keras_t2t import weights

    layer = layers.PositionEmbedding(grid_size=(2, 8), patch_size=16)
    tokens = np.zeros((1, 17, 6), "float32")
    layer.build(tokens.shape)
    table = np.random.default_rng(8).normal(size=(1, 17, 6)).astype("float32")
    layer.pos_embed.assign(table)
    own = np.asarray(layer(tokens, np.zeros((1, 32, 128, 3), "float32")))
    np.testing.assert_array_equal(own, table)
    resized = np.asarray(layer(tokens, np.zeros((1, 64, 64, 3), "float32")))
    expected = weights.interpolate_pos_embed(table, 16, grid=(4, 4), old_grid=(2, 8))
    np.testing.assert_allclose(resized, expected, atol=1e-5)
    assert np.abs(resized - table).max() > 0.1
    with pytest.raises(ValueError, match="multiples of 16, received 72 x 64"):
        layer(tokens, np.zeros((1, 72, 64, 3), "float32"))
    with pytest.raises(ValueError, match="table of 17 rows and received 10 tokens"):
        layer(np.zeros((1, 10, 6), "float32"))


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
    (layers.PositionEmbedding, dict(grid_size=(2, 2), patch_size=16), (2, 5, 8)),
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
    ours = layers.LayerNorm(epsilon=1e-5, name="layer_norm")
    reference = keras.layers.LayerNormalization(epsilon=1e-5)
    ours.build(x.shape)
    reference.build(x.shape)
    weights = [np.random.default_rng(9).normal(size=(147,)).astype("float32") for _ in range(2)]
    ours.set_weights(weights)
    reference.set_weights(weights)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(reference(x)), atol=1e-5)
    assert [w.path for w in ours.weights] == ["layer_norm/gamma", "layer_norm/beta"]


def _graph_ops(fn, spec):
    """The op types of `fn` traced as a TensorFlow graph for `spec`."""
    import tensorflow as tf

    graph = tf.function(fn).get_concrete_function(spec).graph
    return {op.type for op in graph.get_operations()}


def test_gelu_is_written_with_erf_and_layer_norm_divides_by_sqrt():
    """The one form of each, in every graph: GELU is `0.5 x (1 + erf(x / sqrt 2))` (TensorFlow's
    own writes erfc, which ONNX lacks) and LayerNorm divides by a square root (the forms ONNX
    Runtime and OpenVINO fuse into one op); the GELU's values are its definition's."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, 5, 4))
    gelu_ops = _graph_ops(layers.gelu, spec)
    assert "Erf" in gelu_ops and "Erfc" not in gelu_ops, sorted(gelu_ops)
    norm_ops = _graph_ops(layers.LayerNorm(epsilon=1e-5), spec)
    assert {"Sqrt", "RealDiv"} <= norm_ops and not {"Rsqrt", "FusedBatchNormV3"} & norm_ops
    x = np.random.default_rng(13).normal(scale=3.0, size=(2, 5, 4)).astype("float32")
    expected = 0.5 * x * (1 + np.vectorize(math.erf)(x.astype("float64") / math.sqrt(2)))
    np.testing.assert_allclose(np.asarray(layers.gelu(x)), expected, rtol=1e-6, atol=1e-6)


# The ops that tell the soft splits' implementations apart (in a graph of static shape).
SOFT_SPLIT_OPS = {
    "slices": ("ConcatV2", "StridedSlice"),
    "conv": ("Conv2D",),
    "patches": ("ExtractImagePatches",),
}


@pytest.mark.parametrize("implementation", SOFT_SPLIT_OPS)
def test_soft_split_traces_its_implementation_only(implementation):
    """Each implementation is one graph, whatever compiles it: the same op types with and
    without XLA, and the same values (under XLA too)."""
    import tensorflow as tf

    split = layers.SoftSplit(3, 2, 1, implementation=implementation)
    spec = tf.TensorSpec((1, 8, 8, 4))
    graph = tf.function(split).get_concrete_function(spec).graph
    xla_graph = tf.function(split, jit_compile=True).get_concrete_function(spec).graph
    ops_ = [op.type for op in graph.get_operations()]
    assert ops_ == [op.type for op in xla_graph.get_operations()]
    assert {op for ops_of in SOFT_SPLIT_OPS.values() for op in ops_of} & set(ops_) == set(
        SOFT_SPLIT_OPS[implementation]
    )
    x = np.random.default_rng(10).normal(size=(2, 8, 8, 4)).astype("float32")
    np.testing.assert_array_equal(
        np.asarray(tf.function(split, jit_compile=True)(x)), numpy_unfold(x, 3, 2, 1)
    )


def test_t2t_module_resolves_auto_from_the_backend_only():
    """`"auto"`: the one-hot convolution for the image and slices for the maps on TensorFlow
    (slices only elsewhere), the same whatever devices are visible; names and lists too."""
    expected = ("conv", "slices", "slices")
    if keras.backend.backend() != "tensorflow":
        expected = ("slices",) * 3
    assert layers.T2TModule.resolve_soft_splits("auto") == expected
    module = layers.T2TModule(embed_dim=32)
    assert module.soft_split_implementations == expected
    assert [
        s.implementation for s in (module.soft_split0, module.soft_split1, module.soft_split2)
    ] == list(expected)
    assert module.get_config()["soft_split_implementation"] == "auto"
    assert layers.T2TModule.resolve_soft_splits("patches") == ("patches",) * 3
    mixed = layers.T2TModule(embed_dim=32, soft_split_implementation=("slices", "conv", "conv"))
    assert mixed.soft_split_implementations == ("slices", "conv", "conv")
    assert mixed.get_config()["soft_split_implementation"] == ["slices", "conv", "conv"]
    for wrong in ("unfold", ["slices", "conv"], ["slices", "conv", "xla"]):
        with pytest.raises(ValueError, match="soft_split_implementation"):
            layers.T2TModule.resolve_soft_splits(wrong)
