"""What every export serves: the serving function (uint8 images in, the named outputs out)
and the checks of its arguments.

Outputs: `probabilities` float32 `[batch, classes]`, `classes` int32 `[batch]` (top-1),
`scores` float32 `[batch]` (its probability).
"""

import os

import tensorflow as tf

from keras_t2t import layers as t2t_layers
from keras_t2t import weights as weights_lib
from keras_t2t.configs import PATCH_FACTOR
from keras_t2t.imagenet import CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, normalization

INPUT_DTYPES = ("uint8", "float32")
OUTPUTS = ("probabilities", "classes", "scores")


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


def takes_any_size(model):
    """Whether `model` takes images of any size (built with `input_shape=(None, None, 3)`)."""
    return model.input_shape[1] is None


def image_size(model):
    """The side of the square images `model` takes; for a model of any size, the side of its
    position table (the size of its weights), to which `serving_bytes` resizes and crops.
    Exports take square or any-size models."""
    height, width = model.input_shape[1:3]
    if takes_any_size(model):
        grid = model.get_layer("pos_embed").grid_size
        return int(grid[0] * PATCH_FACTOR)
    if height != width:
        raise ValueError(
            f"The exports take models of square images or of any size; {model.name!r} takes "
            f"{height}x{width}. Export a model built with input_shape=(None, None, 3) from "
            f"the same weights: its `serving_default` (and ONNX) take {height}x{width} images."
        )
    return int(height)


def pixels_shape(model):
    """`[None, size, size, 3]` of the images the pixel signatures take, `[None, None, None,
    3]` for a model of any size (sides multiples of 16, checked when it runs)."""
    side = None if takes_any_size(model) else image_size(model)
    return [None, side, side, 3]


def check_input_dtype(input_dtype):
    """`input_dtype` of the ONNX and OpenVINO inputs, checked."""
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"`input_dtype` must be one of {INPUT_DTYPES}, received {input_dtype!r}.")
    return input_dtype


def pixels_function(model, input_dtype="uint8"):
    """(tf.function, its input spec, output names): pixels `images` `[batch, size, size, 3]`
    (`pixels_shape`: any height and width for a model of any size) -> the named outputs, as
    the SavedModel's `serving_default`; what ONNX and OpenVINO convert. The output names are
    in the order of the function's flat outputs.
    float32 pixels: an image with a NaN or infinite pixel is answered `classes` -1
    (`NO_CLASS`) with NaN `probabilities` and `scores` (`_no_class_for_non_finite`).
    """
    check_input_dtype(input_dtype)
    serve = serving_fn(model)
    if input_dtype == "float32":
        serve = _no_class_for_non_finite(serve)
    if takes_any_size(model):
        serve = _sides_multiples_of_patch(serve)
    spec = tf.TensorSpec(pixels_shape(model), tf.as_dtype(input_dtype), name="images")
    function = tf.function(serve, input_signature=[spec])
    names = list(tf.nest.flatten({name: name for name in OUTPUTS}))
    return function, spec, names


def _sides_multiples_of_patch(serve):
    """`serve` that refuses images whose height or width is not a multiple of 16, in an op
    that ONNX has. The model asserts it in its graph, but ONNX has no op that fails a
    request, and tf2onnx drops TensorFlow's Assert: a side of 72 then fails in an Add of
    mismatched shapes, and one of 65 is answered (the soft splits leave its last row out).
    Here the images are reshaped to their sides rounded down to multiples of 16, which holds
    their values only where the sides are such multiples: ONNX Runtime (and OpenVINO) refuse
    any other size, naming this node, `image_height_and_width_must_be_multiples_of_16`."""

    def checked(images):
        shape = tf.shape(images)
        sides = shape[1:3] // PATCH_FACTOR * PATCH_FACTOR
        name = f"image_height_and_width_must_be_multiples_of_{PATCH_FACTOR}"
        return serve(tf.reshape(images, tf.concat([shape[:1], sides, [3]], 0), name=name))

    return checked


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


def serving_fn(model):
    """uint8 images -> dict of the named outputs, whatever the model's head and preprocessing.
    Give it a `keras_t2t.inference.prepare` twin for a runtime's faster forms."""
    has_preprocessing = any(layer.name == "preprocessing" for layer in model.layers)
    activation = model.get_layer("predictions").activation
    softmax_head = getattr(activation, "__name__", "") == "softmax"
    release = getattr(model, "pretrained_release", None)
    mean, std = (release.mean, release.std) if release else (IMAGENET_MEAN, IMAGENET_STD)
    scale, offset = (tf.constant(v, tf.float32) for v in normalization(mean, std))

    def serve(images):
        x = tf.cast(images, tf.float32)
        if not has_preprocessing:
            x = x * scale + offset
        outputs = tf.cast(model(x, training=False), tf.float32)
        probabilities = outputs if softmax_head else tf.nn.softmax(outputs, axis=-1)
        return {
            "probabilities": probabilities,
            "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
            "scores": tf.reduce_max(probabilities, axis=-1),
        }

    return serve


def serving_crop_pct(model, weights=None):
    """The center crop that serving must apply to match how `model` was evaluated: the
    `--crop_pct` of the training run when `weights` is its model_dir, else that of the
    model's release (`weights="imagenet"`), else the official 0.9."""
    if weights is not None and os.path.isdir(os.fspath(weights)):
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
