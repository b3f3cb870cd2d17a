"""Export to SavedModel (TF Serving), TFLite (builtin ops only), ONNX and OpenVINO.

SavedModel signatures (both return the same named outputs, see `savedmodels/README.md`):
- `serving_default`: `images`, uint8 `[batch, size, size, 3]` RGB in [0, 255];
- `serving_bytes`: `image_bytes`, string `[batch]` of JPEG/PNG files (REST `{"b64": ...}`),
  preprocessed as the official evaluation (short side to size / 0.9, bicubic; center crop).
Outputs: `probabilities` float32 `[batch, classes]`, `classes` int32 `[batch]` (top-1),
`scores` float32 `[batch]` (its probability).

The SavedModel holds stock TensorFlow ops only and loads where neither keras nor keras_t2t
can be imported. TFLite models take uint8 `[1, size, size, 3]` and return the probabilities,
with builtin ops only. Each format is converted from the model's twin for its runtime
(`keras_t2t.inference.prepare`): the same outputs, in the forms that runtime runs fastest.
ONNX (through tf2onnx) and OpenVINO IR models take `images` `[batch, size, size, 3]` (uint8,
or float32 pixels in [0, 255] with `input_dtype="float32"`) and return the same three named
outputs as the SavedModel.
"""

import contextlib
import functools
import importlib
import os
import re
import shutil

import keras
import numpy as np

from keras_t2t import require_tensorflow_backend  # noqa: E402

require_tensorflow_backend("keras_t2t.export (SavedModel, TFLite, ONNX and OpenVINO)")

import tensorflow as tf  # noqa: E402

from keras_t2t import inference  # noqa: E402
from keras_t2t import layers as t2t_layers  # noqa: E402
from keras_t2t.imagenet import (  # noqa: E402
    CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    resize_and_center_crop,
)

FORMATS = ("saved_model", "tflite", "onnx", "openvino")
INPUT_DTYPES = ("uint8", "float32")
ONNX_OPSET = 17
TFLITE_KINDS = ("float32", "float16", "dynamic_int8", "int8")
OUTPUTS = ("probabilities", "classes", "scores")
WARMUP_FILE = "tf_serving_warmup_requests"


def check_model(model):
    """Raises a ValueError unless `model` is a keras_t2t classifier."""
    try:
        t2t = model.get_layer("tokens_to_token")
        model.get_layer("predictions")
    except (ValueError, AttributeError):
        raise ValueError(
            "Export needs a keras_t2t classifier (built with include_top=True); received "
            f"{getattr(model, 'name', model)!r}."
        ) from None
    if not isinstance(t2t, t2t_layers.T2TModule):
        raise ValueError(f"{model.name!r} is not a keras_t2t model.")
    return model


def image_size(model):
    return int(model.input_shape[1])


# The `keras_t2t.inference.prepare` runtimes a SavedModel may be prepared for (see
# `export_saved_model`).
SERVING_RUNTIMES = ("tensorflow", "tensorflow_onednn", "generic")


def check_serving_runtime(serving_runtime):
    if serving_runtime not in SERVING_RUNTIMES:
        raise ValueError(
            f"`serving_runtime` must be one of {', '.join(SERVING_RUNTIMES)}, received "
            f"{serving_runtime!r}. Use 'tensorflow_onednn' for x86-64 Linux TF Serving or "
            f"TensorFlow with oneDNN on (their default), 'tensorflow' for any other."
        )
    return serving_runtime


def serving_fn(model):
    """uint8 images -> dict of the named outputs, whatever the model's head and preprocessing.
    Give it a `keras_t2t.inference.prepare` twin for a runtime's faster forms."""
    has_preprocessing = any(layer.name == "preprocessing" for layer in model.layers)
    activation = model.get_layer("predictions").activation
    softmax_head = getattr(activation, "__name__", "") == "softmax"
    mean = tf.constant(IMAGENET_MEAN, tf.float32) * 255.0
    std = tf.constant(IMAGENET_STD, tf.float32) * 255.0

    def serve(images):
        x = tf.cast(images, tf.float32)
        if not has_preprocessing:
            x = (x - mean) / std
        outputs = tf.cast(model(x, training=False), tf.float32)
        probabilities = outputs if softmax_head else tf.nn.softmax(outputs, axis=-1)
        return {
            "probabilities": probabilities,
            "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
            "scores": tf.reduce_max(probabilities, axis=-1),
        }

    return serve


DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # about 16 megapixels
IMAGE_FORMATS = "JPEG, PNG, GIF, BMP or WebP"
_HEADER_BYTES = 32
# A GIF is read block by block (`_read_gif`): each step reads an extension's or a frame's
# header (or neither), then a run of up to _GIF_RUN data sub-blocks of one length (encoders
# write 255-byte ones), one more, and the terminator if it follows: about two steps a frame.
# A GIF that needs more steps is refused (a step takes tens of microseconds).
GIF_MAX_STEPS = 1 << 13
_GIF_RUN = 1024
# code, width, height and flags of a frame descriptor, from its first 10 bytes
_GIF_DESCRIPTOR = [
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 256, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 1, 256, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
]


