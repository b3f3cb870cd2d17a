"""Loading of official T2T-ViT checkpoints and Keras `.weights.h5` files.

Official checkpoints (`.pth.tar`, `.pth`) are read without torch by
`keras_t2t.pytorch_checkpoint`, whose restricted unpickler builds tensors, OrderedDicts and
plain values only: a file from the internet can never run code. Their tensors are mapped once
to the Keras layout: Linear weights transposed, and the patch axis of the layers that read a
soft-split vector (`norm1` and `kqv`/`qkv` of both T2T layers, `project`) permuted from
PyTorch's channel-major unfold order to the order of `tf.image.extract_patches`.

A `.weights.h5` is read from its datasets, each under the path of its variable, after its
metadata is checked (`read_keras_weights`). Either file gives a "state" without building a
model: a dict from Keras variable paths (`blocks_0/attn/qkv/kernel`) to NumPy arrays.
`assign_state` puts one into a model, leaving out a head that does not fit, interpolating a
position table of another size, and failing with the names of every missing, unexpected or
mis-shaped tensor. This module imports no builder: `models` imports it.
"""

import dataclasses
import json
import logging
import math
import os
import re

import numpy as np

from keras_t2t import pytorch_checkpoint
from keras_t2t.configs import MODEL_CONFIGS, SOFT_SPLITS, variant_config
from keras_t2t.layers import TORCH_BICUBIC_A, patch_permutation

logger = logging.getLogger("keras_t2t")

OFFICIAL_SUFFIXES = (".pth.tar", ".pth", ".pt", ".tar")
# What training/train_imagenet.py leaves in its model_dir, recorded in its config.json.
RUN_WEIGHTS = {"raw": "model.weights.h5", "ema": "model_ema.weights.h5"}
RUN_RECORD_KEY = "saved_weights"  # where config.json records them (and which scored better)
KERAS_SUFFIX = ".weights.h5"
STATE_DICT_KEYS = ("state_dict_ema", "state_dict", "model", "net")
POS_EMBED = "pos_embed/pos_embed"
HEAD_KERNEL = "head/kernel"
# The soft split read by attention1 / attention2, and by the project layer.
KERNEL_SIDES = {stage + 1: kernel for stage, (kernel, _, _) in enumerate(SOFT_SPLITS)}


@dataclasses.dataclass
class WeightsState:
    """Weights in the Keras layout, and what the file says of the model it fits."""

    arrays: dict
    source: str
    names: dict  # Keras path -> name in the file, for messages
    file_shapes: dict = dataclasses.field(default_factory=dict)  # Keras path -> shape in the file
    image_size: int = None
    classes: int = None
    config: dict = None  # architecture inferred from the tensors (num_heads excluded)
    # The `pretrained.Release` the model is made from, where known: the builder takes the
    # normalization of its inputs from it (a preset's metadata.json records it).
    release: object = None

    @property
    def variant(self):
        return guess_variant(self.config) if self.config else None


def check_path(weights):
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"`weights` must be None or a path to a file, received {weights!r}.")
    path = os.fspath(weights)
    if os.path.isdir(path):
        return run_weights(path)[0]
    if not os.path.isfile(path):
        raise ValueError(
            f"The weights file {path!r} does not exist. Pass None for random weights, "
            f"'imagenet' (or 'cifar10' / 'cifar100' where released) for the official weights, "
            f"the path of an official checkpoint (.pth.tar / .pth) or of a Keras .weights.h5 "
            f"file, or the --model_dir of a training run."
        )
    return path


def run_weights(folder):
    """(weights file, run config) of a `training/train_imagenet.py` model_dir.

    The file is the one that scored better at the run's last evaluation (raw or EMA), as
    its config.json records; the raw weights when the run was not evaluated.
    """
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"`weights` is a folder, {folder!r}, but not the --model_dir of a training run (no "
            f"config.json); pass a file: an official checkpoint (.pth.tar / .pth) or a Keras "
            f".weights.h5."
        )
    try:
        with open(path) as f:
            run = json.load(f)
    except ValueError as error:
        raise ValueError(f"{path} is not readable JSON ({error}).") from None
    written = run.get(RUN_RECORD_KEY) if isinstance(run, dict) else None
    if not isinstance(written, dict):
        raise ValueError(
            f"{folder!r} holds a training run without a finished model: "
            f"training/train_imagenet.py writes {RUN_WEIGHTS['raw']} and {RUN_WEIGHTS['ema']} "
            f"at each evaluation and at the end. Let it run to an evaluation, or pass a file."
        )
    choice = written.get("best") or "raw"
    file = os.path.join(folder, written.get(choice, RUN_WEIGHTS[choice]))
    if not os.path.isfile(file):
        raise ValueError(f"{folder!r}: its config.json names {file!r}, which does not exist.")
    logger.info("Using the %s weights of the run in %s: %s.", choice, folder, file)
    return file, run


