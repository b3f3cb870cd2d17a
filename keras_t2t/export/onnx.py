"""ONNX (through tf2onnx) of `model`'s "onnx" twin: `images` `[batch, size, size, 3]` (uint8,
or float32 pixels in [0, 255]; `[batch, height, width, 3]` for a model of any size, sides
multiples of 16) in, the named outputs of `serving.serving_fn` out; the graph
rewritten (`onnx_rewrites`) into the forms ONNX Runtime and OpenVINO fuse."""

import numpy as np

from keras_t2t import inference, optional_module
from keras_t2t.export.files import write_atomically
from keras_t2t.export.serving import pixels_function

ONNX_OPSET = 17
DYNAMIC_SIDES = ("height", "width")  # the input's axis names, for a model of any size


def _erfc_as_one_minus_erf(ctx, node, name, args):
    """tf2onnx handler for TensorFlow's Erfc, which ONNX lacks: erfc(x) = 1 - erf(x).

    TensorFlow writes the exact GELU as `0.5 * x * erfc(-x / sqrt(2))`; this gives ONNX's
    `0.5 * x * (1 + erf(x / sqrt(2)))`, the form of the official PyTorch model.
    """
    from tf2onnx import utils  # tf2onnx is an optional extra

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    erf = ctx.make_node("Erf", [node.input[0]], op_name_scope=node.name)
    one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
    node.type = "Sub"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])


def onnx_model(model, input_dtype="uint8", opset=ONNX_OPSET):
    """The ONNX ModelProto of `model`'s pixel signature (see `pixels_function`)."""
    tf2onnx = optional_module("tf2onnx", "onnx", "The ONNX export")
    optional_module("onnx", "onnx", "The ONNX export")
    from keras_t2t.export import onnx_rewrites  # imports onnx, an optional extra

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
    onnx_rewrites.fuse_layer_norms(proto)
    onnx_rewrites.gelu_divides_by_sqrt2(proto)
    onnx_rewrites.drop_unused_initializers(proto.graph)
    _rename_outputs(proto.graph, names)
    proto.graph.input[0].name = _rename_value(proto.graph, proto.graph.input[0].name, "images")
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    for dim, name in zip(proto.graph.input[0].type.tensor_type.shape.dim[1:3], DYNAMIC_SIDES):
        if not dim.HasField("dim_value"):  # a model of any size
            dim.dim_param = name
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
    onnx = optional_module("onnx", "onnx", "The ONNX export")
    onnx.checker.check_model(proto)
    write_atomically(path, proto.SerializeToString())
    return path
