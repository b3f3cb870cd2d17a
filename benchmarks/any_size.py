"""What a model of any size (`input_shape=(None, None, 3)`) costs against the fixed-size model,
at the fixed model's size: `tf.function` forward passes, interleaved rounds.

    python benchmarks/any_size.py                              # T2T-ViT-14, 224, batch 8
    python benchmarks/any_size.py --model=t2t_vit_7 --image_size=384 --rounds=6

Rows (images/s, and each one's ratio to `fixed`):
- `fixed`: the model built at the size, traced at `[batch, size, size, 3]`;
- `any_size_static`: the any-size model traced at that static shape (where the shape is
  known its graph is the fixed model's: no resize);
- `any_size_dynamic`: the any-size model traced at `[None, None, None, 3]`, as its SavedModel
  runs: the position table resized in the graph, the reshapes of dynamic sizes;
- `fixed_serving` / `any_size_serving`: the "tensorflow_onednn" twins
  (`keras_t2t.inference.prepare`) at `[None, size, size, 3]` / `[None, None, None, 3]`: what
  the two SavedModels' `serving_default` run;
- `table_resize`: the position table's resize alone, at a grid known only at run time
  (milliseconds per call).
Both models get the same weights, like released ones (`benchmark.trained_like`).
"""

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import tensorflow as tf

import keras_t2t
from benchmarks.benchmark import interleaved, timed, trained_like
from keras_t2t import inference


def measure(model_name, image_size, batch, min_time, rounds=3):
    fixed = trained_like(keras_t2t.create_model(model_name, input_shape=(image_size,) * 2 + (3,)))
    any_size = keras_t2t.create_model(model_name, input_shape=(None, None, 3))
    # The fixed model's weights; the any-size model keeps its table of 224's grid where the
    # size is another (resized in the graph to the size's grid).
    for target, source in zip(any_size.weights, fixed.weights):
        if tuple(target.shape) == tuple(source.shape):
            target.assign(source)
    images = tf.constant(
        np.random.default_rng(0).uniform(0, 255, (batch, image_size, image_size, 3)), tf.float32
    )

    def traced(model, shape):
        function = tf.function(lambda x: model(x, training=False))
        concrete = function.get_concrete_function(tf.TensorSpec(shape, tf.float32))
        return lambda: concrete(images).numpy()

    static, dynamic = [batch, image_size, image_size, 3], [None, None, None, 3]
    fixed_twin = inference.prepare(fixed, "tensorflow_onednn")
    any_twin = inference.prepare(any_size, "tensorflow_onednn")
    calls = {
        "fixed": traced(fixed, static),
        "any_size_static": traced(any_size, static),
        "any_size_dynamic": traced(any_size, dynamic),
        "fixed_serving": traced(fixed_twin, [None, image_size, image_size, 3]),
        "any_size_serving": traced(any_twin, dynamic),
    }
    if image_size == 224:  # the same weights: the same outputs
        outputs = {key: fn() for key, fn in calls.items()}
        for key, value in outputs.items():
            difference = np.abs(value - outputs["fixed"]).max()
            assert difference < 1e-4, (key, difference)
    seconds = interleaved(calls, min_time * rounds, rounds)
    layer = any_size.get_layer("pos_embed")
    side = tf.constant(image_size // 16)
    resize = tf.function(
        lambda h: layer.table((h, h)), input_signature=[tf.TensorSpec([], tf.int32)]
    )
    resize_seconds = timed(lambda: resize(side).numpy(), min_time)
    return {key: batch / s for key, s in seconds.items()}, resize_seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t2t_vit_14")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min_time", type=float, default=2.0, help="seconds per row and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rates, resize_seconds = measure(
        args.model, args.image_size, args.batch, args.min_time, args.rounds
    )
    print(f"{args.model} at {args.image_size}, batch {args.batch} (images/s, ratio to fixed):")
    for key, rate in rates.items():
        print(f"  {key:18s} {rate:8.2f}  {rate / rates['fixed']:.3f}")
    print(f"  table_resize       {1e3 * resize_seconds:8.3f} ms per call")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
