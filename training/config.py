"""What a run is: `Config`, the recipes that fill its defaults, and `resolve`, which fills
them and checks every value (named by its flag) before anything is built or written.

Sections: recipes -> Config -> resolve and the checks -> normalization of a run's record.
"""

import dataclasses
import json

from keras_t2t import pretrained
from keras_t2t.configs import variant_config
from keras_t2t.imagenet import IMAGENET_MEAN, IMAGENET_STD
from training import data as data_lib
from training.errors import TrainingError

MODES = ("train", "eval", "train_and_eval")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "bfloat16", "float16")


# --- recipes --------------------------------------------------------------------------------


RECIPES = ("imagenet", "finetune")


def recipe(model, name="imagenet"):
    """The training defaults of recipe `name` for a variant: the `Config` fields (and the
    augmentation) a recipe sets. The one place that defines them; `Config`, the flags of
    train_imagenet.py and its --help all take them from here.

    "imagenet": the paper's recipe (lr and weight decay by variant, for batch 512).
    "finetune": fine-tuning (from `--weights`) and small datasets: a lower learning rate, a
    one-epoch warmup, a short cosine, crop, flip and label smoothing only (no RandAugment,
    mixup, cutmix or erasing), and a shorter EMA (warmed up, as on every recipe).
    """
    if name == "imagenet":
        small = model in ("t2t_vit_7", "t2t_vit_10", "t2t_vit_12")
        large = any(model.endswith(s) for s in ("_19", "_24"))
        return dict(
            learning_rate=1e-3 if small else 5e-4,
            weight_decay=0.03 if small else (0.065 if large else 0.05),
            epochs=310,
            warmup_epochs=5,
            cooldown_epochs=10,
            warmup_lr=1e-6,
            min_lr=1e-5,
            drop_path_rate=0.1,
            ema_decay=0.99996,
            aug=data_lib.Augmentation(),
        )
    if name == "finetune":
        return dict(
            learning_rate=1e-4,
            weight_decay=0.05,
            epochs=30,
            warmup_epochs=1,
            cooldown_epochs=0,
            warmup_lr=1e-6,
            min_lr=1e-6,
            drop_path_rate=0.1,
            ema_decay=0.9998,
            aug=data_lib.Augmentation(
                randaugment_ops=0, mixup_alpha=0.0, cutmix_alpha=0.0, random_erasing=0.0
            ),
        )
    raise TrainingError(f"--recipe must be one of {RECIPES}, received {name!r}.")


# --- Config ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    """Everything a run needs; `None` fields take their value from `recipe` (see there)."""

    model: str = "t2t_vit_14"
    model_dir: str = "runs/t2t_vit_14"
    data_dir: str = None
    data_source: str = "tfrecord"  # or "tfds"
    mode: str = "train_and_eval"
    strategy: str = "default"
    tpu: str = None
    recipe: str = "imagenet"  # the defaults of the None fields below: RECIPES
    image_size: int = 224
    num_classes: int = 1000
    label_offset: int = 1
    batch_size: int = 512  # global
    epochs: int = None  # including the cooldown
    warmup_epochs: int = None
    cooldown_epochs: int = None
    learning_rate: float = None  # for batch 512, scaled linearly with batch_size
    warmup_lr: float = None
    min_lr: float = None
    weight_decay: float = None
    grad_clip: float = None
    layer_decay: float = None  # layer-wise LR decay in (0, 1]; None or 1: off
    gradient_checkpointing: bool = False  # recompute the blocks in the backward pass
    drop_path_rate: float = None
    ema_decay: float = None
    mixed_precision: str = None  # None: bfloat16 on TPU, float32 elsewhere
    weights: str = None  # start from: "imagenet" (a release), a file or a run's model_dir
    crop_pct: float = 0.9
    eval_batch_size: int = None
    steps_per_loop: int = 100
    steps_per_epoch: int = None  # default: train examples // batch_size
    train_examples: int = None  # default: counted (ImageNet: 1,281,167)
    eval_every_epochs: int = 10
    jit_compile: bool = True
    seed: int = 0
    deterministic_data: bool = False  # reproducible input order (slower); for tests
    max_checkpoints: int = 3
    checkpoint_every: str = "10m"  # also save every N minutes ("10m") or steps ("2000"); "0": off
    skip_bad_records: bool = False  # skip (and log) unreadable records instead of stopping
    aug: data_lib.Augmentation = None

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# --- resolve and the checks -----------------------------------------------------------------


