"""ONNX (ONNX Runtime), OpenVINO, the Triton repository and TF Serving's batching file.

The ONNX and OpenVINO models are checked against the Keras model's serving function (what the
SavedModel's `serving_default` runs) on the golden checkpoints, whose logits are the official
model's, at batch 1 and at a larger batch."""

import importlib
import pathlib
import re

import numpy as np
import pytest
from conftest import export_cli, register_tiny_releases, shared_folder, tiny_model

tf = pytest.importorskip("tensorflow")
from keras_t2t import export  # noqa: E402
from keras_t2t.export.serving import image_size  # noqa: E402
from savedmodels import export as cli  # noqa: E402
from savedmodels import tf_serving  # noqa: E402

ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")
pytest.importorskip("tf2onnx")
pytest.importorskip("onnx")
from keras_t2t.export import onnx_rewrites  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(scope="session", params=["performer", "transformer"])
def served(request, tmp_path_factory):
    """A golden model (official weights), its ONNX session and its compiled OpenVINO model;
    the files are exported once per session for every xdist worker (`shared_folder`)."""
    from conftest import DATA, GOLDEN

    name = next(n for n, e in GOLDEN.items() if e["tokens_type"] == request.param)
    entry = GOLDEN[name]
    model = tiny_model(
        request.param,
        weights=str(DATA / entry["checkpoint"]),
        input_shape=None,
        classes=entry["num_classes"],
    )

    def build(folder):
        export.export_onnx(model, str(folder / "model.onnx"))
        export.export_openvino(model, str(folder / "ov" / "model.xml"))

    folder = shared_folder(tmp_path_factory, f"onnx_{request.param}", build)
    onnx_path, xml = str(folder / "model.onnx"), str(folder / "ov" / "model.xml")
    core = ov.Core()
    return dict(
        model=model,
        size=image_size(model),
        onnx_path=onnx_path,
        onnx=ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]),
        # The CPU plugin's default precision may be bf16 on CPUs that have it: ask for f32.
        openvino=core.compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}),
    )


def _images(batch, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def _reference(model, images):
    outputs = export.serving_fn(model)(tf.constant(images))
    return {k: np.asarray(v) for k, v in outputs.items()}


def _onnx(session, images):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": images})))


def _openvino(compiled, images):
    results = compiled({"images": images})
    return {o.get_any_name(): results[o] for o in compiled.outputs}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_onnx_and_openvino_match_the_keras_model(served, engine, batch):
    images = _images(batch, served["size"], seed=batch)
    expected = _reference(served["model"], images)
    run = _onnx if engine == "onnx" else _openvino
    got = run(served[engine], images)
    assert set(got) == set(export.OUTPUTS)
    assert got["probabilities"].shape == expected["probabilities"].shape
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=TOLERANCE)
    np.testing.assert_allclose(got["scores"], expected["scores"], atol=TOLERANCE)
    np.testing.assert_array_equal(got["classes"], expected["classes"])
    # Not vacuous: the official weights give probabilities far from uniform (spread >> 1e-4).
    assert np.ptp(expected["probabilities"]) > 0.05


def test_the_signatures_declare_their_names_and_a_batch_axis(served):
    session = served["onnx"]
    size = served["size"]
    (images,) = session.get_inputs()
    assert (images.name, images.type, images.shape) == (
        "images",
        "tensor(uint8)",
        ["batch", size, size, 3],
    )
    assert {o.name: o.shape[0] for o in session.get_outputs()} == {
        name: "batch" for name in export.OUTPUTS
    }
    # The exact GELU as Erf (TF's Erfc has no ONNX op); the image's soft split as a Conv, the
    # token maps' as Slice nodes (no extract_patches, which tf2onnx writes as a -3 reshape).
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(served["onnx_path"])
    ops = {node.op_type for node in proto.graph.node}
    assert {"Erf", "Slice", "Conv"} <= ops and "Erfc" not in ops
    onnx.checker.check_model(proto, full_check=True)
    compiled = served["openvino"]
    assert [i.get_any_name() for i in compiled.inputs] == ["images"]
    assert {o.get_any_name() for o in compiled.outputs} == set(export.OUTPUTS)


def _layer_norms(model):
    from keras_t2t.layers import LayerNorm

    return sum(isinstance(layer, LayerNorm) for layer in model._flatten_layers())


