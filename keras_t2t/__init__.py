"""keras_t2t: T2T-ViT (Tokens-to-Token Vision Transformer) for Keras 3: TensorFlow, JAX and
PyTorch backends.

>>> import keras_t2t
>>> model = keras_t2t.T2TViT7(input_shape=(32, 32, 3), classes=10)
>>> model.output_shape
(None, 10)
"""

import importlib.util as _importlib_util
import os as _os


def _backend():
    """The Keras backend in use, or the one that `import keras` will pick (without importing
    it: before keras, TensorFlow's absence must be reported by us)."""
    import sys as _sys

    if "keras" in _sys.modules and hasattr(_sys.modules["keras"], "backend"):
        return _sys.modules["keras"].backend.backend()
    name = _os.environ.get("KERAS_BACKEND")
    if name:
        return name
    config = _os.path.join(
        _os.environ.get("KERAS_HOME") or _os.path.join(_os.path.expanduser("~"), ".keras"),
        "keras.json",
    )
    try:
        import json as _json

        with open(config) as f:
            return _json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


if _backend() == "tensorflow" and _importlib_util.find_spec("tensorflow") is None:
    raise ImportError(
        "keras_t2t runs on Keras' TensorFlow backend here (KERAS_BACKEND is unset or "
        "'tensorflow'), and TensorFlow is not installed. keras-t2t does not install it for "
        "you, so that it never adds a second TensorFlow distribution beside yours. Install the "
        "flavour you want: `pip install keras-t2t[cpu]` (tensorflow-cpu), `keras-t2t[gpu]` "
        "(tensorflow) or `keras-t2t[tpu]` (tensorflow-tpu); or use JAX or PyTorch with "
        "KERAS_BACKEND=jax or KERAS_BACKEND=torch."
    )


def require_tensorflow_backend(what):
    """Raises ImportError unless Keras runs on TensorFlow: for `what` (the export and the
    training script), which are TensorFlow programs."""
    backend = _backend()
    if backend != "tensorflow":
        raise ImportError(
            f"{what} runs on the TensorFlow backend of Keras, and KERAS_BACKEND is "
            f"{backend!r}. Run it with KERAS_BACKEND=tensorflow: weights and .keras files saved "
            f"under any backend load there. The models themselves (keras_t2t.T2TViT14, ...) "
            f"run on TensorFlow, JAX and PyTorch."
        )


def optional_module(module, extra, what):
    """Imports the optional package `module`, or raises an ImportError that says which extra
    of keras-t2t installs it (`what` needs it)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{what} needs the `{module}` package: pip install 'keras-t2t[{extra}]' (or pip "
            f"install -e '.[{extra}]' in a checkout)."
        ) from None


from keras_t2t import layers  # noqa: E402
from keras_t2t.flops import count_flops  # noqa: E402
from keras_t2t.imagenet import decode_predictions, preprocess_input  # noqa: E402
from keras_t2t.layer_decay import LayerDecayAdamW, layer_decay_multipliers  # noqa: E402
from keras_t2t.lora import enable_lora  # noqa: E402
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
from keras_t2t.presets import from_preset, save_preset  # noqa: E402
from keras_t2t.version import __version__  # noqa: E402, F401

__all__ = [
    "LayerDecayAdamW",
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
    "enable_lora",
    "feature_maps_model",
    "from_preset",
    "layer_decay_multipliers",
    "layers",
    "list_models",
    "preprocess_input",
    "pyramid_model",
    "save_preset",
]
