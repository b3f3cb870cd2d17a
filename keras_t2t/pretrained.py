"""The official released weights: one table, and their download, check and cache.

`T2TViT14(weights="imagenet")` looks its file up in `RELEASES`, downloads it once (`fetch`)
into Keras' cache (`$KERAS_HOME/models/keras_t2t`, by default `~/.keras/models/keras_t2t`),
checks its size and sha384 where they are published, and converts it to a Keras `.weights.h5`
beside it, without building a model (`release_state`). Later calls read the converted file
only, with no network; a record beside it (`<name>.weights.h5.json`: the sha256 of the
conversion and the sha384 of the file it was made from) is checked first, and a conversion
that differs from it is made again. The model that `weights=` builds is the only one.

The environment variable `KERAS_T2T_WEIGHTS_URL` replaces the release URL base: the file is
fetched from `$KERAS_T2T_WEIGHTS_URL/<file name>` (an `https://`, `http://` or `file://`
mirror, for air-gapped clusters). `fetch` gives up on a server that sends nothing for
`$KERAS_T2T_DOWNLOAD_TIMEOUT` seconds (default 30) at any point of a download, tries
`DOWNLOAD_ATTEMPTS` times in all where the failure may pass, and never leaves a partial file.

The table is kept apart from the architectures (`configs.MODEL_CONFIGS`), as timm keeps its
`pretrained_cfg`: what each file was trained on and how it must be fed.
"""

import dataclasses
import json
import logging
import os

from keras_t2t import weights as weights_lib
from keras_t2t.configs import MODEL_CONFIGS
from keras_t2t.download import DownloadError, fetch, file_digest, keras_home, remove_file
from keras_t2t.imagenet import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger("keras_t2t")

BASE_URL = "https://github.com/yitu-opensource/T2T-ViT/releases/download/main"
URL_VARIABLE = "KERAS_T2T_WEIGHTS_URL"
CACHE_SUBDIR = os.path.join("models", "keras_t2t")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the official transfer_learning.py
CIFAR_STD = (0.2023, 0.1994, 0.2010)
# The license of the official weights (SPDX: The Clear BSD License), that of the official
# repository (https://github.com/yitu-opensource/T2T-ViT/blob/main/LICENSE). keras-t2t's own
# code is Apache-2.0; the weights keep their license, whatever format they are converted to.
OFFICIAL_LICENSE = "BSD-3-Clause-Clear"
UNKNOWN_LICENSE = "unknown"  # the license of a file that is no known release


@dataclasses.dataclass(frozen=True)
class Release:
    """One released file, what it was trained on, and how its inputs were prepared."""

    model: str  # the variant, a key of MODEL_CONFIGS
    weights: str  # the name a builder's `weights=` takes: "imagenet", "cifar10", "cifar100"
    file_name: str
    top1: float  # the paper's top-1 (%) of this file
    image_size: int = 224
    classes: int = 1000
    crop_pct: float = 0.9  # evaluation: resize the short side to image_size / crop_pct
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    file_size: int = None  # bytes, where published
    sha384: str = None  # where published
    license: str = UNKNOWN_LICENSE  # an SPDX identifier; the official files: OFFICIAL_LICENSE

    @property
    def source_url(self):
        """The official address of the file (a mirror, `KERAS_T2T_WEIGHTS_URL`, aside)."""
        return f"{BASE_URL}/{self.file_name}"

    @property
    def stem(self):
        for suffix in (".pth.tar", ".pth"):
            if self.file_name.endswith(suffix):
                return self.file_name[: -len(suffix)]
        return self.file_name


def _imagenet(model, file_name, top1, **kwargs):
    return Release(model, "imagenet", file_name, top1, license=OFFICIAL_LICENSE, **kwargs)


def _cifar(model, classes, file_name, top1):
    return Release(
        model,
        f"cifar{classes}",
        file_name,
        top1,
        classes=classes,
        crop_pct=1.0,  # Resize(224) of the 32x32 images, no crop
        interpolation="bilinear",
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        license=OFFICIAL_LICENSE,
    )


