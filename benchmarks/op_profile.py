"""Where a SavedModel's time goes, op by op, as TF Serving runs it (a TF1 session over the
SavedModel bundle): the `serving_default` of one model exported in each compute dtype, timed
in interleaved rounds, then one traced run each, its op time summed by op type.

    python benchmarks/op_profile.py --model=t2t_vit_14 --batch=8 \\
        --variants=float32,bfloat16,bfloat16-rows

A variant is a compute dtype (`export_saved_model(compute_dtype=...)`); `bfloat16-rows` is the
bfloat16 one without (`-`) its `rows` transform (`saved_model.BFLOAT16_TRANSFORMS`).
Random weights: the op times do not depend on them.
"""

import argparse
import collections
import os
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import tensorflow as tf

import keras_t2t
from keras_t2t import inference
from keras_t2t.export import saved_model


def session_runner(path):
    """(session.run of `serving_default`'s probabilities on uint8 pixels, the session and its
    feeds), with TF Serving's one inter-op thread."""
    config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=1)
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph, config=config)
    with graph.as_default():
        meta_graph = tf.compat.v1.saved_model.load(session, ["serve"], path)
    signature = meta_graph.signature_def["serving_default"]
    images, outputs = signature.inputs["images"].name, signature.outputs["probabilities"].name
    return lambda x, **kwargs: session.run(outputs, {images: x}, **kwargs)


def op_times(run, images):
    """{op type: (milliseconds, count)} of one traced run."""
    metadata = tf.compat.v1.RunMetadata()
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    run(images, options=options, run_metadata=metadata)
    times, counts = collections.Counter(), collections.Counter()
    for device in metadata.step_stats.dev_stats:
        for node in device.node_stats:
            label = node.timeline_label
            op = label.split(" = ")[1].split("(")[0] if " = " in label else node.node_name
            times[op] += (node.op_end_rel_micros - node.op_start_rel_micros) / 1000
            counts[op] += 1
    return {op: (ms, counts[op]) for op, ms in times.most_common()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="t2t_vit_14")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", default="float32,bfloat16,bfloat16-rows")
    parser.add_argument(
        "--serving_runtime", default="tensorflow", choices=list(saved_model.SERVING_RUNTIMES)
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0, help="per variant and round")
    parser.add_argument("--top", type=int, default=15, help="op types to list per variant")
    args = parser.parse_args(argv)
    size = args.image_size
    model = keras_t2t.create_model(args.model, input_shape=(size, size, 3))
    images = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), np.uint8)
    folder = tempfile.TemporaryDirectory()
    runners, outputs = {}, {}
    for variant in args.variants.split(","):
        dtype, _, without = variant.partition("-")
        if without and without not in saved_model.BFLOAT16_TRANSFORMS:
            parser.error(
                f"variant {variant!r}: '-' names a transform of the bfloat16 SavedModel to leave "
                f"out, one of {', '.join(saved_model.BFLOAT16_TRANSFORMS)}"
            )
        transforms = inference.RUNTIMES[args.serving_runtime]
        if dtype == "bfloat16":
            transforms += tuple(t for t in saved_model.BFLOAT16_TRANSFORMS if t != without)
        path = saved_model.export_saved_model(
            model, os.path.join(folder.name, variant), compute_dtype=dtype, transforms=transforms
        )
        runners[variant] = run = session_runner(path)
        outputs[variant] = run(images)
    rates = collections.defaultdict(list)
    for _ in range(args.rounds):
        for variant, run in runners.items():
            start, count = time.perf_counter(), 0
            while time.perf_counter() - start < args.seconds:
                run(images)
                count += 1
            rates[variant].append(args.batch * count / (time.perf_counter() - start))
    print(
        f"{args.model} at {size}, batch {args.batch}, {os.cpu_count()} cores, TF {tf.__version__}"
    )
    first = next(iter(outputs))
    for variant, values in rates.items():
        a, b = (np.log(outputs[v].astype("float64")) for v in (first, variant))
        a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
        cosine = np.min(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
        rounds = ", ".join(f"{v:.1f}" for v in values)
        print(
            f"{variant:16s} {max(values):6.1f} images/s (rounds {rounds}); logits' cosine to "
            f"{first} {cosine:.5f}"
        )
    for variant, run in runners.items():
        times = op_times(run, images)
        total = sum(ms for ms, _ in times.values())
        print(f"\n{variant}: {total:.1f} ms of op time in one run")
        for op, (ms, count) in list(times.items())[: args.top]:
            print(f"  {op:32s} {ms:8.2f} ms  x{count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
