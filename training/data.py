"""ImageNet input pipeline on tf.data, on the host: nothing here ends up in the TPU step.

Sources: TFRecords in the layout written by the TPU ImageNet converter (`train-00000-of-01024`,
`validation-00000-of-00128`, in one folder or in `train/` and `validation/` subfolders, local
or `gs://`), with features `image/encoded` and `image/class/label`; or TFDS `imagenet2012`.

Training: random resized crop (scale 0.08-1, ratio 3/4-4/3), flip, RandAugment per image,
random erasing, label smoothing, then mixup / cutmix per batch. Evaluation: resize the short
side to `image_size / crop_pct` (bicubic), center crop, as the official evaluation. Images
leave the pipeline as float32 RGB in [0, 255] (the models normalize inside), labels as
one-hot (training) or integer (evaluation) class indices. Batches have static shapes.
"""

import dataclasses

import tensorflow as tf

from keras_t2t.imagenet import resize_and_center_crop

AUTOTUNE = tf.data.AUTOTUNE
SPLITS = {"train": "train", "validation": "validation"}


class DataError(ValueError):
    """Bad input data, with a message that says what was wrong and how to fix it."""


@dataclasses.dataclass
class Augmentation:
    """The training augmentation; the defaults are the paper's recipe."""

    crop_scale_min: float = 0.08
    hflip: bool = True
    randaugment_ops: int = 2
    randaugment_magnitude: float = 0.9  # timm's m9 of 10; its mstd 0.5 becomes +-0.05
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    random_erasing: float = 0.25

    @classmethod
    def none(cls):
        """No augmentation at all (used by tests that compare runs)."""
        return cls(
            crop_scale_min=1.0,
            hflip=False,
            randaugment_ops=0,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
            label_smoothing=0.0,
            random_erasing=0.0,
        )


def list_files(data_dir, split):
    """TFRecord files of `split` ("train" or "validation") under `data_dir`, sorted."""
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'validation', received {split!r}.")
    patterns = [
        f"{data_dir}/{split}-*-of-*",
        f"{data_dir}/{split}/{split}-*-of-*",
        f"{data_dir}/{split}/*.tfrecord*",
    ]
    for pattern in patterns:
        files = sorted(tf.io.gfile.glob(pattern))
        if files:
            return files
    raise DataError(
        f"No {split} TFRecords found in {data_dir!r}: looked for {', '.join(patterns)}. Point "
        f"--data_dir at the folder written by the ImageNet TFRecord converter (files "
        f"{split}-00000-of-NNNNN), or make one with training/build_tfrecords.py."
    )


FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def parse_record(serialized, num_classes, label_offset):
    """A serialized Example -> (encoded image bytes, int32 label in [0, num_classes))."""
    example = tf.io.parse_single_example(serialized, FEATURES)
    label = tf.cast(example["image/class/label"], tf.int32) - label_offset
    return example["image/encoded"], check_label(label, num_classes, label_offset)


