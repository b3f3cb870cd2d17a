"""Deployment transforms: a twin of a model that computes the same outputs faster in one runtime.

The layers of `keras_t2t` compute one math each, fixed by their config and the backend; every
Keras path (`fit`, `predict`, `model.export`, `model.quantize`) takes the model as built.
What a runtime runs faster is applied here, explicitly, by the exporters or by a user:

    twin = keras_t2t.inference.prepare(model, runtime="tensorflow_onednn")

The twin is made from the model's config with the runtime's transforms applied, and takes the
model's weights as they are (a quantized model's too). It is for inference only; do not train
or save it (save `model`). Transforms, each with an ablation row in `benchmarks/benchmark.py`:

- `class_token_block`: the last backbone block of a class-token classifier computes the class
  token's row only (`ClassTokenBlock`), where the model reads nothing else from it.
- `extract_patches`: the token maps' soft splits as `tf.image.extract_patches` (TensorFlow
  only: TFLite, ONNX Runtime and OpenVINO have no such op).
- `slices`: all three soft splits as strided slices (TFLite builtins, no convolution).
- `onednn_layer_norm`: LayerNorms in the form TensorFlow's oneDNN build fuses into one op
  (`OneDNNLayerNorm`); 4x slower where oneDNN is off.
- `split_qkv`: q, k and v from their own matmuls, with no run-time split (OpenVINO, ONNX).
- `rows`: the Dense layers and MLPs on 2-D rows `(batch * tokens, channels)`, so that
  TensorFlow's oneDNN build fuses each MatMul with its bias (and fc1 with the GELU). It pays
  in bfloat16 (the bf16 SavedModel takes it: 13% more images/s, its bias adds and erf are
  slow ops on their own), not in float32.

`compute_dtype="bfloat16"` makes a twin whose Tokens-to-Token module and backbone hold their
weights and compute in bfloat16 (the `"bfloat16"` dtype policy), for CPUs with bfloat16 units
(AVX-512 BF16, AMX) and TPUs: the layers keep their float32 islands (the performer's random
features, the softmax, the LayerNorm statistics), and the preprocessing, the final LayerNorm,
the pooling and the head stay float32, so the outputs are float32.
"""

import keras

from keras_t2t import layers as t2t_layers
from keras_t2t.inference.layers import (
    ClassTokenBlock,
    OneDNNLayerNorm,
    RowsDense,
    RowsMlp,
    SplitQKVAttention,
    SplitQKVPerformer,
    SplitQKVTokenTransformer,
    onednn_layer_norm,
    tensorflow_fuses_layer_norm,
)
from keras_t2t.models import TokenPooling

__all__ = [
    "COMPUTE_DTYPES",
    "RUNTIMES",
    "TRANSFORMS",
    "ClassTokenBlock",
    "OneDNNLayerNorm",
    "RowsDense",
    "RowsMlp",
    "SplitQKVAttention",
    "SplitQKVPerformer",
    "SplitQKVTokenTransformer",
    "class_token_blocks",
    "onednn_layer_norm",
    "prepare",
    "tensorflow_fuses_layer_norm",
]

TRANSFORMS = (
    "class_token_block",
    "extract_patches",
    "slices",
    "onednn_layer_norm",
    "split_qkv",
    "rows",
)
COMPUTE_DTYPES = ("float32", "bfloat16")
# The layers of a bfloat16 twin that compute in bfloat16: the T2T module, the class token,
# the position table and the blocks (a dropout between them casts and casts back; any layer
# after the last block, a user's head included, stays as the model has it).
_BFLOAT16_LAYERS = (
    t2t_layers.T2TModule,
    t2t_layers.TransformerBlock,
    t2t_layers.ClassToken,
    t2t_layers.PositionEmbedding,
)

# What each runtime takes. "tensorflow" is for any TensorFlow or TF Serving host;
# "tensorflow_onednn" for x86-64 Linux ones with oneDNN on (TensorFlow's and TF Serving's
# default there: `tensorflow_fuses_layer_norm()` says so on the serving machine).
RUNTIMES = {
    "generic": ("class_token_block",),
    "tensorflow": ("class_token_block", "extract_patches"),
    "tensorflow_onednn": ("class_token_block", "extract_patches", "onednn_layer_norm"),
    "tflite": ("class_token_block", "slices"),
    "onnx": ("class_token_block", "split_qkv"),
    "openvino": ("class_token_block", "split_qkv"),
}

_SOFT_SPLITS = {"extract_patches": ["conv", "patches", "patches"], "slices": "slices"}
_SPLIT_QKV = {
    t2t_layers.MultiHeadSelfAttention: SplitQKVAttention,
    t2t_layers.TokenPerformer: SplitQKVPerformer,
    t2t_layers.TokenTransformer: SplitQKVTokenTransformer,
}


def check_runtime(runtime):
    if runtime not in RUNTIMES:
        raise ValueError(
            f"Unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)} "
            f"(keras_t2t.inference.RUNTIMES)."
        )
    return runtime


def _check_transforms(transforms):
    transforms = tuple(transforms)
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise ValueError(
            f"Unknown transform(s) {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(TRANSFORMS)}."
        )
    if {"extract_patches", "slices"} <= set(transforms):
        raise ValueError("`extract_patches` and `slices` both set the soft splits: choose one.")
    if "extract_patches" in transforms and keras.backend.backend() != "tensorflow":
        raise ValueError("`extract_patches` is a TensorFlow op: use it on the TensorFlow backend.")
    return transforms


