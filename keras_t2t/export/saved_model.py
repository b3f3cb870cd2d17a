"""The SavedModel: two signatures, stock TensorFlow ops only, loadable where neither keras nor
keras_t2t can be imported.

- `serving_default`: `images`, uint8 `[batch, size, size, 3]` RGB in [0, 255]; for a model
  of any size (`input_shape=(None, None, 3)`), `[batch, height, width, 3]` with any height
  and width that are multiples of 16 (others are refused: InvalidArgument), as they are,
  with no resize;
- `serving_bytes`: `image_bytes`, string `[batch]` of image files (REST `{"b64": ...}`),
  checked and preprocessed as the official evaluation (`image_bytes.decode_images`): resized
  and center-cropped to the model's size (for a model of any size, the size of its position
  table, that of its weights: 224, or 384 for the 384 release).

Both return the named outputs of `serving.serving_fn`. TF Serving's folder layout, warmup
requests and batching parameters are in `savedmodels/tf_serving.py`.
"""

import keras
import tensorflow as tf

from keras_t2t import inference
from keras_t2t.export.files import replaced_whole
from keras_t2t.export.image_bytes import (
    DEFAULT_MAX_IMAGE_PIXELS,
    check_max_image_pixels,
    decode_images,
)
from keras_t2t.export.serving import (
    check_crop_pct,
    check_model,
    image_size,
    pixels_shape,
    serving_crop_pct,
    serving_fn,
)

# The `keras_t2t.inference.prepare` runtimes a SavedModel may be prepared for.
SERVING_RUNTIMES = ("tensorflow", "tensorflow_onednn", "generic")
# What a bfloat16 SavedModel adds to its runtime's transforms: MatMuls fused with their bias
# adds and GELUs (in bfloat16 those are slow ops on their own; `benchmarks/op_profile.py`).
BFLOAT16_TRANSFORMS = ("rows",)


def check_serving_runtime(serving_runtime):
    """`serving_runtime`, checked: one of SERVING_RUNTIMES."""
    if serving_runtime not in SERVING_RUNTIMES:
        raise ValueError(
            f"`serving_runtime` must be one of {', '.join(SERVING_RUNTIMES)}, received "
            f"{serving_runtime!r}. Use 'tensorflow_onednn' for x86-64 Linux TF Serving or "
            f"TensorFlow with oneDNN on (their default), 'tensorflow' for any other."
        )
    return serving_runtime


def saved_model_archive(
    model,
    max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    crop_pct=None,
    serving_runtime="tensorflow",
    compute_dtype="float32",
    transforms=None,
):
    """The `keras.export.ExportArchive` of `model`'s two signatures, to `write_out`.

    `max_image_pixels` bounds the images `serving_bytes` decodes. `crop_pct` is the center
    crop of `serving_bytes` (resize the short side to size / crop_pct); default: that of the
    model's release (`weights="imagenet"`: 0.9; CIFAR: 1.0), else 0.9. Give a training run's
    `--crop_pct` (`serving.serving_crop_pct`) so that served predictions are its evaluation's.
    `serving_runtime`: the `keras_t2t.inference.prepare` runtime the signatures are traced
    for, named for the serving machine (nothing is inferred from the exporting one):
    "tensorflow" (default) for any TensorFlow or TF Serving host; "tensorflow_onednn" adds the
    LayerNorm form that oneDNN fuses into one op, faster where oneDNN is on (TensorFlow's and
    TF Serving's x86-64 Linux default), slower where it is off (Windows and macOS TensorFlow,
    TF_ENABLE_ONEDNN_OPTS=0, GPUs); "generic" only the portable class-token block. The
    signatures compute the model's outputs in every runtime.
    `compute_dtype="bfloat16"`: the T2T module and the backbone hold their weights and compute
    in bfloat16 (`keras_t2t.inference.prepare`), for serving CPUs with bfloat16 units (AVX-512
    BF16, AMX); the inputs and outputs stay as they are (uint8 images or bytes in, float32
    probabilities out). On a CPU without bfloat16 units it runs slower than float32.
    `transforms`: the `keras_t2t.inference.TRANSFORMS` to apply instead of the runtime's
    (`inference.RUNTIMES[serving_runtime]`, plus BFLOAT16_TRANSFORMS in bfloat16).
    """
    check_model(model)
    check_serving_runtime(serving_runtime)
    max_image_pixels = check_max_image_pixels(max_image_pixels)
    crop_pct = check_crop_pct(serving_crop_pct(model) if crop_pct is None else crop_pct)
    size, shape = image_size(model), pixels_shape(model)
    if transforms is None:
        transforms = inference.RUNTIMES[serving_runtime]
        if compute_dtype == "bfloat16":
            transforms += BFLOAT16_TRANSFORMS
    twin = inference.prepare(model, transforms=transforms, compute_dtype=compute_dtype)
    serve = serving_fn(twin)

    def serve_pixels(images):
        # The layers refuse another size too; this says so in the signature's own words. (A
        # model of any size asserts in its graph that the sides are multiples of 16.)
        return serve(tf.ensure_shape(images, shape))

    def serve_bytes(image_bytes):
        images = decode_images(image_bytes, size, crop_pct, max_pixels=max_image_pixels)
        return serve(tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8))

    archive = keras.export.ExportArchive()
    archive.track(twin)
    archive.add_endpoint(
        "serving_default",
        serve_pixels,
        input_signature=[tf.TensorSpec(shape, tf.uint8, name="images")],
    )
    archive.add_endpoint(
        "serving_bytes",
        serve_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    return archive


def export_saved_model(
    model,
    path,
    max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    crop_pct=None,
    serving_runtime="tensorflow",
    overwrite=False,
    compute_dtype="float32",
    transforms=None,
):
    """Writes `model`'s SavedModel (`saved_model_archive`, see there for the arguments) to the
    folder `path`; returns `path`. An existing `path` is refused unless `overwrite`, and then
    replaced whole: the SavedModel is written under a temporary name and renamed when
    complete. For TF Serving's `<name>/<version>/` layout with warmup requests, use
    `savedmodels/tf_serving.py` (or `savedmodels/export.py`)."""
    if tf.io.gfile.exists(path) and not overwrite:
        raise ValueError(
            f"{path} already exists: nothing was written. Pass overwrite=True to replace it, "
            f"or choose another path."
        )
    if (
        tf.io.gfile.isdir(path)
        and tf.io.gfile.listdir(path)
        and not tf.io.gfile.exists(f"{path}/saved_model.pb")
    ):
        raise ValueError(
            f"{path} is a folder that holds something else than a SavedModel: it is not "
            f"replaced. `export_saved_model` writes the SavedModel itself at `path`; for TF "
            f"Serving's `<export_dir>/<name>/<version>/` layout use savedmodels/tf_serving.py."
        )
    archive = saved_model_archive(
        model, max_image_pixels, crop_pct, serving_runtime, compute_dtype, transforms
    )
    with replaced_whole(path) as staging:
        archive.write_out(staging, verbose=False)
    return path
