"""Keras' `model.quantize` on a trained model: the logits' cosine to float32, top-1 agreement
and top-1 on the 359 held-out digits, for int8, float8 and int4.

    python training/train_imagenet.py --model_dir=/tmp/digits_run   # the README's first command
    python benchmarks/quantize_accuracy.py --model_dir=/tmp/digits_run
"""

import argparse
import gc
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import keras_t2t  # noqa: E402

MODES = ("int8", "float8", "int4")


def held_out_digits(image_size=32, seed=0, validation_fraction=0.2):
    """The validation split of `training.build_tfrecords.digits_examples`, as float32 RGB
    pixels in [0, 255] and labels 0-9 (the model's classes)."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype("uint8")[..., None]
    images = tf.image.resize(images, (image_size, image_size), method="bilinear")
    images = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
    images = tf.image.grayscale_to_rgb(images).numpy()
    order = np.random.default_rng(seed).permutation(len(images))
    held_out = order[int(round(len(images) * (1 - validation_fraction))) :]
    return images[held_out].astype("float32"), digits.target[held_out]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="a finished digits run")
    args = parser.parse_args(argv)
    images, labels = held_out_digits()

    def build():
        return keras_t2t.T2TViT7(weights=args.model_dir, classifier_activation=None)

    reference = build().predict(images, verbose=0)
    print(f"float32 top-1 {(reference.argmax(-1) == labels).mean():.4f} on {len(labels)} digits")
    collect, gc.collect = gc.collect, lambda *args: 0  # Keras collects after every layer
    try:
        for mode in MODES:
            model = build()
            model.quantize(mode)
            logits = model.predict(images, verbose=0)
            norms = np.linalg.norm(logits, axis=-1) * np.linalg.norm(reference, axis=-1)
            cosine = (logits * reference).sum(-1) / norms
            agreement = (logits.argmax(-1) == reference.argmax(-1)).mean()
            top1 = (logits.argmax(-1) == labels).mean()
            print(
                f"{mode:7s} cosine min {cosine.min():.4f} mean {cosine.mean():.4f}  "
                f"agreement {agreement:.4f}  top-1 {top1:.4f}"
            )
    finally:
        gc.collect = collect
    return 0


if __name__ == "__main__":
    sys.exit(main())
