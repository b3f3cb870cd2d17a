"""Trains or evaluates T2T-ViT on ImageNet with tf.distribute (TPU, GPUs, workers, CPU).

    # The main job on the embedded default (scikit-learn's digits, a few minutes on a CPU):
    python training/train_imagenet.py
    # T2T-ViT-14 with the paper's recipe on a Cloud TPU:
    python training/train_imagenet.py --tpu=my-tpu --strategy=tpu --model=t2t_vit_14 \\
        --data_dir=gs://bucket/imagenet --model_dir=gs://bucket/runs/t2t_vit_14

Defaults are the paper's recipe for --model (see README). The resolved config is written to
--model_dir/config.json; a run started again with the same command resumes from the latest
checkpoint in --model_dir.
"""

import logging
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from training import data as data_lib

FLAGS = flags.FLAGS
_D = data_lib.Augmentation()

flags.DEFINE_string(
    "data_dir", None, "ImageNet TFRecords (local or gs://); unset: the embedded digits."
)
flags.DEFINE_enum(
    "data_source", "tfrecord", ["tfrecord", "tfds"], "TFRecords or TFDS imagenet2012."
)
flags.DEFINE_string("model_dir", None, "Checkpoints, summaries, config.json, eval_results.json.")
flags.DEFINE_string("model", "t2t_vit_14", "Variant, e.g. t2t_vit_7 ... t2t_vit_t_24.")
flags.DEFINE_integer("image_size", 224, "Square input side, a multiple of 16.")
flags.DEFINE_integer("num_classes", 1000, "Number of classes.")
flags.DEFINE_integer("label_offset", 1, "Subtracted from image/class/label (ImageNet: 1).")
flags.DEFINE_integer("batch_size", 512, "Global batch size.")
flags.DEFINE_integer("eval_batch_size", None, "Global evaluation batch size (default: batch_size).")
flags.DEFINE_integer("epochs", 310, "Epochs, cooldown included.")
flags.DEFINE_integer("warmup_epochs", 5, "Linear warmup epochs from 1e-6.")
flags.DEFINE_integer("cooldown_epochs", 10, "Epochs at --min_lr after the cosine.")
flags.DEFINE_float(
    "learning_rate", None, "Peak LR for batch 512, scaled linearly (default: recipe)."
)
flags.DEFINE_float("min_lr", 1e-5, "LR at the end of the cosine and in the cooldown.")
flags.DEFINE_float("weight_decay", None, "AdamW weight decay (default: recipe).")
flags.DEFINE_float("grad_clip", None, "Clip gradients to this global norm.")
flags.DEFINE_float("drop_path_rate", 0.1, "Stochastic depth.")
flags.DEFINE_float("ema_decay", 0.99996, "EMA decay of the weights, per step.")
flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"], "What to run.")
flags.DEFINE_enum(
    "strategy", "default", ["default", "mirrored", "multi_worker", "tpu"], "tf.distribute strategy."
)
flags.DEFINE_string(
    "tpu", None, "TPU name or address (with --strategy=tpu; set alone, implies it)."
)
flags.DEFINE_string("weights", None, "Start from these weights (.pth.tar or .weights.h5).")
flags.DEFINE_enum(
    "mixed_precision", None, ["float32", "bfloat16", "float16"], "Default: bfloat16 on TPU."
)
flags.DEFINE_float("crop_pct", 0.9, "Evaluation crop fraction (resize to size / crop_pct).")
flags.DEFINE_integer("steps_per_loop", 100, "Steps per tf.function call.")
flags.DEFINE_integer("steps_per_epoch", None, "Override the steps of an epoch.")
flags.DEFINE_integer("eval_every_epochs", 10, "Evaluate every N epochs (and at the end).")
flags.DEFINE_bool("jit_compile", True, "Compile the forward and backward pass with XLA.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool(
    "skip_bad_records",
    False,
    "Skip records that cannot be read or decoded (each is logged with its file and counted) "
    "instead of stopping. Slower input pipeline.",
)
flags.DEFINE_float("crop_scale_min", _D.crop_scale_min, "Random resized crop: smallest area.")
flags.DEFINE_bool("hflip", _D.hflip, "Random horizontal flip.")
flags.DEFINE_integer("randaugment_ops", _D.randaugment_ops, "RandAugment ops per image (0: off).")
flags.DEFINE_float(
    "randaugment_magnitude", _D.randaugment_magnitude, "RandAugment strength in [0, 1]."
)
flags.DEFINE_float("mixup", _D.mixup_alpha, "Mixup alpha (0: off).")
flags.DEFINE_float("cutmix", _D.cutmix_alpha, "CutMix alpha (0: off).")
flags.DEFINE_float("label_smoothing", _D.label_smoothing, "Label smoothing.")
flags.DEFINE_float("random_erasing", _D.random_erasing, "Random erasing probability.")

