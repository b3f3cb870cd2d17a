"""Trains or evaluates T2T-ViT on ImageNet with tf.distribute (TPU, GPUs, workers, CPU).

    # The main job on the embedded default (scikit-learn's digits, a few minutes on a CPU):
    python training/train_imagenet.py
    # T2T-ViT-14 with the paper's recipe on a Cloud TPU:
    python training/train_imagenet.py --tpu=my-tpu --strategy=tpu --model=t2t_vit_14 \\
        --data_dir=gs://bucket/imagenet --model_dir=gs://bucket/runs/t2t_vit_14

Defaults are the paper's recipe for --model (see docs/training.md). The resolved config is
written to --model_dir/config.json; a run started again with the same command resumes from the
latest checkpoint in --model_dir.
"""

import logging
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from training import config as run_config
from training import data as data_lib
from training.errors import Preempted, TrainingError
from training.trainer import Trainer

FLAGS = flags.FLAGS
# The defaults are defined once, in training.config: `Config` and the recipes.
_C = run_config.Config()
_R = {name: run_config.recipe("t2t_vit_14", name) for name in run_config.RECIPES}


def _recipe_help(text, field, aug=False):
    values = {
        name: getattr(values["aug"], field) if aug else values[field] for name, values in _R.items()
    }
    shown = ", ".join(f"{name}: {value}" for name, value in values.items())
    return f"{text} (default: by --recipe; {shown})."