def run_architecture(weights, model=None, image_size=None, classes=None):
    """(variant, image size, classes): those given, else those of the training run when
    `weights` is a run's model_dir (for command lines that take either)."""
    if weights is not None and os.path.isdir(os.fspath(weights)):
        run = run_weights(os.fspath(weights))[1]
        model = model or run.get("model")
        image_size = image_size or run.get("image_size")
        classes = classes or run.get("num_classes")
    return model, image_size, classes


def read_weights(weights, config):
    """Reads `weights` (a path) into a `WeightsState` for a model of `config`."""
    path = check_path(weights)
    lower = path.lower()
    if lower.endswith(KERAS_SUFFIX):
        return read_keras_weights(path, config)
    if lower.endswith(OFFICIAL_SUFFIXES):
        return official_to_state(read_official_checkpoint(path), source=path)
    raise ValueError(
        f"Cannot tell the format of {path!r} from its name. Official checkpoints end in "
        f"{', '.join(OFFICIAL_SUFFIXES)}; Keras weights end in {KERAS_SUFFIX}."
    )


# --- official checkpoints ------------------------------------------------------------------


def unwrap_state_dict(checkpoint):
    """The state dict inside any official container, without a `module.` prefix.

    Containers: `state_dict_ema` (preferred: the released weights are the EMA ones),
    `state_dict`, `model`, `net`, or a bare state dict.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"An official checkpoint holds a dict, this file holds a {type(checkpoint).__name__}."
        )
    for key in STATE_DICT_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state = {}
    for key, value in checkpoint.items():
        if not hasattr(value, "shape"):
            continue  # epoch counters, args and the like beside the tensors
        state[key[len("module.") :] if key.startswith("module.") else key] = value
    if not state:
        raise ValueError(
            f"Found no tensors in the checkpoint (its keys: {sorted(checkpoint)[:10]}). "
            f"Expected a state dict, or one under {', '.join(STATE_DICT_KEYS)}."
        )
    return state


def read_official_checkpoint(path):
    """Reads an official checkpoint into `{name: float32 ndarray}`, without torch.

    `keras_t2t.pytorch_checkpoint` reads both PyTorch formats with a restricted unpickler:
    nothing in the file can run code.
    """
    try:
        checkpoint = pytorch_checkpoint.load(path)
    except (ValueError, OSError) as error:
        raise ValueError(f"Could not read {path!r} as a PyTorch checkpoint: {error}") from None
    state = unwrap_state_dict(checkpoint)
    return {key: np.asarray(value, dtype=np.float32) for key, value in state.items()}


def infer_config(state_dict):
    """Architecture of an official state dict (num_heads cannot be seen in the tensors)."""
    try:
        embed_dim = state_dict["cls_token"].shape[-1]
        tokens = state_dict["pos_embed"].shape[1] - 1
        project = state_dict["tokens_to_token.project.weight"]
    except KeyError as error:
        raise ValueError(
            f"This does not look like a T2T-ViT checkpoint: it has no {error.args[0]!r} tensor "
            f"(its first keys: {sorted(state_dict)[:6]})."
        ) from None
    depth = 1 + max(
        (int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))),
        default=-1,
    )
    performer = "tokens_to_token.attention1.w" in state_dict
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    head = state_dict.get("head.weight")
    side = math.isqrt(tokens)
    return dict(
        tokens_type="performer" if performer else "transformer",
        embed_dim=int(embed_dim),
        depth=depth,
        mlp_ratio=None if fc1 is None else fc1.shape[0] / embed_dim,
        token_dim=int(project.shape[1] // 9),
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        classes=None if head is None else int(head.shape[0]),
        image_size=int(side * 16) if side * side == tokens else None,
    )


def guess_variant(config):
    """The official variant name whose architecture matches `config`, or None."""

    keys = ("tokens_type", "embed_dim", "depth", "mlp_ratio")
    for name, row in MODEL_CONFIGS.items():
        if "_resnext" in name or "_wide" in name:
            continue  # same shapes as a released variant; prefer the released one
        if all(config.get(key) == row[key] for key in keys):
            return name
    for name, row in MODEL_CONFIGS.items():
        if all(config.get(key) == row[key] for key in keys):
            return name
    return None


def check_architecture(state, architecture):
    """Raises ValueError when `state`, read from an official checkpoint, is of another
    architecture than `architecture` (builder arguments), as far as its tensors show it (the
    heads cannot be seen); `assign_state` checks every tensor when it goes into a model."""
    if not state.config or not architecture:
        return
    expected = dict(token_dim=64, qkv_bias=False)
    expected.update(architecture)
    keys = ("tokens_type", "embed_dim", "depth", "mlp_ratio", "token_dim", "qkv_bias")
    differ = [
        f"{key} {state.config.get(key)!r} (expected {expected[key]!r})"
        for key in keys
        if key in expected and state.config.get(key) != expected[key]
    ]
    if differ:
        raise ValueError(f"Its tensors are of another architecture: {', '.join(differ)}.")


def resolve_architecture(found, model=None, num_heads=None, source="the checkpoint"):
    """(variant name or None, builder arguments) for a checkpoint of config `found`.

    `model` names the variant (default: the official variant whose shapes match);
    `num_heads` overrides the heads, and alone describes a custom architecture.
    """

    if model is None:
        model = guess_variant(found)
    if model is not None:
        model, arch = variant_config(model)
        if num_heads is not None:
            arch["num_heads"] = num_heads
        return model, arch
    if num_heads is None:
        raise ValueError(
            f"{source} matches no official variant (found {found}). Pass --model NAME, or "
            f"--num_heads N for a custom architecture (heads cannot be seen in the tensors)."
        )
    arch = {k: found[k] for k in ("tokens_type", "embed_dim", "depth", "mlp_ratio", "token_dim")}
    arch.update(num_heads=num_heads, qkv_bias=found["qkv_bias"])
    return None, arch


def _keras_path(key):
    """Official tensor name -> (Keras variable path, is_dense_kernel)."""
    if key in ("cls_token", "pos_embed"):
        return {"cls_token": "cls_token/token", "pos_embed": POS_EMBED}[key], False
    path = key.replace("tokens_to_token.", "tokens_to_token/")
    path = re.sub(r"^blocks\.(\d+)\.", r"blocks_\1/", path)
    path = re.sub(r"(attention\d)\.attn\.", r"\1.", path)  # transformer T2T: attn.qkv -> qkv
    path = path.replace("mlp.0.", "mlp.fc1.").replace("mlp.2.", "mlp.fc2.")
    *module, param = path.split(".")
    module = "/".join(module)
    is_norm = re.search(r"(^|/)norm\d?$", module) is not None
    if param == "w":
        return f"{module}/w", False
    if param == "weight":
        return f"{module}/{'gamma' if is_norm else 'kernel'}", not is_norm
    if param == "bias":
        return f"{module}/{'beta' if is_norm else 'bias'}", False
    raise ValueError(f"Unexpected tensor name {key!r} in the checkpoint.")


def _patch_reader(key, in_channels, token_dim):
    """(channels, kernel) of the soft split whose vectors `key` reads, or None."""
    match = re.match(
        r"tokens_to_token\.attention(\d)\.(norm1\.|kqv\.weight|attn\.qkv\.weight)", key
    )
    if match:
        stage = int(match.group(1))
        return (in_channels if stage == 1 else token_dim), KERNEL_SIDES[stage]
    if key == "tokens_to_token.project.weight":
        return token_dim, KERNEL_SIDES[3]
    return None


def official_to_state(state_dict, source="state dict"):
    """Maps an official state dict (`{name: ndarray}`) to a `WeightsState` in Keras layout."""
    config = infer_config(state_dict)
    token_dim = config["token_dim"]
    in_channels = state_dict["tokens_to_token.attention1.norm1.weight"].shape[0] // (
        KERNEL_SIDES[1] ** 2
    )
    arrays, names, file_shapes = {}, {}, {}
    for key, value in state_dict.items():
        path, is_kernel = _keras_path(key)
        value = np.asarray(value, dtype="float32")
        if is_kernel:
            value = value.T
        reader = _patch_reader(key, in_channels, token_dim)
        if reader is not None:
            value = value[patch_permutation(*reader)]
        arrays[path] = np.ascontiguousarray(value)
        names[path] = key
        file_shapes[path] = tuple(np.shape(state_dict[key]))
    return WeightsState(
        arrays=arrays,
        source=source,
        names=names,
        file_shapes=file_shapes,
        image_size=config["image_size"],
        classes=config["classes"],
        config=config,
    )


# --- Keras .weights.h5 ----------------------------------------------------------------------
#
# `model.save_weights` writes the variables of each layer as the datasets `vars/0`, `vars/1`,
# ... of a group `layers/<top-level layer>/<attribute>/...`: a top-level group is named after
# the layer's class in snake case (repeats numbered `_1`, `_2`, ... in model order), a nested
# one after the attribute that holds the layer (in keras_t2t, the layer's own name), and each
# `vars` group records its layer's name in its `name` attribute. A variable's path is the
# names of the layers on the way joined by "/", then the variable's own name (`kernel`, ...),
# which is known from its position in `vars` and the kind of layer. So a file is read into a
# state without building a model, and its every tensor is checked before it is read.

H5_LAYERS = "layers"  # the group of a functional model's layers
# The top-level layers of a T2TViT: their group in a .weights.h5 -> their name in the model.
# For files whose `vars` groups do not record the names, and to write the cache of a release.
H5_TOP_LEVEL = {
    "t2t_module": "tokens_to_token",
    "class_token": "cls_token",
    "position_embedding": "pos_embed",
    "layer_norm": "norm",
    "dense": "head",
}
_H5_BLOCK = re.compile(r"transformer_block(?:_([1-9][0-9]*))?")  # blocks_0, blocks_1, ...
_H5_BLOCK_NAME = re.compile(r"blocks_(0|[1-9][0-9]*)")
_LAYER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")
# The variables of a layer in the order Keras stores them, by the layer's name: the layer
# norms, the performer's frozen random features, the class token, the position table, and
# the Dense layers (kqv, qkv, proj, fc1, fc2, project, head; qkv without a bias).
_VARIABLE_NAMES = (
    (re.compile(r"norm[0-9]*"), ("gamma", "beta")),
    (re.compile(r"attention[0-9]"), ("w",)),
    (re.compile(r"cls_token"), ("token",)),
    (re.compile(r"pos_embed"), ("pos_embed",)),
    (re.compile(r".+"), ("kernel", "bias")),
)
# Groups of a .weights.h5 that are no layer's: a compiled model's optimizer state.
_NOT_WEIGHTS = ("optimizer/",)
# The largest position table a .weights.h5 may declare: a 64 x 64 token grid, 1024 x 1024
# pixels (the releases are 224 and 384). A model built without `input_shape` takes the size of
# its weights, so the bound is checked before any tensor is read.
MAX_POSITION_SIDE = 64
_EXPECTED_H5 = (
    "Expected a .weights.h5 saved from a keras_t2t model (`model.save_weights`) or written by "
    "`python -m keras_t2t.convert`."
)


def _variable_name(layer, index):
    names = next(names for pattern, names in _VARIABLE_NAMES if pattern.fullmatch(layer))
    return names[index] if index < len(names) else f"vars/{index}"  # reported as unexpected


def _h5_variable_path(dataset, layer_names):
    """The variable path (`blocks_0/attn/qkv/kernel`) of the dataset `dataset`
    (`layers/transformer_block/attn/qkv/vars/0`) of a .weights.h5, given the layer names its
    `vars` groups record (`{group: name}`); None for a dataset that is not a layer's."""
    parts = dataset.split("/")
    if (
        len(parts) < 4
        or parts[0] != H5_LAYERS
        or parts[-2] != "vars"
        or not parts[-1].isdigit()
        or len(parts[-1]) > 6
    ):
        return None
    groups, names = parts[1:-2], []
    for depth, group in enumerate(groups):
        name = layer_names.get("/".join([H5_LAYERS, *groups[: depth + 1]]))
        if name is None and depth == 0:
            block = _H5_BLOCK.fullmatch(group)
            name = f"blocks_{block.group(1) or 0}" if block else H5_TOP_LEVEL.get(group, group)
        names.append(name or group)
    return "/".join([*names, _variable_name(names[-1], int(parts[-1]))])


