"""Deployment: a stand-alone SavedModel for TF Serving and builtins-only TFLite models, on
the golden performer model (so that the outputs depend on every weight) and real photos."""

import functools
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import DATA, export_cli, shared_folder, tflite_op_names, tiny_model

from keras_t2t import export, inference
from keras_t2t.export.image_bytes import GIF_MAX_STEPS
from keras_t2t.export.serving import image_size
from savedmodels import export as cli
from savedmodels import tf_serving

ROOT = pathlib.Path(__file__).resolve().parents[3]
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


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """The golden performer model, real photos, and their SavedModel and four TFLite models,
    exported once per session for every xdist worker (`shared_folder`: tests only read it)."""
    model = tiny_model(weights=str(DATA / "t2t_tiny_performer.pth.tar"), input_shape=None)
    images = photo_crops()

    def build(folder):
        written = cli.export(model, str(folder), representative_images=images, name="tiny")
        relative = {artifact: os.path.relpath(path, folder) for artifact, path in written.items()}
        (folder / "written.json").write_text(json.dumps(relative))

    folder = shared_folder(tmp_path_factory, "export_tiny", build)
    relative = json.loads((folder / "written.json").read_text())
    written = {artifact: str(folder / path) for artifact, path in relative.items()}
    expected = model.predict(images.astype("float32"), verbose=0)
    return dict(model=model, images=images, expected=expected, written=written, folder=folder)


def test_tf_serving_layout(exported):
    path = pathlib.Path(exported["written"]["saved_model"])
    assert path == exported["folder"] / "tiny" / "1"
    assert (path / "saved_model.pb").exists() and (path / "variables").is_dir()
    assert (path / "assets.extra" / tf_serving.WARMUP_FILE).exists()


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
    encoded = tf.constant(
        [tf.io.encode_jpeg(p).numpy() for p in photos[:2]]
        + [tf.io.encode_png(p).numpy() for p in photos[2:]]
    )
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


SIDES = [(128, 128), (96, 96), (80, 80), (32, 32), (48, 48), (16, 16), (64, 96), (96, 64), (64, 80)]
REFUSED = (TypeError, ValueError, tf.errors.InvalidArgumentError)


@pytest.mark.parametrize("height,width", SIDES, ids=[f"{h}x{w}" for h, w in SIDES])
def test_serving_default_refuses_every_other_size(exported, height, width):
    # Larger sides used to give (height / 64) * (width / 64) rows per image.
    loaded = tf.saved_model.load(exported["written"]["saved_model"])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"64, 64, 3|\[\?,64,64,3\]"):
        loaded.signatures["serving_default"](images=tf.zeros((2, height, width, 3), tf.uint8))


@pytest.mark.parametrize("implementation", ["patches", "slices"])
def test_the_layers_refuse_another_size_in_a_bare_graph(exported, tmp_path, implementation):
    """The cause is fixed in SoftSplit: a graph with no signature check refuses too."""
    transform = {"patches": "extract_patches", "slices": "slices"}[implementation]
    model = inference.prepare(exported["model"], transforms=[transform])
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve", model.__call__, input_signature=[tf.TensorSpec([None, 64, 64, 3], tf.float32)]
    )
    archive.write_out(str(tmp_path / "bare"), verbose=False)
    function = tf.saved_model.load(str(tmp_path / "bare")).signatures["serve"]
    (key,) = function.structured_outputs
    assert function(tf.zeros((3, 64, 64, 3)))[key].shape == (3, 10)
    for height, width in SIDES:
        if (height, width) == (64, 64):
            continue
        with pytest.raises(tf.errors.InvalidArgumentError):
            rows = function(tf.zeros((1, height, width, 3)))[key].shape[0]
            pytest.fail(f"{height}x{width} gave {rows} rows")


def test_tflite_models_refuse_a_resized_input(exported):
    pytest.importorskip("ai_edge_litert")
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    for kind in export.TFLITE_KINDS:
        path = exported["written"][f"tflite_{kind}"]
        for resolver in (OpResolverType.AUTO, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES):
            for shape in [(1, 128, 128, 3), (1, 32, 32, 3), (1, 64, 96, 3), (1, 80, 64, 3)]:
                interpreter = Interpreter(model_path=path, experimental_op_resolver_type=resolver)
                index = interpreter.get_input_details()[0]["index"]
                interpreter.resize_tensor_input(index, shape)
                with pytest.raises(RuntimeError, match="(?i)reshape"):
                    interpreter.allocate_tensors()
                    interpreter.set_tensor(index, np.zeros(shape, np.uint8))
                    interpreter.invoke()
                    output = interpreter.get_output_details()[0]["index"]
                    pytest.fail(f"{kind} {shape}: {interpreter.get_tensor(output).shape}")


