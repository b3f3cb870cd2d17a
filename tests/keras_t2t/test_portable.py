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

# (class, init kwargs, input shape, trainable weights, non-trainable weights)
LAYER_CASES = [
    (layers.SoftSplit, dict(kernel_size=3, strides=2, padding=1), (2, 8, 8, 4), 0, 0),
    (layers.Restructure, {}, (2, 16, 4), 0, 0),
    (layers.Mlp, dict(hidden_units=12, output_units=6, dropout_rate=0.1), (2, 5, 8), 4, 0),
    (layers.TokenPerformer, dict(token_dim=16, dropout_rate=0.1), (2, 16, 27), 12, 1),
    (layers.TokenTransformer, dict(token_dim=16, mlp_ratio=1.0), (2, 16, 27), 11, 0),
    (
        layers.T2TModule,
        dict(tokens_type="performer", embed_dim=32, token_dim=16),
        (2, 32, 32, 3),
        26,
        2,
    ),
    (
        layers.T2TModule,
        dict(tokens_type="transformer", embed_dim=32, token_dim=16),
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


def _golden_model(golden, **kwargs):
    return keras_t2t.T2TViT(
        **TINY_ARCH,
        tokens_type=golden["tokens_type"],
        include_preprocessing=False,
        classifier_activation=None,
        weights=golden["checkpoint"],
        **kwargs,
    )


def test_golden_logits_through_weights(golden):
    model = _golden_model(golden)
    logits = model.predict(golden["images"], verbose=0)  # compiled whole: fast on JAX too
    assert np.abs(logits - golden["logits"]).max() <= TOLERANCE


def test_weights_h5_and_keras_files_round_trip(golden, tmp_path):
    model = _golden_model(golden)
    expected = keras.ops.convert_to_numpy(model(golden["images"]))
    model.save_weights(tmp_path / "golden.weights.h5")
    again = _golden_model(dict(golden, checkpoint=str(tmp_path / "golden.weights.h5")))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(again(golden["images"])), expected, atol=1e-5
    )
    model.save(tmp_path / "golden.keras")
    revived = keras.saving.load_model(tmp_path / "golden.keras")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(revived(golden["images"])), expected, atol=1e-5
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
    quantized layers (their policies, in the blocks' configs) and the outputs exactly."""
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


def test_a_preset_written_on_another_backend_loads():
    """The runner (on TensorFlow) converts the golden checkpoint to a preset (`convert
    --preset`); under JAX and PyTorch it loads and gives the official logits."""
    path = os.environ.get("KERAS_T2T_FOREIGN_PRESET")
    if not path:
        pytest.skip("run by test_other_backends.py, with a preset written on TensorFlow")
    model = keras_t2t.from_preset(path, include_preprocessing=False, classifier_activation=None)
    golden = GOLDEN_PERFORMER
    logits = keras.ops.convert_to_numpy(model(golden["images"]))
    assert np.abs(logits - golden["logits"]).max() <= TOLERANCE


def test_the_model_carries_a_mixed_policy_with_a_float32_island():
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    reference = tiny_model(input_shape=(32, 32, 3), classifier_activation=None)
    mixed = tiny_model(input_shape=(32, 32, 3), classifier_activation=None, dtype="mixed_bfloat16")
    mixed.set_weights(reference.get_weights())
    assert keras.config.dtype_policy().name == "float32"  # the global one is untouched
    block = mixed.get_layer("blocks_0")
    assert block.compute_dtype == "bfloat16" and block.attn.qkv.compute_dtype == "bfloat16"
    performer = mixed.get_layer("tokens_to_token").attention1
    assert performer.kqv.compute_dtype == "bfloat16" and performer.w.dtype == "float32"
    assert all(w.dtype == "float32" for w in mixed.weights)
    outputs = mixed.predict(images, verbose=0)
    assert str(outputs.dtype) == "float32" and np.isfinite(outputs).all()
    expected = reference.predict(images, verbose=0)
    assert np.abs(outputs - expected).max() <= 0.05 * np.abs(expected).max() + 0.05


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