def _positive(value):
    """A positive number that float32 holds (1e41 would overflow the schedule's tensors)."""
    return isinstance(value, (int, float)) and 0 < value < 1e38


def resolve(config):
    """Fills the recipe defaults and checks the config; returns a new Config."""
    config = dataclasses.replace(config)
    min_lr_given = config.min_lr is not None
    try:  # the official snake-case name ("T2T-ViT-7" -> "t2t_vit_7"), which recipes key on
        config.model = variant_config(config.model)[0]
    except ValueError as error:
        raise TrainingError(f"Unknown --model: {error}") from None
    for field, value in recipe(config.model, config.recipe).items():
        if getattr(config, field) is None:
            setattr(config, field, value)
    if config.mixed_precision is None:
        config.mixed_precision = "bfloat16" if config.strategy == "tpu" else "float32"
    for flag, value, allowed in (
        ("--mode", config.mode, MODES),
        ("--strategy", config.strategy, STRATEGIES),
        ("--mixed_precision", config.mixed_precision, PRECISIONS),
        ("--data_source", config.data_source, ("tfrecord", "tfds")),
    ):
        if value not in allowed:
            raise TrainingError(f"{flag} must be one of {allowed}, received {value!r}.")
    checks = [
        (
            config.image_size >= 16 and config.image_size % 16 == 0,
            f"--image_size must be a multiple of 16 (224, 384, 32, ...), "
            f"received {config.image_size}.",
        ),
        (config.batch_size >= 1, f"--batch_size must be >= 1, received {config.batch_size}."),
        (config.epochs >= 1, f"--epochs must be >= 1, received {config.epochs}."),
        (
            0 <= config.warmup_epochs < config.epochs,
            f"--warmup_epochs must be in [0, --epochs), received {config.warmup_epochs}.",
        ),
        (
            config.steps_per_loop >= 1,
            f"--steps_per_loop must be >= 1, received {config.steps_per_loop}.",
        ),
        (
            _positive(config.learning_rate),
            f"--learning_rate must be a positive number below 1e38, received "
            f"{config.learning_rate}.",
        ),
        (
            _positive(config.min_lr) and _positive(config.warmup_lr),
            f"--min_lr and the warmup LR must be positive numbers below 1e38, received "
            f"{config.min_lr} and {config.warmup_lr}.",
        ),
        (
            config.weight_decay >= 0 and _positive(config.weight_decay + 1),
            f"--weight_decay must be >= 0, received {config.weight_decay}.",
        ),
        (
            config.grad_clip is None or _positive(config.grad_clip),
            f"--grad_clip must be a positive number, received {config.grad_clip}.",
        ),
        (
            config.layer_decay is None
            or (not isinstance(config.layer_decay, bool) and 0 < config.layer_decay <= 1),
            f"--layer_decay must be in (0, 1] (e.g. 0.75; 1 or unset: off), received "
            f"{config.layer_decay}.",
        ),
        (0 <= config.ema_decay < 1, f"--ema_decay must be in [0, 1), received {config.ema_decay}."),
        (
            0 <= config.drop_path_rate < 1,
            f"--drop_path_rate must be in [0, 1), received {config.drop_path_rate}.",
        ),
        (
            config.eval_every_epochs >= 1,
            f"--eval_every_epochs must be >= 1, received {config.eval_every_epochs}.",
        ),
        *(
            (value is None or value >= 1, f"--{name} must be >= 1 (or unset), received {value}.")
            for name, value in (
                ("steps_per_epoch", config.steps_per_epoch),
                ("eval_batch_size", config.eval_batch_size),
                ("train_examples", config.train_examples),
            )
        ),
        (0 < config.crop_pct <= 1, f"--crop_pct must be in (0, 1], received {config.crop_pct}."),
        (
            not min_lr_given or config.min_lr <= config.learning_rate * config.batch_size / 512,
            f"--min_lr={config.min_lr} is above the peak learning rate, --learning_rate "
            f"{config.learning_rate} scaled to --batch_size={config.batch_size} "
            f"({config.learning_rate * config.batch_size / 512:.3g}); lower it.",
        ),
        *augmentation_checks(config.aug),
        (
            not (config.grad_clip and config.mixed_precision == "float16"),
            "--grad_clip with --mixed_precision=float16 is not supported (the loss scale hides the "
            "gradient norm); use bfloat16, or no clipping.",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)
    checkpoint_interval(config.checkpoint_every)  # refuses a malformed value now
    config.cooldown_epochs = min(config.cooldown_epochs, config.epochs - config.warmup_epochs - 1)
    config.cooldown_epochs = max(config.cooldown_epochs, 0)
    return config


def augmentation_checks(aug):
    """(ok, message) of each field of an `Augmentation`, named by its flag."""
    return [
        (
            0 < aug.crop_scale_min <= 1,
            f"--crop_scale_min must be in (0, 1], received {aug.crop_scale_min}.",
        ),
        (
            aug.randaugment_ops >= 0,
            f"--randaugment_ops must be >= 0, received {aug.randaugment_ops}.",
        ),
        (
            0 <= aug.randaugment_magnitude <= 10,
            f"--randaugment_magnitude must be in [0, 10], received {aug.randaugment_magnitude}.",
        ),
        (
            aug.randaugment_magnitude_std >= 0,
            f"--randaugment_magnitude_std must be >= 0, received {aug.randaugment_magnitude_std}.",
        ),
        (aug.mixup_alpha >= 0, f"--mixup must be >= 0 (0: off), received {aug.mixup_alpha}."),
        (aug.cutmix_alpha >= 0, f"--cutmix must be >= 0 (0: off), received {aug.cutmix_alpha}."),
        (
            0 <= aug.mix_switch_prob <= 1,
            f"The mixup/cutmix switch probability must be in [0, 1], received "
            f"{aug.mix_switch_prob}.",
        ),
        (
            0 <= aug.label_smoothing < 1,
            f"--label_smoothing must be in [0, 1), received {aug.label_smoothing}.",
        ),
        (
            0 <= aug.random_erasing <= 1,
            f"--random_erasing must be in [0, 1], received {aug.random_erasing}.",
        ),
    ]


def checkpoint_interval(value):
    """`--checkpoint_every` as `(minutes, steps)`, one of them None: "10m" is every 10
    minutes, "2000" every 2,000 steps, "0" only at the ends of epochs (None, None)."""
    text = str(value).strip().lower()
    try:
        number = float(text[:-1]) if text.endswith("m") else int(text)
    except ValueError:
        number = -1
    if number < 0:
        raise TrainingError(
            f"--checkpoint_every must be minutes ending in m (10m), a number of steps (2000) "
            f"or 0 (at the ends of epochs only), received {value!r}."
        )
    if number == 0:
        return None, None
    return (number, None) if text.endswith("m") else (None, number)


# --- normalization of a run's record --------------------------------------------------------


def normalization(record, weights):
    """(mean, std) of a run of `record`'s model started from `weights` (a release name, or
    anything else: ImageNet's)."""
    if weights and pretrained.is_release_name(weights) and record.get("model"):
        try:
            release = pretrained.find_release(record["model"], weights, record.get("image_size"))
            return tuple(release.mean), tuple(release.std)
        except ValueError:
            pass
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