def _read_gif(data):
    """(pixels of all the frames, the file cut after its first frame, whether it was read to
    its end within GIF_MAX_STEPS steps) of a GIF file, in stock TF ops.

    TensorFlow's GIF decoder sizes its output by the largest frame descriptor (not the logical
    screen) and decodes every frame, even with `expand_animations=False`; so the descriptors of
    all the frames are summed, and the decoder is given the first frame only (closed with a
    trailer), the one it returns. Only the bytes read here reach the decoder.
    """
    size = tf.strings.length(data)
    raw = tf.io.decode_raw(tf.strings.join([data, b"\0" * 16]), tf.uint8)

    def byte(position):
        return tf.cast(raw[tf.minimum(position, size)], tf.int32)  # 0 past the end

    def color_table(flags):  # bytes of the color table that a descriptor's flags announce
        return tf.where(flags >= 128, 3 * tf.bitwise.left_shift(2, flags % 8), 0)

    def step(position, in_data, in_frame, pixels, first_end, steps, stopped):
        head = tf.cast(raw[position : position + 10], tf.int32)
        code, width, height, flags = tf.unstack(tf.linalg.matvec(_GIF_DESCRIPTOR, head))
        # Outside data: an extension (0x21, label, data) or a frame (0x2C, descriptor, color
        # table, LZW code size, data); any other byte (0x3B: the trailer) ends the file, and so
        # does an extension without data: giflib reads the sub-blocks after its terminator too.
        is_extension = ~in_data & (code == 0x21) & (head[2] != 0)
        is_frame = ~in_data & (code == 0x2C)
        stops = ~in_data & ~is_extension & ~is_frame
        header = tf.where(is_extension, 2, 11 + color_table(flags))
        start = position + tf.where(in_data, 0, header)
        # Data: sub-blocks (a length byte, that many bytes) up to a 0 length byte. Reads the
        # run of sub-blocks of the first one's length, one more sub-block (an encoder's last
        # one is shorter), and the terminator if it follows.
        length = byte(start)
        stride = length + 1
        run = tf.cast(raw[start : start + stride * _GIF_RUN : stride] == raw[start], tf.int32)
        rest = start + tf.where(length == 0, 0, stride * tf.reduce_sum(tf.math.cumprod(run)))
        last = rest + byte(rest) + 1
        ends = (byte(rest) == 0) | (byte(last) == 0)
        after = tf.where(byte(rest) == 0, rest + 1, tf.where(byte(last) == 0, last + 1, last))
        in_frame = is_frame | (in_frame & in_data)
        frame_ends = in_frame & ends & (first_end < 0)
        frame_pixels = tf.cast(width, tf.int64) * tf.cast(height, tf.int64)
        return (
            tf.where(stops, position, after),
            ~stops & ~ends,
            in_frame,
            pixels + tf.where(is_frame, frame_pixels, tf.constant(0, tf.int64)),
            tf.where(frame_ends, after, first_end),
            steps + 1,
            stops,
        )

    def more(position, in_data, in_frame, pixels, first_end, steps, stopped):
        return ~stopped & (position < size) & (steps < GIF_MAX_STEPS)

    start = 13 + color_table(byte(10))  # after the header, screen descriptor and color table
    no, zero = tf.constant(False), tf.constant(0)
    position, _, _, pixels, first_end, _, stopped = tf.while_loop(
        more, step, (start, no, no, tf.constant(0, tf.int64), zero - 1, zero, no)
    )
    cut = tf.minimum(tf.where(first_end >= 0, first_end, position), size)
    first_frame = tf.strings.join([tf.strings.substr(data, 0, cut), b";"])
    return pixels, first_frame, stopped | (position >= size)


def declared_pixels(data):
    """Width x height that an image file declares in its header, int64; -1 for another format.

    Reads the header only (JPEG: its frame header; GIF: its block structure, for the
    descriptors of all its frames, summed), in stock TF ops, so that a huge image can be
    refused before it is decoded. Formats: JPEG, PNG, GIF, BMP, WebP (VP8, VP8L, VP8X), those that
    `tf.io.decode_image` reads.
    """
    return _declared(data)[0]


