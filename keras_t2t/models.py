"""T2T-ViT model builders in the style of `keras.applications`.

Every variant is a row of `MODEL_CONFIGS`, built by the one generic `T2TViT`.

>>> import keras_t2t
>>> model = keras_t2t.create_model("t2t_vit_t_14", input_shape=(32, 32, 3), classes=10)
>>> model.output_shape
(None, 10)
"""

import os

import keras
from keras import ops

from keras_t2t import layers as t2t_layers
from keras_t2t import pretrained
from keras_t2t import weights as weights_lib
from keras_t2t.configs import (  # noqa: F401 (list_models, variant_of: re-exported)
    DEFAULT_IMAGE_SIZE,
    MODEL_CONFIGS,
    PATCH_FACTOR,
    POOLING_MODES,
    list_models,
    variant_config,
    variant_of,
)
from keras_t2t.imagenet import IMAGENET_MEAN, IMAGENET_STD, normalization


def _check_side(side):
    if side < PATCH_FACTOR or side % PATCH_FACTOR:
        below = side // PATCH_FACTOR * PATCH_FACTOR
        nearest = (
            f"The nearest allowed sides are {below} and {below + PATCH_FACTOR}."
            if below >= PATCH_FACTOR
            else f"The smallest allowed side is {PATCH_FACTOR}."
        )
        raise ValueError(
            f"The image side must be a multiple of {PATCH_FACTOR} (224, 384, 32, ...), "
            f"received {side}. {nearest}"
        )


def _input_shape(input_shape, input_tensor, default_size):
    """`(height, width, 3)`: sides that are multiples of 16, or both None (any such size)."""
    if input_shape is None and input_tensor is not None:
        input_shape = tuple(input_tensor.shape[1:])
    if input_shape is None:
        input_shape = (default_size, default_size, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"`input_shape` must be (height, width, 3), received {input_shape}.")
    height, width, channels = input_shape
    if channels != 3:
        raise ValueError(
            f"T2T-ViT takes RGB images with 3 channels, received input_shape {input_shape}."
        )
    if (height is None) != (width is None):
        raise ValueError(
            f"T2T-ViT takes images of a fixed size or of any size, received input_shape "
            f"{input_shape}. Pass (None, None, 3) for any size (sides multiples of "
            f"{PATCH_FACTOR}), or fix both sides, e.g. (224, 224, 3)."
        )
    if height is not None:
        for side in (height, width):
            _check_side(side)
    return input_shape


