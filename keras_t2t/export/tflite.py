"""TFLite models (builtin ops only) of `model`'s "tflite" twin: uint8 `[1, size, size, 3]` in,
the probabilities out; float32, float16, dynamic-range int8 and full int8."""

import re

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from keras_t2t import inference
from keras_t2t import layers as t2t_layers
from keras_t2t.export.serving import check_model, image_size, serving_fn

TFLITE_KINDS = ("float32", "float16", "dynamic_int8", "int8")


def tflite_models(model, representative_images=None, kinds=TFLITE_KINDS):
    """`{kind: flatbuffer bytes}` for float32, float16, dynamic-range int8 and full int8.

    Full int8 quantizes weights and activations with `representative_images` (uint8
    `[n, size, size, 3]`, a few dozen real images); the ops that int8 would ruin stay float
    (`full_int8`).
    """
    check_model(model)
    for kind in kinds:
        if kind not in TFLITE_KINDS:
            raise ValueError(f"Unknown TFLite kind {kind!r}; choose from {TFLITE_KINDS}.")
    if "int8" in kinds and representative_images is None:
        raise ValueError("Full int8 quantization needs representative_images.")
    twin = inference.prepare(model, "tflite")
    concrete = tflite_function(twin)
    models = {}
    for kind in kinds:
        converter = tflite_converter(concrete, kind)
        if kind == "int8":
            scopes = attention_scopes(twin)
            models[kind] = full_int8(converter, representative_images, float_scopes=scopes)
        else:
            models[kind] = converter.convert()
    return models


def tflite_function(model):
    """The concrete function that the TFLite models are converted from: uint8 `[1, size, size,
    3]` -> probabilities (give it the "tflite" twin: strided-slice soft splits)."""
    size = image_size(model)
    serve = serving_fn(model)
    function = tf.function(
        lambda images: serve(images)["probabilities"],
        input_signature=[tf.TensorSpec([1, size, size, 3], tf.uint8, name="images")],
    )
    # Weights become constants: no READ_VARIABLE ops, and full int8 can calibrate.
    return convert_variables_to_constants_v2(function.get_concrete_function())