def _declared(data):
    """(`declared_pixels(data)`, the bytes to decode: a GIF's first frame only, whether the
    file was read far enough to tell: False for a GIF of more than GIF_MAX_STEPS blocks)."""
    padded = tf.strings.join([data, b"\0" * _HEADER_BYTES])
    head = tf.io.decode_raw(tf.strings.substr(padded, 0, _HEADER_BYTES), tf.uint8)
    head = tf.cast(head, tf.int64)

    def little(offset, count):
        return sum(head[offset + i] * (1 << (8 * i)) for i in range(count))

    def big(offset, count):
        return sum(head[offset + i] * (1 << (8 * (count - 1 - i))) for i in range(count))

    def starts(offset, signature):
        return tf.reduce_all(tf.equal(head[offset : offset + len(signature)], list(signature)))

    def signed32(value):
        return tf.abs(tf.where(value >= 1 << 31, value - (1 << 32), value))

    vp8l = little(21, 4)
    candidates = [  # (is this format, its declared pixels)
        (starts(0, b"\x89PNG\r\n\x1a\n"), big(16, 4) * big(20, 4)),
        (starts(0, b"BM"), signed32(little(18, 4)) * signed32(little(22, 4))),
        (
            starts(0, b"RIFF") & starts(8, b"WEBPVP8X"),
            (little(24, 3) + 1) * (little(27, 3) + 1),
        ),
        (
            starts(0, b"RIFF") & starts(8, b"WEBPVP8L"),
            (vp8l % (1 << 14) + 1) * ((vp8l // (1 << 14)) % (1 << 14) + 1),
        ),
        (
            starts(0, b"RIFF") & starts(8, b"WEBPVP8 "),
            (little(26, 2) % (1 << 14)) * (little(28, 2) % (1 << 14)),
        ),
    ]
    pixels = tf.constant(-1, tf.int64)
    for is_format, count in reversed(candidates):
        pixels = tf.where(is_format, count, pixels)

    def jpeg():
        shape = tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64)
        return tf.reduce_prod(shape), data, tf.constant(True)

    return tf.cond(
        starts(0, b"\xff\xd8\xff"),
        jpeg,
        lambda: tf.cond(
            starts(0, b"GIF8"), lambda: _read_gif(data), lambda: (pixels, data, tf.constant(True))
        ),
    )


def decode_images(image_bytes, size, crop_pct=0.9, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """string `[batch]` of image files -> float32 `[batch, size, size, 3]` in [0, 255].

    Each file's header is read first: a format other than JPEG, PNG, GIF, BMP and WebP, or an
    image of more than `max_pixels` pixels (a GIF: all its frames together), is refused
    (InvalidArgument) before decoding, so a small file that declares a huge image cannot take
    the server's memory. A GIF is decoded from its first frame only.
    """

    def one(data):
        pixels, data, read = _declared(data)
        checks = [
            tf.debugging.Assert(
                pixels >= 0, [f"Unknown image file format: send {IMAGE_FORMATS} files."]
            ),
            tf.debugging.Assert(
                read,
                [
                    f"The GIF has too many blocks to read (more than {GIF_MAX_STEPS} steps: "
                    "about two a frame, more for data sub-blocks of unusual lengths). Send a "
                    "still image, or an animation of fewer frames."
                ],
            ),
            tf.debugging.Assert(
                pixels <= max_pixels,
                [
                    "The image is too large: its header declares",
                    pixels,
                    f"pixels (a GIF: all its frames together), more than the limit of "
                    f"{max_pixels} (max_image_pixels). Resize it first.",
                ],
            ),
        ]
        with tf.control_dependencies(checks):
            data = tf.identity(data)
        image = tf.cond(  # TF's WebP decoder gives RGBA files 4 channels, whatever is asked
            tf.strings.substr(data, 8, 4) == "WEBP",
            lambda: tf.io.decode_image(data, expand_animations=False)[..., :3],
            lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
        )
        return resize_and_center_crop(tf.ensure_shape(image, [None, None, 3]), size, crop_pct)

    return tf.map_fn(
        one, image_bytes, fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32)
    )


@functools.cache
def _file_decoder(size, crop_pct, max_pixels):
    return tf.function(
        lambda data: decode_images(data[None], size, crop_pct, max_pixels)[0],
        input_signature=[tf.TensorSpec([], tf.string)],
    )


def decode_image_file(data, size, crop_pct=CROP_PCT, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """One image file's bytes -> float32 `[size, size, 3]` in [0, 255], checked and decoded as
    `serving_bytes` does (`decode_images`, in a graph also when called eagerly). Raises a
    ValueError that says why for a file it refuses or cannot decode."""
    try:
        return _file_decoder(size, float(crop_pct), max_pixels)(data)
    except tf.errors.InvalidArgumentError as error:
        raise ValueError(op_error_reason(error)) from None


def op_error_reason(error):
    """The first line of a TF op error's message, without the names of graph nodes and of the
    op (`[Op:DecodeImage]`); an assertion's data joined into one sentence."""
    text = re.sub(r"\{\{[^}]*\}\}", "", error.message).strip().splitlines()[0].strip()
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
    if text.startswith("assertion failed:"):
        text = " ".join(re.findall(r"\[([^\[\]]*)\]", text))
    return text


def serving_crop_pct(model, weights=None):
    """The center crop that serving must apply to match how `model` was evaluated: the
    `--crop_pct` of the training run when `weights` is its model_dir, else that of the
    model's release (`weights="imagenet"`), else the official 0.9."""
    if weights is not None and os.path.isdir(os.fspath(weights)):
        from keras_t2t import weights as weights_lib

        crop_pct = weights_lib.run_weights(os.fspath(weights))[1].get("crop_pct")
        if crop_pct is not None:
            return crop_pct
    release = getattr(model, "pretrained_release", None)
    return release.crop_pct if release is not None else CROP_PCT


def check_crop_pct(crop_pct):
    if isinstance(crop_pct, bool) or not (
        isinstance(crop_pct, (int, float)) and 0.05 <= crop_pct <= 1.0
    ):
        raise ValueError(f"`crop_pct` must be a number in [0.05, 1], received {crop_pct!r}.")
    return crop_pct


def check_max_image_pixels(max_image_pixels):
    return t2t_layers._check_int("max_image_pixels", max_image_pixels)


def check_version(version):
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ValueError(
            f"The SavedModel version must be an integer >= 1 (TF Serving loads numbered "
            f"folders), received {version!r}."
        )
    return int(version)


def export_saved_model(
    model,
    export_dir,
    name=None,
    version=1,
    warmup_images=None,
    overwrite=False,
    max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    crop_pct=None,
    serving_runtime="tensorflow",
):
    """Writes `export_dir/<name>/<version>/` for TF Serving; returns that path.

    `warmup_images` (uint8 `[n, size, size, 3]`) become `assets.extra/` warmup requests.
    An existing version folder is refused unless `overwrite`, and then replaced whole. The
    folder is written under a temporary name and renamed when complete, so TF Serving, which
    loads numbered folders as they appear, never sees a half-written model.
    `max_image_pixels` bounds the images `serving_bytes` decodes. `crop_pct` is the center
    crop of `serving_bytes` (resize the short side to size / crop_pct); default: that of the
    model's release (`weights="imagenet"`: 0.9; CIFAR: 1.0), else 0.9. Give a training run's
    `--crop_pct` (`serving_crop_pct`) so that served predictions are its evaluation's.
    `serving_runtime`: the `keras_t2t.inference.prepare` runtime the signatures are traced
    for, named for the serving machine (nothing is inferred from the exporting one):
    "tensorflow" (default) for any TensorFlow or TF Serving host; "tensorflow_onednn" adds the
    LayerNorm form that oneDNN fuses into one op, faster where oneDNN is on (TensorFlow's and
    TF Serving's x86-64 Linux default), slower where it is off (Windows and macOS TensorFlow,
    TF_ENABLE_ONEDNN_OPTS=0, GPUs); "generic" only the portable class-token block. The
    signatures compute the model's outputs in every runtime.
    """
    check_model(model)
    version = check_version(version)
    check_serving_runtime(serving_runtime)
    max_image_pixels = check_max_image_pixels(max_image_pixels)
    name = name or model.name
    path = os.path.join(export_dir, name, str(version))
    if tf.io.gfile.exists(path) and not overwrite:
        raise ValueError(
            f"{path} already exists. TF Serving would replay its warmup requests against the "
            f"new model, so it is not written into; pass overwrite=True (--overwrite) to "
            f"replace it, or choose another version."
        )
    size = image_size(model)
    twin = inference.prepare(model, serving_runtime)
    serve = serving_fn(twin)
    crop_pct = check_crop_pct(serving_crop_pct(model) if crop_pct is None else crop_pct)

    def serve_pixels(images):
        # The layers refuse another size too; this says so in the signature's own words.
        return serve(tf.ensure_shape(images, [None, size, size, 3]))

    def serve_bytes(image_bytes):
        images = decode_images(image_bytes, size, crop_pct, max_pixels=max_image_pixels)
        return serve(tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8))

    archive = keras.export.ExportArchive()
    archive.track(twin)
    archive.add_endpoint(
        "serving_default",
        serve_pixels,
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")],
    )
    archive.add_endpoint(
        "serving_bytes",
        serve_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    with _replaced_whole(path) as staging:
        archive.write_out(staging, verbose=False)
        if warmup_images is not None:
            write_warmup_requests(staging, name, warmup_images)
    return path


def _remove(path):
    if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


@contextlib.contextmanager
def _replaced_whole(path):
    """Yields a temporary path beside `path` (`.<name>.partial`) to write an export into; when
    the block ends, it replaces `path` whole (a folder or a file), so that `path` never holds a
    half-written export, or files of an earlier one. On an error the temporary path is removed
    and `path` is left as it was."""
    parent, base = os.path.split(path.rstrip("/"))
    staging = os.path.join(parent, f".{base}.partial")
    _remove(staging)
    if parent:
        tf.io.gfile.makedirs(parent)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    previous = os.path.join(parent, f".{base}.previous")
    _remove(previous)
    if tf.io.gfile.exists(path):
        tf.io.gfile.rename(path, previous)
    tf.io.gfile.rename(staging, path)
    _remove(previous)


# --- TF Serving warmup requests (PredictionLog records, encoded without tensorflow-serving-api) --


def _varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number, payload):
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def predict_log_record(model_name, signature_name, inputs):
    """A serialized `tensorflow.serving.PredictionLog` holding one PredictRequest."""
    model_spec = _field(1, model_name.encode()) + _field(3, signature_name.encode())
    request = _field(1, model_spec)
    for key, value in inputs.items():
        entry = _field(1, key.encode()) + _field(2, tf.make_tensor_proto(value).SerializeToString())
        request += _field(2, entry)
    predict_log = _field(1, request)
    return _field(6, predict_log)


def write_warmup_requests(saved_model_path, model_name, images):
    """Writes `assets.extra/tf_serving_warmup_requests` with one request per image."""
    folder = os.path.join(saved_model_path, "assets.extra")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WARMUP_FILE)
    with tf.io.TFRecordWriter(path) as writer:
        for image in np.asarray(images, np.uint8):
            writer.write(predict_log_record(model_name, "serving_default", {"images": image[None]}))
    return path