flags.DEFINE_string(
    "data_dir", None, "ImageNet TFRecords (local or gs://); unset: the embedded digits."
)
flags.DEFINE_enum(
    "data_source", _C.data_source, ["tfrecord", "tfds"], "TFRecords or TFDS imagenet2012."
)
flags.DEFINE_string("model_dir", None, "Checkpoints, summaries, config.json, weights, results.")
flags.DEFINE_string("model", _C.model, "Variant, e.g. t2t_vit_7 ... t2t_vit_t_24.")
flags.DEFINE_enum(
    "recipe",
    _C.recipe,
    list(run_config.RECIPES),
    "Defaults of the schedule, regularization and augmentation: imagenet (the paper's) or "
    "finetune (from --weights, or small data: lower LR, short warmup, no RandAugment, mixup, "
    "cutmix or erasing). Flags given on the command line override it.",
)
flags.DEFINE_integer("image_size", _C.image_size, "Square input side, a multiple of 16.")
flags.DEFINE_integer("num_classes", _C.num_classes, "Number of classes.")
flags.DEFINE_integer(
    "label_offset", _C.label_offset, "Subtracted from image/class/label (ImageNet: 1)."
)
flags.DEFINE_integer("batch_size", _C.batch_size, "Global batch size.")
flags.DEFINE_integer("eval_batch_size", None, "Global evaluation batch size (default: batch_size).")
flags.DEFINE_integer("epochs", None, _recipe_help("Epochs, cooldown included", "epochs"))
flags.DEFINE_integer(
    "warmup_epochs", None, _recipe_help("Linear warmup epochs from 1e-6", "warmup_epochs")
)
flags.DEFINE_integer(
    "cooldown_epochs", None, _recipe_help("Epochs at --min_lr after the cosine", "cooldown_epochs")
)
flags.DEFINE_float(
    "learning_rate",
    None,
    "Peak LR for batch 512, scaled linearly with --batch_size (default: by --recipe and "
    "--model; imagenet: 1e-3 for 7/10/12, else 5e-4; finetune: 1e-4).",
)
flags.DEFINE_float(
    "min_lr", None, _recipe_help("LR at the end of the cosine and in the cooldown", "min_lr")
)
flags.DEFINE_float(
    "weight_decay",
    None,
    "AdamW weight decay (default: by --recipe and --model; imagenet: 0.03 for 7/10/12, 0.065 "
    "for 19/24, else 0.05; finetune: 0.05).",
)
flags.DEFINE_float("grad_clip", None, "Clip gradients to this global norm.")
flags.DEFINE_float(
    "layer_decay",
    None,
    "Layer-wise learning-rate decay for fine-tuning, in (0, 1] (e.g. 0.75): block i of depth "
    "learns at decay**(depth - i) times the rate of the head, the T2T module and class token "
    "at decay**(depth + 1) (keras_t2t.layer_decay_multipliers). Default: off.",
)
flags.DEFINE_bool(
    "gradient_checkpointing",
    _C.gradient_checkpointing,
    "Recompute the blocks' attention and MLP in the backward pass instead of keeping their "
    "activations: less memory, up to a third more compute, the same gradients. Needs no "
    "dropout (the recipes use none).",
)
flags.DEFINE_float("drop_path_rate", None, _recipe_help("Stochastic depth", "drop_path_rate"))
flags.DEFINE_float(
    "ema_decay", None, _recipe_help("EMA decay of the weights per step, warmed up", "ema_decay")
)
flags.DEFINE_enum("mode", _C.mode, ["train", "eval", "train_and_eval"], "What to run.")
flags.DEFINE_enum("strategy", _C.strategy, list(run_config.STRATEGIES), "tf.distribute strategy.")
flags.DEFINE_string(
    "tpu", None, "TPU name or address (with --strategy=tpu; set alone, implies it)."
)
flags.DEFINE_string(
    "weights",
    None,
    "Start from these weights: imagenet (the official release of --model, downloaded once; "
    "see KERAS_T2T_WEIGHTS_URL), a .pth.tar / .weights.h5 file, or a run's --model_dir.",
)
flags.DEFINE_enum("mixed_precision", None, list(run_config.PRECISIONS), "Default: bfloat16 on TPU.")
flags.DEFINE_float("crop_pct", _C.crop_pct, "Evaluation crop fraction (resize to size / crop_pct).")
flags.DEFINE_integer("steps_per_loop", _C.steps_per_loop, "Steps per tf.function call.")
flags.DEFINE_integer("steps_per_epoch", None, "Override the steps of an epoch.")
flags.DEFINE_integer(
    "eval_every_epochs", _C.eval_every_epochs, "Evaluate every N epochs (and at the end)."
)
flags.DEFINE_bool("jit_compile", _C.jit_compile, "Compile the forward and backward pass with XLA.")
flags.DEFINE_integer("seed", _C.seed, "Random seed.")
flags.DEFINE_string(
    "checkpoint_every",
    _C.checkpoint_every,
    "Also save a checkpoint every N minutes (10m) or steps (2000), at the end of a loop of "
    "--steps_per_loop; 0: at the ends of epochs only.",
)
flags.DEFINE_bool(
    "skip_bad_records",
    _C.skip_bad_records,
    "Skip records that cannot be read or decoded (each is logged with its file and counted) "
    "instead of stopping. Slower input pipeline.",
)
# Augmentation flags: their defaults come from --recipe.
AUG_FLAGS = {  # flag -> Augmentation field
    "crop_scale_min": "crop_scale_min",
    "hflip": "hflip",
    "randaugment_ops": "randaugment_ops",
    "randaugment_magnitude": "randaugment_magnitude",
    "randaugment_magnitude_std": "randaugment_magnitude_std",
    "mixup": "mixup_alpha",
    "cutmix": "cutmix_alpha",
    "label_smoothing": "label_smoothing",
    "random_erasing": "random_erasing",
}
flags.DEFINE_float(
    "crop_scale_min", None, _recipe_help("Random-resized-crop smallest area", "crop_scale_min", 1)
)
flags.DEFINE_bool("hflip", None, _recipe_help("Random horizontal flip", "hflip", True))
flags.DEFINE_integer(
    "randaugment_ops", None, _recipe_help("RandAugment ops per image", "randaugment_ops", True)
)
flags.DEFINE_float(
    "randaugment_magnitude",
    None,
    _recipe_help("RandAugment magnitude in [0, 10] (timm's m)", "randaugment_magnitude", True),
)
flags.DEFINE_float(
    "randaugment_magnitude_std",
    None,
    _recipe_help(
        "Std of the per-op RandAugment magnitude (timm's mstd)", "randaugment_magnitude_std", True
    ),
)
flags.DEFINE_float("mixup", None, _recipe_help("Mixup alpha (0: off)", "mixup_alpha", True))
flags.DEFINE_float("cutmix", None, _recipe_help("CutMix alpha (0: off)", "cutmix_alpha", True))
flags.DEFINE_float(
    "label_smoothing", None, _recipe_help("Label smoothing", "label_smoothing", True)
)
flags.DEFINE_float(
    "random_erasing", None, _recipe_help("Random erasing probability", "random_erasing", True)
)

