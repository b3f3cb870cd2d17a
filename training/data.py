"""ImageNet input pipeline on tf.data, on the host: nothing here ends up in the TPU step.

Sources: TFRecords in the layout written by the TPU ImageNet converter (`train-00000-of-01024`,
`validation-00000-of-00128`, in one folder or in `train/` and `validation/` subfolders, local
or `gs://`), with features `image/encoded` and `image/class/label`; or TFDS `imagenet2012`.

Training: random resized crop (scale 0.08-1, ratio 3/4-4/3; a JPEG is decoded as its crop
only), flip, RandAugment and random erasing per image (`training/augment.py`, timm's, from a
per-image seed), label smoothing, then mixup / cutmix per batch (Keras core).

Evaluation: resize the short side to `image_size / crop_pct` (bicubic), center crop, as the
official evaluation. Images leave the pipeline as float32 (or bfloat16) RGB in [0, 255] (the
models normalize inside; erased boxes hold unclipped noise), labels as one-hot (training) or
integer (evaluation) class indices. Batches have static shapes.
"""

import concurrent.futures
import dataclasses
import json
import logging
import os
import struct
import sys
import time

import tensorflow as tf

from keras_t2t.imagenet import decode_rgb, resize_and_center_crop
from training import augment

AUTOTUNE = tf.data.AUTOTUNE
SPLITS = {"train": "train", "validation": "validation"}
# The standard ImageNet TFRecords (the TPU converter's): shards and records per split.
IMAGENET_LAYOUT = {"train": (1024, 1_281_167), "validation": (128, 50_000)}
MANIFEST = "manifest-{split}.json"

logger = logging.getLogger("keras_t2t.training")


class DataError(ValueError):
    """Bad input data, with a message that says what was wrong and how to fix it."""


@dataclasses.dataclass
class Augmentation:
    """The training augmentation; the defaults are the paper's recipe."""

    crop_scale_min: float = 0.08
    hflip: bool = True
    randaugment_ops: int = 2
    randaugment_magnitude: float = 9.0  # timm's rand-m9-mstd0.5-inc1, on its 0-10 scale
    randaugment_magnitude_std: float = 0.5
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


def _crop_window(shape, scale_min, seed):
    """(begin, size) of an Inception-style crop of an image of `shape`: area in
    [scale_min, 1] of the image, aspect ratio in [3/4, 4/3] (`seed`: shape (2,))."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.zeros((1, 0, 4)),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
        area_range=(scale_min, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def random_resized_crop(image, image_size, scale_min, seed):
    """Random-resized crop of encoded bytes (JPEG: only the crop is decoded, with
    `decode_and_crop_jpeg`; PNG and others: decoded whole) or of a decoded uint8 image,
    resized bicubic to `image_size` and rounded to integers, as timm's PIL crop gives."""
    if image.dtype == tf.string:

        def jpeg():
            begin, size = _crop_window(tf.image.extract_jpeg_shape(image), scale_min, seed)
            window = tf.stack([begin[0], begin[1], size[0], size[1]])
            return tf.io.decode_and_crop_jpeg(image, window, channels=3)

        def other():
            decoded = decode_rgb(image)
            begin, size = _crop_window(tf.shape(decoded), scale_min, seed)
            return tf.slice(decoded, begin, size)

        crop = tf.cond(tf.io.is_jpeg(image), jpeg, other)
    else:
        begin, size = _crop_window(tf.shape(image), scale_min, seed)
        crop = tf.slice(image, begin, size)
    resized = tf.image.resize(crop, (image_size, image_size), method="bicubic")
    resized = tf.round(tf.clip_by_value(resized, 0.0, 255.0))
    return tf.ensure_shape(resized, (image_size, image_size, 3))


