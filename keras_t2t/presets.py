"""Presets: a model's builder arguments and weights in one folder, published once and loaded
anywhere, with no torch and no conversion step. KerasHub's layout:

- `config.json`: how to build the model again, `{"module": "keras_t2t", "class_name":
  "T2TViT", "config": {the T2TViT arguments}, "variant": "t2t_vit_14" or null}`;
- `model.weights.h5`: `model.save_weights`;
- `metadata.json`: the Keras and keras-t2t versions, the parameter count, the date, the sha256
  of `model.weights.h5` (checked on loading), the `release` the model was made from (a row of
  `keras_t2t.pretrained.RELEASES`: its variant, image size, mean, std, crop, interpolation,
  top-1; the model takes its normalization from it) and the `source` of the weights (file
  name, sha384, official URL and license; `"license": "unknown"` and no URL unless they are a
  release's file unchanged).

`save_preset(model, path, release=None)` writes one; `python -m keras_t2t.convert --preset
DIR` writes one for every official checkpoint or release it is given. `from_preset(uri,
**overrides)` (also `keras_t2t.T2TViT14.from_preset(uri)` and the other builders', which check
the preset is of their variant) builds the model from a local folder, `file://` or `http(s)://`
(a mirror serving the three files; downloaded once into Keras' cache, `$KERAS_HOME/models/
keras_t2t/presets`), `gs://` (through TensorFlow's `tf.io.gfile`), `hf://owner/name` or
`kaggle://owner/model/framework/variant` (through `huggingface_hub` / `kagglehub` and their
own caches, when installed). `overrides` are the builder's keyword arguments: other `classes`
or `include_top=False` leave the head out, another `input_shape` interpolates the position
table, as `weights=` does.

>>> import os, tempfile, numpy as np, keras_t2t
>>> model = keras_t2t.T2TViT(embed_dim=64, depth=2, num_heads=2, input_shape=(32, 32, 3), classes=4)
>>> folder = os.path.join(tempfile.mkdtemp(), "tiny_digits")
>>> keras_t2t.save_preset(model, folder)
>>> sorted(os.listdir(folder))
['config.json', 'metadata.json', 'model.weights.h5']
>>> again = keras_t2t.from_preset(folder)  # keras_t2t.T2TViT14.from_preset(...) for a variant's
>>> x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
>>> bool(np.allclose(again(x), model(x), atol=1e-6))
True
"""

import dataclasses
import datetime
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re

import keras

from keras_t2t import models, pretrained
from keras_t2t import weights as weights_lib
from keras_t2t.configs import DEFAULT_IMAGE_SIZE, variant_of
from keras_t2t.download import DownloadError, fetch, file_digest, remove_file
from keras_t2t.imagenet import IMAGENET_MEAN, IMAGENET_STD
from keras_t2t.version import __version__

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "metadata.json"
PRESET_FILES = (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE)
BUILDER = {"module": "keras_t2t", "class_name": "T2TViT"}  # config.json's builder
CACHE_SUBDIR = "presets"  # under pretrained.cache_dir(), for http(s)://, file:// and gs://
URI_FORMS = (
    "a local folder, file://, http(s)://, gs://, hf://owner/name or "
    "kaggle://owner/model/framework/variant"
)
_WHAT_A_PRESET_IS = (
    f"A preset is a folder holding {', '.join(PRESET_FILES)}, as keras_t2t.save_preset and "
    f"`python -m keras_t2t.convert --preset DIR` write it."
)
_SIGNATURE = inspect.signature(models.T2TViT).parameters.values()
# The architecture is the builder's positional arguments; the rest may be overridden.
ARCHITECTURE = tuple(p.name for p in _SIGNATURE if p.kind is p.POSITIONAL_OR_KEYWORD)
OVERRIDABLE = tuple(p.name for p in _SIGNATURE if p.kind is p.KEYWORD_ONLY and p.name != "weights")


# --- writing --------------------------------------------------------------------------------