def _h5_dataset(path):
    """The dataset of a .weights.h5 in Keras' layout that holds the variable `path`: the
    inverse of `_h5_variable_path`, for the variables of a T2TViT. Returns (dataset, the
    layer names of its groups)."""
    *layers, variable = path.split("/")
    block = _H5_BLOCK_NAME.fullmatch(layers[0]) if layers else None
    if block:
        group = "transformer_block" + ("" if block.group(1) == "0" else f"_{block.group(1)}")
    else:
        group = next((g for g, name in H5_TOP_LEVEL.items() if layers and name == layers[0]), None)
    if group is None or not all(_LAYER_NAME.fullmatch(layer) for layer in layers):
        raise ValueError(f"{path!r} is not the path of a keras_t2t T2TViT variable.")
    names = next(names for pattern, names in _VARIABLE_NAMES if pattern.fullmatch(layers[-1]))
    if variable not in names:
        raise ValueError(f"{path!r} is not the path of a keras_t2t T2TViT variable.")
    groups = [group, *layers[1:]]
    named = {
        "/".join([H5_LAYERS, *groups[: depth + 1]]): layers[depth] for depth in range(len(groups))
    }
    dataset = "/".join([H5_LAYERS, *groups, "vars", str(names.index(variable))])
    return dataset, named