class Augmenter:
    """The training augmentation: per image (`image`, stateless, from a per-image seed) and
    per batch (`batch`: Keras core's MixUp and CutMix)."""

    def __init__(self, aug, image_size, num_classes, seed=None):
        import keras

        self.aug = aug
        self.image_size = image_size
        self.num_classes = num_classes
        self.randaugment = (
            augment.RandAugment(
                aug.randaugment_ops, aug.randaugment_magnitude, aug.randaugment_magnitude_std
            )
            if aug.randaugment_ops
            else None
        )
        self.mix_seed = None if seed is None else seed + 1
        self.mixup = (
            keras.layers.MixUp(alpha=aug.mixup_alpha, seed=seed) if aug.mixup_alpha else None
        )
        self.cutmix = (
            keras.layers.CutMix(factor=aug.cutmix_alpha, seed=seed) if aug.cutmix_alpha else None
        )

    def image(self, image, label, seed=None):
        """`image`: encoded bytes or a uint8 image; `seed` (shape (2,)): the image's draws."""
        aug = self.aug
        if seed is None:
            seed = tf.random.uniform((2,), 0, 2**31 - 1, tf.int64)
        crop_seed, flip_seed, randaugment_seed, erasing_seed = augment._split(seed, 4)
        image = random_resized_crop(image, self.image_size, aug.crop_scale_min, crop_seed)
        if aug.hflip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        if self.randaugment is not None:
            image = self.randaugment(image, randaugment_seed)
        if aug.random_erasing:
            image = augment.random_erasing(image, erasing_seed, aug.random_erasing)
        target = tf.one_hot(label, self.num_classes)
        if aug.label_smoothing:
            target = target * (1.0 - aug.label_smoothing) + aug.label_smoothing / self.num_classes
        return tf.ensure_shape(image, (self.image_size, self.image_size, 3)), target

    def batch(self, images, targets):
        data = {"images": images, "labels": targets}
        if self.mixup is not None and self.cutmix is not None:
            data = tf.cond(
                tf.random.uniform((), seed=self.mix_seed) < self.aug.mix_switch_prob,
                lambda: self.cutmix(data, training=True),
                lambda: self.mixup(data, training=True),
            )
        elif self.mixup is not None:
            data = self.mixup(data, training=True)
        elif self.cutmix is not None:
            data = self.cutmix(data, training=True)
        return data["images"], data["labels"]


def _examples(
    source,
    input_context,
    shuffle,
    seed,
    num_classes,
    label_offset,
    skip_bad_records=None,
    decode_images=True,
):
    # Element order follows the dataset options (`deterministic`), set by the callers.
    """`(uint8 image, label)` pairs from a list of TFRecord files or a `TFDSSource`; with
    `decode_images=False`, `(encoded bytes, label)` (decoded later, as their crop only).

    `skip_bad_records`: None fails on the first bad record (the fast path); a dict
    `{shard: records}` (from `check_shards`) skips records that cannot be read, parsed or
    decoded, and logs each with its shard, index and image/filename (`checked_records`).
    """
    if isinstance(source, TFDSSource):  # zero-based labels; each pipeline reads its files
        dataset = source.dataset(input_context, shuffle, seed, decode_images)
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
    if skip_bad_records is not None:
        checked = count_bad(checked_records(dataset, skip_bad_records, min(16, len(files))))
        return checked.filter(_log_bad_record).map(
            lambda image, label, *_: (
                image,
                check_label(label - label_offset, num_classes, label_offset),
            ),
            num_parallel_calls=AUTOTUNE,
        )
    dataset = dataset.interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
        cycle_length=min(16, len(files)),
        num_parallel_calls=AUTOTUNE,
    )

    def parse(serialized):
        encoded, label = parse_record(serialized, num_classes, label_offset)
        return (decode_rgb(encoded) if decode_images else encoded), label

    return dataset.map(parse, num_parallel_calls=AUTOTUNE)


