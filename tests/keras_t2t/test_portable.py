"""The model library on every Keras backend (#13): this module runs in the main test run on
TensorFlow, and again under JAX and PyTorch (`test_other_backends.py` starts it with
KERAS_BACKEND set). Nothing here may need TensorFlow."""

import gc
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras.src.testing import TestCase

import keras_t2t
from keras_t2t import layers
from keras_t2t.models import TokenPatches, TokenPooling
from tests.conftest import TINY_ARCH, tiny_model

BACKEND = keras.backend.backend()
TOLERANCE = 1e-4  # max abs difference on the official logits, as in test_weights.py

# On JAX, the T2T module's soft splits as one convolution each (the same values, tested in
# test_layers.py): their default strided slices are some 70 eager ops, each compiled when first
# run (the two T2T module cases below took 14.7 s on JAX, 7.3 s so). SoftSplit's own case
# keeps the slices.
_T2T_SPLITS = dict(soft_split_implementation="conv") if BACKEND == "jax" else {}
# (class, init kwargs, input shape, trainable weights, non-trainable weights)
LAYER_CASES = [
    (layers.SoftSplit, dict(kernel_size=3, strides=2, padding=1), (2, 8, 8, 4), 0, 0),
    (layers.Restructure, {}, (2, 16, 4), 0, 0),
    (layers.Mlp, dict(hidden_units=12, output_units=6, dropout_rate=0.1), (2, 5, 8), 4, 0),
    (layers.TokenPerformer, dict(token_dim=16, dropout_rate=0.1), (2, 16, 27), 12, 1),
    (layers.TokenTransformer, dict(token_dim=16, mlp_ratio=1.0), (2, 16, 27), 11, 0),
    (
        layers.T2TModule,
        dict(tokens_type="performer", embed_dim=32, token_dim=16, **_T2T_SPLITS),
        (2, 32, 32, 3),
        26,
        2,
    ),
    (
        layers.T2TModule,
        dict(tokens_type="transformer", embed_dim=32, token_dim=16, **_T2T_SPLITS),
        (2, 32, 32, 3),
        24,
        0,
    ),
    (layers.MultiHeadSelfAttention, dict(num_heads=2, qkv_bias=True), (2, 5, 8), 4, 0),
    (layers.StochasticDepth, dict(rate=0.2, seed=3), (2, 5, 8), 0, 0),
    (
        layers.TransformerBlock,
        dict(num_heads=2, mlp_ratio=3.0, drop_path_rate=0.1),
        (2, 5, 8),
        11,
        0,
    ),
    (layers.ClassToken, {}, (2, 5, 8), 1, 0),
    (layers.PositionEmbedding, {}, (2, 5, 8), 0, 1),
    (layers.LayerNorm, dict(epsilon=1e-5), (2, 5, 8), 2, 0),
    (TokenPooling, dict(mode="avg"), (2, 5, 8), 0, 0),
    (TokenPatches, {}, (2, 5, 8), 0, 0),
]


class KerasLayerHarness(TestCase):
    """Keras' own layer tests: build, config round trip, a training step, and (but on torch
    CPU, which Keras skips) the layer made with `dtype="mixed_float16"` returning float16
    with float32 weights."""

    def test_every_layer(self):
        for cls, kwargs, shape, trainable, frozen in LAYER_CASES:
            with self.subTest(layer=cls.__name__, **{k: str(v) for k, v in kwargs.items()}):
                self.run_layer_test(
                    cls,
                    init_kwargs=kwargs,
                    input_shape=shape,
                    expected_num_trainable_weights=trainable,
                    expected_num_non_trainable_weights=frozen,
                    # A dropped sample's gradient is 0: the training check needs none dropped.
                    run_training_check=cls is not layers.StochasticDepth,
                )


@pytest.mark.parametrize(
    "cls,kwargs,shape,_t,_f", LAYER_CASES, ids=lambda c: getattr(c, "__name__", None)
)
def test_config_round_trip_keeps_the_outputs(cls, kwargs, shape, _t, _f):
    x = np.random.default_rng(6).normal(size=shape).astype("float32")
    layer = cls(**kwargs, name="under_test")
    expected = keras.ops.convert_to_numpy(layer(x))
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is cls and revived.get_config() == layer.get_config()
    revived(x)
    revived.set_weights(layer.get_weights())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(revived(x)), expected)


