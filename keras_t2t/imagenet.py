"""ImageNet preprocessing and decoding, as in the official T2T-ViT evaluation."""

import json
import math
import os

import numpy as np

from keras_t2t.download import DownloadError, fetch, file_digest, keras_home

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official evaluation: resize the short side to size / CROP_PCT (248 for 224), bicubic,
# then center crop.
CROP_PCT = 0.9
NUM_CLASSES = 1000
# The class names, as Keras' decode_predictions fetches them (same file, cache place and md5).
CLASS_INDEX_URL = (
    "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json"
)
CLASS_INDEX_FILE = "imagenet_class_index.json"
CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"
_CLASS_INDEX = None  # {"0": ["n01440764", "tench"], ...} once read


def normalization(mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """`(scale, offset)`, lists of 3: `x * scale + offset` is `(x / 255 - mean) / std` for RGB
    `x` in [0, 255], as one multiply-add. The one definition of the normalization, which the
    models' preprocessing layer, `preprocess_input` and the exports' serving functions apply.

    >>> [round(v, 4) for v in normalization((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))[1]]
    [-2.0, -1.0, -0.5]
    """
    scale = [1.0 / (255.0 * s) for s in std]
    offset = [-m / s for m, s in zip(mean, std)]
    return scale, offset


def preprocess_input(x, data_format=None):
    """Normalizes RGB images in [0, 255] with the ImageNet mean and std, as the official code.

    Use it with `include_preprocessing=False` models only: by default the models normalize
    inside and take RGB in [0, 255].

    Args:
        x: array or tensor of RGB images, `(..., 3)` channels-last (or `(3, H, W)` /
            `(N, 3, H, W)` with `data_format="channels_first"`), values in [0, 255].
        data_format: `"channels_last"` (default) or `"channels_first"`.

    Returns:
        float32 `(x / 255 - mean) / std`, of the type given (NumPy in, NumPy out).

    >>> preprocess_input(np.full((1, 1, 3), 255.0)).astype(float).round(3).tolist()
    [[[2.249, 2.429, 2.64]]]
    """
    data_format = data_format or "channels_last"
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(
            f"`data_format` must be 'channels_last' or 'channels_first', received {data_format!r}."
        )
    axis = -1 if data_format == "channels_last" else -3
    shape = [1] * 3
    shape[axis] = 3
    if x.shape[axis] != 3:
        raise ValueError(
            f"preprocess_input takes RGB images with 3 channels on axis {axis} "
            f"({data_format}), received shape {tuple(x.shape)}."
        )
    scale, offset = (np.reshape(np.array(v, "float32"), shape) for v in normalization())
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.asarray(x, "float32") * scale + offset
    from keras import ops

    return ops.cast(x, "float32") * scale + offset


def resize_and_center_crop(image, image_size, crop_pct=CROP_PCT):
    """The official evaluation preprocessing of one uint8 RGB image (a TF op, graph-safe).

    Short side to int(size / crop_pct), bicubic; center crop to `image_size`; float32 in
    [0, 255] (the models normalize inside).

    Matches timm's `Resize(int(size / crop_pct), bicubic)` + `CenterCrop(size)` on PIL images:
    the long side is truncated as torchvision does, the resized image is rounded to uint8 as
    PIL returns it, and the crop offset is rounded.
    """
    import tensorflow as tf  # a tf.data op: TensorFlow, whatever the Keras backend

    scale_size = int(math.floor(image_size / crop_pct))
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short = tf.minimum(height, width)
    new_h = tf.where(height == short, scale_size, height * scale_size // short)
    new_w = tf.where(width == short, scale_size, width * scale_size // short)
    resized = tf.image.resize(image, (new_h, new_w), method="bicubic", antialias=True)
    resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2.0), tf.int32)
    crop = resized[top : top + image_size, left : left + image_size]
    return tf.ensure_shape(crop, (image_size, image_size, 3))


def decode_rgb(data):
    """One image file's bytes (JPEG, PNG, GIF: its first frame, BMP or WebP) -> uint8 RGB
    `[height, width, 3]` (a TF op, graph-safe): grayscale, RGBA and CMYK are converted. The
    one decoder of the training data, the TFRecords builder and the exports' `serving_bytes`.
    """
    import tensorflow as tf

    image = tf.cond(  # TF's WebP decoder gives RGBA files 4 channels, whatever is asked
        tf.strings.substr(data, 8, 4) == "WEBP",
        lambda: tf.io.decode_image(data, expand_animations=False)[..., :3],
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    return tf.ensure_shape(image, [None, None, 3])


def class_index_path():
    """Where the class names are cached: `$KERAS_HOME/models/imagenet_class_index.json`, where
    Keras' own `decode_predictions` keeps them too."""
    return os.path.join(keras_home(), "models", CLASS_INDEX_FILE)


def class_index(attempts=None, timeout=None):
    """The ImageNet class index `{"0": [wnid, name], ...}`: read from the cache, else
    downloaded once (`keras_t2t.download.fetch`: bounded by `$KERAS_T2T_DOWNLOAD_TIMEOUT`
    seconds of silence, `attempts` tries) and checked against Keras' md5.

    Raises OSError (`keras_t2t.download.DownloadError` for the download) naming the URL and
    where to put the file to work offline.
    """
    global _CLASS_INDEX
    if _CLASS_INDEX is not None:
        return _CLASS_INDEX
    path = class_index_path()
    offline = f"To work offline, put {CLASS_INDEX_FILE} (from {CLASS_INDEX_URL}) at {path}."
    if not (os.path.isfile(path) and file_digest(path, "md5") == CLASS_INDEX_MD5):
        try:
            fetch(CLASS_INDEX_URL, path, timeout=timeout, attempts=attempts)
        except DownloadError as error:
            raise DownloadError(f"{error} {offline}", error.origin, error.reason) from None
        digest = file_digest(path, "md5")
        if digest != CLASS_INDEX_MD5:
            os.remove(path)
            raise DownloadError(
                f"The ImageNet class index from {CLASS_INDEX_URL} is not Keras' (md5 {digest}, "
                f"expected {CLASS_INDEX_MD5}); it was removed. {offline}"
            )
    try:
        with open(path) as f:
            index = json.load(f)
        if len(index) != NUM_CLASSES:
            raise ValueError(f"{len(index)} classes")
    except (OSError, ValueError) as error:
        raise DownloadError(
            f"Cannot read the ImageNet class index {path} ({error}). {offline}"
        ) from None
    _CLASS_INDEX = index
    return index


def decode_predictions(preds, top=5):
    """Decodes ImageNet predictions into `(class_id, class_name, score)` tuples.

    As `keras.applications.imagenet_utils.decode_predictions`; the class index (the same
    file) is downloaded once by `class_index` and cached in `$KERAS_HOME/models`.

    Args:
        preds: `(batch, 1000)` array of probabilities or logits.
        top: how many classes to return per image.
    """
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] != NUM_CLASSES:
        raise ValueError(
            f"decode_predictions expects ImageNet predictions of shape (batch, {NUM_CLASSES}), "
            f"received shape {preds.shape}. For another label set, take argsort of the outputs."
        )
    if not 1 <= top <= NUM_CLASSES:
        raise ValueError(f"`top` must be in [1, {NUM_CLASSES}], received {top}.")
    index = class_index()
    results = []
    for pred in preds:
        best = pred.argsort()[-top:][::-1]
        result = [tuple(index[str(i)]) + (pred[i],) for i in best]
        result.sort(key=lambda x: x[2], reverse=True)
        results.append(result)
    return results
