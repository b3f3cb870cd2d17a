"""The official T2T-ViT variants: one row of architecture each, and the lookups by name.

Kept apart from `models` (the builders) and `weights` (the loaders), which both read it.
"""

import math

# Paper and official-registry facts (see README): parameters are totals, frozen tensors included.
MODEL_CONFIGS = {
    "t2t_vit_7": dict(tokens_type="performer", embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_10": dict(
        tokens_type="performer", embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0
    ),
    "t2t_vit_12": dict(
        tokens_type="performer", embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0
    ),
    "t2t_vit_14": dict(
        tokens_type="performer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0
    ),
    "t2t_vit_19": dict(
        tokens_type="performer", embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0
    ),
    "t2t_vit_24": dict(
        tokens_type="performer", embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0
    ),
    "t2t_vit_t_14": dict(
        tokens_type="transformer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0
    ),
    "t2t_vit_t_19": dict(
        tokens_type="transformer", embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0
    ),
    "t2t_vit_t_24": dict(
        tokens_type="transformer", embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0
    ),
    # Paper ablations of the official registry, without released weights.
    "t2t_vit_14_resnext": dict(
        tokens_type="performer", embed_dim=384, depth=14, num_heads=32, mlp_ratio=3.0
    ),
    "t2t_vit_14_wide": dict(
        tokens_type="performer", embed_dim=768, depth=4, num_heads=12, mlp_ratio=3.0
    ),
}

DEFAULT_IMAGE_SIZE = 224
POOLING_MODES = (None, "token", "avg", "max")
# The T2T module's three soft splits, (kernel, stride, padding): 4x, then 2x and 2x. The one
# definition of this geometry (layers, weights, FLOPs and explain read it).
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
PATCH_FACTOR = math.prod(stride for _, stride, _ in SOFT_SPLITS)  # 16: tokens per image side


def list_models():
    """The official snake-case names that `create_model` accepts."""
    return sorted(MODEL_CONFIGS)


def variant_config(name):
    """`(key, builder arguments)` of the official variant `name` ("t2t_vit_14", "T2T-ViT-14"):
    the one place that refuses an unknown name, with a ValueError that lists the known ones.

    >>> variant_config("T2T-ViT-7")[1]["depth"]
    7
    """
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in MODEL_CONFIGS:
        raise ValueError(
            f"Unknown T2T-ViT variant {name!r}. Known variants: {', '.join(list_models())}."
        )
    return key, dict(MODEL_CONFIGS[key])


def variant_of(architecture):
    """The name of the official variant with exactly this architecture, or None."""
    defaults = dict(token_dim=64, qkv_bias=False, qk_scale=None)
    for name, config in MODEL_CONFIGS.items():
        if {**defaults, **config} == {**defaults, **architecture}:
            return name
    return None