def write_keras_weights(state, path):
    """Writes `state` as a `.weights.h5` in Keras' layout, as `model.save_weights` of a
    T2TViT would: `model.load_weights` and `read_keras_weights` both read it. No model is
    built."""
    import h5py

    with h5py.File(path, "w") as f:
        for variable, array in sorted(state.arrays.items()):
            dataset, named = _h5_dataset(variable)
            for group, name in named.items():
                f.require_group(f"{group}/vars").attrs["name"] = name
            f.create_dataset(dataset, data=np.asarray(array, np.float32))


def _name_attribute(group):
    """The layer name a `vars` group records, or None where it records none that is valid."""
    if "name" not in group.attrs:
        return None
    attribute = group.attrs.get_id("name")
    if attribute.shape != () or attribute.get_storage_size() > 1024:
        return None
    name = group.attrs["name"]
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name if isinstance(name, str) and _LAYER_NAME.fullmatch(name) else None


def _inspect_keras_weights(f, path, file_size, embed_dim):
    """The checks of `keras_weights_info` on the open file `f`; returns (position table
    shape, head kernel shape or None, has preprocessing, datasets, `{variable path: dataset}`,
    datasets that are no layer's variables)."""
    import h5py

    datasets, layer_names = {}, {}

    def collect(name, item):
        if isinstance(item, h5py.Dataset):
            datasets[name] = _dataset_info(item, file_size)
        elif name.endswith("/vars") and isinstance(item, h5py.Group):
            layer_names[name[: -len("/vars")]] = _name_attribute(item)

    f.visititems(collect)
    has_preprocessing = "rescaling" in f.get(H5_LAYERS, {})
    for name, (shape, numeric, problem) in datasets.items():
        if not numeric or problem:
            raise ValueError(
                f"{path!r} is not a weights file this loader accepts: its tensor {name} "
                f"(declared shape {shape}) is "
                f"{'not numeric' if not numeric else f'not stored whole in the file: {problem}'}"
                f". Keras writes every tensor as a plain array inside the file; the file was "
                f"altered or crafted."
            )
    paths, skipped = {}, []
    for name in sorted(datasets):
        variable = _h5_variable_path(name, layer_names)
        if variable is None and name.startswith(_NOT_WEIGHTS):
            skipped.append(name)
            continue
        variable = variable or name  # no layer's: reported as unexpected by `assign_state`
        if variable in paths:
            raise ValueError(
                f"{path!r} holds two tensors of the variable {variable}: {paths[variable]} and "
                f"{name}. {_EXPECTED_H5}"
            )
        paths[variable] = name
    if POS_EMBED not in paths:
        raise ValueError(
            f"{path!r} holds no keras_t2t position table ({POS_EMBED}). {_EXPECTED_H5}"
        )
    pos_shape = datasets[paths[POS_EMBED]][0]
    tokens = pos_shape[1] - 1 if len(pos_shape) == 3 else -1
    if (
        len(pos_shape) != 3
        or pos_shape[0] != 1
        or tokens < 1
        or math.isqrt(tokens) ** 2 != tokens
        or (embed_dim is not None and pos_shape[2] != embed_dim)
    ):
        raise ValueError(
            f"The position table in {path!r} has shape {pos_shape}; a model of width "
            f"{embed_dim or 'D'} needs (1, 1 + n * n, {embed_dim or 'D'})."
        )
    if math.isqrt(tokens) > MAX_POSITION_SIDE:
        side = math.isqrt(tokens)
        raise ValueError(
            f"The position table in {path!r} has shape {pos_shape}: a {side} x {side} token "
            f"grid ({16 * side} x {16 * side} pixels). This loader takes at most "
            f"{MAX_POSITION_SIDE} x {MAX_POSITION_SIDE} ({16 * MAX_POSITION_SIDE} pixels)."
        )
    head_shape = datasets[paths[HEAD_KERNEL]][0] if HEAD_KERNEL in paths else None
    if head_shape is not None and (
        len(head_shape) != 2 or (embed_dim is not None and head_shape[0] != embed_dim)
    ):
        raise ValueError(
            f"The head in {path!r} has shape {head_shape}; a model of width "
            f"{embed_dim or 'D'} needs ({embed_dim or 'D'}, classes)."
        )
    return pos_shape, head_shape, has_preprocessing, datasets, paths, skipped