def tflite_converter(concrete, kind):
    """The TFLite converter of `concrete` for one of TFLITE_KINDS, builtin ops only."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if kind != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter


# Ops that full int8 keeps in float32 everywhere (a dequantize before, a quantize after).
INT8_FLOAT_OPS = ("DIV", "ADD")


def full_int8(converter, representative_images, float_ops=INT8_FLOAT_OPS, float_scopes=()):
    """Full int8, with the Tokens-to-Token performers, the divisions and the additions in float32.

    - The performers (`float_scopes`, from `attention_scopes`): every op but their
      FULLY_CONNECTED ones. In int8 they carry almost all of the loss. Their first LayerNorm
      normalizes raw pixel patches, whose variance spans decades (on one photo crop, its
      RSQRT ranged 0.9-40 and had a relative error of 0.46); their features are `exp` of an
      argument spanning about -60 to 13, summed over the tokens (256 at 64x64) and divided.
      QuantizationDebugger's layer statistics rank them first (RMSE 28-63 quantization steps
      for the norm's MEAN and the feature SUMs; rounding alone is 0.29), though the blocks'
      attention BATCH_MATMULs also reach 17: it is keeping scopes float that tells. With the
      blocks in float, agreement stayed at 0.772; with the performers, 0.97-0.98. Kept float
      piecemeal (the EXPs, SUMs or BATCH_MATMULs alone) they do not recover, and some islands
      do worse (0.65). Their Dense layers in int8 cost no measurable accuracy.
    - DIV: the performer divides by `phi(q) . sum(phi(k)) + eps`; in int8, small denominators
      round to the zero point, and TFLite's int8 DIV then fails on the input
      ("data[i] != zero_point").
    - ADD: the residual stream (and the biases and position table added to it) spans a wide
      range in which one int8 scale loses the small updates. With DIV and ADD float only (the
      previous default), on T2T-ViT-7 trained for four epochs on digits, top-1 agreement with
      float32 on 397 held-out digits was 87.4% with int8 ADDs and 94.2% with float ones (with
      the performers float too: 99.5%).

    `benchmarks/int8_accuracy.py` (T2T-ViT-7 trained on crops of 10 photos; 500 validation
    crops of parts of the photos it was not trained on; 64 calibration crops; latency of one
    image on one thread in ai_edge_litert, on a shared 2-core machine), top-1 / agreement
    with float32 / ms:

    | model         | float32      | DIV+ADD float (before) | this default         |
    | 64x64, seed 0 | 0.808 / 2.98 | 0.752 / 0.774 / 3.17   | 0.806 / 0.970 / 2.17 |
    | 64x64, seed 1 | 0.796 / 3.26 | 0.720 / 0.768 / 3.18   | 0.794 / 0.986 / 2.30 |
    | 32x32, seed 0 | 0.738 / 1.02 | 0.722 / 0.842 / 0.90   | 0.738 / 0.986 / 0.65 |

    Dynamic-range int8 (int8 weights, float activations) there: 0.808 / 0.998 / 1.44,
    0.798 / 0.998 / 1.60, 0.734 / 0.996 / 0.40. 16x8 (int16 activations) does not run: the
    converter emits an int16 SQUARED_DIFFERENCE (LayerNorm), which has no kernel.

    The matmuls (FULLY_CONNECTED everywhere; BATCH_MATMUL of the transformer blocks) and the
    blocks' softmax, GELU and LayerNorms stay int8. The quantizer's deny lists
    (`QuantizationDebugger`) do this: op types, and the output names of the calibrated
    model's ops under `float_scopes` (regexes of TF name scopes).
    """
    dataset = representative_dataset(representative_images)
    converter.representative_dataset = dataset
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=dataset, debug_options=options
    )
    nodes = _float_nodes(debugger.calibrated_model, float_scopes) if float_scopes else []
    if nodes:  # the names are those of the calibrated model, known only now
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=list(float_ops), denylisted_nodes=nodes
        )
    return debugger.get_nondebug_quantized_model()


def attention_scopes(model):
    """Regexes of the TF name scopes of `model`'s Tokens-to-Token attention layers, as the
    converted graph names them (`t2t_vit_7_1/tokens_to_token_1/attention1_1/Exp`). Measured on
    the performers; the transformer variant's layers (T2T-ViT_t) share the cause, a LayerNorm
    of raw pixel patches, and stay float too (unmeasured)."""
    scopes = []
    for module in model.layers:
        if not isinstance(module, t2t_layers.T2TModule):
            continue
        for layer in (module.attention1, module.attention2):
            parts = [re.escape(part) + r"(?:_\d+)?" for part in layer.path.split("/")]
            scopes.append(r"(?:^|/)" + "/".join(parts) + "/")
    return tuple(scopes)


def _float_nodes(flatbuffer, scopes):
    """The output names of the ops of a TFLite model under `scopes` (regexes), but its
    FULLY_CONNECTED ones."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.python import schema_util

    model = schema.Model.GetRootAs(flatbuffer, 0)
    codes = [
        schema_util.get_builtin_code_from_operator_code(model.OperatorCodes(i))
        for i in range(model.OperatorCodesLength())
    ]
    pattern = re.compile("|".join(scopes))
    names = set()
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            if codes[op.OpcodeIndex()] == schema.BuiltinOperator.FULLY_CONNECTED:
                continue
            for j in range(op.OutputsLength()):
                name = graph.Tensors(op.Outputs(j)).Name().decode()
                if pattern.search(name):
                    names.add(name)
    return sorted(names)


def representative_dataset(images):
    """The converter's `representative_dataset` of uint8 images `[n, size, size, 3]`."""
    samples = np.asarray(images, np.uint8)

    def generate():
        for image in samples:
            yield [image[None]]

    return generate