# --- TFLite -----------------------------------------------------------------------------------


def tflite_models(model, representative_images=None, kinds=TFLITE_KINDS):
    """`{kind: flatbuffer bytes}` for float32, float16, dynamic-range int8 and full int8.

    Full int8 quantizes weights and activations with `representative_images` (uint8
    `[n, size, size, 3]`, a few dozen real images); the ops that int8 would ruin stay float
    (`_full_int8`).
    """
    check_model(model)
    for kind in kinds:
        if kind not in TFLITE_KINDS:
            raise ValueError(f"Unknown TFLite kind {kind!r}; choose from {TFLITE_KINDS}.")
    if "int8" in kinds and representative_images is None:
        raise ValueError("Full int8 quantization needs representative_images.")
    twin = inference.prepare(model, "tflite")
    concrete = _tflite_function(twin)
    models = {}
    for kind in kinds:
        converter = _tflite_converter(concrete, kind)
        if kind == "int8":
            scopes = _t2t_attention_scopes(twin)
            models[kind] = _full_int8(converter, representative_images, float_scopes=scopes)
        else:
            models[kind] = converter.convert()
    return models


def _tflite_function(model):
    """The concrete function that the TFLite models are converted from: uint8 `[1, size, size,
    3]` -> probabilities (give it the "tflite" twin: strided-slice soft splits)."""
    size = image_size(model)
    serve = serving_fn(model)
    function = tf.function(
        lambda images: serve(images)["probabilities"],
        input_signature=[tf.TensorSpec([1, size, size, 3], tf.uint8, name="images")],
    )
    # Weights become constants: no READ_VARIABLE ops, and full int8 can calibrate.
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    return convert_variables_to_constants_v2(function.get_concrete_function())


def _tflite_converter(concrete, kind):
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if kind != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter


# Ops that full int8 keeps in float32 everywhere (a dequantize before, a quantize after).
INT8_FLOAT_OPS = ("DIV", "ADD")