def _open_keras_weights(path, embed_dim, read):
    """`_inspect_keras_weights` of the file at `path`, and `{variable path: array}` if `read`."""
    import h5py

    try:
        file_size = os.path.getsize(path)
    except OSError as error:
        raise ValueError(f"Could not read {path!r} as keras_t2t weights ({error}).") from None
    try:
        with h5py.File(path, "r") as f:
            info = _inspect_keras_weights(f, path, file_size, embed_dim)
            # Every tensor is stored whole in the file: reading them all takes at most the
            # file's size.
            arrays = None
            if read:
                arrays = {p: np.asarray(f[d][()], np.float32) for p, d in info[4].items()}
    except (OSError, KeyError, RuntimeError) as error:  # h5py: KeyError for a damaged object
        raise ValueError(
            f"Could not read {path!r} as keras_t2t weights ({error}). {_EXPECTED_H5}"
        ) from error
    return info, arrays


def keras_weights_info(path, embed_dim=None):
    """(position table shape, head kernel shape or None, has preprocessing, `{dataset: (shape,
    numeric, None or why it is not stored whole)}`) of a .weights.h5.

    Reads the file's metadata only, and checks it before any tensor is read: every tensor is
    a numeric array stored whole in the file (as Keras writes them: contiguous, or compact in
    its header; not chunked, compressed, virtual, in external files or left unallocated, and
    its bytes within the file's length), so that no declared shape can make the loader
    allocate more than the file holds; the position table is `(1, 1 + n * n, embed_dim)` with
    n at most `MAX_POSITION_SIDE`, and the head `(embed_dim, classes)`.
    """
    return _open_keras_weights(path, embed_dim, read=False)[0][:4]


