"""Evaluates T2T-ViT weights on ImageNet validation TFRecords: top-1, top-5 and loss.

    python training/evaluate_imagenet.py --weights=imagenet --model=t2t_vit_14 --data_dir=DIR
    python training/evaluate_imagenet.py --weights=81.5_T2T_ViT_14.pth.tar --data_dir=DIR
    python training/evaluate_imagenet.py --weights=83.3_T2T_ViT_14.pth.tar --data_dir=DIR \\
        --image_size=384 --crop_pct=1.0

Preprocessing is the official evaluation: resize the short side to int(size / crop_pct) with
bicubic (248 for 224 at the default 0.9), center crop, ImageNet mean and std (inside the
model). With the released T2T-ViT-14 file this prints top-1 81.5.
"""

import json
import logging
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse

import tensorflow as tf

from keras_t2t import export
from keras_t2t.models import model_for_command_line
from training import data as data_lib
from training import errors
from training.evaluation import evaluate_model


def build_model(weights, model=None, num_heads=None, image_size=None):
    """The model to evaluate, logits out (see `keras_t2t.models.model_for_command_line`)."""
    return model_for_command_line(
        model, weights, image_size, num_heads=num_heads, classifier_activation=None
    )


def evaluate(
    weights,
    data_dir,
    model=None,
    num_heads=None,
    image_size=None,
    crop_pct=None,
    batch_size=128,
    label_offset=1,
):
    """Returns dict(top1, top5, loss, examples) of `weights` on the validation TFRecords.

    `crop_pct` None: the training run's (a model_dir), the release's ("imagenet"), else 0.9.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"--batch_size must be >= 1, received {batch_size}.")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ValueError(f"--crop_pct must be in (0, 1], received {crop_pct}.")
    files = data_lib.list_files(data_dir, "validation")
    net = build_model(weights, model, num_heads, image_size)
    if crop_pct is None:
        crop_pct = export.serving_crop_pct(net, weights)
    size, classes = net.input_shape[1], net.output_shape[-1]
    data_lib.check_shards(files, "validation", classes)
    strategy = tf.distribute.get_strategy()
    dataset = data_lib.eval_dataset(
        files, batch_size, size, classes, crop_pct=crop_pct, label_offset=label_offset
    )
    try:
        return evaluate_model(net, dataset, strategy)
    except errors.DATA_ERRORS as error:
        if not errors.is_data_error(error):
            raise
        if isinstance(error, errors.DATA_READ_ERRORS):
            message = errors.unreadable_data_message(
                error, "validation", "Put the shard back, then run again."
            )
        else:
            message = errors.data_error_message(error)
        raise errors.TrainingError(message) from None


def check_output(path):
    """Makes the folder of --output `path`; raises OSError with a message that says why it
    cannot (its parent is a file, or `path` is a folder)."""
    if os.path.isdir(path):
        raise OSError(f"cannot write --output {path!r}: it is a folder")
    parent = os.path.dirname(os.path.normpath(path))
    existing = parent
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        raise OSError(f"cannot write --output {path!r}: {existing} is a file, not a folder")
    try:
        os.makedirs(os.path.abspath(parent or "."), exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot write --output {path!r}: {error.strerror}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--weights",
        required=True,
        help="imagenet (the release of --model), .pth.tar / .pth / .weights.h5, or a run's "
        "--model_dir",
    )
    parser.add_argument("--data_dir", required=True, help="folder of validation-*-of-* TFRecords")
    parser.add_argument("--model", help="variant (default: read from an official checkpoint)")
    parser.add_argument("--num_heads", type=int, help="heads of a custom architecture")
    parser.add_argument("--image_size", type=int, help="default: the size of the weights")
    parser.add_argument(
        "--crop_pct",
        type=float,
        help="default: the run's with a --model_dir, the release's with imagenet, else 0.9",
    )
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--label_offset", type=int, default=1, help="ImageNet labels: 1..1000")
    parser.add_argument("--output", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.getLogger("keras_t2t").setLevel(logging.INFO)
    try:
        if args.output:  # checked before the evaluation, not after it
            check_output(args.output)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        results = evaluate(
            args.weights,
            args.data_dir,
            args.model,
            args.num_heads,
            args.image_size,
            args.crop_pct,
            args.batch_size,
            args.label_offset,
        )
    except (ValueError, ImportError, errors.TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"top1 {100 * results['top1']:.2f} top5 {100 * results['top5']:.2f} "
        f"loss {results['loss']:.4f} on {results['examples']} images"
    )
    if args.output:
        try:
            with open(args.output, "w") as f:
                json.dump(results, f, indent=2)
        except OSError as error:
            print(f"error: cannot write --output {args.output!r}: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