def _full_int8(converter, representative_images, float_ops=INT8_FLOAT_OPS, float_scopes=()):
    """Full int8, with the Tokens-to-Token performers, the divisions and the additions in float32.

    - The performers (`float_scopes`, from `_t2t_attention_scopes`): every op but their
      FULLY_CONNECTED ones. In int8 they carry almost all of the loss. Their first LayerNorm
      normalizes raw pixel patches, whose variance spans decades (on one photo crop, its
      RSQRT ranged 0.9-40 and had a relative error of 0.46); their features are `exp` of an
      argument spanning about -60 to 13, summed over the tokens (256 at 64x64) and divided.
      QuantizationDebugger's layer statistics rank them first (RMSE 28-63 quantization steps
      for the norm's MEAN and the feature SUMs; rounding alone is 0.29), though the blocks'
      attention BATCH_MATMULs also reach 17: it is keeping scopes float that tells. With the
      blocks in float, agreement stayed at 0.772; with the performers, 0.97-0.98. Kept float
      piecemeal (the EXPs, SUMs or BATCH_MATMULs alone) they do not recover, and some islands
      do worse (0.65). Their Dense layers in int8 cost no measurable accuracy.
    - DIV: the performer divides by `phi(q) . sum(phi(k)) + eps`; in int8, small denominators
      round to the zero point, and TFLite's int8 DIV then fails on the input
      ("data[i] != zero_point").
    - ADD: the residual stream (and the biases and position table added to it) spans a wide
      range in which one int8 scale loses the small updates. With DIV and ADD float only (the
      previous default), on T2T-ViT-7 trained for four epochs on digits, top-1 agreement with
      float32 on 397 held-out digits was 87.4% with int8 ADDs and 94.2% with float ones (with
      the performers float too: 99.5%).

    `benchmarks/int8_accuracy.py` (T2T-ViT-7 trained on crops of 10 photos; 500 validation
    crops of parts of the photos it was not trained on; 64 calibration crops; latency of one
    image on one thread in ai_edge_litert, on a shared 2-core machine), top-1 / agreement
    with float32 / ms:

    | model         | float32      | DIV+ADD float (before) | this default         |
    | 64x64, seed 0 | 0.808 / 2.98 | 0.752 / 0.774 / 3.17   | 0.806 / 0.970 / 2.17 |
    | 64x64, seed 1 | 0.796 / 3.26 | 0.720 / 0.768 / 3.18   | 0.794 / 0.986 / 2.30 |
    | 32x32, seed 0 | 0.738 / 1.02 | 0.722 / 0.842 / 0.90   | 0.738 / 0.986 / 0.65 |

    Dynamic-range int8 (int8 weights, float activations) there: 0.808 / 0.998 / 1.44,
    0.798 / 0.998 / 1.60, 0.734 / 0.996 / 0.40. 16x8 (int16 activations) does not run: the
    converter emits an int16 SQUARED_DIFFERENCE (LayerNorm), which has no kernel.

    The matmuls (FULLY_CONNECTED everywhere; BATCH_MATMUL of the transformer blocks) and the
    blocks' softmax, GELU and LayerNorms stay int8. The quantizer's deny lists
    (`QuantizationDebugger`) do this: op types, and the output names of the calibrated
    model's ops under `float_scopes` (regexes of TF name scopes).
    """
    dataset = _representative(representative_images)
    converter.representative_dataset = dataset
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=dataset, debug_options=options
    )
    nodes = _float_nodes(debugger.calibrated_model, float_scopes) if float_scopes else []
    if nodes:  # the names are those of the calibrated model, known only now
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=list(float_ops), denylisted_nodes=nodes
        )
    return debugger.get_nondebug_quantized_model()


def _t2t_attention_scopes(model):
    """Regexes of the TF name scopes of `model`'s Tokens-to-Token attention layers, as the
    converted graph names them (`t2t_vit_7_1/tokens_to_token_1/attention1_1/Exp`). Measured on
    the performers; the transformer variant's layers (T2T-ViT_t) share the cause, a LayerNorm
    of raw pixel patches, and stay float too (unmeasured)."""
    scopes = []
    for module in model.layers:
        if not isinstance(module, t2t_layers.T2TModule):
            continue
        for layer in (module.attention1, module.attention2):
            parts = [re.escape(part) + r"(?:_\d+)?" for part in layer.path.split("/")]
            scopes.append(r"(?:^|/)" + "/".join(parts) + "/")
    return tuple(scopes)


def _float_nodes(flatbuffer, scopes):
    """The output names of the ops of a TFLite model under `scopes` (regexes), but its
    FULLY_CONNECTED ones."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.python import schema_util

    model = schema.Model.GetRootAs(flatbuffer, 0)
    codes = [
        schema_util.get_builtin_code_from_operator_code(model.OperatorCodes(i))
        for i in range(model.OperatorCodesLength())
    ]
    pattern = re.compile("|".join(scopes))
    names = set()
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            if codes[op.OpcodeIndex()] == schema.BuiltinOperator.FULLY_CONNECTED:
                continue
            for j in range(op.OutputsLength()):
                name = graph.Tensors(op.Outputs(j)).Name().decode()
                if pattern.search(name):
                    names.add(name)
    return sorted(names)


def _representative(images):
    samples = np.asarray(images, np.uint8)

    def generate():
        for image in samples:
            yield [image[None]]

    return generate


def tflite_op_names(flatbuffer):
    """The operator names of a TFLite model (Flex or custom ops would show here)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


# --- ONNX, OpenVINO, Triton and TF Serving batching ---------------------------------------


