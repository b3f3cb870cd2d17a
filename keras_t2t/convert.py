"""Converts official T2T-ViT checkpoints into Keras weights that load without torch: a
`.weights.h5`, or presets (`keras_t2t.presets`).

    python -m keras_t2t.convert 81.5_T2T_ViT_14.pth.tar t2t_vit_14.weights.h5 --model t2t_vit_14
    python -m keras_t2t.convert --preset presets 81.5_T2T_ViT_14.pth.tar 83.3_T2T_ViT_14.pth.tar
    python -m keras_t2t.convert --preset presets --release t2t_vit_14:imagenet --release all

With `--preset DIR`, every checkpoint it is given becomes the preset `DIR/<name>`:
`t2t_vit_14_imagenet` (`t2t_vit_14_imagenet_384` at 384) when the file is a release (its
sha384 where the table publishes one, else its file name), with the release's URL and license;
else the file's stem, with an unknown source and license. `--release VARIANT:NAME` (repeated;
`all` for every release) downloads the release's files (`keras_t2t.pretrained`, through
`KERAS_T2T_WEIGHTS_URL` where set) and converts each. A `.weights.h5` named after a single
checkpoint is written as well.

The variant is inferred from the tensors when `--model` is left out. After writing, each output
is loaded back into a fresh model, and the logits are compared with the official forward pass
(`keras_t2t.reference`, where torch is installed) on random images; the max abs differences
are printed.
"""

import argparse
import logging
import os
import sys

import keras
import numpy as np

from keras_t2t import models, presets, pretrained, reference
from keras_t2t import weights as weights_lib
from keras_t2t.configs import variant_config
from keras_t2t.imagenet import preprocess_input

logger = logging.getLogger("keras_t2t")


def _logits(model):
    """`model` up to its head's logits (sharing its layers), or `model` if it has no head."""
    names = {layer.name for layer in model.layers}
    return keras.Model(model.input, model.get_layer("head").output) if "head" in names else model


def convert(
    src, dst=None, model=None, num_heads=None, check=True, seed=0, preset_dir=None, release=None
):
    """Converts the official checkpoint `src` to `dst` (a `.weights.h5`) and/or a preset in
    `preset_dir` (at `preset_dir/<presets.preset_name>`); returns a dict of what was done and
    measured. `release`: the release `src` is (default: `pretrained.match_release`, with
    `preset_dir`); a release of another architecture than the file's is not recorded."""
    if dst is None and preset_dir is None:
        raise ValueError("Nothing to write: pass `dst` (a .weights.h5) or `preset_dir`.")
    if dst is not None and not str(dst).endswith(weights_lib.KERAS_SUFFIX):
        raise ValueError(f"The output must end in {weights_lib.KERAS_SUFFIX}, received {dst!r}.")
    weights_lib.check_path(src)
    state_dict = weights_lib.read_official_checkpoint(src)
    found = weights_lib.infer_config(state_dict)
    model, arch = weights_lib.resolve_architecture(found, model, num_heads, source=src)
    if preset_dir is not None and release is None:
        release = pretrained.match_release(src)
    if release is not None and release.model != model:
        logger.warning(
            "%s is named as the release %s of %s, but its tensors are of %s: its preset records "
            "an unknown source.",
            src,
            release.file_name,
            release.model,
            model or "a custom architecture",
        )
        release = None
    state = weights_lib.official_to_state(state_dict, source=src)
    state.release = release  # the normalization of its inputs
    build = dict(
        arch,
        classes=found["classes"] or 1000,
        include_top=found["classes"] is not None,
        name=model or "t2t_vit",
    )
    keras_model = models.T2TViT(**build, weights=state)
    report = dict(
        src=src,
        dst=dst,
        model=model or "custom",
        image_size=keras_model.input_shape[1],
        classes=found["classes"],
        params=keras_model.count_params(),
    )
    if dst is not None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            keras_model.save_weights(dst)
        except OSError as error:
            raise ValueError(f"Cannot write {dst!r}: {error.strerror or error}.") from None
    if preset_dir is not None:
        report["preset"] = os.path.join(preset_dir, presets.preset_name(release, src))
        presets.save_preset(keras_model, report["preset"], release=release, source=src)
        report["release"] = release.file_name if release else None
        report["license"] = release.license if release else pretrained.UNKNOWN_LICENSE
    if check:
        side = keras_model.input_shape[1]
        images = np.random.default_rng(seed).uniform(0, 255, (2, side, side, 3)).astype("float32")
        ours = np.asarray(_logits(keras_model)(images))
        reloaded = {}
        if dst is not None:
            reloaded["reload"] = models.T2TViT(**build, weights=dst)
        if preset_dir is not None:
            reloaded["preset"] = presets.from_preset(report["preset"])
        for what, again in reloaded.items():
            difference = np.abs(np.asarray(_logits(again)(images)) - ours).max()
            report[f"max_abs_diff_{what}"] = float(difference)
        try:  # the official forward is written in torch, which reading the file does not need
            official = reference.official_forward(
                state_dict,
                preprocess_input(images).transpose(0, 3, 1, 2),
                num_heads=arch["num_heads"],
                qk_scale=arch.get("qk_scale"),
            )
        except ImportError:
            report["official_check"] = "skipped: torch is not installed (pip install torch)"
        else:
            report["max_abs_diff_official"] = float(np.abs(official - ours).max())
    return report