def _fuzz_bytes(rng, valid):
    """Random byte strings: noise, valid headers with noise, truncated and mutated images."""
    kind = rng.integers(6)
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 300)))
    if kind == 1:
        magic = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBPVP8L"]
        return magic[rng.integers(len(magic))] + rng.bytes(int(rng.integers(0, 200)))
    data = valid[rng.integers(len(valid))]
    if kind == 2:
        return data[: int(rng.integers(0, len(data)))]
    if kind == 3:
        mutated = bytearray(data)
        for _ in range(int(rng.integers(1, 8))):
            mutated[rng.integers(len(mutated))] = rng.integers(256)
        return bytes(mutated)
    return data


def test_fuzz_every_signature(exported):
    """Random shapes, dtypes and byte strings: the right shape or a refusal, nothing else."""
    loaded = tf.saved_model.load(exported["written"]["saved_model"])
    pixels, files = loaded.signatures["serving_default"], loaded.signatures["serving_bytes"]
    rng = np.random.default_rng(12)
    valid = [tf.io.encode_jpeg(p).numpy() for p in photo_crops(size=48, count=2)]
    valid += [tf.io.encode_png(p).numpy() for p in photo_crops(size=40, count=2)]
    answered = refused = 0
    for trial in range(60):
        rank = int(rng.integers(0, 6))
        shape = tuple(int(rng.choice([0, 1, 2, 3, 5, 64, 70])) for _ in range(rank))
        if trial % 3 == 0:
            shape = (int(rng.integers(0, 4)), *(int(rng.choice([32, 64, 65, 96])) for _ in "hw"), 3)
        dtype = rng.choice([np.uint8, np.uint8, np.float32, np.int32, np.int8, np.uint16])
        images = rng.integers(0, 256, shape).astype(dtype)
        batch = int(rng.integers(0, 4))
        blobs = [_fuzz_bytes(rng, valid) for _ in range(batch)]
        for signature, argument, expected_rows in (
            (pixels, dict(images=tf.constant(images)), shape[0] if rank else None),
            (files, dict(image_bytes=tf.constant(blobs, tf.string)), batch),
        ):
            try:
                out = signature(**argument)
            except REFUSED:
                refused += 1
                continue
            answered += 1
            probabilities = out["probabilities"].numpy()
            assert probabilities.shape == (expected_rows, 10), (shape, dtype, probabilities.shape)
            assert out["classes"].shape == (expected_rows,)
            assert np.all(np.isfinite(probabilities))
    assert answered >= 10 and refused >= 10, (answered, refused)


def _encode(image, fmt, **options):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_declared_pixels_match_what_the_decoder_makes():
    image_module = pytest.importorskip("PIL.Image")
    rgb = image_module.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)  # a real alpha channel: WebP writes the extended (VP8X) header
    files = {
        "jpeg": _encode(rgb, "JPEG"),
        "png": _encode(rgb, "PNG"),
        "gif": _encode(rgb, "GIF"),
        "bmp": _encode(rgb, "BMP"),
        "webp_vp8": _encode(rgb, "WEBP"),
        "webp_vp8l": _encode(rgb, "WEBP", lossless=True),
        "webp_vp8x": _encode(rgba, "WEBP"),
    }
    assert files["webp_vp8x"][12:16] == b"VP8X" and files["webp_vp8l"][12:16] == b"VP8L"
    for name, data in files.items():
        decoded = tf.io.decode_image(data, expand_animations=False)
        assert int(export.declared_pixels(tf.constant(data))) == 37 * 53, name
        assert decoded.shape[:2] == (37, 53), name
        decoded = export.decode_images(tf.constant([data]), 32, crop_pct=1.0)
        assert decoded.shape == (1, 32, 32, 3), name
    for data in (b"", b"GIF", b"not an image", _encode(rgb, "TIFF")):
        assert int(export.declared_pixels(tf.constant(data))) == -1