def preset_name(release=None, source=None):
    """The folder name of a preset: `t2t_vit_14_imagenet` (`_384` where the release's size is
    not 224) for a release, else the stem of the `source` file."""
    if release is not None:
        size = "" if release.image_size == DEFAULT_IMAGE_SIZE else f"_{release.image_size}"
        return f"{release.model}_{release.weights}{size}"
    name = os.path.basename(os.fspath(source))
    for suffix in weights_lib.OFFICIAL_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _json_value(key, value):
    if isinstance(value, (tuple, list)):
        return [_json_value(key, v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    # A dtype policy or an activation given as an object: Keras' own serialization, which
    # the layers take back.
    return keras.saving.serialize_keras_object(value)


def _normalization(release):
    return tuple(release.mean), tuple(release.std)


def save_preset(model, path, release=None, source=None):
    """Writes `model` as a preset folder at `path` (created; a preset there is replaced).

    Args:
        model: a model built by a keras_t2t builder (`T2TViT14(...)`, `create_model`,
            `from_preset`), which records its arguments (`model.builder_config`).
        path: the folder.
        release: the `keras_t2t.pretrained.Release` whose file the weights are, unchanged:
            metadata.json then gives its official URL and license. Left out, the source is
            unknown (`"license": "unknown"`), as for weights trained or fine-tuned since.
        source: the path of the file the weights were converted from, recorded by its name
            and sha384 (`python -m keras_t2t.convert` passes it).
    """
    config = getattr(model, "builder_config", None)
    if config is None:
        raise ValueError(
            f"save_preset needs a model built by a keras_t2t builder (keras_t2t.T2TViT14(...), "
            f"create_model, from_preset), which records the arguments that build it again; "
            f"received {type(model).__name__} {getattr(model, 'name', '')!r} without them (a "
            f"model loaded from a .keras file or cloned has none). Build the variant and load "
            f"the weights into it: keras_t2t.T2TViT14(..., weights='model.weights.h5')."
        )
    inputs = release or getattr(model, "pretrained_release", None)  # how it normalizes
    if release is not None and config["include_preprocessing"]:
        model_release = getattr(model, "pretrained_release", None)
        has = _normalization(model_release) if model_release else (IMAGENET_MEAN, IMAGENET_STD)
        if has != _normalization(release):
            raise ValueError(
                f"The model normalizes its inputs with mean and std {has}, the release "
                f"{release.file_name} with {_normalization(release)}: it is not that release. "
                f"Build it with the release's weights (weights={release.weights!r}), or leave "
                f"`release` out."
            )
    path = os.fspath(path)
    if os.path.isfile(path) or (
        os.path.isdir(path) and os.listdir(path) and not os.path.isfile(_in(path, CONFIG_FILE))
    ):
        raise ValueError(
            f"Cannot write a preset at {path!r}: it is a file or a folder that holds something "
            f"else than a preset (no {CONFIG_FILE}). Pass a new or empty folder."
        )
    builder = dict(
        BUILDER,
        config={key: _json_value(key, value) for key, value in config.items()},
        variant=variant_of({key: config[key] for key in ARCHITECTURE}),
    )
    try:
        os.makedirs(path, exist_ok=True)
        model.save_weights(_in(path, WEIGHTS_FILE))
        metadata = dict(
            keras_version=keras.__version__,
            keras_t2t_version=__version__,
            parameter_count=model.count_params(),
            date_saved=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            variant=builder["variant"],
            weights_sha256=file_digest(_in(path, WEIGHTS_FILE), "sha256"),
            release=None if inputs is None else dataclasses.asdict(inputs),
            source=dict(
                file_name=os.path.basename(os.fspath(source))
                if source
                else getattr(release, "file_name", None),
                sha384=pretrained.sha384(source) if source else getattr(release, "sha384", None),
                url=getattr(release, "source_url", None),
                license=getattr(release, "license", pretrained.UNKNOWN_LICENSE),
            ),
        )
        for name, content in ((CONFIG_FILE, builder), (METADATA_FILE, metadata)):
            with open(_in(path, name), "w") as f:
                json.dump(content, f, indent=2)
                f.write("\n")
    except OSError as error:
        raise ValueError(f"Cannot write the preset at {path!r}: {error}.") from None


# --- reading --------------------------------------------------------------------------------


def _in(folder, name):
    return os.path.join(folder, name)


def _read_json(folder, name):
    path = _in(folder, name)
    if not os.path.isfile(path):
        raise ValueError(f"The preset at {folder!r} has no {name}. {_WHAT_A_PRESET_IS}")
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path} cannot be read as JSON ({error}): the preset is damaged. Write it again "
            f"(keras_t2t.save_preset, or python -m keras_t2t.convert --preset)."
        ) from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a {type(content).__name__}, not a JSON object.")
    return content


