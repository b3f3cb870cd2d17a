"""LoRA on a T2T-ViT: Keras' own `Dense.enable_lora` on every Dense layer of the model, those
inside the T2T module and the blocks included (KerasHub's backbones offer `enable_lora`
likewise).

>>> import keras_t2t
>>> model = keras_t2t.T2TViT7(input_shape=(32, 32, 3), classes=10)
>>> len(keras_t2t.enable_lora(model, rank=4))  # 9 in the T2T module, 4 per block, the head
38
"""

import keras


def dense_layers(model):
    """Every `keras.layers.Dense` of `model`, at any depth (the T2T layers' and the blocks'
    projections and MLPs, the head), in the model's order."""
    return [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dense)]


def enable_lora(model, rank, lora_alpha=None):
    """Enables LoRA of `rank` on every Dense layer of `model` (`Dense.enable_lora`): their
    kernels freeze and two low-rank factors train. Returns those layers.

    Saved to `.keras` or `.weights.h5`, each kernel is written merged with its LoRA product, as
    Keras does; call `enable_lora` again after loading to go on training LoRA factors."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be an integer >= 1, received {rank!r}.")
    layers = dense_layers(model)
    for layer in layers:
        if layer.lora_enabled:
            raise ValueError(
                f"LoRA is already enabled on {layer.path!r}; enable it once per model."
            )
    for layer in layers:
        layer.enable_lora(rank, lora_alpha=lora_alpha)
    return layers