def _golden(name):
    from tests.conftest import DATA, GOLDEN

    entry = GOLDEN[name]
    io = np.load(DATA / entry["io"])
    images = io["images_nchw"].transpose(0, 2, 3, 1)
    return dict(
        entry, checkpoint=str(DATA / entry["checkpoint"]), images=images, logits=io["logits"]
    )


GOLDEN_PERFORMER = _golden("t2t_tiny_performer")


def _golden_architecture(golden, **kwargs):
    """A model of the golden checkpoint's architecture (and head), random weights."""
    kwargs.setdefault("input_shape", (golden["image_size"],) * 2 + (3,))
    return keras_t2t.T2TViT(
        **TINY_ARCH,
        tokens_type=golden["tokens_type"],
        classes=golden["num_classes"],
        include_preprocessing=False,
        classifier_activation=None,
        **kwargs,
    )


def _golden_model(golden, **kwargs):
    return _golden_architecture(golden, weights=golden["checkpoint"], **kwargs)


def _battery_model(tokens_type="performer", **kwargs):
    """The tiny model at 32x32 (logits out) for the backbone battery below, its soft splits
    made as one convolution each: the same values as the backend's default strided slices
    (`test_layers.py`), but 3 ops instead of 67, and on JAX each new op compiles when first
    run eagerly, again for each dtype."""
    return tiny_model(
        tokens_type,
        input_shape=(32, 32, 3),
        classifier_activation=None,
        soft_split_implementation="conv",
        **kwargs,
    )


def _outputs(model, images):
    """`model(images)` as numpy; on JAX compiled whole (`predict_on_batch`), as its eager ops
    each compile on first use: several times slower for a new model or dtype."""
    if BACKEND == "jax":
        return np.asarray(model.predict_on_batch(images))
    return keras.ops.convert_to_numpy(model(images))


def _loss(labels, logits):
    return keras.ops.mean(
        keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    )


def _loss_and_gradients(model, images, labels):
    """The cross-entropy of `model` in training mode and its gradients (numpy), by the
    backend's own differentiation (compiled on JAX, see `_outputs`; eager elsewhere)."""
    variables = model.trainable_variables
    if BACKEND == "jax":
        import jax

        def loss_of(values):
            frozen = [v.value for v in model.non_trainable_variables]  # the seed states too
            logits, _ = model.stateless_call(values, frozen, images, training=True)
            return _loss(labels, logits)

        loss, grads = jax.jit(jax.value_and_grad(loss_of))([v.value for v in variables])
    elif BACKEND == "torch":
        loss = _loss(labels, model(images, training=True))
        loss.backward()
        grads = [v.value.grad for v in variables]
    else:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = _loss(labels, model(images, training=True))
        grads = tape.gradient(loss, variables)
    return float(keras.ops.convert_to_numpy(loss)), [keras.ops.convert_to_numpy(g) for g in grads]


def test_golden_logits_through_weights(golden):
    model = _golden_model(golden)
    logits = model.predict(golden["images"], verbose=0)  # compiled whole: fast on JAX too
    assert np.abs(logits - golden["logits"]).max() <= TOLERANCE


def test_weights_h5_and_keras_files_round_trip(golden, tmp_path):
    """`.weights.h5` into a model built again, and the `.keras` file loaded with
    `safe_mode=True` (no code in it): the outputs within 1e-6."""
    model = _golden_model(golden)
    expected = keras.ops.convert_to_numpy(model(golden["images"]))
    model.save_weights(tmp_path / "golden.weights.h5")
    again = _golden_model(dict(golden, checkpoint=str(tmp_path / "golden.weights.h5")))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(again(golden["images"])), expected, atol=1e-6
    )
    model.save(tmp_path / "golden.keras")
    revived = keras.saving.load_model(tmp_path / "golden.keras", safe_mode=True)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(revived(golden["images"])), expected, atol=1e-6
    )