def read_preset(folder):
    """(config.json, metadata.json) of the local preset `folder`, checked: the builder is
    keras_t2t's, and model.weights.h5 is there with the sha256 that metadata.json records."""
    config, metadata = _read_json(folder, CONFIG_FILE), _read_json(folder, METADATA_FILE)
    builder = {key: config.get(key) for key in BUILDER}
    if builder != BUILDER or not isinstance(config.get("config"), dict):
        named = f"{builder['module']}.{builder['class_name']}"
        if builder == BUILDER:
            named += " without its arguments"
        raise ValueError(
            f"{_in(folder, CONFIG_FILE)} names the builder {named}; keras_t2t presets are "
            f"built by keras_t2t.T2TViT ({json.dumps(BUILDER)} and its arguments under "
            f'"config"). A KerasHub preset loads with keras_hub\'s from_preset.'
        )
    weights = _in(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise ValueError(f"The preset at {folder!r} has no {WEIGHTS_FILE}. {_WHAT_A_PRESET_IS}")
    recorded = metadata.get("weights_sha256")
    if recorded is not None and file_digest(weights, "sha256") != recorded:
        raise ValueError(
            f"{weights} is not the file this preset was written with (its sha256 differs from "
            f"the one {METADATA_FILE} records): it is incomplete or was changed. Write or "
            f"download the preset again."
        )
    return config, metadata


def _release(metadata, folder):
    """The `Release` row of metadata.json, or None."""
    row = metadata.get("release")
    if row is None:
        return None
    fields = {field.name for field in dataclasses.fields(pretrained.Release)}
    try:
        row = {key: value for key, value in row.items() if key in fields}
        row.update(mean=tuple(row["mean"]), std=tuple(row["std"]))
        release = pretrained.Release(**row)
        if len(release.mean) != 3 or len(release.std) != 3 or not all(s > 0 for s in release.std):
            raise ValueError("mean and std must be 3 numbers each, std positive")
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"The release recorded in {_in(folder, METADATA_FILE)} cannot be read ({error!r}): "
            f"the preset is damaged. Write it again."
        ) from None
    return release


def _arguments(config, overrides, folder):
    """The builder arguments: the preset's, with `overrides` (checked) applied."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE) - set(ARCHITECTURE))
    if "weights" in overrides or unknown:
        raise ValueError(
            f"from_preset takes the builder's keyword arguments {', '.join(OVERRIDABLE)} as "
            f"overrides, received {', '.join(unknown or ['weights'])}. The weights are the "
            f"preset's; for another architecture build it with keras_t2t.create_model."
        )
    arguments = dict(config["config"])
    fixed = {k: v for k, v in overrides.items() if k in ARCHITECTURE and arguments.get(k) != v}
    if fixed:
        raise ValueError(
            f"The architecture of the preset at {folder!r} is fixed by its weights: it has "
            f"{', '.join(f'{k}={arguments.get(k)!r}' for k in fixed)}, received "
            f"{', '.join(f'{k}={v!r}' for k, v in fixed.items())}."
        )
    if "input_tensor" in overrides and "input_shape" not in overrides:
        arguments["input_shape"] = None  # the tensor's
    arguments.update(overrides)
    return arguments


def _load(uri, overrides, variant=None):
    folder, downloaded = local_folder(uri)

    def damaged(error):
        if not downloaded:
            return error
        for name in PRESET_FILES:  # a damaged copy is not used again
            remove_file(_in(folder, name))
        return ValueError(
            f"{error} (The copy downloaded from {uri} into {folder} was removed: the next call "
            f"downloads it again.)"
        )

    try:
        config, metadata = read_preset(folder)
        release = _release(metadata, folder)
    except ValueError as error:
        raise damaged(error) from None
    arguments = _arguments(config, overrides, folder)
    if variant is not None:
        found = variant_of({key: arguments.get(key) for key in ARCHITECTURE})
        if found != variant:
            builder = models.BUILDERS.get(found)
            other = f"keras_t2t.{builder.__name__}" if builder else "keras_t2t"
            raise ValueError(
                f"The preset at {uri!r} is {'a ' + found if found else 'no official variant'}"
                f", not {variant}: load it with {other}.from_preset({uri!r})."
            )
    try:
        state = weights_lib.read_keras_weights(_in(folder, WEIGHTS_FILE), arguments)
    except ValueError as error:
        raise damaged(error) from None
    state.release = release
    return models.T2TViT(**arguments, weights=state)


def from_preset(uri, **overrides):
    """Builds the model of the preset at `uri`: a local folder, `file://`, `http(s)://`,
    `gs://`, `hf://owner/name` or `kaggle://owner/model/framework/variant` (see the module).

    `overrides` are keyword arguments of `keras_t2t.T2TViT` (`classes`, `include_top`,
    `input_shape`, `pooling`, `classifier_activation`, `include_preprocessing`, `name`,
    `dtype`, ...): a head that does not fit is left out, and a position table of another size
    is interpolated, as with `weights=`. The model's inputs are normalized with the mean and
    std of the release it was made from (`model.pretrained_release`). Needs no torch.
    """
    return _load(uri, overrides)


def _variant_from_preset(variant):
    def from_preset(uri, **overrides):
        return _load(uri, overrides, variant)

    from_preset.__doc__ = (
        f"`keras_t2t.from_preset` for presets of {variant}; refuses a preset of another "
        f"architecture."
    )
    return from_preset


# The builders' `from_preset`: keras_t2t.T2TViT14.from_preset(uri), ...
models.T2TViT.from_preset = from_preset
for _variant, _builder in models.BUILDERS.items():
    _builder.from_preset = _variant_from_preset(_variant)


# --- where a preset is ----------------------------------------------------------------------


def local_folder(uri):
    """(a local folder holding the preset at `uri`, whether it is a copy downloaded into
    Keras' cache). http(s)://, file:// and gs:// presets are downloaded once into
    `pretrained.cache_dir()/presets/<name>-<hash of the URI>`; hf:// and kaggle:// ones into
    their libraries' caches."""
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str):
        raise ValueError(f"A preset is named by a path or a URI ({URI_FORMS}), received {uri!r}.")
    scheme, separator, rest = uri.partition("://")
    if not separator:
        if not os.path.isdir(uri):
            state = "is a file" if os.path.isfile(uri) else "does not exist"
            raise ValueError(
                f"No preset folder at {uri!r}: it {state}. {_WHAT_A_PRESET_IS} Presets are "
                f"also loaded from {URI_FORMS}."
            )
        return uri, False
    scheme = scheme.lower()
    if scheme in ("http", "https", "file"):
        return _download(uri, _fetch), True
    if scheme == "gs":
        return _download(uri, _gfile_copy), True
    if scheme == "hf":
        return _huggingface(uri, rest), False
    if scheme == "kaggle":
        return _kaggle(uri, rest), False
    raise ValueError(f"Unknown preset address {uri!r}: presets load from {URI_FORMS}.")