def _dataset_info(dataset, file_size):
    """(declared shape, numeric, None or why it is not stored whole) of an h5py dataset, from
    its metadata: its bytes must all lie in the file (of `file_size` bytes)."""
    import h5py

    shape = tuple(int(d) for d in dataset.shape)
    numeric = dataset.dtype.kind in "fiub"
    declared = int(np.prod(shape, dtype=np.int64)) * dataset.dtype.itemsize if numeric else -1
    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    if plist.get_external_count() > 0:
        return shape, numeric, "its data is in external files"
    if layout == getattr(h5py.h5d, "VIRTUAL", None) or dataset.is_virtual:
        return shape, numeric, "a virtual dataset (its data is in other files)"
    if layout == h5py.h5d.CHUNKED or dataset.chunks is not None:
        return shape, numeric, "chunked (or compressed)"
    if dataset.id.get_storage_size() != declared:
        return (
            shape,
            numeric,
            (f"{dataset.id.get_storage_size():,} bytes are stored of the {declared:,} declared"),
        )
    if layout == h5py.h5d.COMPACT:  # in the object header, at most 64 KiB
        return shape, numeric, None
    if layout != h5py.h5d.CONTIGUOUS:
        return shape, numeric, f"of an unknown storage layout ({layout})"
    offset = dataset.id.get_offset()
    if declared > 0 and (offset is None or offset < 0 or offset + declared > file_size):
        where = "not allocated" if offset is None else f"at offset {offset:,}"
        return (
            shape,
            numeric,
            (f"its {declared:,} bytes, {where}, do not lie within the file's {file_size:,} bytes"),
        )
    return shape, numeric, None