def _optional(module, extra, what):
    """Imports `module`, or says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{what} needs the `{module}` package: pip install 'keras-t2t[{extra}]' (or pip "
            f"install -e '.[{extra}]' in a checkout)."
        ) from None


def check_input_dtype(input_dtype):
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"`input_dtype` must be one of {INPUT_DTYPES}, received {input_dtype!r}.")
    return input_dtype


def pixels_function(model, input_dtype="uint8"):
    """(tf.function, its input spec, output names): pixels `images` `[batch, size, size, 3]`
    -> the named outputs, as the SavedModel's `serving_default`; what ONNX and OpenVINO
    convert. The output names are in the order of the function's flat outputs.
    float32 pixels: an image with a NaN or infinite pixel is answered `classes` -1
    (`NO_CLASS`) with NaN `probabilities` and `scores` (`_no_class_for_non_finite`).
    """
    check_input_dtype(input_dtype)
    size = image_size(model)
    serve = serving_fn(model)
    if input_dtype == "float32":
        serve = _no_class_for_non_finite(serve)
    spec = tf.TensorSpec([None, size, size, 3], tf.as_dtype(input_dtype), name="images")
    function = tf.function(serve, input_signature=[spec])
    names = list(tf.nest.flatten({name: name for name in OUTPUTS}))
    return function, spec, names


NO_CLASS = -1  # `classes` of an image that has no answer (float32 ONNX/OpenVINO: non-finite)


def _no_class_for_non_finite(serve):
    """`serve` whose rows for images with a NaN or infinite pixel say so: `classes` NO_CLASS,
    `probabilities` and `scores` NaN. Without this the NaN probabilities reach the argmax,
    which ONNX Runtime and OpenVINO answer with class 0. ONNX has no op that fails a request
    (TensorFlow's CheckNumerics has no counterpart), so the answer is marked instead; the
    check is exact (IsNaN and IsInf on the pixels) and costs one pass over them. uint8 pixels
    are finite by their type."""

    def marked(images):
        outputs = serve(images)
        finite = tf.reduce_all(tf.math.is_finite(images), axis=[1, 2, 3])
        nan = tf.constant(float("nan"), tf.float32)
        return {
            "probabilities": tf.where(finite[:, None], outputs["probabilities"], nan),
            "classes": tf.where(finite, outputs["classes"], NO_CLASS),
            "scores": tf.where(finite, outputs["scores"], nan),
        }

    return marked


def _erfc_as_one_minus_erf(ctx, node, name, args):
    """tf2onnx handler for TensorFlow's Erfc, which ONNX lacks: erfc(x) = 1 - erf(x).

    TensorFlow writes the exact GELU as `0.5 * x * erfc(-x / sqrt(2))`; this gives ONNX's
    `0.5 * x * (1 + erf(x / sqrt(2)))`, the form of the official PyTorch model.
    """
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    erf = ctx.make_node("Erf", [node.input[0]], op_name_scope=node.name)
    one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
    node.type = "Sub"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])


class _OnnxGraph:
    """Producers, consumers and constant values of an ONNX GraphProto, for the rewrites below."""

    def __init__(self, graph):
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        # Constant tensors by name, read as arrays only when asked: the weights are most of them.
        self._tensors = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute[0].name == "value":
                self._tensors[node.output[0]] = node.attribute[0].t
        self.outputs = {value.name for value in graph.output}

    def is_constant(self, name):
        return name in self._tensors

    def constant(self, name):
        """The value of the constant `name` as an array, else None."""
        from onnx import numpy_helper

        tensor = self._tensors.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def node(self, name, op_type):
        """The node of type `op_type` (one of them, if a tuple) that produces `name`, else None."""
        node = self.producer.get(name)
        types = op_type if isinstance(op_type, tuple) else (op_type,)
        return node if node is not None and node.op_type in types else None

    def only_use(self, name):
        """The single node that reads `name`, else None (a graph output has other readers)."""
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def other_input(self, node, name):
        """The input of a two-input `node` that is not `name`."""
        a, b = node.input
        return b if a == name else a if b == name else None


def _last_axis_mean(g, name, rank):
    """The input of the node producing `name` if it is a mean over the last axis of a rank-`rank`
    tensor (tf2onnx writes a last-axis ReduceMean of a rank-3 tensor as GlobalAveragePool)."""
    node = g.node(name, ("GlobalAveragePool", "ReduceMean"))
    if node is None:
        return None
    if node.op_type == "GlobalAveragePool":
        return node.input[0] if rank == 3 else None
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axes = attributes.get("axes")
    if axes is None and len(node.input) > 1:
        axes = g.constant(node.input[1])
    axes = None if axes is None else [int(a) % rank for a in np.ravel(axes)]
    return node.input[0] if axes == [rank - 1] and attributes.get("keepdims", 1) else None


def _fuse_onnx_layer_norms(proto):
    """Replaces each LayerNorm written out in elementary ops (mean, subtract, square, mean, add
    epsilon, sqrt, divide, scale, offset: what tf2onnx makes of `keras_t2t.layers.LayerNorm`)
    with one ONNX LayerNormalization node (opset 17), which ONNX Runtime
    runs as one kernel and OpenVINO reads as MVN. Returns the number replaced."""
    import onnx
    from onnx import helper

    inferred = onnx.shape_inference.infer_shapes(proto)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        if v.type.tensor_type.HasField("shape")
    }
    g = _OnnxGraph(proto.graph)
    replaced, dropped = {}, set()
    for div in [n for n in proto.graph.node if n.op_type == "Div"]:
        centered, root = div.input
        sqrt = g.node(root, "Sqrt")
        add_eps = sqrt and g.node(sqrt.input[0], "Add")
        sub = g.node(centered, "Sub")
        if not (add_eps and sub) or sub.input[0] not in ranks:
            continue
        x, rank = sub.input[0], ranks[sub.input[0]]
        variance = next((i for i in add_eps.input if not g.is_constant(i)), None)
        epsilon = next((g.constant(i) for i in add_eps.input if g.is_constant(i)), None)
        if variance is None or epsilon is None or np.size(epsilon) != 1:
            continue
        square = g.node(_last_axis_mean(g, variance, rank), ("Mul", "Pow"))
        if square is None or square.input[0] != centered:
            continue
        if square.op_type == "Mul" and square.input[1] != centered:
            continue
        if square.op_type == "Pow" and g.constant(square.input[1]) != 2:
            continue
        if _last_axis_mean(g, sub.input[1], rank) != x:
            continue
        scale = g.only_use(div.output[0])
        offset = scale is not None and scale.op_type == "Mul" and g.only_use(scale.output[0])
        if not offset or offset.op_type != "Add":
            continue
        gamma = g.other_input(scale, div.output[0])
        beta = g.other_input(offset, scale.output[0])
        if not (g.is_constant(gamma) and g.is_constant(beta)):
            continue
        gamma_shape, beta_shape = np.shape(g.constant(gamma)), np.shape(g.constant(beta))
        if gamma_shape != beta_shape or len(gamma_shape) != 1:
            continue
        readers = {  # each intermediate value and the nodes of the pattern that read it
            sub.input[1]: [sub],
            centered: [square, div],
            square.output[0]: [g.producer[variance]],
            variance: [add_eps],
            add_eps.output[0]: [sqrt],
            sqrt.output[0]: [div],
        }
        if any(
            {n.output[0] for n in g.consumers.get(name, [])} != {n.output[0] for n in nodes}
            or name in g.outputs
            for name, nodes in readers.items()
        ):
            continue  # an intermediate value is used elsewhere: leave this one as it is
        fused = helper.make_node(
            "LayerNormalization",
            [x, gamma, beta],
            [offset.output[0]],
            name=f"{div.name}/LayerNormalization",
            axis=-1,
            epsilon=float(epsilon),
        )
        # Nodes are named by their first output (unique in a graph).
        replaced[offset.output[0]] = fused
        mean = g.producer[sub.input[1]]
        for node in (mean, sub, square, g.producer[variance], add_eps, sqrt, div, scale):
            dropped.add(node.output[0])
    nodes = [replaced.get(n.output[0], n) for n in proto.graph.node if n.output[0] not in dropped]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return len(replaced)


def _gelu_divides_by_sqrt2(proto):
    """Rewrites `erf(x * (1 / sqrt(2)))` as `erf(x / sqrt(2))` (the exact GELU as TensorFlow's
    grappler leaves it, a multiply, into the form of ONNX Runtime's Gelu fusion, a divide).
    Returns the number rewritten."""
    from onnx import numpy_helper

    g = _OnnxGraph(proto.graph)
    rewritten = 0
    for erf in [n for n in proto.graph.node if n.op_type == "Erf"]:
        mul = g.node(erf.input[0], "Mul")
        if mul is None or g.only_use(mul.output[0]) is not erf:
            continue
        const = next((i for i in mul.input if g.is_constant(i)), None)
        value = g.constant(const)
        if value is None or np.size(value) != 1 or abs(float(value) - 0.5**0.5) > 1e-6:
            continue
        root2 = numpy_helper.from_array(
            np.array(2.0**0.5, dtype=value.dtype).reshape(np.shape(value)),
            name=f"{mul.name}/sqrt2",
        )
        proto.graph.initializer.append(root2)
        mul.op_type = "Div"
        mul.input[:] = [g.other_input(mul, const), root2.name]
        rewritten += 1
    return rewritten


def _drop_unused_initializers(graph):
    """Removes the initializers no node reads any more (the constants of rewritten nodes),
    which ONNX Runtime would otherwise warn about on every load."""

    def names(g):  # inputs read anywhere, subgraphs (If, Loop bodies) included
        for node in g.node:
            yield from node.input
            for attribute in node.attribute:
                for sub in [attribute.g, *attribute.graphs]:
                    yield from names(sub)

    used = set(names(graph)) | {value.name for value in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def onnx_model(model, input_dtype="uint8", opset=ONNX_OPSET):
    """The ONNX ModelProto of `model`'s pixel signature (see `pixels_function`)."""
    tf2onnx = _optional("tf2onnx", "onnx", "The ONNX export")
    # The soft splits as the model has them on TensorFlow: the one-hot convolution for the
    # image (a plain Conv; ONNX Runtime ran T2T-ViT-14 4.6% faster than with slices there)
    # and strided slices for the token maps (tf2onnx turns extract_patches into a Reshape to
    # a -3 dimension, which ONNX Runtime refuses). The Erfc handler is for models whose own
    # layers write tf.nn.gelu (ours write the erf form).
    function, spec, names = pixels_function(inference.prepare(model, "onnx"), input_dtype)
    proto, _ = tf2onnx.convert.from_function(
        function,
        input_signature=[spec],
        opset=opset,
        custom_op_handlers={"Erfc": (_erfc_as_one_minus_erf, [])},
    )
    _fuse_onnx_layer_norms(proto)
    _gelu_divides_by_sqrt2(proto)
    _drop_unused_initializers(proto.graph)
    _rename_outputs(proto.graph, names)
    proto.graph.input[0].name = _rename_value(proto.graph, proto.graph.input[0].name, "images")
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def _rename_value(graph, old, new):
    if old == new:
        return new
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    return new


def _rename_outputs(graph, names):
    for output, name in zip(graph.output, names):
        output.name = _rename_value(graph, output.name, name)


def export_onnx(model, path, input_dtype="uint8", opset=ONNX_OPSET):
    """Writes `model`'s pixel signature as an ONNX file at `path`; returns `path`."""
    proto = onnx_model(model, input_dtype, opset)
    onnx = _optional("onnx", "onnx", "The ONNX export")
    onnx.checker.check_model(proto)
    _write_atomically(path, proto.SerializeToString())
    return path


def openvino_model(model, input_dtype="uint8"):
    """The OpenVINO `Model` of `model`'s pixel signature (see `pixels_function`)."""
    ov = _optional("openvino", "openvino", "The OpenVINO export")
    function, _, names = pixels_function(inference.prepare(model, "openvino"), input_dtype)
    ov_model = ov.convert_model(function.get_concrete_function())
    for output, name in zip(ov_model.outputs, names):
        output.get_tensor().set_names({name})
    ov_model.inputs[0].get_tensor().set_names({"images"})
    return ov_model


def export_openvino(model, path, input_dtype="uint8"):
    """Writes an OpenVINO IR (`path` ending in .xml, weights in the .bin beside it), float32
    weights; returns `path`."""
    if not path.endswith(".xml"):
        raise ValueError(f"An OpenVINO IR path ends in .xml, received {path!r}.")
    ov = _optional("openvino", "openvino", "The OpenVINO export")
    ov.save_model(openvino_model(model, input_dtype), path, compress_to_fp16=False)
    return path


def _write_atomically(path, data):
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


TRITON_DTYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}


def triton_config(model, name, input_dtype="uint8", max_batch_size=32, queue_delay_us=2000):
    """`config.pbtxt` of a Triton model repository entry serving the ONNX model with ONNX
    Runtime, with dynamic batching."""
    check_input_dtype(input_dtype)
    size, classes = image_size(model), int(model.output_shape[-1])
    preferred = [b for b in (4, 8, 16, 32) if b <= max_batch_size]
    return f"""name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [
  {{ name: "images", data_type: {TRITON_DTYPES[input_dtype]}, dims: [ {size}, {size}, 3 ] }}
]
output [
  {{ name: "probabilities", data_type: TYPE_FP32, dims: [ {classes} ] }},
  {{ name: "classes", data_type: TYPE_INT32, dims: [ 1 ], reshape: {{ shape: [ ] }} }},
  {{ name: "scores", data_type: TYPE_FP32, dims: [ 1 ], reshape: {{ shape: [ ] }} }}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(b) for b in preferred)} ]
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
"""


def export_triton(model, output_dir, name, input_dtype="uint8", onnx_path=None, version=1):
    """A Triton model repository entry: `output_dir/<name>/config.pbtxt` and
    `output_dir/<name>/<version>/model.onnx` (copied from `onnx_path`, else exported), written
    under a temporary name and put in place whole: it replaces an existing entry. Returns the
    entry's folder."""
    version = check_version(version)
    config = triton_config(model, name, input_dtype)
    folder = os.path.join(output_dir, name)
    with _replaced_whole(folder) as staging:
        os.makedirs(os.path.join(staging, str(version)))
        target = os.path.join(staging, str(version), "model.onnx")
        if onnx_path is None:
            export_onnx(model, target, input_dtype)
        else:
            shutil.copyfile(onnx_path, target)
        with open(os.path.join(staging, "config.pbtxt"), "w") as f:
            f.write(config)
    return folder


BATCHING_FILE = "batching_parameters.txt"


def batching_parameters(max_batch_size=32, timeout_us=2000, threads=None):
    """TF Serving's `--batching_parameters_file` text: batches of up to `max_batch_size`
    images, waiting at most `timeout_us` to fill one; one batch thread per core."""
    threads = threads or os.cpu_count() or 1
    allowed = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch_size} | {max_batch_size})
    return (
        f"max_batch_size {{ value: {max_batch_size} }}\n"
        f"batch_timeout_micros {{ value: {timeout_us} }}\n"
        f"max_enqueued_batches {{ value: {max(4 * threads, 16)} }}\n"
        f"num_batch_threads {{ value: {threads} }}\n"
        + "".join(f"allowed_batch_sizes: {b}\n" for b in allowed)
    )