def test_serving_bytes_refuses_huge_images_before_decoding(exported):
    image_module = pytest.importorskip("PIL.Image")
    loaded = tf.saved_model.load(exported["written"]["saved_model"])
    huge = {
        "png": _encode(image_module.new("1", (12000, 12000)), "PNG"),
        "jpeg": _encode(image_module.new("L", (12000, 12000)), "JPEG"),
        "gif": _encode(image_module.new("L", (5000, 4000)), "GIF"),
        "webp": _encode(image_module.new("RGB", (5000, 4000)), "WEBP"),
    }
    for name, data in huge.items():
        start = time.perf_counter()
        with pytest.raises(tf.errors.InvalidArgumentError, match="too large.*16777216"):
            loaded.signatures["serving_bytes"](image_bytes=tf.constant([data]))
        assert time.perf_counter() - start < 3.0, name  # refused from the header alone


@pytest.fixture(scope="session")
def other_settings(exported, tmp_path_factory):
    """The SavedModel of the same model exported with settings other than the defaults, for
    the tests of each: serving_runtime="tensorflow_onednn" and max_image_pixels=40 * 40."""

    def build(folder):
        export.export_saved_model(
            exported["model"],
            str(folder / "other"),
            max_image_pixels=40 * 40,
            serving_runtime="tensorflow_onednn",
        )

    return str(shared_folder(tmp_path_factory, "export_other_settings", build) / "other")


def test_max_image_pixels_is_set_at_export(other_settings):
    serve = tf.saved_model.load(other_settings).signatures["serving_bytes"]
    small = tf.io.encode_png(np.zeros((40, 40, 3), np.uint8)).numpy()
    large = tf.io.encode_png(np.zeros((40, 41, 3), np.uint8)).numpy()
    assert serve(image_bytes=tf.constant([small]))["probabilities"].shape == (1, 10)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[1640\] .*limit of 1600"):
        serve(image_bytes=tf.constant([large]))


GRAPHIC_CONTROL = b"\x21\xf9\x04\x00\x00\x00\x00\x00"


@functools.cache
def _lzw(width, height):
    """The LZW data (code size, sub-blocks, terminator) of a one-colour frame, as PIL writes
    it: a few bytes for a frame of millions of pixels."""
    image_module = pytest.importorskip("PIL.Image")
    data = _encode(image_module.new("P", (width, height), 1), "GIF")
    position = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[position] == 0x21:  # extensions: label, sub-blocks
        position += 2
        while data[position]:
            position += data[position] + 1
        position += 1
    return data[position + 10 : -1]  # after the descriptor, up to the trailer


def _gif(frames, screen=(1, 1), before=GRAPHIC_CONTROL, local_table=False):
    """A GIF built by hand: a 2-colour table; for each `(width, height)` frame, `before` (an
    extension), the descriptor and one-colour LZW data."""
    data = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    table = b"\0\0\0\xff\xff\xff" if local_table else b""
    for width, height in frames:
        descriptor = struct.pack("<HHHHB", 0, 0, width, height, 0x80 if local_table else 0)
        data += before + b"\x2c" + descriptor + table + _lzw(width, height)
    return data + b";"


def test_serving_bytes_counts_every_gif_frame(exported):
    """TensorFlow's GIF decoder allocates each frame descriptor's size, whatever the logical
    screen says, and decodes every frame: a GIF's frames count together against the limit."""
    serve = tf.saved_model.load(exported["written"]["saved_model"]).signatures["serving_bytes"]
    hostile = {
        "1x1 screen, a frame over the limit": _gif([(4097, 4096)]),
        "17 frames of 1024x1024": _gif([(1024, 1024)] * 17, screen=(1024, 1024)),
        "a small frame, then one over the limit": _gif([(8, 8), (4097, 4096)], screen=(8, 8)),
    }
    for name, data in hostile.items():
        start = time.perf_counter()
        with pytest.raises(tf.errors.InvalidArgumentError, match="too large.*16777216"):
            serve(image_bytes=tf.constant([data]))
            pytest.fail(f"{name}: answered")
        assert time.perf_counter() - start < 3.0, name  # refused from the descriptors alone


