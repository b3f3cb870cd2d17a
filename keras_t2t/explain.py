"""What T2T-ViT looks at: attention maps, attention rollout to pixels, the T2T feature maps.

    python -m keras_t2t.explain photo.jpg --model=t2t_vit_7 --weights=imagenet --output=DIR

The model is not changed: these functions run its layers one by one, eagerly, and ask each
attention layer for its weights (`attention_weights`), so a normal model carries no extra
outputs and pays nothing. Each function checks what it is given first: a keras_t2t model and a
batch `(batch, side, side, 3)` at the model's size (and `maps` of that model), else a
ValueError that says what the model takes.

>>> import numpy as np, keras_t2t
>>> from keras_t2t import explain
>>> model = keras_t2t.T2TViT7(input_shape=(32, 32, 3), classes=10)
>>> images = np.zeros((1, 32, 32, 3), "float32")
>>> {k: v.shape for k, v in explain.attention_maps(model, images).items()}["t2t_1"]
(1, 64, 64)
>>> explain.attention_rollout(model, images).shape
(1, 32, 32)
"""

import argparse
import os
import re
import sys

import numpy as np

from keras_t2t.configs import SOFT_SPLITS


def _blocks(model):
    blocks = []
    while True:
        try:
            blocks.append(model.get_layer(f"blocks_{len(blocks)}"))
        except ValueError:
            return blocks


def _side(model):
    """The image side of a keras_t2t model; a ValueError that says so for anything else."""
    from keras_t2t.layers import T2TModule

    try:
        t2t = model.get_layer("tokens_to_token")
        for name in ("cls_token", "pos_embed", "norm"):
            model.get_layer(name)
    except (AttributeError, TypeError, ValueError):
        t2t = None
    if not isinstance(t2t, T2TModule):
        received = "None" if model is None else f"a {type(model).__name__}"
        if getattr(model, "name", None):
            received += f" named {model.name!r}"
        raise ValueError(
            f"`model` must be a keras_t2t T2T-ViT (keras_t2t.T2TViT7(...), create_model(...), "
            f"with or without its head); received {received}."
        )
    height, width = model.input_shape[1:3]
    if height is None or height != width:
        size = "any size" if height is None else f"{height}x{width} images"
        raise ValueError(
            f"keras_t2t.explain takes a model of square images of a fixed size; "
            f"{model.name!r} takes {size}. Build one with input_shape=(side, side, 3) from the "
            f"same weights."
        )
    return int(height)


def _checked_images(model, images):
    """The entry check of `attention_maps`, `attention_rollout` and `feature_maps`: `images`
    a batch `(batch, side, side, 3)` of numbers at `model`'s size, batch >= 1. Returns them
    as float32; raises a ValueError that says what is wrong."""
    side = _side(model)
    expected = f"a batch of images (batch, {side}, {side}, 3)"
    if images is None:
        raise ValueError(f"`images` must be {expected}; received None.")
    try:
        array = np.asarray(images)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`images` must be {expected}; received {error}.") from None
    if array.dtype.kind not in "uif":
        raise ValueError(f"`images` must be {expected} of numbers; received dtype {array.dtype}.")
    if array.ndim != 4:
        hint = " (one image: add the batch axis, images[None])" if array.ndim == 3 else ""
        raise ValueError(f"`images` must be {expected}; received shape {array.shape}{hint}.")
    batch, height, width, channels = array.shape
    if channels != 3:
        raise ValueError(
            f"The model takes RGB images with 3 channels; received {channels} (shape "
            f"{array.shape}). Repeat a grayscale channel: np.repeat(images, 3, axis=-1)."
        )
    if (height, width) != (side, side):
        raise ValueError(
            f"The model takes {side}x{side} images; received {height}x{width} (shape "
            f"{array.shape}). Resize them, or use a model built for that size."
        )
    if batch == 0:
        raise ValueError(f"`images` holds no image (shape {array.shape}): give at least one.")
    return array.astype("float32", copy=False)