def test_each_engine_runs_layer_norm_and_gelu_as_one_op(served, tmp_path):
    """As for the official model: ONNX Runtime runs each LayerNorm as one LayerNormalization
    and each GELU as one Gelu; OpenVINO runs each LayerNorm as one MVN and computes each GELU
    inside its Linear (no Erf left on its own)."""
    onnx = pytest.importorskip("onnx")
    norms = _layer_norms(served["model"])
    proto = onnx.load(served["onnx_path"])
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("LayerNormalization") == norms and "Sqrt" not in ops
    read = {name for node in proto.graph.node for name in node.input}
    assert [t.name for t in proto.graph.initializer if t.name not in read] == []
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(served["onnx_path"], options, providers=["CPUExecutionProvider"])
    optimized = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert "Erf" not in optimized and optimized.count("Gelu") == ops.count("Erf") > 0
    runtime = [
        (op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["originalLayersNames"])
        for op in served["openvino"].get_runtime_model().get_ordered_ops()
    ]
    assert [kind for kind, _ in runtime].count("MVN") == norms
    gelus = [kind for kind, names in runtime if "/mlp_1/mul_1" in names.astype(str)]
    assert gelus and set(gelus) == {"FullyConnected"}, gelus


def _layer_norm_graph(reduce="ReduceMean", centered_is_output=False):
    """An ONNX graph of a LayerNorm in elementary ops, as tf2onnx writes it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(a, n)
        for n, a in [
            ("gamma", rng.normal(size=6).astype("float32")),
            ("beta", rng.normal(size=6).astype("float32")),
            ("eps", np.array(1e-5, "float32")),
        ]
    ]
    mean = dict(axes=[-1], keepdims=1) if reduce == "ReduceMean" else {}
    nodes = [
        helper.make_node(reduce, ["x"], ["mean"], **mean),
        helper.make_node("Sub", ["x", "mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["square"]),
        helper.make_node(reduce, ["square"], ["variance"], **mean),
        helper.make_node("Add", ["variance", "eps"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["root"]),
        helper.make_node("Div", ["centered", "root"], ["normalized"]),
        helper.make_node("Mul", ["normalized", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 5, 6])  # noqa: E731
    outputs = [value("y")] + ([value("centered")] if centered_is_output else [])
    graph = helper.make_graph(nodes, "ln", [value("x")], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", export.ONNX_OPSET)])


@pytest.mark.parametrize("reduce", ["ReduceMean", "GlobalAveragePool"])
def test_onnx_layer_norm_fusion_keeps_the_values(reduce):
    onnx = pytest.importorskip("onnx")
    x = np.random.default_rng(4).normal(scale=2.0, size=(2, 5, 6)).astype("float32")
    proto = _layer_norm_graph(reduce)
    before = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    assert onnx_rewrites.fuse_layer_norms(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["LayerNormalization"]
    onnx.checker.check_model(proto, full_check=True)
    after = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    # From its definition, in float64.
    mean = x.astype("float64").mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    gamma, beta = (onnx.numpy_helper.to_array(t) for t in proto.graph.initializer[:2])
    np.testing.assert_allclose(after, (x - mean) / np.sqrt(var + 1e-5) * gamma + beta, atol=1e-5)


def test_onnx_layer_norm_fusion_leaves_a_shared_intermediate_alone():
    proto = _layer_norm_graph(centered_is_output=True)
    assert onnx_rewrites.fuse_layer_norms(proto) == 0
    assert len(proto.graph.node) == 9


@pytest.mark.parametrize("side", [None, 8])
def test_another_image_size_is_refused_not_answered(served, side):
    """The reliability rule of the SavedModel: a wrong size gets an error, never rows."""
    size = served["size"] + (side or -16)
    images = _images(1, size)
    with pytest.raises(Exception, match="(?i)invalid dimensions|index: 1"):
        _onnx(served["onnx"], images)
    with pytest.raises(RuntimeError):
        _openvino(served["openvino"], images)


def test_float32_pixels_give_the_uint8_answers_and_non_finite_ones_no_class(tmp_path):
    """float32 pixels: the uint8 model's answers; an image with a NaN or infinite pixel gets
    class NO_CLASS (-1) and NaN scores from both engines, where the argmax of its NaN
    probabilities said class 0 (F16). The other images of its batch keep their answers."""
    model = tiny_model()
    images = _images(3, 64, seed=5)
    written = cli.export(model, str(tmp_path), formats=("onnx", "openvino"), input_dtype="float32")
    session = ort.InferenceSession(written["onnx"], providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    expected = _reference(model, images)
    got = _onnx(session, images.astype(np.float32))
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=TOLERANCE)
    compiled = ov.Core().compile_model(
        written["openvino"], "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    got = _openvino(compiled, images.astype(np.float32))
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=TOLERANCE)

    bad = np.concatenate([images, images[:1], images[:1], images[:1]]).astype(np.float32)
    bad[3, 10, 20, 1] = np.nan  # one NaN pixel
    bad[4, 0, 0, 0] = np.inf  # one +Inf pixel
    bad[5] = -np.inf
    for run, engine in ((_onnx, session), (_openvino, compiled)):
        got = run(engine, bad)
        np.testing.assert_array_equal(got["classes"][3:], [export.NO_CLASS] * 3)
        assert np.isnan(got["scores"][3:]).all() and np.isnan(got["probabilities"][3:]).all()
        np.testing.assert_array_equal(got["classes"][:3], expected["classes"])
        np.testing.assert_allclose(
            got["probabilities"][:3], expected["probabilities"], atol=TOLERANCE
        )
    # OpenVINO's Python API converts an array of another dtype when called (the README says
    # so); an ov.Tensor of another dtype is refused.
    request = compiled.create_infer_request()
    with pytest.raises(RuntimeError, match="precision"):
        request.set_input_tensor(ov.Tensor(images.astype(np.int8)))


def test_export_cli_counts_the_openvino_weights_in_its_size(tmp_path, monkeypatch, capsys):
    """The printed size of the OpenVINO IR is its .xml and .bin together: it was the .xml alone
    (0.31 MiB for a 15.6 MiB model; F19)."""

    def fake_export(model, output_dir, formats, *args, **kwargs):
        folder = pathlib.Path(output_dir) / f"{model.name}_openvino"
        folder.mkdir(parents=True)
        (folder / f"{model.name}.xml").write_bytes(b"x" * 2**19)
        (folder / f"{model.name}.bin").write_bytes(bytes(3 * 2**20))
        return {"openvino": str(folder / f"{model.name}.xml")}

    monkeypatch.setattr(cli, "export", fake_export)
    code = export_cli().main(
        [
            "--model=t2t_vit_7",
            "--image_size=32",
            "--classes=5",
            f"--output={tmp_path}",
            "--format=openvino",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and re.search(r"^openvino\s+3\.50 MiB  .*t2t_vit_7\.xml$", out, re.M), out


def test_a_missing_converter_is_named_before_anything_is_written(tmp_path, monkeypatch):
    real = importlib.import_module

    def without_tf2onnx(name, *args):
        if name == "tf2onnx":
            raise ImportError("No module named 'tf2onnx'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_tf2onnx)
    with pytest.raises(ImportError, match=r"pip install 'keras-t2t\[onnx\]'"):
        cli.export(tiny_model(), str(tmp_path / "out"), formats=("saved_model", "onnx"))
    assert not (tmp_path / "out").exists()


def test_export_cli_onnx_openvino_triton_and_batching(tmp_path, monkeypatch, capsys):
    # In this process (test_export.py runs the CLI's own process), on a registered variant of
    # the golden models' architecture.
    register_tiny_releases(monkeypatch)
    out, name = tmp_path / "out", "t2t_tiny_performer"
    code = export_cli().main(
        [
            f"--model={name}",
            "--image_size=32",
            "--classes=5",
            f"--output={out}",
            "--format=saved_model,onnx,openvino",
            "--triton",
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    for artifact in ("saved_model", "tf_serving_batching", "onnx", "triton", "openvino"):
        assert re.search(rf"^{artifact}\s+\d+\.\d+ MiB", printed.out, re.M), printed.out
    # The three engines give the same answers as the SavedModel's serving_default.
    images = _images(4, 32, seed=7)
    loaded = tf.saved_model.load(str(out / name / "1"))
    expected = {
        k: v.numpy()
        for k, v in loaded.signatures["serving_default"](images=tf.constant(images)).items()
    }
    triton_onnx = out / "triton" / name / "1" / "model.onnx"
    for path in (out / f"{name}.onnx", triton_onnx):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = _onnx(session, images)
        np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=TOLERANCE)
        np.testing.assert_array_equal(got["classes"], expected["classes"])
    compiled = ov.Core().compile_model(
        str(out / f"{name}_openvino" / f"{name}.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    got = _openvino(compiled, images)
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=TOLERANCE)
    # Triton's config names what the ONNX model takes and gives.
    config = (out / "triton" / name / "config.pbtxt").read_text()
    assert f'name: "{name}"' in config and 'backend: "onnxruntime"' in config
    assert "dynamic_batching" in config and "max_batch_size: 32" in config
    assert re.search(r'name: "images", data_type: TYPE_UINT8, dims: \[ 32, 32, 3 \]', config)
    assert re.search(r'name: "probabilities", data_type: TYPE_FP32, dims: \[ 5 \]', config)
    session = ort.InferenceSession(str(triton_onnx), providers=["CPUExecutionProvider"])
    declared = set(re.findall(r'name: "(\w+)", data_type', config))
    assert declared == {"images"} | {o.name for o in session.get_outputs()}
    # TF Serving's batching file: fields of its BatchingParameters message
    # (tensorflow_serving/servables/tensorflow/session_bundle_config.proto), in text format.
    text = (out / name / tf_serving.BATCHING_FILE).read_text()
    wrapped = dict(re.findall(r"^(\w+) \{ value: (\d+) \}$", text, re.M))
    allowed = [int(v) for v in re.findall(r"^allowed_batch_sizes: (\d+)$", text, re.M)]
    assert len(wrapped) + len(allowed) == len(text.strip().splitlines())
    assert set(wrapped) == {
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
    }
    assert int(wrapped["max_batch_size"]) == allowed[-1] == 32 and allowed == sorted(allowed)


def test_a_model_of_any_size_exports_with_dynamic_height_and_width(tmp_path, capsys):
    """`export.py --image_size=any` with the golden checkpoint: its SavedModel's
    `serving_default` and its ONNX model take 64, 96, 128 and 64x96 images (stand-ins for
    224, 288, 384 and a non-square size) and give the probabilities of models built at those
    sizes from the same file; sides of 72 and 100 are refused, in words (the SavedModel) or
    by a node that says why (ONNX has no assertion op). `serving_bytes` resizes to the size
    of the weights."""
    from conftest import DATA

    checkpoint = str(DATA / "t2t_tiny_performer.pth.tar")
    model = tiny_model(weights=checkpoint, input_shape=(None, None, 3))
    assert image_size(model) == 64  # what serving_bytes resizes and crops to
    with pytest.raises(SystemExit):
        export_cli().main(["--output", str(tmp_path), "--image_size=large"])
    assert "'large' is neither a side in pixels (e.g. 224) nor 'any'" in capsys.readouterr().err
    argv = [f"--weights={checkpoint}", "--num_heads=2", "--image_size=any"]
    assert export_cli().main([*argv, "--format=saved_model,onnx", f"--output={tmp_path}"]) == 0
    written = dict(line.split()[::3] for line in capsys.readouterr().out.splitlines())
    serve = tf.saved_model.load(written["saved_model"]).signatures["serving_default"]
    session = ort.InferenceSession(written["onnx"], providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert shape == ["batch", "height", "width", 3], shape
    rng = np.random.default_rng(3)
    for size in [(64, 64), (96, 96), (128, 128), (64, 96)]:
        images = rng.integers(0, 256, (2, *size, 3), dtype=np.uint8)
        fixed = tiny_model(weights=checkpoint, input_shape=(*size, 3))
        expected = fixed.predict(images.astype("float32"), verbose=0)
        got = serve(images=tf.constant(images))["probabilities"].numpy()
        assert np.abs(got - expected).max() <= TOLERANCE, ("saved_model", size)
        got = _onnx(session, images)["probabilities"]
        assert np.abs(got - expected).max() <= TOLERANCE, ("onnx", size)
    for side in (72, 100):
        images = np.zeros((1, side, 64, 3), np.uint8)
        message = rf"multiples of 16, received\] \[{side}\] \[x\] \[64\]"
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            serve(images=tf.constant(images))
        with pytest.raises(Exception, match="image_height_and_width_must_be_multiples_of_16"):
            _onnx(session, images)