def test_declared_pixels_of_a_gif_sum_its_frames():
    comment = (  # sub-blocks of many lengths: a run longer than one step reads, then others
        b"\x21\xfe" + (b"\xff" + b"c" * 255) * 1500 + b"\x11" + b"c" * 17 + b"\x01c\x03abc\0"
    )
    cases = [
        (_gif([(37, 53)]), 37 * 53),
        (_gif([(37, 53)], screen=(5000, 5000)), 37 * 53),  # the screen is not decoded
        (_gif([(30, 20), (7, 9), (300, 200)], local_table=True), 600 + 63 + 60000),
        (_gif([(30, 20), (7, 9)], before=GRAPHIC_CONTROL + comment), 600 + 63),
        (_gif([(30, 20), (7, 9)], before=b"") + b"junk after the trailer", 600 + 63),
        (_gif([(30, 20), (7, 9)])[:-3], 600 + 63),  # truncated in its last frame's data
        (_gif([(30, 20)])[:-1] + b"\x2c\0\0\0\0\x07\0", 600),  # in its last descriptor
        # giflib reads the sub-blocks after an empty extension's terminator as its data: such
        # an extension ends the file, which is cut there before it is decoded
        (_gif([(30, 20)])[:-1] + b"\x21\xfe\x00" + _gif([(4097, 4096)], before=b"")[19:], 600),
        (b"GIF89a", 0),
    ]
    for data, pixels in cases:
        assert int(export.declared_pixels(tf.constant(data))) == pixels, data[:40]


def test_an_animated_gif_is_decoded_from_its_first_frame():
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(3)
    frames = [
        image_module.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).convert("P")
        for _ in range(3)
    ]
    animated = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], comment=b"hi")
    still = _encode(frames[0], "GIF")
    decode = tf.function(lambda data, limit: export.decode_images(data, 32, 1.0, limit))
    np.testing.assert_array_equal(
        decode(tf.constant([animated]), 3 * 30 * 40), decode(tf.constant([still]), 30 * 40)
    )
    with pytest.raises(ValueError, match=r"too large: its header declares 3600 pixels"):
        export.decode_image_file(animated, 32, max_pixels=3 * 30 * 40 - 1)


def test_a_gif_too_slow_to_read_is_refused_fast():
    """Reading a GIF's structure takes a step per block (a run of equal sub-blocks being one):
    a GIF built of more blocks than GIF_MAX_STEPS is refused, within a bounded time."""
    comments = b"\x21\xfe\x01c\x00" * GIF_MAX_STEPS  # a step each
    fewer = _gif([(1, 1)], before=comments[10:])  # the frame and the trailer: 2 steps
    assert export.decode_image_file(fewer, 32).shape == (32, 32, 3)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="too many blocks"):
        export.decode_image_file(_gif([(1, 1)], before=comments), 32)
    assert time.perf_counter() - start < 3.0


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


def _session_run(saved_model, images, options):
    """(RunMetadata, probabilities) of serving_default run in a TF1 session with `options`
    (RunOptions), as TF Serving runs the SavedModel: after grappler, oneDNN rewrites included."""
    graph = tf.Graph()
    with tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.load(session, ["serve"], saved_model)
        signature = meta_graph.signature_def["serving_default"]
        metadata = tf.compat.v1.RunMetadata()
        probabilities = session.run(
            signature.outputs["probabilities"].name,
            {signature.inputs["images"].name: images},
            options,
            metadata,
        )
    return metadata, probabilities


def _session_ops(saved_model, images):
    """(op counts of the graph that ran, probabilities); see `_session_run`."""
    import collections

    options = tf.compat.v1.RunOptions(output_partition_graphs=True)
    metadata, probabilities = _session_run(saved_model, images, options)
    ops = collections.Counter(n.op for part in metadata.partition_graphs for n in part.node)
    return ops, probabilities


def test_saved_model_for_onednn_runs_each_layer_norm_as_one_fused_op(
    exported, other_settings, tmp_path
):
    """serving_runtime="tensorflow_onednn": where this TensorFlow fuses the oneDNN form, every
    LayerNorm of the served graph runs as one _MklLayerNorm (else as a FusedBatchNormV3); the
    default ("tensorflow") keeps the reductions; both answer as the Keras model."""
    model, images = exported["model"], exported["images"][:6]
    norms = sum(weight.path.endswith("/gamma") for weight in model.weights)
    assert norms == 2 * (2 + 2) + 1  # 2 T2T layers and 2 blocks of 2 each, and the last
    onednn_ops, fused = _session_ops(other_settings, images)
    plain_ops, plain = _session_ops(exported["written"]["saved_model"], images)
    assert plain_ops["_MklLayerNorm"] == plain_ops["FusedBatchNormV3"] == 0
    assert plain_ops["Rsqrt"] + plain_ops["Sqrt"] == norms, plain_ops
    if inference.tensorflow_fuses_layer_norm():
        assert onednn_ops["_MklLayerNorm"] == norms, onednn_ops
    else:
        assert onednn_ops["FusedBatchNormV3"] == norms, onednn_ops
    assert np.abs(fused - plain).max() <= 1e-6
    assert np.abs(fused - exported["expected"][:6]).max() <= 1e-5
    with pytest.raises(ValueError, match="`serving_runtime` must be one of tensorflow"):
        cli.export(model, str(tmp_path / "refused"), serving_runtime="onednn")
    assert not (tmp_path / "refused").exists()


