"""Writes TFRecords in the ImageNet layout from a folder of class subfolders.

    python training/build_tfrecords.py --input_dir photos/train --output_dir records \
        --split train --num_shards 16
    python training/build_tfrecords.py --input_dir photos/val --output_dir records \
        --split validation --num_shards 4

Class subfolders are sorted by name and numbered from 1 (as ImageNet's labels 1..1000, so
train with the default --label_offset=1); `labels.txt` in the output lists them. Files are
`{split}-00000-of-NNNNN` with the features of the TPU ImageNet converter (`image/encoded`
JPEG, `image/class/label`, `image/class/text`, `image/format`, `image/filename`,
`image/height`, `image/width`), so `train_imagenet.py --data_dir` reads them as ImageNet.
"""

import json
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import tensorflow as tf

from keras_t2t.export.image_bytes import op_error_reason
from keras_t2t.imagenet import decode_rgb
from training import data as data_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def make_example(jpeg, label, text, filename, height, width):
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                "image/encoded": _bytes(jpeg),
                "image/format": _bytes(b"JPEG"),
                "image/class/label": _int(label),
                "image/class/text": _bytes(text.encode()),
                "image/filename": _bytes(filename.encode()),
                "image/height": _int(height),
                "image/width": _int(width),
                "image/channels": _int(3),
            }
        )
    ).SerializeToString()