def read_keras_weights(path, config=None):
    """Reads a `.weights.h5` written by a keras_t2t model into a `WeightsState`, with no model.

    The file's metadata is checked first (`keras_weights_info`; the width of the position
    table and the head against `config["embed_dim"]` where given), then each tensor is read
    under the path of its variable. A compiled model's optimizer state is left out. Whether
    the tensors fit a model is `assign_state`'s to check, which names every one that does not.
    """
    embed_dim = (config or {}).get("embed_dim")
    (pos_shape, head_shape, _, _, _, skipped), arrays = _open_keras_weights(path, embed_dim, True)
    if skipped:
        logger.info(
            "Left out the %d tensors of %s that are no layer's (%s, ...).",
            len(skipped),
            path,
            skipped[0],
        )
    return WeightsState(
        arrays=arrays,
        source=path,
        names={p: p for p in arrays},
        image_size=16 * math.isqrt(pos_shape[1] - 1),
        classes=None if head_shape is None else head_shape[1],
    )


# --- assignment -----------------------------------------------------------------------------


def bicubic_resize(grid, size, a=TORCH_BICUBIC_A):
    """Resizes `(height, width, channels)` to `size` as PyTorch does: `(size, size,
    channels)` for an int, `(*size, channels)` for a pair `(out_height, out_width)`.

    `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`: cubic convolution
    with coefficient `a` = -0.75 (TF's bicubic uses -0.5), source coordinates
    `(out + 0.5) * in / out - 0.5` (not clamped), and taps beyond the border clamped to it.
    In float64; `keras_t2t.layers.bicubic_matrix` is the same resize in a graph.
    """
    grid = np.asarray(grid, np.float64)
    sizes = (size, size) if np.ndim(size) == 0 else tuple(size)
    for axis, size in zip((0, 1), sizes):
        length = grid.shape[axis]
        source = (np.arange(size) + 0.5) * (length / size) - 0.5
        base = np.floor(source).astype(int)
        t = source - base
        # Keys' cubic convolution weights of the taps base-1 .. base+2.
        distances = np.stack([t + 1, t, 1 - t, 2 - t])
        near = ((a + 2) * distances - (a + 3)) * distances**2 + 1
        far = ((a * distances - 5 * a) * distances + 8 * a) * distances - 4 * a
        weights = np.where(distances <= 1, near, far)  # (4, size)
        taps = np.clip(base[None] + np.arange(-1, 3)[:, None], 0, length - 1)  # (4, size)
        moved = np.moveaxis(grid, axis, 0)
        resized = np.einsum("ks,ks...->s...", weights, moved[taps])
        grid = np.moveaxis(resized, 0, axis)
    return grid


def _square_side(tokens):
    side = math.isqrt(tokens)
    return side if side * side == tokens else None


def interpolate_pos_embed(table, tokens, grid=None, old_grid=None):
    """Resizes a `(1, 1 + h*w, D)` position table to `1 + tokens` rows.

    As the official fine-tuning code (`resize_pos_embed`): the class row is kept, the token
    grid is resized with PyTorch's bicubic (`bicubic_resize`). The grids are square unless
    given: `grid` `(height, width)` of the new table (of `tokens` tokens), `old_grid` of
    `table`.
    """
    old = table.shape[1] - 1
    if old_grid is None and _square_side(old) is not None:
        old_grid = (_square_side(old),) * 2
    if grid is None and _square_side(tokens) is not None:
        grid = (_square_side(tokens),) * 2
    if old_grid is None or grid is None or math.prod(old_grid) != old or math.prod(grid) != tokens:
        raise ValueError(
            f"Cannot interpolate a position table of {old} tokens (grid {old_grid}) to "
            f"{tokens} tokens (grid {grid}): the grids must be given where they are not "
            f"square, and hold the tokens."
        )
    grid_rows = bicubic_resize(table[0, 1:].reshape(*old_grid, -1), grid)
    rows = np.concatenate([table[0, :1], grid_rows.reshape(tokens, -1)], axis=0)
    return rows[None].astype(table.dtype)