def T2TViT(
    tokens_type="performer",
    embed_dim=384,
    depth=14,
    num_heads=6,
    mlp_ratio=3.0,
    token_dim=64,
    qkv_bias=False,
    qk_scale=None,
    *,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=None,
    classifier_activation="softmax",
    name="t2t_vit",
    include_preprocessing=True,
    drop_path_rate=0.0,
    dropout_rate=0.0,
    soft_split_implementation="auto",
    dtype=None,
    gradient_checkpointing=False,
):
    """Builds a T2T-ViT of any configuration; the variant builders call this.

    Args:
        tokens_type: T2T layer, `"performer"` or `"transformer"`.
        embed_dim, depth, num_heads, mlp_ratio: backbone width, blocks, heads, MLP ratio.
        token_dim: width of the T2T layers (64 in every official variant).
        qkv_bias: bias in the backbone's `qkv` (False in every official variant).
        qk_scale: backbone attention scale; None means `head_dim ** -0.5`.
        include_top, weights, input_tensor, input_shape, pooling, classes,
        classifier_activation, name: as in `keras.applications`; see `T2TViT14`.
            `weights` may also be a `keras_t2t.weights.WeightsState` already read (as
            `keras_t2t.from_preset` passes a preset's), with the release it was made from.
        include_preprocessing, drop_path_rate, dropout_rate: see `T2TViT14`.
        soft_split_implementation: `"auto"` (default), resolved from the backend only: on
            TensorFlow a one-hot convolution for the image and strided slices for the token
            maps, elsewhere strided slices; or `"conv"`, `"slices"`, `"patches"`
            (`tf.image.extract_patches`: TensorFlow only, no TFLite builtin), or a list of
            three. The same values each; see `keras_t2t.layers.T2TModule`. The fastest
            forms for a runtime come from `keras_t2t.inference.prepare`.
        dtype, gradient_checkpointing: see `T2TViT14`.

    Returns:
        A functional `keras.Model`. Its `builder_config` (a dict) holds the arguments of
        this call, resolved (`input_shape`, `classes`) and without `weights` and
        `input_tensor`: `T2TViT(**model.builder_config)` builds the same model again, and
        `keras_t2t.save_preset` writes them as the preset's config.json.
    """
    if pooling not in POOLING_MODES:
        raise ValueError(
            f"`pooling` must be one of {POOLING_MODES}, received {pooling!r}. "
            f"'token' takes the class token, 'avg' and 'max' pool the patch tokens, None "
            f"returns the whole token sequence."
        )
    if classes is not None:
        t2t_layers._check_int("classes", classes)
    t2t_layers._check_rate("drop_path_rate", drop_path_rate)  # before it is spread over blocks
    t2t_layers._check_rate("dropout_rate", dropout_rate)
    state = release = None
    default_size = DEFAULT_IMAGE_SIZE
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    architecture = dict(
        tokens_type=tokens_type,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        token_dim=token_dim,
        qkv_bias=qkv_bias,
        qk_scale=qk_scale,
    )
    if weights is not None:
        state, release = _read_weights(weights, architecture, input_shape, input_tensor)
        default_size = state.image_size or default_size
        if release is not None:  # the normalization these weights were trained with
            mean, std = release.mean, release.std
    if classes is None:  # the head of the weights, so that it loads
        classes = (state.classes if state is not None else None) or 1000
    t2t_layers._check_int("classes", classes)
    input_shape = _input_shape(input_shape, input_tensor, default_size)

    if input_tensor is None:
        images = keras.Input(shape=input_shape, name="images")
    elif not keras.backend.is_keras_tensor(input_tensor):
        images = keras.Input(tensor=input_tensor, shape=input_shape, name="images")
    else:
        images = input_tensor

    x = images
    if include_preprocessing:
        # (x / 255 - mean) / std as one multiply-add, in float32 whatever the policy.
        scale, offset = normalization(mean, std)
        x = keras.layers.Rescaling(
            scale=scale,
            offset=offset,
            dtype="float32",
            name="preprocessing",
        )(x)
    t2t = t2t_layers.T2TModule(
        tokens_type,
        embed_dim,
        token_dim,
        soft_split_implementation=soft_split_implementation,
        name="tokens_to_token",
        dtype=dtype,
    )
    x, _ = t2t(x, return_feature_maps=True)
    x = t2t_layers.ClassToken(name="cls_token", dtype=dtype)(x)
    height, width = input_shape[:2]
    if height is None:  # any size: the table of the weights' grid, resized in the graph
        side = default_size // PATCH_FACTOR
        pos_embed = t2t_layers.PositionEmbedding(
            grid_size=(side, side), patch_size=PATCH_FACTOR, name="pos_embed", dtype=dtype
        )
        x = pos_embed(x, images)
    elif height != width:  # the grid, for a table loaded from a square one
        grid = (height // PATCH_FACTOR, width // PATCH_FACTOR)
        x = t2t_layers.PositionEmbedding(grid_size=grid, name="pos_embed", dtype=dtype)(x)
    else:
        x = t2t_layers.PositionEmbedding(name="pos_embed", dtype=dtype)(x)
    x = keras.layers.Dropout(dropout_rate, name="pos_drop", dtype=dtype)(x)
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    for i, rate in enumerate(rates):
        x = t2t_layers.TransformerBlock(
            num_heads,
            mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            dropout_rate=dropout_rate,
            drop_path_rate=rate,
            gradient_checkpointing=gradient_checkpointing,
            name=f"blocks_{i}",
            dtype=dtype,
        )(x)
    x = t2t_layers.LayerNorm(epsilon=t2t_layers.LAYER_NORM_EPSILON, name="norm", dtype=dtype)(x)

    if include_top:
        x = _pool(x, "token", dtype)
        x = keras.layers.Dense(
            classes,
            kernel_initializer=t2t_layers.official_init(),
            name="head",
            dtype=dtype,
        )(x)
        x = keras.layers.Activation(classifier_activation, dtype="float32", name="predictions")(x)
    elif pooling is not None:
        x = _pool(x, pooling, dtype)

    inputs = keras.utils.get_source_inputs(input_tensor) if input_tensor is not None else images
    model = keras.Model(inputs, x, name=name)
    model.builder_config = dict(
        architecture,
        include_top=include_top,
        input_shape=input_shape,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        name=name,
        include_preprocessing=include_preprocessing,
        drop_path_rate=drop_path_rate,
        dropout_rate=dropout_rate,
        soft_split_implementation=soft_split_implementation,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
    )
    if state is not None:  # into this model: `weights=` builds no other
        weights_lib.assign_state(model, state)
        if release is not None:
            model.pretrained_release = release  # how its inputs must be prepared
    return model


def _run_release(weights):
    """The release a training run in `weights` (a model_dir) started from, for its
    normalization: a run fine-tuned from "cifar10" weights keeps the CIFAR mean and std."""
    if not os.path.isdir(os.fspath(weights)):
        return None
    run = weights_lib.run_weights(os.fspath(weights))[1]
    start = run.get("weights")
    if not (pretrained.is_release_name(start) and run.get("model") in MODEL_CONFIGS):
        return None
    return pretrained.find_release(run["model"], start, run.get("image_size"))


def _read_weights(weights, architecture, input_shape, input_tensor):
    """(WeightsState, release or None) for `weights`: a path, a release name, or a state read
    already. Reading a file builds no model: the state goes into the one that `T2TViT` builds."""
    if isinstance(weights, weights_lib.WeightsState):
        return weights, weights.release
    if not pretrained.is_release_name(weights):
        state = weights_lib.read_weights(weights, architecture)
        return state, _run_release(weights)
    side = None
    if input_shape is not None:
        side = tuple(input_shape)[0] if len(tuple(input_shape)) == 3 else None
    elif input_tensor is not None:
        side = tuple(input_tensor.shape)[1] if len(tuple(input_tensor.shape)) == 4 else None
    release = pretrained.find_release(variant_of(architecture), weights, side)
    return pretrained.release_state(release), release


def _pool(x, mode, dtype=None):
    return TokenPooling(mode, name=f"{mode}_pool", dtype=dtype)(x)


@keras.saving.register_keras_serializable(package="keras_t2t")
class TokenPooling(keras.layers.Layer):
    """Pools `(batch, 1 + tokens, dim)`: `"token"` takes the class token; `"avg"`/`"max"`
    reduce the patch tokens (the class token left out)."""

    def __init__(self, mode="token", **kwargs):
        super().__init__(**kwargs)
        if mode not in POOLING_MODES[1:]:
            raise ValueError(f"`mode` must be one of {POOLING_MODES[1:]}, received {mode!r}.")
        self.mode = mode

    def call(self, inputs):
        if self.mode == "token":
            return inputs[:, 0]
        reduce = ops.mean if self.mode == "avg" else ops.max
        return reduce(inputs[:, 1:], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode)
        return config


def feature_maps_model(model):
    """A model that returns the intermediate maps of `model`, for detection and segmentation.

    Outputs a dict: `"t2t_1"` `(side/4, side/4, 64)` and `"t2t_2"` `(side/8, side/8, 64)` from
    the T2T module, and `"tokens"` `(side/16, side/16, embed_dim)`: the final-norm patch tokens
    as a map. Shares its weights with `model`.
    """
    layers = {layer.name for layer in getattr(model, "layers", ())}
    if not isinstance(model, keras.Model) or not {"tokens_to_token", "norm"} <= layers:
        raise ValueError(
            f"Expected a keras_t2t T2T-ViT model (e.g. keras_t2t.T2TViT14()), received "
            f"{type(model).__name__}."
        )
    t2t = model.get_layer("tokens_to_token")
    _, map1, map2 = keras.tree.flatten(t2t.output)  # (tokens, (map1, map2))
    tokens = model.get_layer("norm").output
    if None in model.input_shape[1:3]:
        raise ValueError(
            f"feature_maps_model takes a model of a fixed image size; {model.name!r} takes any "
            f"size (input_shape {model.input_shape}). Build one of the size you need with "
            f"the same weights (`input_shape=(h, w, 3)`)."
        )
    grid = keras.layers.Reshape(
        (*t2t.grid_sizes(*model.input_shape[1:3])[2], tokens.shape[-1]), name="tokens_map"
    )(TokenPatches(name="patch_tokens")(tokens))
    return keras.Model(
        model.input, {"t2t_1": map1, "t2t_2": map2, "tokens": grid}, name=f"{model.name}_features"
    )


def pyramid_model(model):
    """A backbone for detection and segmentation heads: a model that returns a dict of
    feature maps by level, in the style of KerasHub's `pyramid_outputs`.

    `"P2"` stride 4 `(side/4, side/4, 64)` and `"P3"` stride 8 `(side/8, side/8, 64)`: the
    two T2T maps; `"P4"` stride 16 `(side/16, side/16, embed_dim)`: the final-norm patch
    tokens as a map; `"P5"` stride 32: P4 max-pooled 2x2 (as ViTDet makes its coarser
    levels). Every level is a 4-D NHWC map, ready for an FPN. Shares its weights with
    `model` (built with or without its head).
    """
    features = feature_maps_model(model)
    maps = features.output
    p5 = keras.layers.MaxPooling2D(2, padding="same", name="p5_pool")(maps["tokens"])
    return keras.Model(
        features.input,
        {"P2": maps["t2t_1"], "P3": maps["t2t_2"], "P4": maps["tokens"], "P5": p5},
        name=f"{model.name}_pyramid",
    )


@keras.saving.register_keras_serializable(package="keras_t2t")
class TokenPatches(keras.layers.Layer):
    """Drops the class token: `(batch, 1 + tokens, dim)` -> `(batch, tokens, dim)`."""

    def call(self, inputs):
        return inputs[:, 1:]

    def compute_output_shape(self, input_shape):
        tokens = None if input_shape[1] is None else input_shape[1] - 1
        return (input_shape[0], tokens, input_shape[2])


def create_model(name, **kwargs):
    """Builds a variant by its official name, e.g. `create_model("t2t_vit_t_14", classes=10)`.

    `kwargs` are those of the variant builders (`include_top`, `weights`, `classes`, ...), and
    may override the variant's architecture (`depth=2`: a shallower T2T-ViT-14, as timm's
    `create_model` takes), which official weights then no longer fit.

    >>> create_model("t2t_vit_7", depth=1, input_shape=(32, 32, 3)).get_layer("blocks_0").name
    'blocks_0'
    """
    key, config = variant_config(name)
    kwargs.setdefault("name", key)
    return T2TViT(**{**config, **kwargs})


def model_for_command_line(
    model=None,
    weights=None,
    image_size=None,
    classes=None,
    num_heads=None,
    classifier_activation="softmax",
):
    """The classifier that a command line's `--model`, `--weights`, `--image_size`,
    `--classes` and `--num_heads` name (the export, evaluation and explain commands).
    `image_size="any"` builds a model of any size (`input_shape=(None, None, 3)`), whose
    position table keeps the size of the weights and is resized in the graph.

    `weights`: None, a release name (`"imagenet"`, needs `--model`), a training run's
    model_dir (the variant, size and classes left out come from its config), a Keras
    `.weights.h5` (needs `--model`), or an official checkpoint, whose variant is read from
    its tensors when `--model` is left out (`--num_heads` describes a custom architecture).
    A weights file must hold a classification head: a random one would answer at random.
    """
    if weights is None or pretrained.is_release_name(weights):
        if model is None:
            raise ValueError(
                f"--weights={weights} needs --model (e.g. --model=t2t_vit_14)."
                if weights
                else "--model is required (unless --weights is a run's --model_dir)."
            )
        builder, arch = create_model, dict(name=model)
    else:
        model, image_size, classes = weights_lib.run_architecture(
            weights, model, image_size, classes
        )
        path = weights_lib.check_path(weights)  # a run's model_dir: its weights file
        if path.lower().endswith(weights_lib.KERAS_SUFFIX):
            head = weights_lib.keras_weights_info(path)[1]
            found = dict(classes=head[1] if head else None)
        else:
            found = weights_lib.infer_config(weights_lib.read_official_checkpoint(path))
        if not found["classes"]:
            raise ValueError(
                f"{path!r} has no classification head (it was saved without one); this "
                f"command needs a classifier: give weights that have a head."
            )
        if model is None and "tokens_type" not in found:
            raise ValueError(f"{path!r} does not say its variant: pass --model (e.g. t2t_vit_14).")
        if num_heads is not None and "tokens_type" not in found:
            raise ValueError(
                f"--num_heads describes a custom architecture of an official checkpoint; "
                f"{path!r} is not one: leave --num_heads out."
            )
        if "tokens_type" in found:  # an official checkpoint
            name, arch = weights_lib.resolve_architecture(found, model, num_heads, source=path)
            builder, arch = T2TViT, dict(arch, name=name or "t2t_vit")
        else:
            builder, arch = create_model, dict(name=model)
        classes = classes or found["classes"]
    if image_size == "any":
        shape = (None, None, 3)
    else:
        shape = None if image_size is None else (image_size, image_size, 3)
    return builder(
        **arch,
        weights=weights,
        input_shape=shape,
        classes=classes,
        classifier_activation=classifier_activation,
    )


BASE_DOCSTRING = """Instantiates the {title} model (Yuan et al., "Tokens-to-Token ViT", ICCV 2021).

    {description} ImageNet top-1 of the released weights: {top1}%.

    By default the model takes RGB images with values in [0, 255] and normalizes them inside
    (`include_preprocessing=True`). `{builder}.from_preset(uri, **overrides)` builds it from a
    preset instead (`keras_t2t.presets`: converted weights, with no torch and no conversion).

    Args:
        include_top: whether to include the classification head.
        weights: None (random initialization); `"imagenet"` for the official ImageNet
            weights (downloaded once into Keras' cache; at 384 the 83.3% file of T2T-ViT-14),
            or `"cifar10"` / `"cifar100"` where released (see `keras_t2t.pretrained`); or a
            path: an official checkpoint (`.pth.tar` / `.pth`, read without torch), a Keras
            `.weights.h5` file, or the `--model_dir` of a training run. A head that does not
            fit (`include_top=False`, or other `classes`) is left out, and a position table of
            another size is interpolated as the official fine-tuning code does.
        input_tensor: optional Keras tensor to use as image input.
        input_shape: `(height, width, 3)` with sides multiples of 16 (square or not);
            default `(224, 224, 3)`, or the size of `weights`. `(None, None, 3)`: a model
            of any such size, whose position table (of the size of `weights`, else 224) is
            resized in the graph to each input's token grid, as the official fine-tuning
            resize does (see `keras_t2t.layers.PositionEmbedding`).
        pooling: with `include_top=False`: None returns the token sequence
            `(batch, 1 + (side/16)**2, dim)` after the final norm, `"token"` the class token,
            `"avg"`/`"max"` the mean/max of the patch tokens.
        classes: number of classes of the head; default: those of `weights`, else 1000.
        classifier_activation: activation of the head (None for logits).
        name: model name.
        include_preprocessing: True to take RGB in [0, 255]; False to take images normalized
            with the ImageNet mean and std (see `keras_t2t.preprocess_input`).
        drop_path_rate: stochastic depth, rates linearly from 0 to this over the blocks.
        dropout_rate: dropout after the position table and in the blocks (attention
            projection and MLP), as the official `drop_rate`.
        dtype: the dtype policy of the model's layers (`"mixed_bfloat16"`,
            `"mixed_float16"`, ...), so that a model carries its own; default None: Keras'
            global policy. The preprocessing, the performer's random-feature attention,
            the softmaxes and the output stay float32.
        gradient_checkpointing: True to recompute the backbone blocks' attention and MLP in
            the backward pass instead of keeping their activations (`keras.remat`; see
            `keras_t2t.layers.TransformerBlock`): less training memory for about one more
            forward pass of the blocks, the same outputs and gradients. Needs
            `dropout_rate=0`. Default False.

    Returns:
        A `keras.Model`.

    Example:
        >>> import keras_t2t
        >>> model = keras_t2t.{builder}(input_shape=(32, 32, 3), classes=10)
        >>> model.output_shape
        (None, 10)
"""

_DESCRIPTIONS = {
    "performer": "Performer (linear-attention) T2T module.",
    "transformer": "Transformer (softmax-attention) T2T module.",
}


BUILDERS = {}  # variant -> its builder (T2TViT7, ...)


def _builder(config_name, builder_name, title, top1):
    def builder(
        include_top=True,
        weights=None,
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=None,
        classifier_activation="softmax",
        name=config_name,
        include_preprocessing=True,
        drop_path_rate=0.0,
        dropout_rate=0.0,
        dtype=None,
        gradient_checkpointing=False,
    ):
        return T2TViT(
            **MODEL_CONFIGS[config_name],
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            name=name,
            include_preprocessing=include_preprocessing,
            drop_path_rate=drop_path_rate,
            dropout_rate=dropout_rate,
            dtype=dtype,
            gradient_checkpointing=gradient_checkpointing,
        )

    builder.__name__ = builder.__qualname__ = builder_name
    builder.__doc__ = BASE_DOCSTRING.format(
        title=title,
        description=_DESCRIPTIONS[MODEL_CONFIGS[config_name]["tokens_type"]],
        top1=top1,
        builder=builder_name,
    )
    BUILDERS[config_name] = builder
    return builder


T2TViT7 = _builder("t2t_vit_7", "T2TViT7", "T2T-ViT-7", 71.7)
T2TViT10 = _builder("t2t_vit_10", "T2TViT10", "T2T-ViT-10", 75.2)
T2TViT12 = _builder("t2t_vit_12", "T2TViT12", "T2T-ViT-12", 76.5)
T2TViT14 = _builder("t2t_vit_14", "T2TViT14", "T2T-ViT-14", 81.5)
T2TViT19 = _builder("t2t_vit_19", "T2TViT19", "T2T-ViT-19", 81.9)
T2TViT24 = _builder("t2t_vit_24", "T2TViT24", "T2T-ViT-24", 82.3)
T2TViTT14 = _builder("t2t_vit_t_14", "T2TViTT14", "T2T-ViT_t-14", 81.7)
T2TViTT19 = _builder("t2t_vit_t_19", "T2TViTT19", "T2T-ViT_t-19", 82.4)
T2TViTT24 = _builder("t2t_vit_t_24", "T2TViTT24", "T2T-ViT_t-24", 82.6)