# The embedded default: T2T-ViT-7 on scikit-learn's digits at 32x32, no flips (they change
# digits), light augmentation, a short schedule. Only what differs from the imagenet recipe;
# flags given on the command line still win.
EMBEDDED = dict(
    model="t2t_vit_7",
    image_size=32,
    num_classes=10,
    batch_size=64,
    epochs=15,
    warmup_epochs=2,
    cooldown_epochs=0,
    learning_rate=4e-3,
    weight_decay=0.05,
    drop_path_rate=0.0,
    ema_decay=0.99,
    eval_every_epochs=5,
    crop_pct=1.0,
    crop_scale_min=0.7,
    hflip=False,
    randaugment_ops=0,
    mixup=0.0,
    cutmix=0.0,
    random_erasing=0.0,
)


def config_from_flags():
    import dataclasses

    from training.build_tfrecords import digits_tfrecords

    values = {name: FLAGS[name].value for name in FLAGS if name in _OUR_FLAGS}
    embedded = FLAGS.data_dir is None and FLAGS.data_source == "tfrecord"
    if embedded:
        for name, value in EMBEDDED.items():
            if not FLAGS[name].present:
                values[name] = value
    if values["tpu"] and not FLAGS["strategy"].present:
        values["strategy"] = "tpu"
    if values["model_dir"] is None:
        values["model_dir"] = os.path.join("runs", values["model"])
    aug = run_config.recipe(values["model"], values["recipe"])["aug"]
    given = {field: values.pop(flag) for flag, field in AUG_FLAGS.items()}
    aug = dataclasses.replace(aug, **{k: v for k, v in given.items() if v is not None})
    config = run_config.Config(**values, aug=aug)
    run_config.resolve(config)  # every flag is checked before anything is built or written
    if embedded:
        cache = os.path.join(
            os.path.expanduser(os.environ.get("KERAS_T2T_CACHE", "~/.cache/keras_t2t"))
        )
        config.data_dir = digits_tfrecords(cache, config.image_size)
        logging.info(
            "No --data_dir: training on the embedded digits TFRecords in %s.", config.data_dir
        )
    return config


_OUR_FLAGS = {
    "data_dir",
    "data_source",
    "model_dir",
    "model",
    "recipe",
    "image_size",
    "num_classes",
    "label_offset",
    "batch_size",
    "eval_batch_size",
    "epochs",
    "warmup_epochs",
    "cooldown_epochs",
    "learning_rate",
    "min_lr",
    "weight_decay",
    "grad_clip",
    "layer_decay",
    "gradient_checkpointing",
    "drop_path_rate",
    "ema_decay",
    "mode",
    "strategy",
    "tpu",
    "weights",
    "mixed_precision",
    "crop_pct",
    "steps_per_loop",
    "steps_per_epoch",
    "eval_every_epochs",
    "jit_compile",
    "seed",
    "skip_bad_records",
    "checkpoint_every",
    *AUG_FLAGS,
}


def main(argv):
    del argv
    logging.getLogger("keras_t2t").setLevel(logging.INFO)
    try:
        config = config_from_flags()
        results = Trainer(config).run()
    except Preempted as stop:
        logging.warning("%s", stop)
        return 143
    except (TrainingError, data_lib.DataError, ValueError) as error:
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