def releases(spec):
    """The releases that `spec` names: `VARIANT:NAME` (every file of it, e.g. both sizes of
    `t2t_vit_14:imagenet`; NAME defaults to imagenet) or `all`."""
    if spec == "all":
        return list(pretrained.RELEASES)
    variant, _, name = spec.partition(":")
    key, _ = variant_config(variant)
    first = pretrained.find_release(key, name or "imagenet")  # or the error saying what exists
    return [r for r in pretrained.RELEASES if (r.model, r.weights) == (key, first.weights)]


def _print(report):
    print(f"converted {report['src']}")
    for key, what in (("dst", "weights"), ("preset", "preset")):
        if report.get(key):
            print(f"  {what}: {report[key]}")
    if "preset" in report:
        print(
            f"  release: {report['release'] or 'unknown (not an official file)'}, license "
            f"{report['license']}"
        )
    print(
        f"  variant {report['model']}, {report['image_size']}x{report['image_size']}, "
        f"{report['classes']} classes, {report['params']:,} parameters"
    )
    if "max_abs_diff_official" in report:
        print(
            "  max abs difference vs the official forward (torch): "
            f"{report['max_abs_diff_official']:.3g}"
        )
    if "official_check" in report:
        print(f"  comparison with the official forward {report['official_check']}")
    for key, what in (("reload", report["dst"]), ("preset", report.get("preset"))):
        if f"max_abs_diff_{key}" in report:
            print(
                f"  max abs difference after reloading {what}: {report[f'max_abs_diff_{key}']:.3g}"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_t2t.convert",
        description="Convert official T2T-ViT checkpoints (.pth.tar/.pth) to a Keras "
        ".weights.h5 or to presets.",
    )
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="SRC DST.weights.h5; with --preset: official checkpoints (and a DST.weights.h5 "
        "after a single one)",
    )
    parser.add_argument("--preset", metavar="DIR", help="write a preset per checkpoint in DIR")
    parser.add_argument(
        "--release",
        action="append",
        default=[],
        metavar="VARIANT:NAME",
        help="with --preset: download and convert a release, e.g. t2t_vit_14:imagenet, or all",
    )
    parser.add_argument("--model", help="variant name, e.g. t2t_vit_14 (default: inferred)")
    parser.add_argument("--num_heads", type=int, help="backbone heads of a custom architecture")
    parser.add_argument("--no_check", action="store_true", help="skip the parity check")
    args = parser.parse_args(argv)
    files, dst = list(args.files), None
    if args.preset is None:
        if args.release or len(files) != 2:
            parser.error(
                "convert SRC DST.weights.h5, or --preset DIR with checkpoints and/or --release"
            )
        files, dst = files[:1], files[1]
    elif files and files[-1].endswith(weights_lib.KERAS_SUFFIX):
        files, dst = files[:-1], files[-1]
        if len(files) != 1:
            parser.error("a .weights.h5 output follows a single checkpoint")
    if args.preset is not None and not (files or args.release):
        parser.error("--preset needs checkpoints or --release")
    options = dict(num_heads=args.num_heads, check=not args.no_check, preset_dir=args.preset)
    try:
        jobs = [dict(src=src, dst=dst, model=args.model) for src in files]
        for spec in args.release:
            jobs += [
                dict(src=pretrained.download(r), model=r.model, release=r) for r in releases(spec)
            ]
        for job in jobs:
            _print(convert(**job, **options))
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