def test_saved_model_runs_the_last_block_on_the_class_token_only(exported):
    """In the SavedModel the last block's MLP takes one row per image (batch x hidden); the
    others take every token's row; the probabilities are the Keras model's."""
    model, images = exported["model"], exported["images"][:3]
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    metadata, probabilities = _session_run(exported["written"]["saved_model"], images, options)
    shapes = [
        tuple(d.size for d in output.tensor_description.shape.dim)
        for device in metadata.step_stats.dev_stats
        for node in device.node_stats
        for output in node.output
    ]
    hidden = model.get_layer("blocks_0").mlp.fc1.units
    tokens = 1 + (image_size(model) // 16) ** 2
    assert (3, hidden) in shapes and (3 * tokens, hidden) in shapes
    assert np.abs(probabilities - exported["expected"][:3]).max() <= 1e-5


STANDALONE = """
import runpy
import sys
for name in ("keras", "keras_t2t", "tf_keras"):
    sys.modules[name] = None  # any import of these now fails
import numpy as np
import tensorflow as tf
saved_model, images_file, out_file, cli_dir = sys.argv[1:]
loaded = tf.saved_model.load(saved_model)
images = np.load(images_file)
out = loaded.signatures["serving_default"](images=tf.constant(images))
np.save(out_file, out["probabilities"].numpy())
assert "keras" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("standalone ok", flush=True)
# TensorFlow's saved_model_cli, as `python -m tensorflow.python.tools.saved_model_cli run ...`
sys.argv = ["saved_model_cli", "run", "--dir", saved_model, "--tag_set", "serve",
            "--signature_def", "serving_default", "--inputs", f"images={images_file}",
            "--outdir", cli_dir]
runpy.run_module("tensorflow.python.tools.saved_model_cli", run_name="__main__")
"""


def test_saved_model_runs_without_keras_and_in_saved_model_cli(exported, tmp_path):
    """In one process without keras and keras_t2t: the SavedModel loaded by TensorFlow alone,
    then run by TensorFlow's saved_model_cli; both give the Keras model's probabilities."""
    np.save(tmp_path / "images.npy", exported["images"])
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            STANDALONE,
            exported["written"]["saved_model"],
            str(tmp_path / "images.npy"),
            str(tmp_path / "out.npy"),
            str(tmp_path / "cli"),
        ],
        env=dict(ENV, PYTHONPATH=""),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "standalone ok" in result.stdout
    assert np.abs(np.load(tmp_path / "out.npy") - exported["expected"]).max() <= 1e-5
    probabilities = np.load(tmp_path / "cli" / "probabilities.npy")
    assert np.abs(probabilities - exported["expected"]).max() <= 1e-5


def test_warmup_requests_parse_as_prediction_logs(exported):
    apis = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
    path = (
        pathlib.Path(exported["written"]["saved_model"]) / "assets.extra" / tf_serving.WARMUP_FILE
    )
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
    ops = tflite_op_names(flatbuffer)
    assert not [op for op in ops if op.startswith("Flex") or op in ("CUSTOM", "DELEGATE")], ops
    probabilities = _run_tflite(path, exported["images"])
    expected = exported["expected"]
    if kind == "float32":
        assert np.abs(probabilities - expected).max() <= 1e-4
    else:
        agreement = np.mean(probabilities.argmax(-1) == expected.argmax(-1))
        assert agreement >= 0.8, agreement


