"""OpenVINO IR of `model`'s "openvino" twin: `images` `[batch, size, size, 3]` (uint8, or
float32 pixels in [0, 255]; any height and width that are multiples of 16 for a model of any
size) in, the named outputs of `serving.serving_fn` out."""

from keras_t2t import inference, optional_module
from keras_t2t.export.serving import pixels_function


def openvino_model(model, input_dtype="uint8"):
    """The OpenVINO `Model` of `model`'s pixel signature (see `pixels_function`)."""
    ov = optional_module("openvino", "openvino", "The OpenVINO export")
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
    ov = optional_module("openvino", "openvino", "The OpenVINO export")
    ov.save_model(openvino_model(model, input_dtype), path, compress_to_fp16=False)
    return path