def _checked_maps(model, maps, batch):
    """`maps` as `attention_maps(model, images)` gives them for `batch` images: the keys of
    this model's layers and their shapes, else a ValueError that names what differs."""
    side = _side(model)
    tokens = (side // 16) ** 2 + 1
    expected = {
        "t2t_1": (batch, (side // 4) ** 2, (side // 4) ** 2),
        "t2t_2": (batch, (side // 8) ** 2, (side // 8) ** 2),
    }
    for i, block in enumerate(_blocks(model)):
        expected[f"block_{i}"] = (batch, block.num_heads, tokens, tokens)
    problem = None
    if not isinstance(maps, dict):
        problem = f"received {type(maps).__name__}, not a dict"
    else:
        missing = [k for k in expected if k not in maps]
        extra = sorted(map(str, set(maps) - set(expected)))
        if missing or extra:
            problem = ", ".join(
                [f"{k!r} missing" for k in missing] + [f"{k!r} is not this model's" for k in extra]
            )
        else:
            for key, shape in expected.items():
                got = np.shape(maps[key])
                if got != shape:
                    problem = f"{key!r} has shape {got}, this model's is {shape}"
                    break
    if problem:
        raise ValueError(
            f"`maps` must be attention_maps(model, images) of this model for the {batch} "
            f"image(s) given: {problem}."
        )
    return {key: np.asarray(maps[key], "float32") for key in expected}


def _forward(model, images, collect):
    """Runs `model` layer by layer up to the final norm; `collect(name, layer, inputs)` sees
    the input of every attention layer. Returns the T2T maps and the final tokens."""
    x = np.asarray(images, "float32")
    if any(layer.name == "preprocessing" for layer in model.layers):
        x = model.get_layer("preprocessing")(x)
    t2t = model.get_layer("tokens_to_token")
    split = t2t.soft_split0(x)
    collect("t2t_1", t2t.attention1, split)
    map1 = t2t.restructure(t2t.attention1(split))
    split = t2t.soft_split1(map1)
    collect("t2t_2", t2t.attention2, split)
    map2 = t2t.restructure(t2t.attention2(split))
    x = t2t.project(t2t.soft_split2(map2))
    x = model.get_layer("pos_embed")(model.get_layer("cls_token")(x))
    for i, block in enumerate(_blocks(model)):
        collect(f"block_{i}", block.attn, block.norm1(x))
        x = block(x)
    return map1, map2, model.get_layer("norm")(x)


def attention_maps(model, images):
    """The attention of every layer, as NumPy arrays, for images as `model` takes them.

    Returns a dict: `"t2t_1"` and `"t2t_2"`, `(batch, T, T)`, the attention of the two T2T
    layers over their soft-split tokens (the transformer T2T layer's softmax; the performer's
    kernel attention made explicit, phi(q) phi(k)^T over its normalizer, rows summing to 1);
    `"block_0"` ... `"block_{depth-1}"`, `(batch, heads, 1 + N, 1 + N)`, the backbone's
    softmax attention (token 0 is the class token). Equal to the official code's (tested).
    """
    images = _checked_images(model, images)
    maps = {}
    _forward(
        model,
        images,
        lambda name, layer, x: maps.__setitem__(
            name, np.asarray(layer.attention_weights(x), "float32")
        ),
    )
    return maps


def spread(relevance, kernel, stride, padding, size):
    """Carries relevance on the tokens of a soft split back to its input grid.

    `relevance` `(batch, out, out)`: each token's value is spread evenly over the pixels of its
    `kernel` x `kernel` window (the windows overlap; padding pixels are dropped). The
    transpose of the unfold with uniform weights. Returns `(batch, size, size)`.
    """
    batch, out = relevance.shape[0], relevance.shape[1]
    padded = np.zeros((batch, size + 2 * padding + kernel, size + 2 * padding + kernel))
    share = relevance / (kernel * kernel)
    for di in range(kernel):
        for dj in range(kernel):
            padded[:, di : di + stride * out : stride, dj : dj + stride * out : stride] += share
    return padded[:, padding : padding + size, padding : padding + size]


def _with_residual(attention):
    """Identity mixing (Abnar & Zuidema): A' = (A + I) / 2, rows renormalized."""
    mixed = 0.5 * attention + 0.5 * np.eye(attention.shape[-1])
    return mixed / mixed.sum(-1, keepdims=True)


def _mix(attention, relevance):
    """Relevance over a layer's outputs -> over its inputs: r_in = r_out A'."""
    return np.einsum("bt,bts->bs", relevance, _with_residual(attention))


def attention_rollout(model, images, maps=None):
    """One relevance map per image at the input resolution, `(batch, H, W)`, non-negative.

    Method: attention rollout (Abnar & Zuidema, 2020) through the backbone, then back through
    the T2T module:
    1. Backbone: each block's attention, averaged over heads, is mixed with the identity (the
       residual), A' = (A + I) / 2 with rows renormalized, and the blocks are multiplied from
       the last to the first. The class token's row gives a weight to each patch token.
    2. The patch tokens are the windows of the third soft split (3x3, stride 2, padding 1)
       over the second T2T map: each token's weight is spread evenly over its window (`spread`,
       the transpose of the unfold); overlapping windows add up.
    3. The second T2T layer mixes its tokens (one per position of that map) with its
       attention and a residual (its "v" shortcut): the same identity mixing carries the
       weights to its input tokens, which are the windows of the second soft split (3x3,
       stride 2) over the first T2T map, spread the same way.
    4. Likewise through the first T2T layer and its soft split (7x7, stride 4, padding 2)
       onto the image pixels.
    Maps already computed by `attention_maps` can be passed as `maps`.
    """
    if maps is None:
        maps = attention_maps(model, images)
    else:
        maps = _checked_maps(model, maps, len(_checked_images(model, images)))
    size = model.input_shape[1]
    blocks = sorted((k for k in maps if k.startswith("block_")), key=lambda k: int(k[6:]))
    rollout = None
    for name in blocks:
        mixed = _with_residual(maps[name].mean(axis=1))
        rollout = mixed if rollout is None else np.einsum("bij,bjk->bik", mixed, rollout)
    relevance = rollout[:, 0, 1:]  # the class token's weight on each patch token
    sides = [size // 4, size // 8, size // 16]
    relevance = relevance.reshape(-1, sides[2], sides[2])
    relevance = spread(relevance, *SOFT_SPLITS[2], sides[1])  # onto the second T2T map
    relevance = _mix(maps["t2t_2"], relevance.reshape(len(relevance), -1))
    relevance = spread(relevance.reshape(-1, sides[1], sides[1]), *SOFT_SPLITS[1], sides[0])
    relevance = _mix(maps["t2t_1"], relevance.reshape(len(relevance), -1))
    relevance = spread(relevance.reshape(-1, sides[0], sides[0]), *SOFT_SPLITS[0], size)
    return np.maximum(relevance, 0.0).astype("float32")


def feature_maps(model, images):
    """The T2T maps and the token grid as NumPy arrays, for pictures as the paper's Fig. 2:
    `"t2t_1"` `(batch, H/4, W/4, 64)`, `"t2t_2"` `(batch, H/8, W/8, 64)`, `"tokens"`
    `(batch, H/16, W/16, embed_dim)` (the final-norm patch tokens)."""
    map1, map2, tokens = _forward(model, _checked_images(model, images), lambda *_: None)
    side = model.input_shape[1] // 16
    tokens = np.asarray(tokens)[:, 1:]
    return {
        "t2t_1": np.asarray(map1),
        "t2t_2": np.asarray(map2),
        "tokens": tokens.reshape(len(tokens), side, side, -1),
    }


# --- command line ---------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "The pictures of keras_t2t.explain need matplotlib: pip install keras-t2t[viz] "
            "(or pip install matplotlib). attention_maps, attention_rollout and feature_maps "
            "work without it."
        ) from None
    return plt


def _read_error(path):
    """Why `path` cannot be read as an image file (a folder, missing), else None."""
    import tensorflow as tf

    if tf.io.gfile.isdir(path):
        return f"{path!r} is a folder, not an image file; give the image files in it"
    if not tf.io.gfile.exists(path):
        return f"{path!r}: no such file"
    return None


def _load_image(path, size, crop_pct):
    """Read as `serving_bytes` reads it: formats, the pixel limit and GIFs checked first."""
    import tensorflow as tf

    from keras_t2t.export import decode_image_file

    try:
        data = tf.io.read_file(path)
    except tf.errors.OpError as error:
        # The op's message without TF's node names and op tag, e.g. "...; Is a directory".
        reason = _read_error(path) or re.sub(r"\{\{.*?\}\}|\[Op:\w+\]", "", error.message)
        raise ValueError(f"cannot read {path!r}: {reason.strip()}") from None
    try:
        return decode_image_file(data, size, crop_pct).numpy()
    except ValueError as error:
        raise ValueError(f"{path!r} is not a readable image file ({error}).") from None


def _output_names(paths):
    """Each image's name for its pictures: the file name without its extension. Two different
    images with one name (a/x.jpg and b/x.png, x.jpg and x.bmp; compared ignoring case, as
    macOS and Windows do) would overwrite each other's pictures: a ValueError that names them.
    A path given twice is drawn once. Returns [(path, name)]."""
    named, owner = [], {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        key = name.casefold()
        if key in owner:
            if os.path.realpath(owner[key]) == os.path.realpath(path):
                continue
            raise ValueError(
                f"{owner[key]!r} and {path!r} would both be drawn as {name}_rollout.png and "
                f"{name}_t2t_maps.png: the pictures are named after the file name without "
                f"its extension. Rename one, or run them with different --output folders. "
                f"Nothing was written."
            )
        owner[key] = path
        named.append((path, name))
    return named


def _grid(maps, columns=8):
    """The first channels of a `(h, w, c)` map as one tiled image, each channel normalized."""
    h, w, c = maps.shape
    count = min(c, columns * 4)
    rows = -(-count // columns)
    tiles = np.ones((rows * (h + 1), columns * (w + 1))) * np.nan
    for i in range(count):
        channel = maps[..., i]
        low, high = channel.min(), channel.max()
        r, col = divmod(i, columns)
        tiles[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = (
            (channel - low) / (high - low) if high > low else 0.0
        )
    return tiles


def write_pictures(model, image, name, output, top=None):
    """Writes `<name>_rollout.png` (the image with the rollout over it) and
    `<name>_t2t_maps.png` (channels of both T2T maps, as the paper's Fig. 2); returns paths."""
    plt = _pyplot()
    batch = image[None].astype("float32")
    rollout = attention_rollout(model, batch)[0]
    maps = feature_maps(model, batch)
    paths = []
    figure, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    axes[0].imshow(image.astype("uint8"))
    axes[0].set_title("input")
    axes[1].imshow(image.astype("uint8"))
    axes[1].imshow(rollout / max(rollout.max(), 1e-12), cmap="jet", alpha=0.5)
    axes[1].set_title("attention rollout")
    if top:
        figure.suptitle(" | ".join(top), fontsize=8)
    for axis in axes:
        axis.axis("off")
    paths.append(os.path.join(output, f"{name}_rollout.png"))
    figure.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(figure)
    figure, axes = plt.subplots(1, 2, figsize=(12, 6.4))
    for axis, key, stride in zip(axes, ("t2t_1", "t2t_2"), (4, 8)):
        axis.imshow(_grid(maps[key][0]), cmap="viridis")
        axis.set_title(f"T2T map {key[-1]} (stride {stride}), 32 of 64 channels")
        axis.axis("off")
    paths.append(os.path.join(output, f"{name}_t2t_maps.png"))
    figure.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(figure)
    return paths


def _class_names(model):
    """The ImageNet class names for a 1000-class `model`, else None. Without them (no network,
    a stalled server: one try, bounded by $KERAS_T2T_DOWNLOAD_TIMEOUT), None with a warning:
    the pictures are titled with class ids."""
    if model.output_shape[-1] != 1000:
        return None
    from keras_t2t.imagenet import class_index

    try:
        return class_index(attempts=1)
    except OSError as error:
        print(f"warning: class ids instead of names: {error}", file=sys.stderr)
        return None


def _top5(model, image, names=None):
    probabilities = np.asarray(model(image[None].astype("float32")))[0]
    if probabilities.min() < 0 or abs(probabilities.sum() - 1) > 1e-3:
        probabilities = np.exp(probabilities - probabilities.max())
        probabilities /= probabilities.sum()
    best = np.argsort(-probabilities)[:5]
    if names is not None and len(probabilities) == len(names):
        return [f"{names[str(i)][1]} {_percent(probabilities[i])}" for i in best]
    return [f"class {i} {_percent(probabilities[i])}" for i in best]


def _percent(probability):
    """A probability as a percentage to three significant digits (87.3%, 0.123%): a model
    that is unsure among 1000 classes gives each well under 1%."""
    percent = 100 * float(probability)
    if not np.isfinite(percent):
        return "nan"
    return f"{percent:.3g}%" if percent >= 0.001 else "<0.001%"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_t2t.explain",
        description="Writes attention-rollout and T2T feature-map pictures (PNG) per image.",
    )
    parser.add_argument(
        "images",
        nargs="+",
        help="JPEG, PNG, GIF, BMP or WebP files. The pictures are named after each file's name "
        "without its extension (photo.jpg: photo_rollout.png, photo_t2t_maps.png); two images "
        "with the same name (a/x.jpg and b/x.jpg, x.jpg and x.png) are refused before "
        "anything is written, never overwritten",
    )
    parser.add_argument("--model", help="variant, e.g. t2t_vit_7 (default: the run's)")
    parser.add_argument(
        "--weights", help="imagenet, a .pth.tar / .weights.h5 file or a run's --model_dir"
    )
    parser.add_argument("--image_size", type=int, help="default: that of the weights, or 224")
    parser.add_argument("--crop_pct", type=float, help="default: as the weights were evaluated")
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    args = parser.parse_args(argv)
    try:
        images = _output_names(args.images)  # refused before the model is built
        for path, _ in images:
            reason = _read_error(path)
            if reason:
                raise ValueError(reason)
        plt = _pyplot()
        del plt
        from keras_t2t import export
        from keras_t2t.models import model_for_command_line

        model = model_for_command_line(args.model, args.weights, args.image_size)
        crop_pct = args.crop_pct or export.serving_crop_pct(model, args.weights)
        os.makedirs(args.output, exist_ok=True)
        names = _class_names(model) if args.weights else None  # once, for all the images
        for path, name in images:
            image = _load_image(path, model.input_shape[1], crop_pct)
            top = _top5(model, image, names) if args.weights else None
            for written in write_pictures(model, image, name, args.output, top):
                print(written)
            if top:
                print(f"{path}: {', '.join(top)}")
    except (ValueError, ImportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
