"""ImageNet preprocessing and decoding, as in the official T2T-ViT evaluation."""

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official evaluation: resize the short side to size / CROP_PCT (248 for 224), bicubic,
# then center crop.
CROP_PCT = 0.9
NUM_CLASSES = 1000


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
    mean = np.reshape(np.array(IMAGENET_MEAN, "float32"), shape)
    std = np.reshape(np.array(IMAGENET_STD, "float32"), shape)
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return ((np.asarray(x, "float32") / 255.0) - mean) / std
    from keras import ops

    return (ops.cast(x, "float32") / 255.0 - mean) / std


def decode_predictions(preds, top=5):
    """Decodes ImageNet predictions into `(class_id, class_name, score)` tuples.

    Delegates to `keras.applications.imagenet_utils.decode_predictions` (the class index is
    downloaded once and cached in `~/.keras/models`).

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
    from keras.applications import imagenet_utils

    return imagenet_utils.decode_predictions(preds, top=top)
