"""The bfloat16 SavedModel (#25): its graph computes the backbone's matmuls in bfloat16, and
its outputs stay those of the float32 model (what the float32 SavedModel serves) on the golden
checkpoints."""

import keras
import numpy as np
import pytest
from conftest import DATA, GOLDEN, TINY_ARCH

import keras_t2t

tf = pytest.importorskip("tensorflow")
from keras_t2t import export, inference  # noqa: E402
from keras_t2t.imagenet import normalization  # noqa: E402

MATMULS = ("MatMul", "BatchMatMulV2", "BatchMatMulV3", "_FusedMatMul", "Einsum", "Conv2D")
MIN_COSINE = 0.99  # of the centered log-probabilities (the logits, up to a constant)


def _golden_pixels_and_model(name):
    """The golden checkpoint `name` as a classifier that normalizes inside, and its images as
    uint8 pixels (the golden images are normalized)."""
    entry = GOLDEN[name]
    io = np.load(DATA / entry["io"])
    normalized = io["images_nchw"].transpose(0, 2, 3, 1)
    scale, offset = normalization()
    pixels = np.clip(np.round((normalized - offset) / scale), 0, 255).astype(np.uint8)
    model = keras_t2t.T2TViT(
        **TINY_ARCH, tokens_type=entry["tokens_type"], weights=str(DATA / entry["checkpoint"])
    )
    return model, pixels


def _matmul_dtypes(concrete):
    """{node name: dtype} of the matmuls and convolutions that `concrete` runs, its function
    library included."""
    graph = concrete.graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    found = {}
    for node in nodes:
        if node.op in MATMULS:
            attr = node.attr["T"] if "T" in node.attr else node.attr["Ta"]
            found[node.name] = tf.as_dtype(attr.type).name
    return found


# (golden checkpoint, serving runtime): the oneDNN runtime's LayerNorm takes bfloat16 itself.
CASES = [(name, "tensorflow") for name in sorted(GOLDEN)] + [
    ("t2t_tiny_performer", "tensorflow_onednn")
]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def saved_model(request, tmp_path_factory):
    """(the bfloat16 SavedModel, loaded; the golden pixels; the float32 model's named outputs
    on them through the serving function that the float32 SavedModel traces)."""
    name, runtime = request.param
    model, pixels = _golden_pixels_and_model(name)
    folder = tmp_path_factory.mktemp(f"bf16_{name}_{runtime}")
    path = export.export_saved_model(
        model, str(folder / "bfloat16"), serving_runtime=runtime, compute_dtype="bfloat16"
    )
    float32 = export.serving_fn(model)(tf.constant(pixels))
    return tf.saved_model.load(path), pixels, model, float32


def test_the_bfloat16_saved_model_computes_its_matmuls_in_bfloat16(saved_model):
    loaded, _, model, _ = saved_model
    for signature in ("serving_default", "serving_bytes"):
        dtypes = _matmul_dtypes(loaded.signatures[signature])
        in_blocks = {n: d for n, d in dtypes.items() if "blocks_" in n}
        # qkv, the attention's two batched matmuls, proj, fc1, fc2: per block, bfloat16.
        assert len(in_blocks) >= 6 * len(
            [layer for layer in model.layers if layer.name.startswith("blocks_")]
        ), sorted(dtypes)
        assert set(in_blocks.values()) == {"bfloat16"}, in_blocks
        # float32 only in the T2T attention's float32 island and the head.
        float32 = [n for n, d in dtypes.items() if d == "float32"]
        assert all("/tokens_to_token" in n or "/head" in n for n in float32), float32
        assert sum(d == "bfloat16" for d in dtypes.values()) > 2 * len(float32), dtypes


def test_the_bfloat16_saved_model_keeps_the_float32_outputs(saved_model):
    loaded, pixels, _, float32 = saved_model
    bfloat16 = loaded.signatures["serving_default"](images=tf.constant(pixels))
    assert bfloat16["probabilities"].dtype == tf.float32
    log_probabilities = []
    for outputs in (float32, bfloat16):
        logs = np.log(outputs["probabilities"].numpy().astype("float64"))
        log_probabilities.append(logs - logs.mean(-1, keepdims=True))
    a, b = log_probabilities
    cosine = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cosine.min() >= MIN_COSINE, cosine
    np.testing.assert_allclose(
        bfloat16["probabilities"].numpy(), float32["probabilities"].numpy(), atol=0.02
    )


def test_bfloat16_is_refused_for_a_quantized_model_and_an_unknown_dtype(tmp_path):
    model = keras_t2t.T2TViT(**TINY_ARCH, input_shape=(32, 32, 3), classes=3)
    with pytest.raises(ValueError, match="`compute_dtype` must be one of float32, bfloat16"):
        inference.prepare(model, compute_dtype="float16")
    # A keras_t2t model nested in another would be cloned as it is: refused, not float32.
    inputs = keras.Input((32, 32, 3))
    wrapped = keras.Model(inputs, model(inputs))
    with pytest.raises(ValueError, match="found no keras_t2t layer at the top level"):
        inference.prepare(wrapped, compute_dtype="bfloat16")
    # export_saved_model writes the SavedModel at `path`: a folder of other files stays.
    (tmp_path / "exports" / "other_model").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds something else than a SavedModel"):
        export.export_saved_model(model, str(tmp_path / "exports"), overwrite=True)
    assert (tmp_path / "exports" / "other_model").is_dir()
    model.quantize("int8")
    with pytest.raises(ValueError, match=r"takes a float model; this one is quantized \(int8\)"):
        inference.prepare(model, compute_dtype="bfloat16")