def test_a_model_of_any_size_runs_on_this_backend():
    """A model built with input_shape=(None, None, 3) from the golden checkpoint gives at
    64x96 the logits of a model built at 64x96 from the same file (its table resized by the
    NumPy reference as the file loads), and refuses a side of 72. (`test_models.py` checks
    more sizes on TensorFlow; on JAX each size is a compilation.)"""
    golden = GOLDEN_PERFORMER
    model = _golden_model(golden, input_shape=(None, None, 3))
    images = np.random.default_rng(5).normal(size=(2, 64, 96, 3)).astype("float32")
    expected = _golden_model(golden, input_shape=(64, 96, 3)).predict(images, verbose=0)
    assert np.abs(model.predict(images, verbose=0) - expected).max() <= TOLERANCE
    # A ValueError where the sizes are static when traced; TensorFlow's assertion otherwise.
    with pytest.raises(Exception, match=r"multiples of 16, received\W+72\W+x\W+64"):
        model.predict(np.zeros((1, 72, 64, 3), "float32"), verbose=0)


QUANTIZATION_MODES = ["int8", "float8", "int4"]  # Keras >= 3.13 has each on every backend
# The logits' cosine to float32 on the golden images. float8 (e4m3: 3 mantissa bits) scales by
# amax histories that only training fills (Keras' delayed scaling): a model quantized for
# inference keeps scale 1. int4 (16 levels per output channel, activations in int8) is coarse
# on this untrained 64-wide model; the trained digits model shows what it keeps (test_training).
MIN_COSINE = {"int8": 0.995, "float8": 0.98, "int4": 0.9}


@pytest.mark.parametrize("mode", QUANTIZATION_MODES)
def test_model_quantize_keeps_the_logits_and_round_trips_through_keras_files(
    mode, tmp_path, monkeypatch
):
    """Keras' own `model.quantize` on the model as built (the golden checkpoint): its Dense
    layers take the mode, the logits stay close to float32's, and the `.keras` file keeps the
    quantized layers (their policies, in the blocks' configs) and the outputs exactly. For
    int8 and float8, KerasHub's check too: the model built quantized from a DTypePolicyMap."""
    # Keras runs a full garbage collection after quantizing each layer (to free the float
    # kernels of big models): most of this test's time for 40 small Dense layers.
    monkeypatch.setattr(gc, "collect", lambda *args: 0)
    golden = dict(GOLDEN_PERFORMER)
    model = _golden_model(golden)
    images = golden["images"]
    expected = keras.ops.convert_to_numpy(model(images))
    model.quantize(mode)
    qkv = model.get_layer("blocks_0").attn.qkv
    assert qkv.quantization_mode == mode
    logits = keras.ops.convert_to_numpy(model(images))
    cosine = np.sum(logits * expected, -1) / (
        np.linalg.norm(logits, axis=-1) * np.linalg.norm(expected, axis=-1)
    )
    assert cosine.min() >= MIN_COSINE[mode], cosine
    model.save(tmp_path / "quantized.keras")
    revived = keras.saving.load_model(tmp_path / "quantized.keras")
    assert revived.get_layer("blocks_0").attn.qkv.quantization_mode == mode
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(revived(images)), logits)
    if mode == "int4":
        return
    # KerasHub's quantization check: a model built quantized from a DTypePolicyMap keyed by
    # the Dense layers' paths (no `quantize` call), its config rebuilt, the weights loaded.
    dense = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dense)]
    policies = keras.dtype_policies.DTypePolicyMap(
        "float32", {layer.path: layer.dtype_policy for layer in dense}
    )
    built = _golden_architecture(golden, dtype=policies)
    modes = {layer.quantization_mode for layer in built._flatten_layers()}
    assert modes == {None, mode}
    by_path = {v.path: v for v in model.weights}  # float8's scales come in another order
    assert sorted(by_path) == sorted(v.path for v in built.weights)
    for variable in built.weights:
        variable.assign(by_path[variable.path])
    again = keras.Model.from_config(built.get_config())
    again.set_weights(built.get_weights())
    for twin in (built, again):
        assert twin.get_layer("blocks_1").mlp.fc2.quantization_mode == mode
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(twin(images)), logits)