def export(
    model,
    output_dir,
    formats=FORMATS[:2],
    version=1,
    representative_images=None,
    name=None,
    overwrite=False,
    max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    crop_pct=None,
    input_dtype="uint8",
    triton=False,
    serving_runtime="tensorflow",
):
    """Writes the chosen formats under `output_dir`; returns `{artifact: path}`.

    See `export_saved_model` for `version`, `max_image_pixels`, `crop_pct` and
    `serving_runtime` (the SavedModel's; each other format is prepared for its runtime).
    The SavedModel gets a TF Serving `batching_parameters.txt` beside its version folders.
    `input_dtype` is that of the ONNX and OpenVINO inputs; `triton` also writes a Triton
    model repository (`output_dir/triton/<name>/`) around the ONNX model.
    Each format's output (the SavedModel's version folder, `<name>_tflite/`, `<name>.onnx`,
    `<name>_openvino/`, `triton/<name>/`) is written under a temporary name and put in place
    whole, so it holds one export's files only. Where one exists, nothing is written (or
    converted) unless `overwrite`; then each is replaced whole.
    """
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"Unknown export format {fmt!r}; choose from {', '.join(FORMATS)}.")
    if not formats and not triton:
        raise ValueError(f"Nothing to export: no format given; choose from {', '.join(FORMATS)}.")
    # Refused before anything is written:
    check_input_dtype(input_dtype)
    check_serving_runtime(serving_runtime)
    check_model(model)
    name = name or model.name
    paths = {}
    if "saved_model" in formats:
        check_max_image_pixels(max_image_pixels)
        if crop_pct is not None:
            check_crop_pct(crop_pct)
        paths["saved_model"] = os.path.join(output_dir, name, str(check_version(version)))
    if "tflite" in formats:
        paths["tflite"] = os.path.join(output_dir, f"{name}_tflite")
    if "onnx" in formats:
        paths["onnx"] = os.path.join(output_dir, f"{name}.onnx")
    if "openvino" in formats:
        paths["openvino"] = os.path.join(output_dir, f"{name}_openvino")
    if triton:
        paths["triton"] = os.path.join(output_dir, "triton", name)
    existing = [path for path in paths.values() if tf.io.gfile.exists(path)]
    if existing and not overwrite:
        raise ValueError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
            f"nothing was written. Pass overwrite=True (--overwrite) to replace "
            f"{'it' if len(existing) == 1 else 'each'} whole, or export to another folder."
        )
    # Each optional converter is looked for before anything is written.
    if "onnx" in formats or triton:
        _optional("tf2onnx", "onnx", "The ONNX export")
        _optional("onnx", "onnx", "The ONNX export")
    if "openvino" in formats:
        _optional("openvino", "openvino", "The OpenVINO export")
    written = {}
    if "saved_model" in formats:
        warmup = None if representative_images is None else representative_images[:4]
        written["saved_model"] = export_saved_model(
            model,
            output_dir,
            name,
            version,
            warmup,
            overwrite,
            max_image_pixels,
            crop_pct,
            serving_runtime,
        )
        batching = os.path.join(output_dir, name, BATCHING_FILE)
        _write_atomically(batching, batching_parameters().encode())
        written["tf_serving_batching"] = batching
    if "tflite" in formats:
        kinds = TFLITE_KINDS if representative_images is not None else TFLITE_KINDS[:3]
        with _replaced_whole(paths["tflite"]) as staging:
            tf.io.gfile.makedirs(staging)
            for kind, flatbuffer in tflite_models(model, representative_images, kinds).items():
                with tf.io.gfile.GFile(os.path.join(staging, f"{name}_{kind}.tflite"), "wb") as f:
                    f.write(flatbuffer)
        for kind in kinds:
            written[f"tflite_{kind}"] = os.path.join(paths["tflite"], f"{name}_{kind}.tflite")
    if "onnx" in formats:
        os.makedirs(output_dir, exist_ok=True)
        written["onnx"] = export_onnx(model, paths["onnx"], input_dtype)
    if triton:
        written["triton"] = export_triton(
            model, os.path.dirname(paths["triton"]), name, input_dtype, written.get("onnx")
        )
    if "openvino" in formats:
        with _replaced_whole(paths["openvino"]) as staging:
            os.makedirs(staging)
            export_openvino(model, os.path.join(staging, f"{name}.xml"), input_dtype)
        written["openvino"] = os.path.join(paths["openvino"], f"{name}.xml")
    return written
