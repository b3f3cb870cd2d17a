"""keras_t2t: T2T-ViT (Tokens-to-Token Vision Transformer) for Keras 3 and TensorFlow.

>>> import keras_t2t
>>> model = keras_t2t.T2TViT7(input_shape=(32, 32, 3), classes=10)
>>> model.output_shape
(None, 10)
"""

try:
    import tensorflow as _tf  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without TensorFlow
    raise ImportError(
        "keras_t2t needs TensorFlow, which is not installed. keras-t2t does not install it "
        "for you, so that it never adds a second TensorFlow distribution beside yours. "
        "Install the flavour you want: `pip install keras-t2t[cpu]` (tensorflow-cpu), "
        "`pip install keras-t2t[gpu]` (tensorflow), or `pip install keras-t2t[tpu]` "
        "(tensorflow-tpu)."
    ) from error

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras as _keras  # noqa: E402

if _keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on the user's env
    raise ImportError(
        f"keras_t2t runs on the TensorFlow backend of Keras, but KERAS_BACKEND is "
        f"{_keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow before importing keras."
    )

from keras_t2t import layers  # noqa: E402
from keras_t2t.flops import count_flops  # noqa: E402
from keras_t2t.imagenet import decode_predictions, preprocess_input  # noqa: E402
from keras_t2t.models import (  # noqa: E402
    MODEL_CONFIGS,
    T2TViT,
    T2TViT7,
    T2TViT10,
    T2TViT12,
    T2TViT14,
    T2TViT19,
    T2TViT24,
    T2TViTT14,
    T2TViTT19,
    T2TViTT24,
    create_model,
    feature_maps_model,
    list_models,
    pyramid_model,
)

__version__ = "0.1.0"

__all__ = [
    "MODEL_CONFIGS",
    "T2TViT",
    "T2TViT7",
    "T2TViT10",
    "T2TViT12",
    "T2TViT14",
    "T2TViT19",
    "T2TViT24",
    "T2TViTT14",
    "T2TViTT19",
    "T2TViTT24",
    "count_flops",
    "create_model",
    "decode_predictions",
    "feature_maps_model",
    "layers",
    "list_models",
    "preprocess_input",
    "pyramid_model",
]