def test_a_keras_file_written_by_another_backend_loads():
    """The runner (on TensorFlow) writes a `.keras` file and its outputs; under JAX and
    PyTorch they must load and give the same outputs."""
    path = os.environ.get("KERAS_T2T_FOREIGN_KERAS")
    if not path:
        pytest.skip("run by test_other_backends.py, with a file written on TensorFlow")
    io = np.load(path + ".npz")
    model = keras.saving.load_model(path)
    outputs = keras.ops.convert_to_numpy(model(io["images"]))
    np.testing.assert_allclose(outputs, io["outputs"], atol=1e-5)


def test_a_preset_written_on_another_backend_loads(tmp_path, monkeypatch):
    """The runner (on TensorFlow) converts the golden checkpoint to a preset (`convert
    --preset`); under JAX and PyTorch it loads from its folder, from `file://` and from a
    loopback HTTP mirror, and gives the official logits."""
    import functools
    import http.server
    import threading

    from tests.conftest import QuietHTTPHandler

    path = os.environ.get("KERAS_T2T_FOREIGN_PRESET")
    if not path:
        pytest.skip("run by test_other_backends.py, with a preset written on TensorFlow")
    path = pathlib.Path(path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))  # where downloads are cached
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHTTPHandler, directory=str(path.parent))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    http_uri = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
    golden = GOLDEN_PERFORMER
    try:
        for uri in (str(path), path.as_uri(), http_uri):
            model = keras_t2t.from_preset(
                uri, include_preprocessing=False, classifier_activation=None
            )
            logits = _outputs(model, golden["images"])
            assert np.abs(logits - golden["logits"]).max() <= TOLERANCE, uri
    finally:
        server.shutdown()
        server.server_close()


# The largest difference to float32's logits allowed, as a fraction of their largest value:
# a few roundings of the dtype's epsilon (float16 2**-11, bfloat16 2**-8) through the model.
# Measured: 0.09% (float16) and 0.5% to 0.9% (bfloat16, mixed or not) on the 3 backends.
POLICIES = {"mixed_float16": 0.005, "mixed_bfloat16": 0.03, "bfloat16": 0.03}


def test_the_model_carries_each_policy_with_a_float32_island():
    """KerasHub's policy checks: the model made with each dtype policy (the global one left
    alone) computes in that dtype, keeps the performer's random-feature attention, the
    preprocessing and the output in float32, and gives float32's logits within the dtype's
    precision."""
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    reference = _battery_model()
    expected = _outputs(reference, images)
    for policy, tolerance in POLICIES.items():
        dtype = policy.split("_")[-1]
        model = _battery_model(dtype=policy)
        model.set_weights(reference.get_weights())
        assert keras.config.dtype_policy().name == "float32"  # the global one is untouched
        block = model.get_layer("blocks_0")
        assert block.compute_dtype == dtype and block.attn.qkv.compute_dtype == dtype
        performer = model.get_layer("tokens_to_token").attention1
        assert performer.kqv.compute_dtype == dtype and performer.w.dtype == "float32"
        variable_dtype = "bfloat16" if policy == "bfloat16" else "float32"
        assert block.attn.qkv.kernel.dtype == variable_dtype, policy
        outputs = _outputs(model, images)
        assert str(outputs.dtype) == "float32" and np.isfinite(outputs).all(), policy
        error = np.abs(outputs - expected).max() / np.abs(expected).max()
        assert error <= tolerance, (policy, error)


