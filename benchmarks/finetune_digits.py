"""Fine-tuning with layer-wise learning-rate decay, on the embedded digits: T2T-ViT-7 trained on
the digits 0-5 is fine-tuned on the digits 6-9 from a few images of each (a new head), with
`--layer_decay` off and at each value asked for, beside the same model trained from scratch on
those few images. Each run is `training.trainer.Trainer`, the product's loop.

    python benchmarks/finetune_digits.py --seeds=0,1,2 --per_class=10 --layer_decays=0.75,0.65

Prints the top-1 of each run on the held-out digits 6-9 and, per setting, the mean and spread
over the seeds. The pretraining (the README's embedded recipe on 0-5) is done once.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

PRETRAIN_DIGITS, FINETUNE_DIGITS = tuple(range(6)), (6, 7, 8, 9)
IMAGE_SIZE = 32


def write_records(folder, digits, per_class=None):
    """The digits `digits` (labels 1.. in that order) as TFRecords in `folder`: the embedded
    default's images and split, at most `per_class` training images of each."""
    import tensorflow as tf

    from training import build_tfrecords

    train, validation = build_tfrecords.digits_examples(IMAGE_SIZE, digits=digits)
    if per_class is not None:
        kept, counts = [], {}
        for example in train:
            feature = tf.train.Example.FromString(example).features.feature
            label = feature["image/class/label"].int64_list.value[0]
            if counts.get(label, 0) < per_class:
                counts[label] = counts.get(label, 0) + 1
                kept.append(example)
        train = kept
    names = [str(d) for d in digits]
    build_tfrecords.write_shards(train, folder, "train", 1, names)
    build_tfrecords.write_shards(validation, folder, "validation", 1, names)
    return folder


def config(data_dir, model_dir, classes, seed, **fields):
    """The README's embedded recipe (training/train_imagenet.py's EMBEDDED) with `fields`."""
    from training import data
    from training.config import Config

    values = dict(
        model="t2t_vit_7",
        data_dir=data_dir,
        model_dir=model_dir,
        image_size=IMAGE_SIZE,
        num_classes=classes,
        batch_size=64,
        epochs=15,
        warmup_epochs=2,
        cooldown_epochs=0,
        learning_rate=4e-3,
        weight_decay=0.05,
        drop_path_rate=0.0,
        ema_decay=0.99,
        crop_pct=1.0,
        seed=seed,
        eval_batch_size=100,
    )
    values.update(fields)
    values["eval_every_epochs"] = values["epochs"]
    aug = data.Augmentation(
        crop_scale_min=0.7,
        hflip=False,
        randaugment_ops=0,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        random_erasing=0.0,
    )
    return Config(**values, aug=aug)


def train(config):
    from training import trainer

    start = time.time()
    results = trainer.Trainer(config).run()
    return max(results["top1"], results["ema_top1"]), time.time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds")
    parser.add_argument("--per_class", type=int, default=10, help="training images per digit")
    parser.add_argument("--layer_decays", default="0.75,0.65", help="comma-separated values")
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs")
    parser.add_argument("--batch_size", type=int, default=8, help="fine-tuning batch")
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=4e-3,
        help="fine-tuning peak learning rate for batch 512 (scaled to --batch_size, as the "
        "trainer does)",
    )
    parser.add_argument(
        "--workdir", help="where the records and runs go (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    decays = [float(d) for d in args.layer_decays.split(",") if d.strip()]
    workdir = args.workdir or tempfile.mkdtemp(prefix="finetune_digits_")

    pretrain_data = write_records(os.path.join(workdir, "digits_0_5"), PRETRAIN_DIGITS)
    finetune_data = write_records(
        os.path.join(workdir, f"digits_6_9_{args.per_class}"), FINETUNE_DIGITS, args.per_class
    )
    pretrained = os.path.join(workdir, "pretrained")
    if not os.path.exists(os.path.join(pretrained, "eval_results.json")):
        top1, seconds = train(config(pretrain_data, pretrained, len(PRETRAIN_DIGITS), 0))
        print(f"pretrained on the digits 0-5: top-1 {top1:.4f} ({seconds:.0f} s)", flush=True)

    fields = dict(
        epochs=args.epochs,
        warmup_epochs=1,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        eval_batch_size=100,
    )
    settings = [("scratch", None)] + [("finetune", None)] + [("finetune", d) for d in decays]
    print(
        f"T2T-ViT-7 at {IMAGE_SIZE}px; digits 6-9, {args.per_class} training images each, "
        f"{args.epochs} epochs, batch {args.batch_size}, peak lr {args.learning_rate:g} "
        f"(batch 512)",
        flush=True,
    )
    results = {}
    for seed in seeds:
        for start, decay in settings:
            name = "from scratch" if start == "scratch" else f"layer decay {decay or 'off'}"
            weights = pretrained if start == "finetune" else None
            run = os.path.join(workdir, f"{start}_{decay}_{seed}")
            shutil.rmtree(run, ignore_errors=True)  # a new run (one there would be resumed)
            run_config = config(
                finetune_data,
                run,
                len(FINETUNE_DIGITS),
                seed,
                weights=weights,
                layer_decay=decay,
                **fields,
            )
            top1, seconds = train(run_config)
            results.setdefault(name, []).append(top1)
            print(f"seed {seed} {name:18s} top-1 {top1:.4f} ({seconds:.0f} s)", flush=True)
    print(f"\nheld-out digits 6-9 (top-1, the better of raw and EMA), over seeds {seeds}:")
    for name, values in results.items():
        values = np.asarray(values)
        print(
            f"  {name:18s} mean {values.mean():.4f}  min {values.min():.4f}  max {values.max():.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
