"""`keras_t2t.inference`: the deployment twins compute the model's outputs, each transform's
layer its plain layer's, and the model's own layers keep one math (no ambient state)."""

import gc
import os
import pathlib
import platform
import subprocess
import sys
import types

import keras
import numpy as np
import pytest

import keras_t2t
from keras_t2t import inference
from keras_t2t import layers as t2t_layers

tf = pytest.importorskip("tensorflow")

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEC = tf.TensorSpec((None, 32, 32, 3))  # a SavedModel's unknown batch
LAST_BLOCK = "blocks_6"  # T2T-ViT-7's


def _small_model(**kwargs):
    kwargs.setdefault("classifier_activation", None)  # logits: a stricter comparison
    return keras_t2t.T2TViT7(input_shape=(32, 32, 3), classes=10, weights=None, **kwargs)


def _away_from_zero(model, seed=0):
    """Biases and LayerNorm offsets away from their zero init, so that a lost one shows."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if variable.path.endswith(("bias", "beta")):
            variable.assign(rng.normal(scale=0.1, size=variable.shape).astype("float32"))


def _traced(model, images, spec=SPEC):
    """(outputs, op types, op names (in graph order)) of `model` traced as a TensorFlow
    graph."""
    function = tf.function(lambda t: model(t, training=False))
    concrete = function.get_concrete_function(spec)
    graph_ops = concrete.graph.get_operations()
    outputs = tf.nest.map_structure(np.asarray, concrete(tf.constant(images)))
    return outputs, [op.type for op in graph_ops], [op.name for op in graph_ops]


def _layer_types(model):
    return [type(layer) for layer in model._flatten_layers()]


def _eager(model, images):
    return tf.nest.map_structure(np.asarray, model(images, training=False))


@pytest.fixture(scope="module")
def classifier():
    """One small class-token classifier for the module, its images and traced logits."""
    keras.utils.set_random_seed(0)
    model = _small_model()
    _away_from_zero(model)
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    logits, ops_, _ = _traced(model, images)
    return types.SimpleNamespace(model=model, images=images, logits=logits, ops=ops_)


@pytest.fixture
def quantize_fast(monkeypatch):
    """`model.quantize`, without the full garbage collection Keras runs for each Dense it
    quantizes (0.3 s each with TensorFlow loaded): the same model, 10x sooner."""
    monkeypatch.setattr(gc, "collect", lambda *args: 0)
    return lambda model, mode: model.quantize(mode)


# -- prepare: a twin per runtime -----------------------------------------------------------


@pytest.mark.parametrize("runtime", list(inference.RUNTIMES))
def test_prepare_gives_the_models_outputs_for_every_runtime(classifier, runtime):
    model = classifier.model
    config, weights = model.get_config(), model.get_weights()
    layer_types = _layer_types(model)
    twin = inference.prepare(model, runtime)
    logits, ops_, names = _traced(twin, classifier.images)
    np.testing.assert_allclose(logits, classifier.logits, rtol=1e-5, atol=1e-5)
    # `model` is left as it was: its config, weights and layers' classes; the twin shares
    # no variable with it.
    assert model.get_config() == config
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))
    assert _layer_types(model) == layer_types
    assert not {id(v) for v in model.weights} & {id(v) for v in twin.weights}
    # Each of the runtime's transforms shows in the twin.
    transforms = inference.RUNTIMES[runtime]
    assert type(twin.get_layer(LAST_BLOCK)) is inference.ClassTokenBlock
    assert type(twin.get_layer("blocks_5")) is t2t_layers.TransformerBlock
    splits = twin.get_layer("tokens_to_token").soft_split_implementations
    if "extract_patches" in transforms:
        assert splits == ("conv", "patches", "patches") and "ExtractImagePatches" in ops_
    elif "slices" in transforms:
        assert splits == ("slices",) * 3 and not {"Conv2D", "ExtractImagePatches"} & set(ops_)
    else:
        assert splits == t2t_layers.T2TModule.resolve_soft_splits("auto")
    twin_types = set(_layer_types(twin))
    onednn = "onednn_layer_norm" in transforms
    assert (inference.OneDNNLayerNorm in twin_types) == onednn
    assert (t2t_layers.LayerNorm in twin_types) == (not onednn)
    assert ("FusedBatchNormV3" in ops_) == onednn
    split_qkv = {inference.SplitQKVAttention, inference.SplitQKVPerformer}
    assert (split_qkv <= twin_types) == ("split_qkv" in transforms)
    if "split_qkv" in transforms:
        assert "Split" in classifier.ops and not {"Split", "SplitV", "Unpack"} & set(ops_)


def test_rows_computes_the_dense_layers_on_2d_rows_with_the_same_outputs(classifier):
    twin = inference.prepare(classifier.model, transforms=("rows",))
    logits, _, _ = _traced(twin, classifier.images)
    np.testing.assert_allclose(logits, classifier.logits, rtol=1e-5, atol=1e-5)
    twin_types = set(_layer_types(twin))
    assert {inference.RowsMlp, inference.RowsDense} <= twin_types
    assert t2t_layers.Mlp not in twin_types and keras.layers.Dense not in twin_types


def test_prepare_takes_a_model_of_any_size():
    """Every transform works on a model of any size, traced with unknown height and width
    (a SavedModel's): the model's eager outputs on non-square images."""
    model = keras_t2t.T2TViT(
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        input_shape=(None, None, 3),
        classes=10,
        classifier_activation=None,
    )
    _away_from_zero(model)
    images = np.random.default_rng(1).uniform(0, 255, (2, 48, 32, 3)).astype("float32")
    expected = _eager(model, images)
    spec = tf.TensorSpec((None, None, None, 3))
    for transforms in [
        ("class_token_block", "extract_patches", "onednn_layer_norm", "rows"),
        ("slices", "split_qkv"),
    ]:
        logits, _, _ = _traced(inference.prepare(model, transforms=transforms), images, spec)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5, err_msg=transforms)


def test_class_token_blocks_is_the_last_block_of_a_class_token_reader_only(classifier):
    model = classifier.model
    assert inference.class_token_blocks(model) == [LAST_BLOCK]
    # The patch tokens pooled (the blocks' every row is read), or the sequence returned.
    pooled = _small_model(include_top=False, pooling="avg")
    assert inference.class_token_blocks(pooled) == []
    assert inference.class_token_blocks(_small_model(include_top=False)) == []
    # The class token as features: its row is all that is read.
    assert inference.class_token_blocks(_small_model(include_top=False, pooling="token")) == [
        LAST_BLOCK
    ]
    # The last block's output is a model output too.
    both = keras.Model(model.input, [model.output, model.get_layer(LAST_BLOCK).output])
    assert inference.class_token_blocks(both) == []
    twin = inference.prepare(both)
    assert type(twin.get_layer(LAST_BLOCK)) is t2t_layers.TransformerBlock
    for ours, expected in zip(_eager(twin, classifier.images), _eager(both, classifier.images)):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    twin = inference.prepare(pooled, "tensorflow_onednn")
    np.testing.assert_allclose(
        _eager(twin, classifier.images), _eager(pooled, classifier.images), rtol=1e-5, atol=1e-5
    )


def test_prepare_takes_a_model_wrapped_in_a_bigger_model(classifier):
    """The nested model's layers take the transforms that swap classes; the model is left
    as it was (its twin is its own copy)."""
    inner = _small_model()
    _away_from_zero(inner, seed=2)
    inputs = keras.Input((32, 32, 3))
    outer = keras.Model(inputs, keras.layers.Dense(3, name="probe")(inner(inputs)))
    inner_types = _layer_types(inner)
    expected = _eager(outer, classifier.images)
    twin = inference.prepare(outer, "tensorflow_onednn")
    logits, ops_, _ = _traced(twin, classifier.images)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert inference.OneDNNLayerNorm in _layer_types(twin) and "FusedBatchNormV3" in ops_
    assert _layer_types(inner) == inner_types


@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize` method")
def test_prepare_keeps_a_quantized_models_weights_and_outputs(classifier, quantize_fast):
    model = _small_model()
    _away_from_zero(model)
    quantize_fast(model, "int8")
    expected = _eager(model, classifier.images)
    # Between them, these three runtimes (and rows) take every transform.
    for runtime, extra in (("tensorflow_onednn", ("rows",)), ("tflite", ()), ("onnx", ())):
        twin = inference.prepare(model, transforms=inference.RUNTIMES[runtime] + extra)
        block = twin.get_layer(LAST_BLOCK)
        assert type(block) is inference.ClassTokenBlock
        assert block.attn.qkv.quantization_mode == "int8"
        assert twin.get_layer("blocks_0").mlp.fc1.quantization_mode == "int8"
        np.testing.assert_allclose(
            _eager(twin, classifier.images), expected, rtol=1e-5, atol=1e-5, err_msg=runtime
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(runtime="tensorrt"), r"Unknown runtime 'tensorrt'; choose from generic, tensorflow"),
        (dict(transforms=["fuse_all"]), r"Unknown transform.*'fuse_all'.*choose from class_token"),
        (dict(transforms=["extract_patches", "slices"]), "both set the soft splits: choose one"),
    ],
    ids=["runtime", "transform", "two_soft_splits"],
)
def test_prepare_says_what_to_choose(classifier, kwargs, match):
    with pytest.raises(ValueError, match=match):
        inference.prepare(classifier.model, **kwargs)


def test_prepare_refuses_what_is_not_a_functional_model():
    with pytest.raises(ValueError, match="functional or Sequential Keras model"):
        inference.prepare(keras.layers.Dense(3))


# -- the inference layers, each against its plain layer ------------------------------------


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_class_token_block_is_the_class_tokens_row(qkv_bias):
    """`ClassTokenBlock` (k and v of every token; q, attention, proj and MLP for the class
    token only) gives row 0 of `TransformerBlock`'s output, eagerly and in a TF graph of an
    unknown batch."""
    block = t2t_layers.TransformerBlock(4, mlp_ratio=2.0, qkv_bias=qkv_bias)
    rng = np.random.default_rng(17)
    x = rng.normal(size=(3, 10, 16)).astype("float32")
    block(x)
    for weight in block.weights:  # every bias and norm offset away from zero
        weight.assign(rng.normal(scale=0.3, size=weight.shape).astype("float32"))
    head = inference.ClassTokenBlock.from_config(block.get_config())
    head.build(x.shape)
    head.set_weights(block.get_weights())
    assert head.compute_output_shape((None, 10, 16)) == (None, 1, 16)
    expected = np.asarray(block(x, training=False))[:, :1]
    np.testing.assert_allclose(np.asarray(head(x)), expected, atol=1e-5)
    graph = tf.function(head, input_signature=[tf.TensorSpec((None, 10, 16))])
    np.testing.assert_allclose(graph(x).numpy(), expected, atol=1e-5)
    # Row 0 depends on the other tokens too (through k and v).
    moved = x.copy()
    moved[:, 5] += rng.normal(size=16).astype("float32")  # (not a constant: LN removes it)
    assert np.abs(np.asarray(head(moved)) - expected).max() > 1e-3


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_onednn_layer_norm_is_layer_norm(policy):
    """`OneDNNLayerNorm` traces a training-mode FusedBatchNormV3 over its rows (what grappler
    fuses into _MklLayerNorm) where a dimension is unknown, and `LayerNorm`'s form where the
    shape is static; each is layer normalization, by a float64 reference, with the layer's
    epsilon (not tf.nn's 1.001e-5 floor). `LayerNorm` itself never traces it."""
    norm = t2t_layers.LayerNorm(epsilon=1e-5, dtype=policy)
    fused = inference.OneDNNLayerNorm.from_config(norm.get_config())
    rng = np.random.default_rng(16)
    # Rows of small variance, where the epsilon shows: 1e-5 against 1.001e-5 moves them 2e-5.
    x = rng.normal(size=(3, 5, 8)) * [[[1.0]], [[30.0]], [[3e-3]]] + [[[2.0]], [[-5.0]], [[0.0]]]
    x = x.astype("float32")
    for layer in (norm, fused):
        layer.build(x.shape)
    norm.set_weights([rng.normal(size=8).astype("float32") for _ in range(2)])
    fused.set_weights(norm.get_weights())
    mean = x.astype("float64").mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(variance + 1e-5) * norm.gamma.numpy() + norm.beta.numpy()
    tolerance = 1e-5 if policy == "float32" else 3e-2
    for layer, shape in [(fused, (None, 5, 8)), (fused, (3, 5, 8)), (norm, (None, 5, 8))]:
        function = tf.function(layer)
        graph = function.get_concrete_function(tf.TensorSpec(shape)).graph
        ops_ = {op.type for op in graph.get_operations()}
        assert ("FusedBatchNormV3" in ops_) == (layer is fused and None in shape), (layer, shape)
        assert ("Sqrt" in ops_) == ("FusedBatchNormV3" not in ops_)
        y = function(x)
        assert y.dtype == norm.compute_dtype
        np.testing.assert_allclose(
            np.asarray(tf.cast(y, tf.float32)), expected, rtol=tolerance, atol=tolerance
        )


@pytest.mark.slow
def test_tensorflow_fuses_layer_norm_is_false_where_onednn_is_off():
    """The probe reads what grappler did: with oneDNN off (TF_ENABLE_ONEDNN_OPTS=0) nothing
    is fused; with it on (TensorFlow's default on x86-64 Linux) the form is one op. oneDNN is
    chosen when TensorFlow loads: one process each (run side by side)."""
    probe = (
        "from keras_t2t import inference; print('fuses', inference.tensorflow_fuses_layer_norm())"
    )
    processes = {}
    for setting in ("0", "1"):
        env = dict(
            os.environ,
            TF_ENABLE_ONEDNN_OPTS=setting,
            TF_CPP_MIN_LOG_LEVEL="2",
            PYTHONPATH=str(ROOT),
        )
        processes[setting] = subprocess.Popen(
            [sys.executable, "-c", probe],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    answers = {}
    try:
        for setting, process in processes.items():
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr[-3000:]
            answers[setting] = stdout.split("fuses")[-1].strip()
    finally:
        for process in processes.values():
            process.kill()
    assert answers["0"] == "False"
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        assert answers["1"] == "True"


@pytest.mark.parametrize(
    "plain,split,kwargs",
    [
        (
            t2t_layers.MultiHeadSelfAttention,
            inference.SplitQKVAttention,
            dict(num_heads=2, qkv_bias=True),
        ),
        (t2t_layers.TokenPerformer, inference.SplitQKVPerformer, dict(token_dim=8)),
        (t2t_layers.TokenTransformer, inference.SplitQKVTokenTransformer, dict(token_dim=8)),
    ],
    ids=["attention", "performer", "transformer"],
)
def test_split_qkv_layers_split_no_tensor(plain, split, kwargs):
    """q, k and v from their own matmuls on column blocks of the kernel (constants for a
    converter): no Split / Unpack runs; the values are the plain layer's."""
    spec = tf.TensorSpec((None, 9, 8))
    x = np.random.default_rng(14).normal(size=(2, 9, 8)).astype("float32")
    layer = plain(**kwargs)
    layer(x)
    for weight in layer.weights:  # biases away from zero, so that a lost bias shows
        if weight.path.endswith("bias"):
            weight.assign(np.random.default_rng(15).normal(size=weight.shape).astype("float32"))
    twin = split.from_config(layer.get_config())
    twin.build(x.shape)
    twin.set_weights(layer.get_weights())
    outputs, traced = {}, {}
    for which in (layer, twin):
        function = tf.function(which)
        traced[which] = {
            op.type for op in function.get_concrete_function(spec).graph.get_operations()
        }
        outputs[which] = np.asarray(function(x))
    assert {"Split", "Unpack"} & traced[layer]
    assert not {"Split", "SplitV", "Unpack"} & traced[twin], sorted(traced[twin])
    np.testing.assert_allclose(outputs[twin], outputs[layer], rtol=1e-5, atol=1e-6)


# -- the model's own layers: one math, from their config and the backend --------------------


def test_layers_read_no_ambient_state():
    """No context variable, TF1 session or device probe chooses a layer's math."""
    source = (ROOT / "keras_t2t" / "layers.py").read_text()
    for word in (
        "ContextVar",
        "contextvars",
        "tf.compat.v1",
        "Session(",
        "_has_accelerator",
        "list_physical_devices",
    ):
        assert word not in source, word


def test_a_model_from_its_config_is_the_same_graph(classifier):
    """From the config alone (and the weights), the same predictions and the same graph,
    op for op; XLA compiling the function changes nothing in it either."""
    model = classifier.model
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    logits, ops_, _ = _traced(copy, classifier.images)
    np.testing.assert_array_equal(logits, classifier.logits)
    assert ops_ == classifier.ops
    xla = tf.function(lambda t: model(t, training=False), jit_compile=True)
    assert [op.type for op in xla.get_concrete_function(SPEC).graph.get_operations()] == ops_
