"""Keras' own `model.export`, on a model loaded from an official (golden) checkpoint, with no
keras_t2t export code: each format loads in its runtime and gives Keras' logits (#22)."""

import numpy as np
import pytest
from conftest import tflite_op_names

import keras_t2t
from tests.conftest import TINY_ARCH

tf = pytest.importorskip("tensorflow")

TOLERANCE = 1e-4  # max abs difference to Keras' logits


@pytest.fixture(scope="module")
def golden_model():
    from tests.conftest import DATA, GOLDEN

    entry = GOLDEN["t2t_tiny_performer"]
    io = np.load(DATA / entry["io"])
    model = keras_t2t.T2TViT(
        **TINY_ARCH,
        tokens_type=entry["tokens_type"],
        include_preprocessing=False,
        classifier_activation=None,
        weights=str(DATA / entry["checkpoint"]),
    )
    images = io["images_nchw"].transpose(0, 2, 3, 1).astype("float32")
    logits = model.predict(images, verbose=0)
    assert np.abs(logits - io["logits"]).max() <= TOLERANCE  # the official logits
    return model, images, logits


def test_tf_saved_model(golden_model, tmp_path):
    model, images, logits = golden_model
    model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    assert np.abs(loaded.serve(images).numpy() - logits).max() <= TOLERANCE


def test_onnx(golden_model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    model, images, logits = golden_model
    path = str(tmp_path / "model.onnx")
    model.export(path, format="onnx", verbose=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: images})
    assert np.abs(output - logits).max() <= TOLERANCE


def test_openvino(golden_model, tmp_path):
    ov = pytest.importorskip("openvino")
    model, images, logits = golden_model
    path = str(tmp_path / "model.xml")
    model.export(path, format="openvino", verbose=False)
    # OpenVINO's CPU plugin computes in bf16 where the CPU has bf16 units unless told.
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    output = compiled(images)[compiled.output(0)]
    assert np.abs(output - logits).max() <= TOLERANCE


def test_litert_with_builtin_ops_only(golden_model, tmp_path):
    pytest.importorskip("ai_edge_litert")
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    model, images, logits = golden_model
    path = str(tmp_path / "model.tflite")
    model.export(path, format="litert", verbose=False)
    with open(path, "rb") as f:
        ops = tflite_op_names(f.read())
    assert not [op for op in ops if op.startswith("FlexDelegate") or "FLEX" in op.upper()], ops
    # The builtin resolver alone: a model that needs Select TF ops fails to allocate here.
    interpreter = Interpreter(
        model_path=path,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    assert np.abs(interpreter.get_tensor(out["index"]) - logits).max() <= TOLERANCE
