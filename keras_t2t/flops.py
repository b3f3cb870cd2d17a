"""Analytic FLOP counter for T2T-ViT (multiply-adds count as 2 FLOPs).

The paper reports MACs; `count_flops(...) / 2` reproduces them (T2T-ViT-14 at 224: 4.8 G).
Elementwise work (norms, activations, softmax, exp) is left out, as in the paper's counter.
"""

from keras_t2t.configs import SOFT_SPLITS, variant_config


def _grid(side, kernel, stride, padding):
    return (side + 2 * padding - kernel) // stride + 1


def _config_of(model):
    t2t = model.get_layer("tokens_to_token")
    blocks = [layer for layer in model.layers if layer.name.startswith("blocks_")]
    try:
        classes = model.get_layer("head").units
    except ValueError:
        classes = 0
    return dict(
        tokens_type=t2t.tokens_type,
        embed_dim=t2t.embed_dim,
        token_dim=t2t.token_dim,
        depth=len(blocks),
        mlp_ratio=blocks[0].mlp_ratio,
        image_size=model.input_shape[1],
        classes=classes,
    )


def count_macs(
    tokens_type,
    embed_dim,
    depth,
    mlp_ratio,
    image_size=224,
    classes=1000,
    token_dim=64,
    in_channels=3,
    **_,
):
    """Multiply-accumulates of one forward pass of one image."""
    side, channels, macs = image_size, in_channels, 0
    for stage, (kernel, stride, padding) in enumerate(SOFT_SPLITS):
        side = _grid(side, kernel, stride, padding)
        tokens, width = side * side, kernel * kernel * channels
        if stage == 2:
            macs += tokens * width * embed_dim  # project
            break
        d = token_dim
        macs += tokens * width * 3 * d  # kqv / qkv
        if tokens_type == "performer":
            m = d // 2
            macs += 2 * tokens * d * m  # phi(k), phi(q)
            macs += tokens * m * d + tokens * m * d + tokens * m  # v^T phi(k), phi(q) (.), D
        else:
            macs += 2 * tokens * tokens * d  # q k^T, attn v
        macs += tokens * d * d  # proj
        macs += 2 * tokens * d * d  # mlp (ratio 1 in both T2T layers)
        channels = d
    n, dim = side * side + 1, embed_dim
    hidden = int(dim * mlp_ratio)
    per_block = n * dim * 3 * dim + 2 * n * n * dim + n * dim * dim + 2 * n * dim * hidden
    macs += depth * per_block + dim * classes
    return macs


def count_flops(model_or_name, image_size=None, classes=1000):
    """FLOPs of one forward pass of one image (2 per multiply-add).

    Args:
        model_or_name: a model built by keras_t2t, or a variant name (`"t2t_vit_14"`).
        image_size: input side, for a name (default 224) or a model of any size; taken from
            a model of a fixed size.
        classes: head width, for a name.

    >>> round(count_flops("t2t_vit_14") / 2e9, 1)
    4.8
    """
    if isinstance(model_or_name, str):
        config = variant_config(model_or_name)[1]
        config.update(image_size=image_size or 224, classes=classes)
    else:
        config = _config_of(model_or_name)
        height, width = model_or_name.input_shape[1:3]
        if height is None and image_size is None:
            raise ValueError(
                f"{model_or_name.name!r} takes images of any size: pass the `image_size` to "
                f"count at (224, 384, ...)."
            )
        if height is None:
            config.update(image_size=image_size)
        elif height != width:
            raise ValueError(
                f"count_flops counts square images; {model_or_name.name!r} takes "
                f"{height}x{width}. Count a square model, or the variant's name with "
                f"`image_size`."
            )
    return 2 * count_macs(**config)