def pipeline_seed(seed, input_context=None):
    """The seed of one input pipeline: `seed` for pipeline 0 (and a single host), a different
    one for each other pipeline; None stays None (unseeded)."""
    if seed is None or input_context is None:
        return seed
    return (int(seed) + 1_000_003 * input_context.input_pipeline_id) % 2**31


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
    skip_bad_records=None,
    image_dtype=tf.float32,
):
    """Infinite training batches `(images [B, S, S, 3], one-hot targets [B, C])`, the images
    in `image_dtype` (bfloat16 halves what goes to the device: it holds integer pixels
    exactly, and rounds mixed and erased ones to its 8 significant bits).

    `source` is a list of TFRecord files or a `TFDSSource`. `batch_size` is
    per input pipeline (the per-replica batch times the replicas this pipeline feeds).
    `skip_bad_records`: see `_examples`.

    `seed` is folded with the input pipeline's id (`pipeline_seed`), so that every host draws
    its own crops, RandAugment ops and mixing, reproducibly.
    """
    seed = pipeline_seed(seed, input_context)
    augmenter = Augmenter(aug, image_size, num_classes, seed=seed)
    # The shuffle buffer holds encoded JPEGs (about 110 kB each on ImageNet), not decoded
    # images; each is decoded as its crop only (`random_resized_crop`).
    dataset = _examples(
        source,
        input_context,
        True,
        seed,
        num_classes,
        label_offset,
        skip_bad_records,
        decode_images=False,
    )
    dataset = dataset.shuffle(shuffle_buffer, seed=seed).repeat()
    # One seed per image, in stream order: the stateless augmentation then gives the same
    # images whatever the order in which the parallel map runs.
    seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
    dataset = tf.data.Dataset.zip(dataset, seeds).map(
        lambda example, image_seed: augmenter.image(*example, image_seed),
        num_parallel_calls=AUTOTUNE,
    )
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if augmenter.mixup is not None or augmenter.cutmix is not None:
        # Keras' layers draw from a stateful generator: one batch at a time when the run
        # must be reproducible (the per-batch work is small beside the per-image work).
        dataset = dataset.map(
            augmenter.batch, num_parallel_calls=None if deterministic else AUTOTUNE
        )
    if image_dtype != tf.float32:
        dataset = dataset.map(lambda images, targets: (tf.cast(images, image_dtype), targets))
    options = tf.data.Options()
    options.deterministic = deterministic
    return dataset.with_options(options).prefetch(AUTOTUNE)


def eval_dataset(
    source,
    batch_size,
    image_size,
    num_classes,
    crop_pct=0.9,
    label_offset=1,
    input_context=None,
    skip_bad_records=None,
    num_batches=None,
):
    """Evaluation batches `(images, labels, mask)`: one pass over every record, in order.

    The last batch is padded to `batch_size` (static shapes for TPU); `mask` is 0 on padding.
    `num_batches` (see `eval_batches`): pad with whole batches of padding up to that many, so
    that every input pipeline gives the same number of batches.
    """
    dataset = _examples(
        source, input_context, False, None, num_classes, label_offset, skip_bad_records
    )
    dataset = dataset.map(
        lambda image, label: (resize_and_center_crop(image, image_size, crop_pct), label, 1.0),
        num_parallel_calls=AUTOTUNE,
    )
    pad = tf.data.Dataset.from_tensors(
        (tf.zeros((image_size, image_size, 3)), tf.constant(0, tf.int32), 0.0)
    )
    if num_batches is None:
        dataset = dataset.concatenate(pad.repeat(batch_size - 1))
        dataset = dataset.batch(batch_size, drop_remainder=True)
    else:
        dataset = dataset.concatenate(pad.repeat()).batch(batch_size).take(num_batches)
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options).prefetch(AUTOTUNE)


