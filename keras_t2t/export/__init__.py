"""Export to SavedModel, TFLite (builtin ops only), ONNX and OpenVINO: one module per format.

Each format is converted from the model's twin for its runtime
(`keras_t2t.inference.prepare`): the model's outputs, in the forms that runtime runs fastest.
Every format serves the same named outputs (`serving.OUTPUTS`): `probabilities` float32
`[batch, classes]`, `classes` int32 `[batch]` (top-1) and `scores` float32 `[batch]`.

- `saved_model`: `serving_default` (uint8 images) and `serving_bytes` (image files, read by
  `image_bytes`); stock TensorFlow ops only.
- `tflite`: uint8 `[1, size, size, 3]` in, the probabilities out; builtin ops only.
- `onnx` (through tf2onnx, its graph rewritten by `onnx_rewrites`) and `openvino`: `images`
  `[batch, size, size, 3]`, uint8 or float32 pixels in [0, 255].

A model of any size (`input_shape=(None, None, 3)`) exports with dynamic height and width:
its `serving_default`, ONNX and OpenVINO take `[batch, height, width, 3]` with sides that
are multiples of 16 (others are refused when they run), its position table resized in the
graph; `serving_bytes` resizes and crops to the size of its weights (its position table's),
and TFLite, whose models have one size, takes that size too.

TF Serving's `<name>/<version>/` layout, its warmup requests and batching parameters, the
Triton repository and the command line that writes them all are in `savedmodels/`.
"""

from keras_t2t import require_tensorflow_backend

require_tensorflow_backend("keras_t2t.export (SavedModel, TFLite, ONNX and OpenVINO)")

from keras_t2t.export.image_bytes import (  # noqa: E402
    DEFAULT_MAX_IMAGE_PIXELS,
    declared_pixels,
    decode_image_file,
    decode_images,
    op_error_reason,
)
from keras_t2t.export.onnx import ONNX_OPSET, export_onnx, onnx_model  # noqa: E402
from keras_t2t.export.openvino import export_openvino, openvino_model  # noqa: E402
from keras_t2t.export.saved_model import (  # noqa: E402
    SERVING_RUNTIMES,
    export_saved_model,
    saved_model_archive,
)
from keras_t2t.export.serving import (  # noqa: E402
    INPUT_DTYPES,
    NO_CLASS,
    OUTPUTS,
    pixels_function,
    serving_crop_pct,
    serving_fn,
)
from keras_t2t.export.tflite import TFLITE_KINDS, tflite_models  # noqa: E402

FORMATS = ("saved_model", "tflite", "onnx", "openvino")

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "FORMATS",
    "INPUT_DTYPES",
    "NO_CLASS",
    "ONNX_OPSET",
    "OUTPUTS",
    "SERVING_RUNTIMES",
    "TFLITE_KINDS",
    "decode_image_file",
    "decode_images",
    "declared_pixels",
    "export_onnx",
    "export_openvino",
    "export_saved_model",
    "onnx_model",
    "op_error_reason",
    "openvino_model",
    "pixels_function",
    "saved_model_archive",
    "serving_crop_pct",
    "serving_fn",
    "tflite_models",
]