def _only_consumers(layer):
    """The layers that read `layer`'s output, or None where `layer` was called more than once
    or its output is read by something else than a layer of the same model (for example as
    the model's output)."""
    if len(layer._inbound_nodes) != 1:
        return None
    return [node.operation for node in layer._outbound_nodes]


def class_token_blocks(model):
    """Names of `model`'s top-level `TransformerBlock`s whose output only a class-token reader
    uses: called once, read by one LayerNorm called once, itself read only by
    `TokenPooling("token")` layers, neither of them a model output. For these
    `ClassTokenBlock` gives the same outputs."""
    outputs = {id(t) for t in model.outputs}
    names = []
    for layer in model.layers:
        if type(layer) is not t2t_layers.TransformerBlock:
            continue
        readers = _only_consumers(layer)
        if not readers or len(readers) != 1 or id(layer.output) in outputs:
            continue
        norm = readers[0]
        if not isinstance(norm, keras.layers.LayerNormalization):
            continue
        poolers = _only_consumers(norm)
        if not poolers or id(norm.output) in outputs:
            continue
        if all(isinstance(p, TokenPooling) and p.mode == "token" for p in poolers):
            names.append(layer.name)
    return names


def check_compute_dtype(compute_dtype, model=None):
    """`compute_dtype`, checked: one of COMPUTE_DTYPES; "bfloat16" only for a model that is
    not quantized (its quantized layers compute in their own dtype)."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"`compute_dtype` must be one of {', '.join(COMPUTE_DTYPES)}, received "
            f"{compute_dtype!r}."
        )
    if compute_dtype == "bfloat16" and model is not None:
        quantized = sorted(
            {
                layer.quantization_mode
                for layer in model._flatten_layers(include_self=False)
                if getattr(layer, "quantization_mode", None)
            }
        )
        if quantized:
            raise ValueError(
                f"compute_dtype='bfloat16' takes a float model; this one is quantized "
                f"({', '.join(quantized)}). Prepare the model before `quantize`, or keep "
                f"compute_dtype='float32'."
            )
    return compute_dtype


def _clone_function(model, transforms, compute_dtype="float32"):
    blocks = set(class_token_blocks(model)) if "class_token_block" in transforms else set()
    soft_splits = [_SOFT_SPLITS[t] for t in transforms if t in _SOFT_SPLITS]

    def clone(layer):
        config = layer.get_config()
        if compute_dtype == "bfloat16" and isinstance(layer, _BFLOAT16_LAYERS):
            config["dtype"] = "bfloat16"
        if layer.name in blocks:
            return ClassTokenBlock.from_config(config)
        if soft_splits and isinstance(layer, t2t_layers.T2TModule):
            config["soft_split_implementation"] = soft_splits[0]
        return layer.__class__.from_config(config)

    return clone


def _swap_classes(twin, transforms):
    """Nested layers (made by their parents, not from a config) take their subclass in place:
    none adds a weight or a constructor argument."""
    for layer in twin._flatten_layers(include_self=False):
        if "onednn_layer_norm" in transforms and type(layer) is t2t_layers.LayerNorm:
            layer.__class__ = OneDNNLayerNorm
        if "split_qkv" in transforms and type(layer) in _SPLIT_QKV:
            layer.__class__ = _SPLIT_QKV[type(layer)]
        if "rows" in transforms and type(layer) is t2t_layers.Mlp:
            layer.__class__ = RowsMlp
        if "rows" in transforms and type(layer) is keras.layers.Dense:
            layer.__class__ = RowsDense


def prepare(model, runtime="generic", transforms=None, compute_dtype="float32"):
    """A twin of `model` with `runtime`'s transforms (`RUNTIMES`), or with `transforms` (names
    from `TRANSFORMS`) where given: the same outputs (to float rounding), for inference only.

    `model` is a functional or Sequential Keras model (every keras_t2t builder's, and models
    built around them); it is left as it is. Transforms that find nothing to change in it are
    skipped, so `prepare` takes any model. `compute_dtype="bfloat16"`: the T2T module and the
    backbone in bfloat16 (see the module's docstring); the outputs then differ from
    float32's by bfloat16 rounding.
    """
    check_runtime(runtime)
    transforms = _check_transforms(RUNTIMES[runtime] if transforms is None else transforms)
    if not isinstance(model, keras.Model) or not hasattr(model, "_operations"):
        raise ValueError(
            f"`prepare` takes a functional or Sequential Keras model, received "
            f"{type(model).__name__}."
        )
    check_compute_dtype(compute_dtype, model)
    if compute_dtype == "bfloat16" and not any(
        isinstance(layer, _BFLOAT16_LAYERS) for layer in model.layers
    ):
        raise ValueError(
            "compute_dtype='bfloat16' found no keras_t2t layer at the top level of this model "
            "(a keras_t2t model nested in another is cloned as it is); prepare the keras_t2t "
            "model itself, then build around its twin."
        )
    clone = _clone_function(model, transforms, compute_dtype)
    twin = keras.models.clone_model(model, clone_function=clone)
    _swap_classes(twin, transforms)
    twin.set_weights(model.get_weights())
    return twin