def eval_batches(examples, num_pipelines, batch_size, replicas_per_pipeline=1):
    """The number of evaluation batches each of `num_pipelines` input pipelines gives: enough
    for the fullest pipeline, rounded up to a multiple of the replicas a pipeline feeds.

    `examples`: `{shard: records}` (files are sharded over pipelines as `_examples` does,
    shard `i` to pipeline `i % num_pipelines`), or the total count (sharded example by
    example, as TFDS is).
    """
    if isinstance(examples, dict):
        counts = list(examples.values())
        most = max(sum(counts[i::num_pipelines]) for i in range(num_pipelines))
    else:
        most = -(-int(examples) // num_pipelines)
    step = batch_size * replicas_per_pipeline
    return max(-(-most // step), 1) * replicas_per_pipeline


class TFDSSource:
    """A split of a prepared TFDS dataset (`imagenet2012` by default), opened by each input
    pipeline itself (`dataset`): with `tfds.ReadConfig(input_context=...)` every host reads
    only its own share of the files, not every file (the dataset is built inside the
    strategy's `dataset_fn`, never on the client).

    `shard_lengths` (`{shard: examples}`, in file order) tells how many examples each input
    pipeline gets: TFDS gives pipeline `i` the files `i, i + n, ...`, as `_examples` does
    with TFRecords. `builder`: an already made `tfds.core.DatasetBuilder` (for data prepared
    elsewhere: `tfds.builder_from_directory`).
    """

    def __init__(self, split, data_dir=None, name="imagenet2012", builder=None):
        tfds = _import_tfds()
        if builder is None:
            try:
                builder = tfds.builder(name, data_dir=data_dir)
            except Exception as error:  # unknown name, unreadable data_dir
                raise DataError(f"TFDS cannot open {name!r}: {error}") from None
        splits = builder.info.splits
        if not tf.io.gfile.exists(os.fspath(builder.data_dir)) or split not in splits:
            raise DataError(
                f"TFDS {builder.name} is not prepared in {os.fspath(builder.data_dir)!r} (no "
                f"{split!r} split there). Prepare it first; for imagenet2012, put the ILSVRC2012 "
                f"tars in a folder and run `tfds build imagenet2012 --manual_dir=FOLDER "
                f"--data_dir=DATA_DIR`, then pass --data_dir=DATA_DIR (gs:// on a TPU pod)."
            )
        self.builder, self.split = builder, split
        info = splits[split]
        self.num_examples = int(info.num_examples)
        self.shard_lengths = {
            f"{builder.name}-{split}-{i:05d}": int(n) for i, n in enumerate(info.shard_lengths)
        }

    def dataset(self, input_context=None, shuffle=False, seed=None, decode_images=True):
        """`(image, zero-based label)` of this pipeline's files: a uint8 image, or with
        `decode_images=False` the encoded bytes (decoded later, as their crop only)."""
        tfds = _import_tfds()
        pipelines = input_context.num_input_pipelines if input_context is not None else 1
        if pipelines > len(self.shard_lengths):
            raise DataError(
                f"TFDS {self.builder.name} {self.split} has {len(self.shard_lengths)} files, "
                f"fewer than the {pipelines} input pipelines (hosts) that read it."
            )
        read_config = tfds.ReadConfig(
            input_context=input_context if pipelines > 1 else None,
            shuffle_seed=seed,
            interleave_cycle_length=16,
            try_autocache=False,
        )
        return self.builder.as_dataset(
            split=self.split,
            as_supervised=True,
            shuffle_files=shuffle,
            read_config=read_config,
            decoders=None if decode_images else {"image": tfds.decode.SkipDecoding()},
        )


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DataError(
            "--data_source=tfds needs tensorflow-datasets: pip install keras-t2t[tfds]"
        ) from error
    return tfds


# --- shard checks -------------------------------------------------------------------------------


def _stat(path):
    stat = tf.io.gfile.stat(path)
    return stat.length, stat.mtime_nsec


def walk_records(path):
    """(records, problem or None) of one TFRecord file, from its record headers alone.

    Each record is `length (8 bytes) | crc (4) | data (length) | crc (4)`: the walk reads the
    lengths and seeks past the data, so a file that ends inside a record is found without
    reading the images. (A file cut exactly at a record boundary looks whole: the manifest
    of build_tfrecords.py, or the ImageNet totals, find those.)
    """
    size = _stat(path)[0]
    opener = open if "://" not in path else tf.io.gfile.GFile
    offset = count = 0
    with opener(path, "rb") as f:
        while offset < size:
            f.seek(offset)
            header = f.read(8)
            end = offset + 16 + struct.unpack("<Q", header)[0] if len(header) == 8 else size + 1
            if end > size:
                return count, (
                    f"the file ends inside record {count} (byte {offset} of {size}): it was "
                    f"truncated or overwritten"
                )
            count, offset = count + 1, end
    return count, None


def read_manifest(folder, split):
    path = os.path.join(folder, MANIFEST.format(split=split))
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            manifest = json.load(f)
        manifest["shards"].items()
    except (ValueError, KeyError, AttributeError, tf.errors.OpError) as error:
        raise DataError(f"{path} is not a readable manifest ({error}); rebuild the data.") from None
    return manifest


def _verify_manifest(files, manifest, split, num_classes):
    folder = os.path.dirname(files[0])
    listed = set(manifest["shards"])
    found = {os.path.basename(f) for f in files}
    where = f"{folder}/{MANIFEST.format(split=split)}"
    problems = []
    extra, missing = sorted(found - listed), sorted(listed - found)
    if extra:
        problems.append(
            f"{len(extra)} {split} shards are not in it ({', '.join(extra[:5])}): left over "
            f"from another build?"
        )
    if missing:
        problems.append(f"{len(missing)} listed shards are missing ({', '.join(missing[:5])})")
    for name in sorted(found & listed):
        size = _stat(os.path.join(folder, name))[0]
        if size != manifest["shards"][name]["bytes"]:
            problems.append(
                f"{name} is {size} bytes, the manifest says {manifest['shards'][name]['bytes']} "
                f"({manifest['shards'][name]['records']} records): truncated or altered"
            )
    if problems:
        raise DataError(
            f"The {split} TFRecords do not match {where}: {'; '.join(problems)}. Rebuild them "
            f"with training/build_tfrecords.py, or copy them again."
        )
    classes = manifest.get("classes")
    if classes and num_classes is not None and num_classes < len(classes):
        raise DataError(
            f"{where} lists {len(classes)} classes, more than --num_classes={num_classes}; "
            f"set --num_classes={len(classes)}."
        )
    return {os.path.join(folder, n): int(manifest["shards"][n]["records"]) for n in sorted(found)}


def check_shards(files, split, num_classes=None, skip_bad_records=False, cache=None):
    """`{file: records}` for the TFRecord files of `split`, checked before training.

    With a manifest (written by build_tfrecords.py beside the shards): every shard it lists
    must be there, with its size, and no other shard of the split. Without one: every file's
    record headers are walked (`walk_records`; in parallel, and cached in the JSON file
    `cache`, keyed by size and modification time, so a restart does not walk again); a file
    that ends inside a record is named, an error unless `skip_bad_records` (then its readable
    records are used). For the standard ImageNet layout (1,024 train or 128 validation shards
    and 1,000 classes), the total must be ImageNet's: 1,281,167 or 50,000.
    """
    manifest = read_manifest(os.path.dirname(files[0]), split)
    if manifest is not None:
        return _verify_manifest(files, manifest, split, num_classes)
    cached = {}
    if cache and tf.io.gfile.exists(cache):
        try:
            with tf.io.gfile.GFile(cache) as f:
                cached = json.load(f)
        except (ValueError, tf.errors.OpError):
            cached = {}
    start = time.time()

    def walk(path):
        key = list(_stat(path))
        hit = cached.get(path)
        if hit and hit[:2] == key:
            return path, key + hit[2:]
        return path, key + list(walk_records(path))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        walked = dict(pool.map(walk, files))
    if cache and walked != {p: cached.get(p) for p in walked}:
        try:
            with tf.io.gfile.GFile(cache, "w") as f:
                json.dump(walked, f)
        except tf.errors.OpError:
            pass  # a cache only
    counts = {path: entry[2] for path, entry in walked.items()}
    logger.info(
        "%d %s records in %d files (headers checked in %.1f s).",
        sum(counts.values()),
        split,
        len(files),
        time.time() - start,
    )
    damaged = {path: entry[3] for path, entry in walked.items() if entry[3]}
    if damaged:
        listing = "; ".join(f"{path}: {problem}" for path, problem in sorted(damaged.items())[:5])
        if not skip_bad_records:
            raise DataError(
                f"{len(damaged)} {split} TFRecord file(s) are damaged: {listing}. Copy or "
                f"rebuild them, or pass --skip_bad_records to train on the readable records."
            )
        logger.warning("--skip_bad_records: reading only the readable records of %s.", listing)
    shards, total = IMAGENET_LAYOUT.get(split, (None, None))
    if len(files) == shards and num_classes == 1000 and sum(counts.values()) != total:
        typical = sorted(counts.values())[len(counts) // 2]
        odd = [
            f"{os.path.basename(p)} ({n})"
            for p, n in sorted(counts.items())
            if abs(n - typical) > 1
        ]
        message = (
            f"The {shards} {split} shards look like ImageNet's, but hold {sum(counts.values()):,} "
            f"records instead of {total:,}; shards whose count differs from the typical "
            f"{typical}: {', '.join(odd[:10]) or 'none'}. Some files are incomplete: copy them "
            f"again."
        )
        if not skip_bad_records:
            raise DataError(message)
        logger.warning("--skip_bad_records: %s", message)
    return counts


# --- bad records: found by name ------------------------------------------------------------------

_FILENAME = {"image/filename": tf.io.FixedLenFeature([], tf.string, default_value="")}
UNREADABLE = (
    "cannot be read (the file is corrupt or truncated there; a TFRecord reader cannot go on "
    "past it, so the rest of this file is left out too)"
)
UNDECODABLE = "cannot be parsed or decoded"


def checked_records(files, expected, cycle_length=16):
    """`(image, label, ok, shard, index, filename, problem)` for every record of `files`.

    A record that cannot be read, parsed or decoded comes out with `ok` False (and an empty
    image) instead of stopping the pipeline, named by its shard, its index in the shard and,
    where it parses, its `image/filename`. `expected` (`{shard: records}`, from
    `check_shards`) tells where a shard's reader stopped early. `label` is the raw
    `image/class/label`. Each record is tried in a small dataset of its own, which costs
    about half the speed of the plain pipeline on small images: used for --skip_bad_records
    and to find the bad record after a run stopped on one.
    """
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(expected), tf.string), tf.constant(list(expected.values()), tf.int64)
        ),
        default_value=-1,
    )
    if not isinstance(files, tf.data.Dataset):
        files = tf.data.Dataset.from_tensor_slices(list(files))
    empty_image = tf.zeros((0, 0, 3), tf.uint8)

    def per_shard(shard):
        records = tf.data.TFRecordDataset(shard).ignore_errors().enumerate()
        end = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), tf.constant("")))

        def count(read, element):  # the end marker carries the number of records read
            index, record = element
            read = tf.where(index >= 0, index + 1, read)
            return read, (shard, index, record, read)

        return records.concatenate(end).scan(tf.constant(0, tf.int64), count)

    def decoded(data):
        example = tf.io.parse_single_example(data, FEATURES)
        label = tf.cast(example["image/class/label"], tf.int32)
        return decode_rgb(example["image/encoded"]), label

    def attempt(shard, index, record, read):
        one = tf.data.Dataset.from_tensors(record)
        is_record = index >= 0
        good = one.filter(lambda _: is_record).map(decoded).ignore_errors()
        name = one.map(lambda data: tf.io.parse_single_example(data, _FILENAME)["image/filename"])
        name = name.ignore_errors().concatenate(tf.data.Dataset.from_tensors("")).take(1)
        bad = name.filter(lambda _: is_record)
        cut = tf.data.Dataset.from_tensors(read).filter(
            lambda n: tf.logical_not(is_record) & (n < table.lookup(shard))
        )
        return (
            good.map(lambda image, label: (image, label, True, shard, index, "", ""))
            .concatenate(bad.map(lambda n: (empty_image, 0, False, shard, index, n, UNDECODABLE)))
            .take(1)
            .concatenate(cut.map(lambda n: (empty_image, 0, False, shard, n, "", UNREADABLE)))
        )

    stream = files.interleave(per_shard, cycle_length=cycle_length, num_parallel_calls=AUTOTUNE)
    return stream.interleave(
        attempt, cycle_length=cycle_length, block_length=1, num_parallel_calls=AUTOTUNE
    )


