"""Deployment: a stand-alone SavedModel for TF Serving and builtins-only TFLite models, on
the golden performer model (so that the outputs depend on every weight) and real photos."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import DATA, tiny_model

from keras_t2t import export

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))


def photo_crops(size=64, count=24):
    """Real photographs: crops of the two JPEGs that ship with scikit-learn, uint8."""
    sklearn = pytest.importorskip("sklearn")
    folder = pathlib.Path(sklearn.__file__).parent / "datasets" / "images"
    crops = []
    for name in ("china.jpg", "flower.jpg"):
        image = tf.io.decode_jpeg((folder / name).read_bytes()).numpy()
        for i in range(count // 2):
            side = 96 + 24 * (i % 6)
            top, left = (37 * i) % (image.shape[0] - side), (53 * i) % (image.shape[1] - side)
            crop = tf.image.resize(image[top : top + side, left : left + side], (size, size))
            crops.append(np.clip(np.round(crop.numpy()), 0, 255).astype(np.uint8))
    return np.stack(crops)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model(weights=str(DATA / "t2t_tiny_performer.pth.tar"), input_shape=None)
    images = photo_crops()
    folder = tmp_path_factory.mktemp("export")
    written = export.export(model, str(folder), representative_images=images, name="tiny")
    expected = model.predict(images.astype("float32"), verbose=0)
    return dict(model=model, images=images, expected=expected, written=written, folder=folder)


def test_tf_serving_layout(exported):
    path = pathlib.Path(exported["written"]["saved_model"])
    assert path == exported["folder"] / "tiny" / "1"
    assert (path / "saved_model.pb").exists() and (path / "variables").is_dir()
    assert (path / "assets.extra" / export.WARMUP_FILE).exists()


def test_serving_signatures(exported):
    loaded = tf.saved_model.load(exported["written"]["saved_model"])
    assert set(loaded.signatures) == {"serving_default", "serving_bytes"}
    out = loaded.signatures["serving_default"](images=tf.constant(exported["images"]))
    assert set(out) == set(export.OUTPUTS)
    probabilities = out["probabilities"].numpy()
    assert np.abs(probabilities - exported["expected"]).max() <= 1e-5
    np.testing.assert_array_equal(out["classes"].numpy(), exported["expected"].argmax(-1))
    np.testing.assert_allclose(out["scores"].numpy(), probabilities.max(-1))


def test_bytes_signature_applies_the_evaluation_preprocessing(exported):
    loaded = tf.saved_model.load(exported["written"]["saved_model"])
    photos = photo_crops(size=96, count=4)
    encoded = tf.constant([tf.io.encode_jpeg(p).numpy() for p in photos[:2]] +
                          [tf.io.encode_png(p).numpy() for p in photos[2:]])  # fmt: skip
    out = loaded.signatures["serving_bytes"](image_bytes=encoded)
    decoded = [tf.io.decode_image(e, channels=3).numpy() for e in encoded.numpy()]
    from keras_t2t.imagenet import resize_and_center_crop

    crops = np.stack([resize_and_center_crop(d, 64).numpy() for d in decoded])
    expected = exported["model"].predict(crops, verbose=0)
    assert np.abs(out["probabilities"].numpy() - expected).max() <= 1e-5


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s["serving_default"](images=tf.zeros((1, 64, 64, 3), tf.float32)),
        lambda s: s["serving_default"](images=tf.zeros((1, 32, 32, 3), tf.uint8)),
        lambda s: s["serving_default"](images=tf.zeros((1, 64, 64), tf.uint8)),
    ],
    ids=["float32", "wrong_size", "no_channels"],
)
def test_serving_rejects_wrong_dtype_and_shape(exported, call):
    loaded = tf.saved_model.load(exported["written"]["saved_model"])
    errors = (TypeError, ValueError, tf.errors.InvalidArgumentError)
    with pytest.raises(errors, match=r"uint8|shape|\(None, 64, 64, 3\)"):
        call(loaded.signatures)


def test_corrupt_image_bytes_give_an_error(exported):
    loaded = tf.saved_model.load(exported["written"]["saved_model"])
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="(?i)unknown image file format|decode"
    ):
        loaded.signatures["serving_bytes"](image_bytes=tf.constant([b"not an image at all"]))


def test_saved_model_has_stock_ops_only(exported):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    path = pathlib.Path(exported["written"]["saved_model"]) / "saved_model.pb"
    proto.ParseFromString(path.read_bytes())
    graph = proto.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops |= {node.op for node in function.node_def}
    stock = set(dir(tf.raw_ops))
    assert ops and ops <= stock, sorted(ops - stock)
    assert "ExtractImagePatches" in ops  # the serving graph is the training graph


STANDALONE = """
import sys
for name in ("keras", "keras_t2t", "tf_keras"):
    sys.modules[name] = None  # any import of these now fails
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
images = np.load(sys.argv[2])
out = loaded.signatures["serving_default"](images=tf.constant(images))
np.save(sys.argv[3], out["probabilities"].numpy())
assert "keras" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("standalone ok")
"""


def test_saved_model_runs_without_keras(exported, tmp_path):
    np.save(tmp_path / "images.npy", exported["images"])
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE, exported["written"]["saved_model"],
         str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
        env=dict(ENV, PYTHONPATH=""), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "standalone ok" in result.stdout
    assert np.abs(np.load(tmp_path / "out.npy") - exported["expected"]).max() <= 1e-5


def test_saved_model_cli_reproduces_keras(exported, tmp_path):
    np.save(tmp_path / "images.npy", exported["images"][:4])
    result = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "run",
         "--dir", exported["written"]["saved_model"], "--tag_set", "serve",
         "--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'images.npy'}",
         "--outdir", str(tmp_path / "out")],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    probabilities = np.load(tmp_path / "out" / "probabilities.npy")
    assert np.abs(probabilities - exported["expected"][:4]).max() <= 1e-5


def test_warmup_requests_parse_as_prediction_logs(exported):
    apis = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
    path = pathlib.Path(exported["written"]["saved_model"]) / "assets.extra" / export.WARMUP_FILE
    records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    assert len(records) == 4
    log = apis.PredictionLog.FromString(records[0])
    request = log.predict_log.request
    assert request.model_spec.name == "tiny"
    assert request.model_spec.signature_name == "serving_default"
    image = tf.make_ndarray(request.inputs["images"])
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, exported["images"][:1])


def _run_tflite(path, images):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.uint8 and tuple(inp["shape"]) == (1, 64, 64, 3)
    results = []
    for image in images:
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(results)


@pytest.mark.parametrize("kind", export.TFLITE_KINDS)
def test_tflite_models(exported, kind):
    pytest.importorskip("ai_edge_litert")
    path = exported["written"][f"tflite_{kind}"]
    flatbuffer = pathlib.Path(path).read_bytes()
    print(f"{kind}: {len(flatbuffer):,} bytes")
    ops = export.tflite_op_names(flatbuffer)
    assert not [op for op in ops if op.startswith("Flex") or op in ("CUSTOM", "DELEGATE")], ops
    probabilities = _run_tflite(path, exported["images"])
    expected = exported["expected"]
    if kind == "float32":
        assert np.abs(probabilities - expected).max() <= 1e-4
    else:
        agreement = np.mean(probabilities.argmax(-1) == expected.argmax(-1))
        assert agreement >= 0.8, agreement


def test_tflite_slices_twin_has_the_same_weights(exported):
    twin = export.with_soft_split(exported["model"], "slices")
    assert twin.get_layer("tokens_to_token").soft_split0.implementation == "slices"
    out = twin.predict(exported["images"].astype("float32"), verbose=0)
    assert np.abs(out - exported["expected"]).max() <= 1e-6


def test_export_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(ValueError, match="Unknown export format 'onnx'"):
        export.export(tiny_model(), str(tmp_path), formats=("onnx",))
    with pytest.raises(ValueError, match="include_top=True"):
        export.export(tiny_model(include_top=False), str(tmp_path))
    with pytest.raises(ValueError, match="needs representative_images"):
        export.tflite_models(tiny_model(), kinds=("int8",))


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "savedmodels" / "export.py"), *args],
                          env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip


def test_export_cli(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(photo_crops(size=80, count=4)):
        (photos / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
    result = _cli(
        "--model=t2t_vit_7",
        "--image_size=32",
        "--classes=5",
        f"--output={tmp_path / 'out'}",
        f"--representative_data={photos}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "random weights" in result.stdout
    for artifact in (
        "saved_model",
        "tflite_float32",
        "tflite_float16",
        "tflite_dynamic_int8",
        "tflite_int8",
    ):
        assert re.search(rf"^{artifact}\s+\d+\.\d+ MiB", result.stdout, re.M), result.stdout
    assert (tmp_path / "out" / "t2t_vit_7" / "1" / "saved_model.pb").exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--model=t2t_vit_15"], "Unknown T2T-ViT variant 't2t_vit_15'"),
        (["--model=t2t_vit_7", "--format=onnx"], "Unknown --format 'onnx'"),
        (
            ["--model=t2t_vit_7", f"--weights={DATA / 't2t_tiny_performer.pth.tar'}"],
            "do not fit the model 't2t_vit_7'",
        ),
        (["--model=t2t_vit_7", "--weights=/nonexistent.pth"], "does not exist"),
    ],
)
def test_export_cli_errors(tmp_path, args, match):
    result = _cli(*args, f"--output={tmp_path}")
    assert result.returncode == 2
    assert re.search(match, result.stderr) and "Traceback" not in result.stderr