def test_gradient_checkpointing_keeps_the_loss_and_the_gradients():
    """The same model with and without `gradient_checkpointing` (the blocks' branches in
    `keras.remat`), the same weights and the same stochastic-depth draws (the seed states
    copied): the same loss and gradients."""
    images = np.random.default_rng(2).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    labels = np.arange(4)
    # The transformer T2T module has no dropout (the performer's would draw its own masks).
    plain = _battery_model("transformer", drop_path_rate=0.5)
    checkpointed = _battery_model("transformer", drop_path_rate=0.5, gradient_checkpointing=True)
    block = checkpointed.get_layer("blocks_1")
    assert type(block).from_config(block.get_config()).gradient_checkpointing is True
    for source, target in zip(plain.variables, checkpointed.variables):
        target.assign(source)  # the weights, and the seed states of stochastic depth
    loss, grads = _loss_and_gradients(plain, images, labels)
    loss_again, grads_again = _loss_and_gradients(checkpointed, images, labels)
    assert abs(loss - loss_again) <= 1e-6, (loss, loss_again)
    assert max(np.abs(a - b).max() for a, b in zip(grads, grads_again)) <= 1e-6
    assert max(np.abs(g).max() for g in grads) > 1e-2  # gradients that can differ
    with pytest.raises(ValueError, match="needs `dropout_rate=0`, received dropout_rate=0.1"):
        layers.TransformerBlock(2, dropout_rate=0.1, gradient_checkpointing=True)


def test_lora_trains_saves_and_reloads(tmp_path):
    """LoRA through Keras' `Dense.enable_lora` on every Dense layer (18 in the tiny model, 38
    in T2T-ViT-7): only the LoRA factors of the kernels train; one step; the `.keras` file
    (each kernel merged with its LoRA product, as Keras saves them) loads with
    `safe_mode=True` and gives the same outputs."""
    images = np.random.default_rng(4).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    model = _battery_model()
    # The tiny model's Dense layers: 4 in each of the 2 T2T layers, the projection, 4 in each
    # of the 2 blocks, the head.
    dense = keras_t2t.enable_lora(model, rank=4)
    assert len(dense) == 4 * 2 + 1 + 4 * 2 + 1
    with pytest.raises(ValueError, match="already enabled"):
        keras_t2t.enable_lora(model, rank=4)
    trainable = {v.path.rsplit("/", 1)[-1] for v in model.trainable_variables}
    assert "kernel" not in trainable and {"lora_kernel_a", "lora_kernel_b"} <= trainable
    grads = _loss_and_gradients(model, images, np.arange(2))[1]
    grads = [keras.ops.convert_to_tensor(g) for g in grads]
    keras.optimizers.SGD(1.0).apply(grads, model.trainable_variables)  # one step
    moved = [keras.ops.convert_to_numpy(layer.lora_kernel_b) for layer in dense]
    assert min(np.abs(b).max() for b in moved) > 0  # from zeros: the step trained each one
    outputs = _outputs(model, images)
    model.save(tmp_path / "lora.keras")
    revived = keras.saving.load_model(tmp_path / "lora.keras", safe_mode=True)
    np.testing.assert_allclose(_outputs(revived, images), outputs, atol=1e-6)


TRAINED = (
    "tokens_to_token/attention1/kqv/kernel",
    "tokens_to_token/attention1/kqv/bias",
    "cls_token/token",
    "blocks_0/attn/qkv/kernel",
    "blocks_0/norm1/gamma",
    "blocks_1/mlp/fc2/kernel",
    "blocks_1/mlp/fc2/bias",
    "norm/gamma",
    "head/kernel",
    "head/bias",
)