def _file_layout(path, shape):
    """A Keras variable shape in the official layout (Linear weights are transposed)."""
    return shape[::-1] if path.endswith("/kernel") else shape


def _table_grid(model, tokens):
    """(height, width) of the token grid of `model`'s position table of `tokens` tokens: its
    layer's `grid_size` (a model of non-square images), else the square one."""
    layer = next((x for x in model.layers if x.name == "pos_embed"), None)
    grid = getattr(layer, "grid_size", None)
    return tuple(grid) if grid is not None else (math.isqrt(tokens),) * 2


def assign_state(model, state):
    """Assigns `state` to `model`, strictly; see the module docstring."""
    variables = {v.path: v for v in model.weights}
    arrays = dict(state.arrays)

    head = [path for path in arrays if path.startswith("head/")]
    if head:
        if HEAD_KERNEL not in variables:
            logger.warning(
                "The head in %s (%s classes) is not loaded: the model has no head.",
                state.source,
                state.classes,
            )
            arrays = {p: a for p, a in arrays.items() if p not in head}
        elif tuple(variables[HEAD_KERNEL].shape) != arrays[HEAD_KERNEL].shape:
            file_shape, model_shape = arrays[HEAD_KERNEL].shape, tuple(variables[HEAD_KERNEL].shape)
            logger.warning(
                "The head in %s is not loaded: %s. The new head keeps its random initialization.",
                state.source,
                f"it has {file_shape[1]} classes, the model {model_shape[1]}"
                if file_shape[1] != model_shape[1]
                else f"its kernel is {file_shape}, the model's {model_shape}",
            )
            arrays = {p: a for p, a in arrays.items() if p not in head}
            variables = {p: v for p, v in variables.items() if not p.startswith("head/")}
    elif HEAD_KERNEL in variables:
        logger.warning(
            "%s has no head: the model's head keeps its random initialization.", state.source
        )
        variables = {p: v for p, v in variables.items() if not p.startswith("head/")}

    if POS_EMBED in arrays and POS_EMBED in variables:
        old, new = arrays[POS_EMBED].shape, tuple(variables[POS_EMBED].shape)
        if old != new and old[2] == new[2]:
            grid = _table_grid(model, new[1] - 1)
            old_side = math.isqrt(old[1] - 1)
            logger.warning(
                "Interpolating the position table of %s from %d to %d tokens (bicubic, class "
                "row kept): the file was trained at %dx%d, the model takes %dx%d.",
                state.source,
                old[1] - 1,
                new[1] - 1,
                16 * old_side,
                16 * old_side,
                16 * grid[0],
                16 * grid[1],
            )
            arrays[POS_EMBED] = interpolate_pos_embed(arrays[POS_EMBED], new[1] - 1, grid)

    name = state.names.get
    missing = [p for p in variables if p not in arrays]
    unexpected = [name(p, p) for p in arrays if p not in variables]
    mismatched = [
        f"{name(p, p)}: file {state.file_shapes.get(p, arrays[p].shape)}, model "
        f"{tuple(v.shape) if p not in state.file_shapes else _file_layout(p, tuple(v.shape))}"
        for p, v in variables.items()
        if p in arrays and arrays[p].shape != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing from the file ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected in the file ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            problems.append(f"of another shape ({len(mismatched)}): {'; '.join(mismatched)}")
        variant = state.variant
        seems = f" The file looks like {variant!r}." if variant else ""
        raise ValueError(
            f"The weights in {state.source} do not fit the model {model.name!r}.{seems} "
            f"Tensors " + ". Tensors ".join(problems) + "."
        )
    for path, variable in variables.items():
        variable.assign(arrays[path])