def check_label(label, num_classes, label_offset=0):
    """Fails the pipeline with a clear message when a label is out of range."""
    checks = [
        tf.debugging.assert_less(
            label,
            num_classes,
            message=f"label out of range: a record's label is >= num_classes + label_offset "
            f"({num_classes} + {label_offset}); check --num_classes and --label_offset",
        ),
        tf.debugging.assert_non_negative(
            label,
            message=f"label out of range: a record's label is < --label_offset "
            f"({label_offset}); ImageNet TFRecords use labels 1..1000 (--label_offset=1), "
            f"zero-based data needs --label_offset=0",
        ),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(label)


def decode(encoded):
    """JPEG or PNG bytes -> uint8 RGB (grayscale and CMYK are converted)."""
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def random_resized_crop(image, image_size, scale_min, seed=None):
    """Inception-style crop: area in [scale_min, 1], aspect ratio in [3/4, 4/3], bicubic."""
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros((1, 0, 4)),
        min_object_covered=0.0,
        aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
        area_range=(scale_min, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
        seed=seed or 0,
    )
    crop = tf.slice(image, begin, size)
    resized = tf.image.resize(crop, (image_size, image_size), method="bicubic")
    return tf.ensure_shape(tf.clip_by_value(resized, 0.0, 255.0), (image_size, image_size, 3))


class Augmenter:
    """Per-image and per-batch training augmentation with Keras core layers."""

    def __init__(self, aug, image_size, num_classes, seed=None):
        import keras

        self.aug = aug
        self.image_size = image_size
        self.num_classes = num_classes
        self.randaugment = (
            keras.layers.RandAugment(
                value_range=(0, 255),
                num_ops=aug.randaugment_ops,
                factor=(
                    aug.randaugment_magnitude - 0.05,
                    min(aug.randaugment_magnitude + 0.05, 1.0),
                ),
                seed=seed,
            )
            if aug.randaugment_ops
            else None
        )
        self.erasing = (
            keras.layers.RandomErasing(
                factor=(aug.random_erasing, aug.random_erasing), value_range=(0, 255), seed=seed
            )
            if aug.random_erasing
            else None
        )
        self.mixup = (
            keras.layers.MixUp(alpha=aug.mixup_alpha, seed=seed) if aug.mixup_alpha else None
        )
        self.cutmix = (
            keras.layers.CutMix(factor=aug.cutmix_alpha, seed=seed) if aug.cutmix_alpha else None
        )

    def image(self, image, label):
        aug = self.aug
        image = random_resized_crop(tf.cast(image, tf.float32), self.image_size, aug.crop_scale_min)
        if aug.hflip:
            image = tf.image.random_flip_left_right(image)
        if self.randaugment is not None:
            image = tf.clip_by_value(self.randaugment(image, training=True), 0.0, 255.0)
        if self.erasing is not None:
            image = self.erasing(image, training=True)
        target = tf.one_hot(label, self.num_classes)
        if aug.label_smoothing:
            target = target * (1.0 - aug.label_smoothing) + aug.label_smoothing / self.num_classes
        return tf.ensure_shape(image, (self.image_size, self.image_size, 3)), target

    def batch(self, images, targets):
        data = {"images": images, "labels": targets}
        if self.mixup is not None and self.cutmix is not None:
            data = tf.cond(
                tf.random.uniform(()) < self.aug.mix_switch_prob,
                lambda: self.cutmix(data, training=True),
                lambda: self.mixup(data, training=True),
            )
        elif self.mixup is not None:
            data = self.mixup(data, training=True)
        elif self.cutmix is not None:
            data = self.cutmix(data, training=True)
        return data["images"], data["labels"]


def _examples(source, input_context, shuffle, seed, num_classes, label_offset):
    # Element order follows the dataset options (`deterministic`), set by the callers.
    """`(uint8 image, label)` pairs from a list of TFRecord files or a TFDS dataset."""
    if isinstance(source, tf.data.Dataset):  # TFDS: decoded images, zero-based labels
        dataset = source
        if input_context is not None and input_context.num_input_pipelines > 1:
            dataset = dataset.shard(
                input_context.num_input_pipelines, input_context.input_pipeline_id
            )
        return dataset.map(
            lambda image, label: (image, check_label(tf.cast(label, tf.int32), num_classes)),
            num_parallel_calls=AUTOTUNE,
        )
    files = list(source)
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if input_context is not None and input_context.num_input_pipelines > 1:
        if len(files) < input_context.num_input_pipelines:
            raise DataError(
                f"{len(files)} TFRecord files cannot be sharded over "
                f"{input_context.num_input_pipelines} workers; write at least one file per "
                f"worker (--num_shards of build_tfrecords.py)."
            )
        dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
        cycle_length=min(16, len(files)),
        num_parallel_calls=AUTOTUNE,
    )

    def parse(serialized):
        encoded, label = parse_record(serialized, num_classes, label_offset)
        return decode(encoded), label

    return dataset.map(parse, num_parallel_calls=AUTOTUNE)


def train_dataset(
    source,
    batch_size,
    image_size,
    num_classes,
    aug,
    label_offset=1,
    input_context=None,
    seed=None,
    shuffle_buffer=10_000,
    deterministic=False,
):
    """Infinite training batches `(images [B, S, S, 3] float32, one-hot targets [B, C])`.

    `source` is a list of TFRecord files or a TFDS dataset (`tfds_dataset`). `batch_size` is
    per input pipeline (the per-replica batch times the replicas this pipeline feeds).
    """
    augmenter = Augmenter(aug, image_size, num_classes, seed=seed)
    dataset = _examples(source, input_context, True, seed, num_classes, label_offset)
    dataset = dataset.shuffle(shuffle_buffer, seed=seed).repeat()
    dataset = dataset.map(augmenter.image, num_parallel_calls=AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if augmenter.mixup is not None or augmenter.cutmix is not None:
        dataset = dataset.map(augmenter.batch, num_parallel_calls=AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    return dataset.with_options(options).prefetch(AUTOTUNE)


def eval_dataset(
    source, batch_size, image_size, num_classes, crop_pct=0.9, label_offset=1, input_context=None
):
    """Evaluation batches `(images, labels, mask)`: one pass over every record, in order.

    The last batch is padded to `batch_size` (static shapes for TPU); `mask` is 0 on padding.
    """
    dataset = _examples(source, input_context, False, None, num_classes, label_offset)
    dataset = dataset.map(
        lambda image, label: (resize_and_center_crop(image, image_size, crop_pct), label, 1.0),
        num_parallel_calls=AUTOTUNE,
    )
    pad = tf.data.Dataset.from_tensors(
        (tf.zeros((image_size, image_size, 3)), tf.constant(0, tf.int32), 0.0)
    ).repeat(batch_size - 1)
    dataset = dataset.concatenate(pad).batch(batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options).prefetch(AUTOTUNE)


def tfds_dataset(split, data_dir=None):
    """TFDS `imagenet2012` as `(uint8 image, zero-based label)` pairs (optional extra)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DataError(
            "--data_source=tfds needs tensorflow-datasets: pip install keras-t2t[tfds]"
        ) from error
    return tfds.load("imagenet2012", split=split, data_dir=data_dir, as_supervised=True)