def test_layer_decay_multipliers_and_optimizer_are_per_layer_adamw():
    """timm's layer decay on the tiny model (2 blocks: 3 layers): the T2T module and the class
    token at decay**3, block i at decay**(2 - i), the final norm and the head at 1. Two
    steps of `LayerDecayAdamW` equal, variable by variable, those of Keras' own AdamW with
    the learning rate times the multiplier (the weight decay scaled with it), one per
    multiplier, as timm's param groups."""
    model = _battery_model()
    multipliers = keras_t2t.layer_decay_multipliers(model, 0.5)
    expected = {
        "tokens_to_token/attention1/kqv/kernel": 0.125,
        "tokens_to_token/project/bias": 0.125,
        "cls_token/token": 0.125,
        "pos_embed/pos_embed": 0.125,
        "blocks_0/attn/qkv/kernel": 0.25,
        "blocks_1/mlp/fc2/bias": 0.5,
        "norm/gamma": 1.0,
        "head/kernel": 1.0,
    }
    assert {path: multipliers[path] for path in expected} == expected
    assert set(multipliers) == {v.path for v in model.weights}
    assert set(multipliers.values()) == {0.125, 0.25, 0.5, 1.0}
    with pytest.raises(ValueError, match=r"in \(0, 1\].*received 1.5"):
        keras_t2t.layer_decay_multipliers(model, 1.5)

    # A kernel and a 1-D weight (not decayed, as in the trainer's groups) of each layer group.
    variables = [v for v in model.trainable_variables if v.path in TRAINED]
    assert len(variables) == len(TRAINED)
    no_decay = [v for v in variables if len(v.shape) == 1]
    rng = np.random.default_rng(3)
    steps = [
        [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32")) for v in variables]
        for _ in range(2)
    ]
    optimizer = keras_t2t.LayerDecayAdamW(
        learning_rate=0.01, weight_decay=0.5, lr_multipliers=multipliers
    )
    optimizer.exclude_from_weight_decay(var_list=no_decay)
    copies = [keras.Variable(v.value, name=v.name) for v in variables]
    references = {}
    for scale in set(multipliers.values()):
        reference = keras.optimizers.AdamW(learning_rate=0.01 * scale, weight_decay=0.5)
        reference.exclude_from_weight_decay(
            var_list=[c for c, v in zip(copies, variables) if any(v is n for n in no_decay)]
        )
        group = [i for i, v in enumerate(variables) if multipliers[v.path] == scale]
        references[scale] = reference, group
    for grads in steps:
        optimizer.apply(grads, variables)
        for reference, group in references.values():
            reference.apply([grads[i] for i in group], [copies[i] for i in group])
    for variable, copy in zip(variables, copies):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(variable),
            keras.ops.convert_to_numpy(copy),
            atol=1e-6,
            err_msg=variable.path,
        )
    revived = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(revived) is keras_t2t.LayerDecayAdamW
    assert revived.get_config() == optimizer.get_config()


NOT_TENSORFLOW = """
import sys
import keras_t2t

keras_t2t.T2TViT7(input_shape=(32, 32, 3), classes=3)
print("TF MODULES", sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
for module in ("keras_t2t.export", "training.trainer"):
    try:
        __import__(module)
    except ImportError as error:
        print("REFUSED", module, error)
"""


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow is the backend here")
def test_no_tensorflow_imported_and_the_tf_programs_say_so():
    root = pathlib.Path(__file__).resolve().parents[2]  # the repository's root
    result = subprocess.run(
        [sys.executable, "-c", NOT_TENSORFLOW],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TF MODULES []" in result.stdout, result.stdout[-3000:]
    for module in ("keras_t2t.export", "training.trainer"):  # TensorFlow programs
        refused = [line for line in result.stdout.splitlines() if f"REFUSED {module}" in line]
        assert refused and f"KERAS_BACKEND is '{BACKEND}'" in refused[0]
        assert "KERAS_BACKEND=tensorflow" in refused[0]


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX's")
def test_fit_data_parallel_over_two_devices_on_jax():
    devices = keras.distribution.list_devices("cpu")
    if len(devices) < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=2")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices[:2]))
    try:
        model = tiny_model(input_shape=(32, 32, 3), classes=4)
        model.compile(
            optimizer=keras.optimizers.AdamW(3e-3, weight_decay=0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(),
        )
        rng = np.random.default_rng(0)
        labels = np.arange(32) % 4
        # Four classes told apart by brightness: learnable in a few steps.
        images = labels[:, None, None, None] * 60 + rng.uniform(0, 20, (32, 32, 32, 3))
        history = model.fit(
            images.astype("float32"), labels, batch_size=8, epochs=6, verbose=0, shuffle=False
        )
        losses = history.history["loss"]
        assert losses[-1] < 0.8 * losses[0], losses
        kernel = model.get_layer("head").kernel.value
        assert len(kernel.sharding.device_set) == 2  # replicated over both devices
    finally:
        keras.distribution.set_distribution(None)