def write_shards(examples, output_dir, split, num_shards, classes=None):
    """Writes serialized examples round-robin into `num_shards` files; returns their paths.

    All or nothing: the shards and their manifest (`manifest-<split>.json`: records and bytes
    of every shard, and the classes) are written into a staging folder inside `output_dir`;
    only when every example is written do they replace the split's old shards and manifest.
    A failure (a bad image, a full disk, an interrupt) leaves `output_dir` as it was.
    """
    if num_shards < 1:
        raise ValueError(f"--num_shards must be >= 1, received {num_shards}.")
    try:
        tf.io.gfile.makedirs(output_dir)
    except tf.errors.OpError as error:
        raise ValueError(f"Cannot create --output_dir {output_dir!r}: {error.message}") from None
    staging = os.path.join(output_dir, f".{split}-partial-{os.getpid()}-{time.time_ns()}")
    tf.io.gfile.makedirs(staging)
    names = [f"{split}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    counts = [0] * num_shards
    try:
        writers = [tf.io.TFRecordWriter(os.path.join(staging, name)) for name in names]
        try:
            for index, example in enumerate(examples):
                writers[index % num_shards].write(example)
                counts[index % num_shards] += 1
        finally:
            for writer in writers:
                writer.close()
        if not sum(counts):
            raise ValueError(f"No examples to write for split {split!r}.")
        manifest = dict(
            split=split,
            num_shards=num_shards,
            records=sum(counts),
            classes=None if classes is None else list(classes),
            shards={
                name: dict(
                    records=count, bytes=tf.io.gfile.stat(os.path.join(staging, name)).length
                )
                for name, count in zip(names, counts)
            },
        )
        manifest_name = data_lib.MANIFEST.format(split=split)
        with tf.io.gfile.GFile(os.path.join(staging, manifest_name), "w") as f:
            json.dump(manifest, f, indent=1)
        # Only now is the old data of this split replaced (other splits are left alone).
        old = tf.io.gfile.glob(os.path.join(output_dir, f"{split}-*-of-*"))
        for path in old + tf.io.gfile.glob(os.path.join(output_dir, manifest_name)):
            tf.io.gfile.remove(path)
        for name in [*names, manifest_name]:
            tf.io.gfile.rename(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        tf.io.gfile.rmtree(staging)
    return [os.path.join(output_dir, name) for name in names]


def to_jpeg(image_uint8, quality=95):
    return tf.io.encode_jpeg(image_uint8, quality=quality).numpy()


def _utf8(path, what):
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"The {what} {os.fsencode(path)!r} has a name that is not UTF-8, which the "
            f"records cannot hold; rename it."
        ) from None
    return path


def folder_examples(input_dir, label_offset=1):
    """(classes, generator of serialized examples) from `input_dir/<class>/<image>`.

    Warns about class folders without images and about images in nested folders (which are
    not read); refuses names that are not UTF-8 and files that are not readable images.
    """
    if not os.path.isdir(input_dir):
        raise ValueError(f"--input_dir {input_dir!r} is not a folder.")
    classes = sorted(d for d in os.listdir(input_dir) if os.path.isdir(os.path.join(input_dir, d)))
    if not classes:
        raise ValueError(
            f"{input_dir!r} has no class subfolders; expected {input_dir}/<class>/<image>.jpg."
        )
    for name in classes:
        folder = _utf8(os.path.join(input_dir, name), "class folder")
        entries = os.listdir(folder)
        if not any(e.lower().endswith(IMAGE_EXTENSIONS) for e in entries):
            print(f"warning: the class folder {folder} holds no images", file=sys.stderr)
        nested = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
        if nested:
            print(
                f"warning: {folder} has subfolders ({', '.join(sorted(nested)[:5])}) whose "
                f"images are not read: only {input_dir}/<class>/<image> is",
                file=sys.stderr,
            )

    def generate():
        for index, name in enumerate(classes):
            folder = os.path.join(input_dir, name)
            for filename in sorted(os.listdir(folder)):
                if not filename.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = _utf8(os.path.join(folder, filename), "file")
                with open(path, "rb") as f:
                    data = f.read()
                try:
                    image = decode_rgb(data)
                except tf.errors.InvalidArgumentError as error:
                    reason = op_error_reason(error)
                    raise ValueError(
                        f"{path!r} is not a readable image: {reason.rstrip('.')}. Nothing "
                        f"was written; remove or replace the file and run again."
                    ) from None
                is_jpeg = data[:3] == b"\xff\xd8\xff"
                jpeg = data if is_jpeg and image.shape[-1] == 3 else to_jpeg(image)
                yield make_example(
                    jpeg, index + label_offset, name, filename, image.shape[0], image.shape[1]
                )

    return classes, generate()


def build_from_folder(input_dir, output_dir, split="train", num_shards=8, label_offset=1):
    classes, examples = folder_examples(input_dir, label_offset)
    paths = write_shards(examples, output_dir, split, num_shards, classes)
    with tf.io.gfile.GFile(os.path.join(output_dir, "labels.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    return classes, paths


def digits_examples(image_size=32, seed=0, validation_fraction=0.2, digits=tuple(range(10))):
    """scikit-learn's handwritten digits (8x8, 1,797 images) as JPEG examples, labels 1..10;
    with `digits`, only those, labelled 1.. in that order (the same split either way)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "The embedded default dataset is scikit-learn's digits: pip install keras-t2t[train]"
        ) from error
    data = load_digits()
    images = (data.images * (255.0 / 16.0)).round().astype("uint8")[..., None]
    images = tf.image.resize(images, (image_size, image_size), method="bilinear")
    images = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
    images = tf.image.grayscale_to_rgb(images).numpy()
    order = np.random.default_rng(seed).permutation(len(images))
    split = int(round(len(images) * (1 - validation_fraction)))

    labels = {digit: index + 1 for index, digit in enumerate(digits)}

    def examples(indices):
        for i in indices:
            digit = int(data.target[i])
            if digit in labels:
                yield make_example(
                    to_jpeg(images[i]),
                    labels[digit],
                    str(digit),
                    f"digit_{i}.jpg",
                    image_size,
                    image_size,
                )

    return examples(order[:split]), examples(order[split:])


def digits_tfrecords(cache_dir, image_size=32, num_shards=2):
    """The embedded default: digits as ImageNet-layout TFRecords in `cache_dir` (made once).

    Written into a temporary folder and renamed, so that a killed run leaves no half cache.
    """
    target = os.path.join(cache_dir, f"digits_{image_size}")
    if tf.io.gfile.exists(os.path.join(target, "COMPLETE")):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="digits_", dir=cache_dir)
    train, validation = digits_examples(image_size)
    classes = [str(d) for d in range(10)]
    write_shards(train, tmp, "train", num_shards, classes)
    write_shards(validation, tmp, "validation", num_shards, classes)
    with open(os.path.join(tmp, "labels.txt"), "w") as f:
        f.write("\n".join(str(d) for d in range(10)) + "\n")
    open(os.path.join(tmp, "COMPLETE"), "w").close()
    try:
        os.rename(tmp, target)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_dir", required=True, help="folder of class subfolders")
    parser.add_argument("--output_dir", required=True, help="where to write the TFRecords")
    parser.add_argument("--split", default="train", choices=["train", "validation"])
    parser.add_argument("--num_shards", type=int, default=8)
    parser.add_argument("--label_offset", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        classes, paths = build_from_folder(
            args.input_dir, args.output_dir, args.split, args.num_shards, args.label_offset
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, tf.errors.OpError) as error:
        reason = getattr(error, "message", None) or getattr(error, "strerror", None) or error
        print(f"error: cannot write to {args.output_dir!r}: {reason}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} {args.split} shards of {len(classes)} classes to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
