"""TF Serving's side of a SavedModel export: the `<export_dir>/<name>/<version>/` layout,
written whole; warmup requests in `assets.extra/`; `batching_parameters.txt` for
`--enable_batching`."""

import os

import numpy as np
import tensorflow as tf

from keras_t2t.export.files import replaced_whole
from keras_t2t.export.image_bytes import DEFAULT_MAX_IMAGE_PIXELS
from keras_t2t.export.saved_model import saved_model_archive

WARMUP_FILE = "tf_serving_warmup_requests"
BATCHING_FILE = "batching_parameters.txt"


def check_version(version):
    """`version`, checked: an integer >= 1 (TF Serving loads numbered folders)."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ValueError(
            f"The SavedModel version must be an integer >= 1 (TF Serving loads numbered "
            f"folders), received {version!r}."
        )
    return int(version)


def prediction_log_protos():
    """The `tensorflow_serving.apis` modules that warmup requests are written with, or an
    ImportError that says how to install them."""
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    except ImportError:
        raise ImportError(
            "Warmup requests are TF Serving PredictionLogs, written with the "
            "tensorflow-serving-api package: pip install --no-deps 'tensorflow-serving-api"
            ">=2.20' (--no-deps: it would install the full tensorflow beside tensorflow-cpu; "
            "its protos need only the TensorFlow you have). Or export without warmup images."
        ) from None
    return model_pb2, predict_pb2, prediction_log_pb2


def has_prediction_log_protos():
    """Whether `tensorflow_serving.apis` can be imported (warmup requests can be written)."""
    try:
        prediction_log_protos()
    except ImportError:
        return False
    return True


def write_warmup_requests(saved_model_path, model_name, images):
    """Writes `assets.extra/tf_serving_warmup_requests`: one `serving_default` PredictionLog
    per uint8 image `[size, size, 3]` of `images`. Returns its path."""
    model_pb2, predict_pb2, prediction_log_pb2 = prediction_log_protos()
    folder = os.path.join(saved_model_path, "assets.extra")
    tf.io.gfile.makedirs(folder)
    path = os.path.join(folder, WARMUP_FILE)
    with tf.io.TFRecordWriter(path) as writer:
        for image in np.asarray(images, np.uint8):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default")
            )
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(image[None]))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path


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
    export_dir,
    name=None,
    version=1,
    warmup_images=None,
    overwrite=False,
    max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    crop_pct=None,
    serving_runtime="tensorflow",
    compute_dtype="float32",
):
    """Writes `export_dir/<name>/<version>/` for TF Serving, and `batching_parameters.txt`
    beside the version folders; returns the version folder.

    The SavedModel is `keras_t2t.export.saved_model_archive(model, max_image_pixels,
    crop_pct, serving_runtime, compute_dtype)`. `warmup_images` (uint8 `[n, size, size, 3]`) become
    `assets.extra/` warmup requests. An existing version folder is refused unless
    `overwrite`, and then replaced whole. The folder is written under a temporary name and
    renamed when complete, so TF Serving, which loads numbered folders as they appear, never
    sees a half-written model.
    """
    version = check_version(version)
    name = name or model.name
    path = os.path.join(export_dir, name, str(version))
    if tf.io.gfile.exists(path) and not overwrite:
        raise ValueError(
            f"{path} already exists. TF Serving would replay its warmup requests against the "
            f"new model, so it is not written into; pass overwrite=True (--overwrite) to "
            f"replace it, or choose another version."
        )
    if warmup_images is not None:
        prediction_log_protos()  # missing: refused before anything is built or written
    archive = saved_model_archive(model, max_image_pixels, crop_pct, serving_runtime, compute_dtype)
    with replaced_whole(path) as staging:
        archive.write_out(staging, verbose=False)
        if warmup_images is not None:
            write_warmup_requests(staging, name, warmup_images)
    batching = os.path.join(export_dir, name, BATCHING_FILE)
    with replaced_whole(batching) as staging:
        with tf.io.gfile.GFile(staging, "w") as f:
            f.write(batching_parameters())
    return path