# The official releases (https://github.com/yitu-opensource/T2T-ViT#2-pretrained-models).
# Integrity: OpenVINO's Open Model Zoo (models/public/t2t-vit-14/model.yml); no other file's
# size or hash is published. Left out: 84.2_T2T_ViT_24 (Token Labeling, another head layout).
RELEASES = (
    _imagenet("t2t_vit_7", "71.7_T2T_ViT_7.pth.tar", 71.7),
    _imagenet("t2t_vit_10", "75.2_T2T_ViT_10.pth.tar", 75.2),
    _imagenet("t2t_vit_12", "76.5_T2T_ViT_12.pth.tar", 76.5),
    _imagenet(
        "t2t_vit_14",
        "81.5_T2T_ViT_14.pth.tar",
        81.5,
        file_size=86_212_823,
        sha384="98c8ae06a1e9997f3e83ad2dfbac49985bf7bd7723eb64e4b8462338163be026"
        "57998f0bd9f8997367417003caeaf7a1",
    ),
    _imagenet("t2t_vit_14", "83.3_T2T_ViT_14.pth.tar", 83.3, image_size=384),
    _imagenet("t2t_vit_19", "81.9_T2T_ViT_19.pth.tar", 81.9),
    _imagenet("t2t_vit_24", "82.3_T2T_ViT_24.pth.tar", 82.3),
    _imagenet("t2t_vit_t_14", "81.7_T2T_ViTt_14.pth.tar", 81.7),
    _imagenet("t2t_vit_t_19", "82.4_T2T_ViTt_19.pth.tar", 82.4),
    _imagenet("t2t_vit_t_24", "82.6_T2T_ViTt_24.pth.tar", 82.6),
    _cifar("t2t_vit_14", 10, "cifar10_t2t-vit_14_98.3.pth", 98.3),
    _cifar("t2t_vit_14", 100, "cirfar100_t2t-vit-14_88.4.pth", 88.4),  # sic, as released
    _cifar("t2t_vit_19", 10, "cifar10_t2t-vit_19_98.4.pth", 98.4),
    _cifar("t2t_vit_19", 100, "cifar100_t2t-vit-19_89.0.pth", 89.0),
)


class WeightsDownloadError(ValueError):
    """Released weights could not be fetched or failed their integrity check."""


def is_release_name(weights):
    """Whether `weights` names released weights ("imagenet", ...) rather than a path."""
    return isinstance(weights, str) and weights.lower() in {r.weights for r in RELEASES} | {
        "imagenet1k"
    }


def available(model):
    """The release names that `model` (a variant) can load, e.g. `["cifar10", "imagenet"]`."""
    return sorted({r.weights for r in RELEASES if r.model == model})


def find_release(model, weights, image_size=None):
    """The release of `model` named `weights`; of the same image size when there is one
    (`t2t_vit_14` at 384 gets the 83.3 file), else the 224 one."""
    name = weights.lower()
    name = "imagenet" if name == "imagenet1k" else name
    if model is None:
        raise ValueError(
            f"weights={weights!r} needs a known variant: build the model with a variant builder "
            f"(keras_t2t.T2TViT14(weights={weights!r})) or keras_t2t.create_model(name, "
            f"weights={weights!r}); this architecture is not one of the released ones."
        )
    candidates = [r for r in RELEASES if r.model == model and r.weights == name]
    if not candidates:
        names = available(model)
        offer = f"it has {', '.join(repr(n) for n in names)}" if names else "it has none"
        having = sorted({r.model for r in RELEASES if r.weights == name})
        raise ValueError(
            f"There are no released {name!r} weights for {model!r} ({offer}). "
            f"Variants with {name!r} weights: {', '.join(having) or 'none'}."
        )
    for release in candidates:
        if release.image_size == image_size:
            return release
    return candidates[0]


def match_release(path, digest=None):
    """The release that the file at `path` is, or None: by its sha384 (`digest`, computed if
    not given) where the table publishes one, else by its file name. A file named as a
    release whose published sha384 differs is not that release."""
    digest = digest or sha384(path)
    name = os.path.basename(os.fspath(path))
    for release in RELEASES:
        if release.sha384 is not None and release.sha384 == digest:
            return release
    for release in RELEASES:
        if release.file_name == name and release.sha384 in (None, digest):
            return release
    return None


def base_url():
    return (os.environ.get(URL_VARIABLE) or BASE_URL).rstrip("/")


def url(release):
    return f"{base_url()}/{release.file_name}"


def cache_dir():
    """Keras' cache folder for our files, as `keras.utils.get_file` chooses it."""
    return os.path.join(keras_home(), CACHE_SUBDIR)


def converted_path(release):
    return os.path.join(cache_dir(), f"{release.stem}.weights.h5")


def record_path(release):
    """The record of the cached conversion: what it was made from, and its own sha256."""
    return converted_path(release) + ".json"


def sha384(path):
    return file_digest(path, "sha384")


def check_integrity(release, path, origin):
    """Size and sha384 of a downloaded file against the table; a file that fails is renamed
    `<name>.bad` (kept for inspection, never used again) and an error says what differed."""
    problems = []
    size = os.path.getsize(path)
    if release.file_size is not None and size != release.file_size:
        problems.append(f"it has {size:,} bytes, the release {release.file_size:,}")
    elif release.sha384 is not None:
        digest = sha384(path)
        if digest != release.sha384:
            problems.append(f"its sha384 is {digest}, the release's {release.sha384}")
    if problems:
        bad = path + ".bad"
        os.replace(path, bad)
        raise WeightsDownloadError(
            f"The file {path} (from {origin}) is not the released {release.file_name}: "
            f"{'; '.join(problems)}. It was moved to {bad}. A truncated download or a wrong "
            f"mirror ({URL_VARIABLE}={os.environ.get(URL_VARIABLE, '')!r}) does this; call "
            f"again to download it anew."
        )