def _cache_folder(uri):
    last = uri.rsplit("/", 1)[-1]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", last).strip("._")[:64] or "preset"
    digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    return os.path.join(pretrained.cache_dir(), CACHE_SUBDIR, f"{slug}-{digest}")


def _download(uri, copy):
    """The preset at `uri` in Keras' cache: each file copied by `copy(origin, path)` once."""
    uri = uri.rstrip("/")
    folder = _cache_folder(uri)
    for name in PRESET_FILES:
        path = _in(folder, name)
        if not os.path.isfile(path):
            copy(f"{uri}/{name}", path)
    return folder


def _fetch(origin, path):
    try:
        fetch(origin, path)
    except DownloadError as error:
        raise ValueError(
            f"Cannot download the preset file {origin}: {error.reason}. {_WHAT_A_PRESET_IS}"
        ) from None


def _gfile_copy(origin, path):
    if importlib.util.find_spec("tensorflow") is None:
        raise ValueError(
            f"gs:// presets are read through TensorFlow's tf.io.gfile, and TensorFlow is not "
            f"installed here: pip install tensorflow-cpu, or copy the folder first (gcloud "
            f"storage cp -r {origin.rsplit('/', 1)[0]} .) and pass its path."
        )
    import tensorflow as tf

    staging = f"{path}.{os.getpid()}.partial"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tf.io.gfile.copy(origin, staging, overwrite=True)
        os.replace(staging, path)
    except (tf.errors.OpError, OSError) as error:
        remove_file(staging)
        reason = getattr(error, "message", None) or error
        raise ValueError(f"Cannot copy the preset file {origin}: {reason}.") from None


def _client(module, scheme, install):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"{scheme} presets are downloaded with the `{module}` package, which is not "
            f"installed: {install}. (keras-t2t does not depend on it.) Or download the preset "
            f"folder yourself and pass its path."
        ) from None


def _huggingface(uri, rest):
    parts = [part for part in rest.split("/") if part]
    if len(parts) < 2:
        raise ValueError(
            f"Hugging Face presets are named hf://owner/name (or hf://owner/name/subfolder), "
            f"received {uri!r}."
        )
    hub = _client("huggingface_hub", "hf://", "pip install huggingface_hub")
    repo, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    prefix = f"{subfolder}/" if subfolder else ""
    root = hub.snapshot_download(repo_id=repo, allow_patterns=[prefix + n for n in PRESET_FILES])
    return os.path.join(root, subfolder)


def _kaggle(uri, rest):
    parts = [part for part in rest.split("/") if part]
    if len(parts) not in (4, 5):
        raise ValueError(
            f"Kaggle presets are named kaggle://owner/model/framework/variant (and /version), "
            f"received {uri!r}."
        )
    kagglehub = _client("kagglehub", "kaggle://", "pip install kagglehub")
    return kagglehub.model_download("/".join(parts))
