"""Converts an official T2T-ViT checkpoint into a Keras `.weights.h5` that loads without torch.

    python -m keras_t2t.convert 81.5_T2T_ViT_14.pth.tar t2t_vit_14.weights.h5 --model t2t_vit_14

The variant is inferred from the tensors when `--model` is left out. After writing, the file
is loaded back into a fresh model and both are checked against the official forward pass
(`keras_t2t.reference`) on random images; the max abs difference of the logits is printed.
"""

import argparse
import os
import sys

import numpy as np

from keras_t2t import models, reference
from keras_t2t import weights as weights_lib
from keras_t2t.imagenet import preprocess_input


def convert(src, dst, model=None, num_heads=None, check=True, seed=0):
    """Converts `src` to `dst`; returns a dict of what was done and measured."""
    if not str(dst).endswith(weights_lib.KERAS_SUFFIX):
        raise ValueError(f"The output must end in {weights_lib.KERAS_SUFFIX}, received {dst!r}.")
    weights_lib.check_path(src)
    state_dict = weights_lib.read_official_checkpoint(src)
    found = weights_lib.infer_config(state_dict)
    model, arch = weights_lib.resolve_architecture(found, model, num_heads, source=src)
    build = dict(
        arch,
        classes=found["classes"] or 1000,
        include_top=found["classes"] is not None,
        classifier_activation=None,
        name=model or "t2t_vit",
    )
    keras_model = models.T2TViT(**build, weights=src)
    folder = os.path.dirname(os.path.abspath(dst))
    try:
        os.makedirs(folder, exist_ok=True)
        keras_model.save_weights(dst)
    except OSError as error:
        raise ValueError(f"Cannot write {dst!r}: {error.strerror or error}.") from None
    report = dict(
        src=src,
        dst=dst,
        model=model or "custom",
        image_size=keras_model.input_shape[1],
        classes=found["classes"],
        params=keras_model.count_params(),
    )
    if check:
        reloaded = models.T2TViT(**build, weights=dst)
        side = keras_model.input_shape[1]
        images = np.random.default_rng(seed).uniform(0, 255, (2, side, side, 3)).astype("float32")
        ours = np.asarray(keras_model(images))
        report["max_abs_diff_reload"] = float(np.abs(np.asarray(reloaded(images)) - ours).max())
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


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_t2t.convert",
        description="Convert an official T2T-ViT checkpoint (.pth.tar/.pth) to Keras .weights.h5.",
    )
    parser.add_argument("src", help="official checkpoint, e.g. 81.5_T2T_ViT_14.pth.tar")
    parser.add_argument("dst", help="output file, ending in .weights.h5")
    parser.add_argument("--model", help="variant name, e.g. t2t_vit_14 (default: inferred)")
    parser.add_argument("--num_heads", type=int, help="backbone heads of a custom architecture")
    parser.add_argument("--no_check", action="store_true", help="skip the parity check")
    args = parser.parse_args(argv)
    try:
        report = convert(args.src, args.dst, args.model, args.num_heads, check=not args.no_check)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"converted {report['src']} -> {report['dst']}")
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
    if "max_abs_diff_reload" in report:
        print(
            f"  max abs difference after reloading {report['dst']}: "
            f"{report['max_abs_diff_reload']:.3g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