def download(release):
    """The released file in the cache, downloaded if missing; checked where the table can."""
    folder = cache_dir()
    path = os.path.join(folder, release.file_name)
    if os.path.isfile(path):  # downloaded before, or put there by hand
        check_integrity(release, path, path)
        return path
    origin = url(release)
    try:
        # Into a temporary name, renamed once complete: a killed download is never taken for
        # the file.
        fetch(origin, path)
    except DownloadError as error:
        raise WeightsDownloadError(
            f"Cannot download the {release.weights!r} weights of {release.model} "
            f"({release.file_name}) from {origin}: {error.reason}. Nothing is cached at {path}. "
            f"Without network access, set {URL_VARIABLE} to a mirror that holds "
            f"{release.file_name} (an http(s):// or file:// folder), or put the file at {path}."
        ) from None
    check_integrity(release, path, origin)
    return path


def _conversion_problem(release, converted):
    """None if the cached conversion is the one its record describes, else what differs."""
    record = record_path(release)
    try:
        with open(record) as f:
            recorded = json.load(f)
    except FileNotFoundError:
        return f"it has no record ({os.path.basename(record)})"
    except (OSError, ValueError) as error:
        return f"its record {record} cannot be read ({error})"
    if not isinstance(recorded, dict) or recorded.get("release") != release.file_name:
        return f"its record {record} is not that of a conversion of {release.file_name}"
    if release.sha384 is not None and recorded.get("release_sha384") != release.sha384:
        return f"it was converted from another file than the released {release.file_name}"
    digest = file_digest(converted, "sha256")
    if recorded.get("sha256") != digest:
        return f"its sha256 is {digest}, at its conversion {recorded.get('sha256')}"
    return None


def release_state(release):
    """The weights of `release` as a `weights.WeightsState`, for the model that `models.T2TViT`
    builds: read from the cached conversion; converted from the downloaded file (and cached)
    on the first call, and again when the cached one differs from its record or cannot be
    read. Builds no model."""
    converted = converted_path(release)
    if os.path.isfile(converted):
        problem = _conversion_problem(release, converted)
        if problem is None:
            try:
                return weights_lib.read_keras_weights(converted, MODEL_CONFIGS.get(release.model))
            except ValueError as error:  # derived data: made again from the released file
                problem = f"it cannot be read: {error}"
        logger.warning(
            "The cached %s is not the conversion of %s that was written (%s): converting it again.",
            converted,
            release.file_name,
            problem,
        )
        remove_file(converted)
        remove_file(record_path(release))
    source = download(release)
    logger.info("Converting %s to %s (once).", source, converted)
    state = _convert(release, source)
    _cache(release, source, state)
    return state


def _convert(release, source):
    """The `WeightsState` of the downloaded official file, checked to be of the release's
    architecture; a file that is not (from a mirror that the table has no hash to check
    against) is renamed `<name>.bad`."""
    try:
        state = weights_lib.read_weights(source, MODEL_CONFIGS.get(release.model) or {})
        weights_lib.check_architecture(state, MODEL_CONFIGS.get(release.model) or {})
    except ValueError as error:
        if release.sha384 is not None:  # the released file itself, checked: not its fault
            raise
        bad = source + ".bad"
        os.replace(source, bad)
        raise WeightsDownloadError(
            f"The file downloaded from {url(release)} is not the released {release.file_name} "
            f"of {release.model}: {error} It was moved to {bad}; check the mirror "
            f"({URL_VARIABLE}) and call again."
        ) from None
    return state


def _cache(release, source, state):
    """Writes `state` as the cached conversion of `release` (a Keras `.weights.h5`) and its
    record; a cache that cannot be written is left out (the next call converts again)."""
    converted = converted_path(release)
    staging = os.path.join(os.path.dirname(converted), f".{os.getpid()}.{release.stem}.weights.h5")
    record = record_path(release)
    record_staging = staging + ".json"
    try:
        weights_lib.write_keras_weights(state, staging)
        with open(record_staging, "w") as f:
            json.dump(
                {
                    "release": release.file_name,
                    "release_sha384": sha384(source),
                    "sha256": file_digest(staging, "sha256"),
                },
                f,
                indent=1,
            )
        os.replace(staging, converted)
        os.replace(record_staging, record)
    except OSError as error:  # a read-only cache: use the official file directly next time too
        logger.warning("Cannot cache the converted weights at %s: %s", converted, error)
        for path in (staging, record_staging, converted, record):
            remove_file(path)