def test_full_int8_keeps_the_performers_in_float_and_the_matmuls_in_int8(exported):
    """`_full_int8`: the Tokens-to-Token performers compute in float but for their Dense
    layers (int8 ruins their first LayerNorm and exp features); every FULLY_CONNECTED, and
    the transformer blocks' LayerNorms, attention matmuls and softmax, compute in int8."""
    pytest.importorskip("ai_edge_litert")
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=exported["written"]["tflite_int8"],
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    tensors = interpreter.get_tensor_details()
    dtypes = {}  # (op, "performer" or "other") -> dtypes of its first input
    for op in interpreter._get_ops_details():
        name = tensors[op["outputs"][0]]["name"]
        where = "performer" if re.search(r"tokens_to_token[^/]*/attention[12]", name) else "other"
        key = (op["op_name"], where)
        dtypes.setdefault(key, set()).add(np.dtype(tensors[op["inputs"][0]]["dtype"]).name)
    for op in ("EXP", "SUM", "DIV", "BATCH_MATMUL", "MEAN", "RSQRT", "GELU"):
        assert dtypes[(op, "performer")] == {"float32"}, op
    for where in ("performer", "other"):
        assert dtypes[("FULLY_CONNECTED", where)] == {"int8"}, where
    for op in ("BATCH_MATMUL", "SOFTMAX", "MEAN", "RSQRT", "GELU"):
        assert dtypes[(op, "other")] == {"int8"}, op
    assert dtypes[("ADD", "other")] == {"float32"}


def test_tflite_twin_has_slices_and_the_same_outputs(exported):
    twin = inference.prepare(exported["model"], "tflite")
    assert twin.get_layer("tokens_to_token").soft_split0.implementation == "slices"
    out = twin.predict(exported["images"].astype("float32"), verbose=0)
    assert np.abs(out - exported["expected"]).max() <= 1e-6


def test_export_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(ValueError, match="Unknown export format 'coreml'"):
        cli.export(tiny_model(), str(tmp_path), formats=("coreml",))
    with pytest.raises(ValueError, match="`input_dtype` must be one of"):
        cli.export(tiny_model(), str(tmp_path), formats=("onnx",), input_dtype="int32")
    with pytest.raises(ValueError, match="include_top=True"):
        cli.export(tiny_model(include_top=False), str(tmp_path))
    with pytest.raises(ValueError, match="needs representative_images"):
        export.tflite_models(tiny_model(), kinds=("int8",))


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "savedmodels" / "export.py"), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


# The golden checkpoint, whose variant the CLI reads from its tensors (a custom architecture:
# the model is named "t2t_vit"); T2T-ViT-7 made the CLI's own run take 24 s instead of 17.
CLI_ARGS = [f"--weights={DATA / 't2t_tiny_performer.pth.tar'}", "--num_heads=2"]
CLI_NAME = "t2t_vit"


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """The one run of the CLI's own process (`python savedmodels/export.py`), shared by the
    xdist workers (`shared_folder`): (its stdout, its --output folder, its photos folder).
    The other CLI tests call its `main(argv)` in this process."""

    def build(folder):
        photos = folder / "photos"
        photos.mkdir()
        for i, image in enumerate(photo_crops(size=80, count=4)):
            (photos / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
        result = _cli(*CLI_ARGS, f"--output={folder / 'out'}", f"--representative_data={photos}")
        assert result.returncode == 0, result.stderr[-3000:]
        (folder / "stdout.txt").write_text(result.stdout)

    folder = shared_folder(tmp_path_factory, "export_cli", build)
    return (folder / "stdout.txt").read_text(), folder / "out", folder / "photos"


def test_export_cli(cli_run):
    stdout, out, _ = cli_run
    for artifact in (
        "saved_model",
        "tflite_float32",
        "tflite_float16",
        "tflite_dynamic_int8",
        "tflite_int8",
    ):
        assert re.search(rf"^{artifact}\s+\d+\.\d+ MiB", stdout, re.M), stdout
    assert (out / CLI_NAME / "1" / "saved_model.pb").exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--model=t2t_vit_15"], "Unknown T2T-ViT variant 't2t_vit_15'"),
        (["--model=t2t_vit_7", "--format=coreml"], "Unknown --format 'coreml'"),
        (
            ["--model=t2t_vit_7", f"--weights={DATA / 't2t_tiny_performer.pth.tar'}"],
            "do not fit the model 't2t_vit_7'",
        ),
        (["--model=t2t_vit_7", "--weights=/nonexistent.pth"], "does not exist"),
        (["--model=t2t_vit_7", "--version=0"], "version must be an integer >= 1"),
        (["--model=t2t_vit_7", "--format="], "--format='' names no format; choose from"),
        (["--model=t2t_vit_7", "--max_image_pixels=0"], "max_image_pixels` must be an integer"),
        (["--model=t2t_vit_7", "--crop_pct=0"], r"crop_pct` must be a number in \[0.05, 1\]"),
    ],
)
def test_export_cli_errors(tmp_path, args, match, capsys):
    # In this process: the CLI's own process (`python savedmodels/export.py`) is run by
    # the cli_run fixture.
    assert export_cli().main([*args, f"--output={tmp_path}"]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_an_existing_version_is_refused_unless_overwrite(exported, tmp_path):
    model, path = exported["model"], tmp_path / "m" / "1"
    shutil.copytree(exported["written"]["saved_model"], path)  # an export, warmup requests too
    assert (path / "assets.extra" / tf_serving.WARMUP_FILE).exists()
    with pytest.raises(ValueError, match=r"m/1 already exists.*overwrite"):
        tf_serving.export(model, str(tmp_path), "m", 1)
    assert (path / "assets.extra" / tf_serving.WARMUP_FILE).exists()  # untouched
    tf_serving.export(model, str(tmp_path), "m", 1, overwrite=True)
    assert not (path / "assets.extra").exists()  # replaced whole: no stale warmup requests
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [  # no staging left
        "1",
        tf_serving.BATCHING_FILE,
    ]
    for version in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="version must be an integer >= 1"):
            cli.export(model, str(tmp_path), formats=("saved_model",), version=version)