def _log_bad_record(image, label, ok, shard, index, filename, problem, skipped):
    """Filter predicate: keeps the good records, logs each bad one (stderr) by name and count."""
    del image, label

    def report():
        name = tf.where(filename == "", "", tf.strings.join([" (image/filename ", filename, ")"]))
        printed = tf.print(
            "--skip_bad_records: skipped record",
            index,
            "of",
            tf.strings.join([shard, name]),
            "-",
            problem,
            "-",
            skipped,
            "skipped in this pass over the data",
            output_stream=sys.stderr,
        )
        with tf.control_dependencies([printed]):
            return tf.constant(False)

    return tf.cond(ok, lambda: tf.constant(True), report)


def count_bad(dataset):
    """Appends the running count of bad records (`ok` False) to each element."""

    def count(skipped, element):
        skipped += tf.cast(tf.logical_not(element[2]), tf.int64)
        return skipped, (*element, skipped)

    return dataset.scan(tf.constant(0, tf.int64), count)


def find_bad_record(files, expected, time_limit=300.0):
    """`(shard, index, filename, problem)` of the first bad record found, or None.

    Reads, parses and decodes every record (`checked_records`) until one fails, for at most
    `time_limit` seconds. Called after a run stopped on a bad record, to name it.
    """
    import threading

    found = []

    def scan():
        dataset = checked_records(files, expected).filter(lambda *e: tf.logical_not(e[2]))
        for _, _, _, shard, index, filename, problem in dataset.take(1):
            found.append(
                (
                    shard.numpy().decode(),
                    int(index),
                    filename.numpy().decode("utf-8", "replace"),
                    problem.numpy().decode(),
                )
            )

    thread = threading.Thread(target=scan, daemon=True)
    thread.start()
    thread.join(time_limit)
    return found[0] if found else None