# The embedded default: T2T-ViT-7 on scikit-learn's digits at 32x32, no flips (they change
# digits), light augmentation, a short schedule. Flags given on the command line still win.
EMBEDDED = dict(
    model="t2t_vit_7", image_size=32, num_classes=10, batch_size=64, epochs=15,
    warmup_epochs=2, cooldown_epochs=0, learning_rate=4e-3, weight_decay=0.05,
    drop_path_rate=0.0, ema_decay=0.99, steps_per_loop=100, eval_every_epochs=5,
    crop_pct=1.0, crop_scale_min=0.7, hflip=False, randaugment_ops=0, mixup=0.0,
    cutmix=0.0, random_erasing=0.0, label_smoothing=0.1,
)  # fmt: skip


def config_from_flags():
    from training import trainer
    from training.build_tfrecords import digits_tfrecords

    values = {name: FLAGS[name].value for name in FLAGS if name in _OUR_FLAGS}
    if FLAGS.data_dir is None and FLAGS.data_source == "tfrecord":
        for name, value in EMBEDDED.items():
            if not FLAGS[name].present:
                values[name] = value
        cache = os.path.join(
            os.path.expanduser(os.environ.get("KERAS_T2T_CACHE", "~/.cache/keras_t2t"))
        )
        values["data_dir"] = digits_tfrecords(cache, values["image_size"])
        logging.info(
            "No --data_dir: training on the embedded digits TFRecords in %s.", values["data_dir"]
        )
    if values["tpu"] and not FLAGS["strategy"].present:
        values["strategy"] = "tpu"
    if values["model_dir"] is None:
        values["model_dir"] = os.path.join("runs", values["model"])
    aug = data_lib.Augmentation(
        crop_scale_min=values.pop("crop_scale_min"),
        hflip=values.pop("hflip"),
        randaugment_ops=values.pop("randaugment_ops"),
        randaugment_magnitude=values.pop("randaugment_magnitude"),
        mixup_alpha=values.pop("mixup"),
        cutmix_alpha=values.pop("cutmix"),
        label_smoothing=values.pop("label_smoothing"),
        random_erasing=values.pop("random_erasing"),
    )
    return trainer.Config(**values, aug=aug)


_OUR_FLAGS = {
    "data_dir", "data_source", "model_dir", "model", "image_size", "num_classes", "label_offset",
    "batch_size", "eval_batch_size", "epochs", "warmup_epochs", "cooldown_epochs",
    "learning_rate", "min_lr", "weight_decay", "grad_clip", "drop_path_rate", "ema_decay", "mode",
    "strategy", "tpu", "weights", "mixed_precision", "crop_pct", "steps_per_loop",
    "steps_per_epoch", "eval_every_epochs", "jit_compile", "seed", "skip_bad_records",
    "crop_scale_min", "hflip",
    "randaugment_ops", "randaugment_magnitude", "mixup", "cutmix", "label_smoothing",
    "random_erasing",
}  # fmt: skip


def main(argv):
    del argv
    from training import trainer

    logging.getLogger("keras_t2t").setLevel(logging.INFO)
    try:
        config = config_from_flags()
        results = trainer.Trainer(config).run()
    except trainer.Preempted as stop:
        logging.warning("%s", stop)
        return 143
    except (trainer.TrainingError, data_lib.DataError, ValueError) as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        return 2
    if results:
        print(
            f"top1 {results['top1']:.4f} top5 {results['top5']:.4f} loss {results['loss']:.4f} | "
            f"EMA top1 {results['ema_top1']:.4f} top5 {results['ema_top5']:.4f} "
            f"(results in {os.path.join(config.model_dir, 'eval_results.json')})"
        )
    return 0


if __name__ == "__main__":
    app.run(main)