def test_reexport_replaces_each_format_whole(tmp_path, monkeypatch):
    """Each format's output holds one export's files: an existing one stops a new export before
    anything is converted; with overwrite it is replaced whole, and a conversion that fails
    leaves it as it was. (The converters are stand-ins: what is checked is the files.)"""
    converted = []

    def tflite_models(model, representative_images=None, kinds=export.TFLITE_KINDS):
        converted.append("tflite")
        return {kind: kind.encode() for kind in kinds}

    def export_onnx(model, path, input_dtype="uint8"):
        converted.append("onnx")
        pathlib.Path(path).write_bytes(b"onnx")
        return path

    def export_openvino(model, path, input_dtype="uint8"):
        converted.append("openvino")
        pathlib.Path(path).write_bytes(b"xml")
        pathlib.Path(path).with_suffix(".bin").write_bytes(b"bin")
        return path

    for function in (tflite_models, export_onnx, export_openvino):
        monkeypatch.setattr(export, function.__name__, function)
    model, out = tiny_model(input_shape=(32, 32, 3)), tmp_path / "out"
    formats = ("tflite", "onnx", "openvino")

    def run(**kwargs):
        return cli.export(model, str(out), formats, name="m", triton=True, **kwargs)

    def files():
        return sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    written = run(representative_images=np.zeros((2, 32, 32, 3), np.uint8))
    assert pathlib.Path(written["tflite_int8"]).exists()
    (out / "m_openvino" / "other.bin").write_bytes(b"")  # files that a new export does not write
    (out / "triton" / "m" / "2").mkdir()
    before, converted[:] = files(), []
    with pytest.raises(
        ValueError,
        match=r"m_tflite and \S+m\.onnx and \S+m_openvino and "
        r"\S+triton/m already exist: nothing was written.*--overwrite",
    ):
        run()
    assert converted == [] and files() == before

    def failing(model, path, input_dtype="uint8"):
        pathlib.Path(path).write_bytes(b"half")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(export, "export_openvino", failing)
    with pytest.raises(RuntimeError, match="conversion failed"):
        run(overwrite=True)
    assert sorted(os.listdir(out / "m_openvino")) == ["m.bin", "m.xml", "other.bin"]
    monkeypatch.setattr(export, "export_openvino", export_openvino)
    run(overwrite=True)  # without representative images: no int8 model
    assert files() == [
        "m.onnx",
        "m_openvino",
        "m_openvino/m.bin",
        "m_openvino/m.xml",
        "m_tflite",
        "m_tflite/m_dynamic_int8.tflite",
        "m_tflite/m_float16.tflite",
        "m_tflite/m_float32.tflite",
        "triton",
        "triton/m",
        "triton/m/1",
        "triton/m/1/model.onnx",
        "triton/m/config.pbtxt",
    ]


