"""Throughput of the training input pipeline on this host, against a minimal one.

    python benchmarks/input_pipeline.py                    # 224 px, batches of 32
    python benchmarks/input_pipeline.py --images=256 --seconds=5 --output=input.json
    python benchmarks/input_pipeline.py --short            # seconds; what CI runs

Writes generated ImageNet-sized JPEGs (500x375, about 100 kB each, as ImageNet's average) to
TFRecords in a temporary folder, then measures images/s (and images/s per host core) of:
- `minimal`: read, `decode_and_crop_jpeg` of a random window, resize, flip: the least a
  training pipeline can do, the reference of the ratios;
- the training pipeline (`training/data.py: train_dataset`) with the augmentation built up
  stage by stage, `crop_flip` (as minimal, plus the shuffle and the label) up to
  `full_recipe` (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix
  1.0, label smoothing: the paper's recipe);
and prints each as a ratio to `minimal`, measured in the same run.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from training import build_tfrecords, data  # noqa: E402


def generated_jpegs(count, seed=0, shape=(375, 500)):
    """JPEG bytes of `count` natural-looking pictures (smooth colour fields, edges and noise)
    of ImageNet's most common size."""
    rng = np.random.default_rng(seed)
    height, width = shape
    for _ in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3)).astype(np.float32)
        field = tf.image.resize(coarse[None], shape, "bicubic")[0].numpy()
        rows, cols = np.mgrid[0:height, 0:width]
        stripes = 40 * np.sin(rows / rng.uniform(3, 30) + cols / rng.uniform(3, 30))[..., None]
        picture = field + stripes + rng.normal(0, 12, (height, width, 3))
        yield build_tfrecords.to_jpeg(np.clip(picture, 0, 255).astype(np.uint8))


def write_records(folder, count, shards=8):
    examples = (
        build_tfrecords.make_example(jpeg, 1 + i % 1000, "c", f"{i}.jpg", 375, 500)
        for i, jpeg in enumerate(generated_jpegs(count))
    )
    build_tfrecords.write_shards(examples, folder, "train", shards)
    files = data.list_files(folder, "train")
    size = sum(tf.io.gfile.stat(f).length for f in files) / count
    return files, size


def minimal_pipeline(files, batch_size, image_size):
    """Read, decode only a random crop window, resize, flip: the reference."""

    def load(serialized):
        example = tf.io.parse_single_example(serialized, data.FEATURES)
        encoded = example["image/encoded"]
        shape = tf.image.extract_jpeg_shape(encoded)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            shape,
            tf.zeros((1, 0, 4)),
            min_object_covered=0.0,
            area_range=(0.08, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3),
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        image = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
        image = tf.image.resize(image, (image_size, image_size))
        return tf.image.random_flip_left_right(image), example["image/class/label"]

    dataset = tf.data.Dataset.from_tensor_slices(files).repeat()
    dataset = dataset.interleave(
        tf.data.TFRecordDataset, cycle_length=len(files), num_parallel_calls=tf.data.AUTOTUNE
    )
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


STAGES = {  # name -> the Augmentation fields beyond crop and flip
    "crop_flip": dict(randaugment_ops=0, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0),
    "randaugment": dict(random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0),
    "randaugment_erasing": dict(mixup_alpha=0.0, cutmix_alpha=0.0),
    "full_recipe": dict(),
}


def throughput(dataset, batch_size, seconds, warmup_batches):
    iterator = iter(dataset)
    for _ in range(warmup_batches):
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)[0].numpy()
        count += 1
    return count * batch_size / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="generated JPEGs")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured per row")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated")
    parser.add_argument("--short", action="store_true", help="a few seconds (for CI)")
    parser.add_argument("--output", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.short:
        args.images, args.seconds, args.image_size = 64, 1.0, 64
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as folder:
        print(f"Writing {args.images} generated 500x375 JPEGs...", flush=True)
        files, mean_bytes = write_records(folder, args.images)
        print(f"{len(files)} shards, {mean_bytes / 1024:.0f} kB per record.")
        warmup = 2 if args.short else 10
        rows = {}
        rows["minimal"] = throughput(
            minimal_pipeline(files, args.batch_size, args.image_size),
            args.batch_size,
            args.seconds,
            warmup,
        )
        for stage in stages:
            aug = data.Augmentation(**STAGES[stage])
            dataset = data.train_dataset(
                files,
                args.batch_size,
                args.image_size,
                1000,
                aug,
                seed=0,
                shuffle_buffer=min(1000, args.images),
            )
            rows[stage] = throughput(dataset, args.batch_size, args.seconds, warmup)
    reference = rows["minimal"]
    report = dict(
        host_cores=cores,
        batch_size=args.batch_size,
        image_size=args.image_size,
        record_kb=round(mean_bytes / 1024, 1),
        pipelines={
            name: dict(
                images_per_second=round(value, 1),
                images_per_second_per_core=round(value / cores, 1),
                ratio_to_minimal=round(value / reference, 3),
            )
            for name, value in rows.items()
        },
    )
    print(f"\n{cores} host cores, batch {args.batch_size}, {args.image_size} px")
    print(f"{'pipeline':22s} {'images/s':>9s} {'per core':>9s} {'/ minimal':>9s}")
    for name, figures in report["pipelines"].items():
        print(
            f"{name:22s} {figures['images_per_second']:9.1f} "
            f"{figures['images_per_second_per_core']:9.1f} {figures['ratio_to_minimal']:9.3f}"
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