@pytest.fixture(scope="module")
def digits_model():
    """T2T-ViT-7 trained for an epoch on scikit-learn's digits (32x32), and held-out images."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images = (digits.images * (255.0 / 16.0))[..., None]
    images = tf.image.grayscale_to_rgb(tf.image.resize(images, (32, 32), method="bilinear"))
    images = np.clip(np.round(images.numpy()), 0, 255).astype(np.uint8)
    labels = digits.target
    keras.utils.set_random_seed(0)
    import keras_t2t

    model = keras_t2t.T2TViT7(input_shape=(32, 32, 3), classes=10)
    model.compile(
        optimizer=keras.optimizers.AdamW(2e-3, weight_decay=0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(images[:1400], labels[:1400], batch_size=50, epochs=1, verbose=0)
    return model, images[:64], images[1400:], labels[1400:]


@pytest.mark.slow
def test_full_int8_runs_and_agrees_with_float32_on_a_trained_model(digits_model):
    pytest.importorskip("ai_edge_litert")
    from ai_edge_litert.interpreter import Interpreter

    model, calibration, held_out, labels = digits_model
    expected = model.predict(held_out.astype("float32"), verbose=0)
    assert np.mean(expected.argmax(-1) == labels) >= 0.6  # it has learned something
    flatbuffer = export.tflite_models(model, calibration, kinds=("int8",))["int8"]
    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(image):
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        return interpreter.get_tensor(out["index"])[0]

    predictions = np.stack([run(image) for image in held_out])
    agreement = np.mean(predictions.argmax(-1) == expected.argmax(-1))
    print(f"int8 agrees with float32 on {agreement:.3f} of {len(held_out)} held-out digits")
    assert agreement >= 0.9
    rng = np.random.default_rng(0)
    others = np.concatenate(
        [
            photo_crops(size=32, count=8),
            rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
            np.stack([np.full((32, 32, 3), v, np.uint8) for v in (0, 128, 255)]),
        ]
    )
    for image in others:  # real photos, noise and constant images run too
        assert np.all(np.isfinite(run(image)))


def test_export_cli_output_that_cannot_be_created(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    built, init, main = [], keras.Model.__init__, export_cli().main

    def counting(self, *args, **kwargs):
        built.append(type(self).__name__)
        return init(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "__init__", counting)
    for output in (tmp_path / "file", tmp_path / "file" / "out", tmp_path / "file" / "a" / "b"):
        assert main([*CLI_ARGS, "--format=saved_model", f"--output={output}"]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: cannot write to --output '{output}': "), error
    assert built == []  # refused before the model is built
    monkeypatch.undo()

    def unwritable(*args, **kwargs):  # as a writer fails when the folder is made or written
        raise tf.errors.PermissionDeniedError(None, None, f"{tmp_path}/out; Permission denied")

    monkeypatch.setattr(cli, "export", unwritable)
    assert main([*CLI_ARGS, "--format=saved_model", f"--output={tmp_path / 'out'}"]) == 2
    error = capsys.readouterr().err
    assert re.search(
        r"^error: cannot write to --output '\S+/out': \S+/out; Permission denied$", error
    ), error


def test_export_cli_refuses_an_existing_export_unless_overwrite(cli_run, tmp_path, capsys):
    _, shared, photos = cli_run
    out = tmp_path / "out"
    shutil.copytree(shared, out)  # the CLI's export, warmup requests and int8 model included

    def files():
        return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")}

    before, main = files(), export_cli().main
    assert main([*CLI_ARGS, f"--output={out}", f"--representative_data={photos}"]) == 2
    error = capsys.readouterr().err
    assert "already exist" in error and "--overwrite" in error, error
    assert files() == before  # nothing written
    saved_model = out / CLI_NAME / "1"
    assert (saved_model / "assets.extra").is_dir()
    assert main([*CLI_ARGS, f"--output={out}", "--format=saved_model", "--overwrite"]) == 0
    assert "saved_model" in capsys.readouterr().out
    assert not (saved_model / "assets.extra").exists()  # replaced whole: no warmup requests
    written = (saved_model / "saved_model.pb").stat().st_mtime_ns
    assert written > before[f"{CLI_NAME}/1/saved_model.pb"]
    assert sorted(p.name for p in (out / CLI_NAME).iterdir()) == [
        "1",
        tf_serving.BATCHING_FILE,
    ]


def test_export_cli_without_tensorflow_serving_api_writes_no_warmup_requests(
    cli_run, tmp_path, capsys, monkeypatch
):
    """--representative_data still calibrates; the warmup requests, which need
    tensorflow-serving-api, are left out with a note instead of stopping the export."""
    _, _, photos = cli_run
    monkeypatch.setattr(tf_serving, "has_prediction_log_protos", lambda: False)
    out = tmp_path / "out"
    args = [*CLI_ARGS, f"--output={out}", "--format=saved_model", f"--representative_data={photos}"]
    assert export_cli().main(args) == 0
    assert "note: no TF Serving warmup requests" in capsys.readouterr().out
    assert (out / CLI_NAME / "1" / "saved_model.pb").exists()
    assert not (out / CLI_NAME / "1" / "assets.extra").exists()
