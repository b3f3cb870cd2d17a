"""Full-int8 TFLite on a T2T-ViT-7 trained on real photos: top-1, agreement and CPU latency.

    TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 OMP_NUM_THREADS=1 \\
        nice -n 19 python benchmarks/int8_accuracy.py --debug

Needs scikit-image (its sample photos) and ai-edge-litert; nothing from the network. About
7 minutes on one core at 64x64 (3 at --size=32), most of it training; --model=m.keras keeps
the trained model for later runs.

Data: 10 classes, one per color photo (scikit-image's astronaut, chelsea, coffee,
hubble_deep_field, immunohistochemistry, motorcycle (left view), retina and rocket, and
scikit-learn's china and flower), each resized to a short side of 384 px and cut into a 3x3
grid of cells. A crop lies inside one cell (a side of 35-100% of the cell's), resized to
--size. Three cells of each photo, one per row and a different column per photo, give the
validation crops; the other six give the training crops (fresh ones every epoch, flipped at
random) and the calibration crops. So validation crops are of parts of the photos that the
model never saw, and the task is to tell a photo from a patch of it: sky, skin and shadows
look alike across photos.

T2T-ViT-7 (weights=None) is trained from scratch (AdamW, cosine decay), then exported by
`keras_t2t.export.tflite.tflite_models`: float32, dynamic-range int8 and full int8 (calibrated on
--calibration training crops, as `savedmodels/export.py --representative_data` would).
Prints, for each TFLite model on the validation crops: top-1, agreement of its top-1 with the
float32 TFLite model's, the latency of one image in ai_edge_litert's Interpreter on one
thread with its default (XNNPACK) delegate (the models take turns, 20 invokes a turn; the
least of the turns' medians), its size and the ops that compute in float. Besides the default
full int8 it measures the variants in VARIANTS (the previous default among them), and with
--debug prints the layer-by-layer statistics of TFLite's quantization debugger for a model
with every op int8 but DIV: per op, the RMSE of its int8 output against the float op on the
same (float) inputs, in units of its output's quantization step (1/sqrt(12), about 0.29, is
pure rounding), on the calibration crops.
"""

import argparse
import io
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

SHORT_SIDE = 384
GRID = 3


def photos():
    """The 10 color photos, uint8 RGB, resized to a short side of SHORT_SIDE."""
    import pathlib

    import skimage.data
    import sklearn
    import tensorflow as tf

    images = [
        skimage.data.astronaut(),
        skimage.data.chelsea(),
        skimage.data.coffee(),
        skimage.data.hubble_deep_field(),
        skimage.data.immunohistochemistry(),
        skimage.data.stereo_motorcycle()[0],
        skimage.data.retina(),
        skimage.data.rocket(),
    ]
    folder = pathlib.Path(sklearn.__file__).parent / "datasets" / "images"
    for name in ("china.jpg", "flower.jpg"):
        images.append(tf.io.decode_jpeg((folder / name).read_bytes()).numpy())
    resized = []
    for image in images:
        scale = SHORT_SIDE / min(image.shape[:2])
        shape = [round(image.shape[0] * scale), round(image.shape[1] * scale)]
        image = tf.image.resize(image[..., :3], shape, antialias=True)
        resized.append(np.clip(np.round(image.numpy()), 0, 255).astype(np.uint8))
    return resized


def cells(label, validation):
    """The (row, column) grid cells of photo `label` that give training or validation crops."""
    held_out = {(row, (row + label) % GRID) for row in range(GRID)}
    grid = [(row, column) for row in range(GRID) for column in range(GRID)]
    return [cell for cell in grid if (cell in held_out) == validation]


def crops(images, per_class, size, validation, seed):
    """`per_class` crops of each photo, uint8 `[n, size, size, 3]`, and their labels."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    out, labels = [], []
    for label, image in enumerate(images):
        height, width = image.shape[0] // GRID, image.shape[1] // GRID
        choices = cells(label, validation)
        for _ in range(per_class):
            row, column = choices[rng.integers(len(choices))]
            side = int(rng.uniform(0.35, 1.0) * min(height, width))
            top = row * height + rng.integers(height - side + 1)
            left = column * width + rng.integers(width - side + 1)
            crop = image[top : top + side, left : left + side]
            if not validation and rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = tf.image.resize(crop, (size, size), antialias=True).numpy()
            out.append(np.clip(np.round(crop), 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(out), np.array(labels)


def train(images, size, epochs, per_class, seed):
    import keras

    import keras_t2t

    keras.utils.set_random_seed(seed)
    model = keras_t2t.T2TViT7(input_shape=(size, size, 3), classes=len(images), weights=None)
    steps = epochs * (per_class * len(images) // 64)
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, steps, alpha=0.01)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    for epoch in range(epochs):
        x, y = crops(images, per_class, size, validation=False, seed=seed * 1000 + epoch)
        start = time.perf_counter()
        history = model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=True)
        print(
            f"epoch {epoch + 1}/{epochs}: loss {history.history['loss'][0]:.3f}, "
            f"train top-1 {history.history['accuracy'][0]:.3f}, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    return model


def interpreter(flatbuffer):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=flatbuffer, num_threads=1)
    runner.allocate_tensors()
    return runner


def predict(flatbuffer, images):
    runner = interpreter(flatbuffer)
    inp, out = runner.get_input_details()[0], runner.get_output_details()[0]
    results = []
    for image in images:
        runner.set_tensor(inp["index"], image[None])
        runner.invoke()
        results.append(runner.get_tensor(out["index"])[0].copy())
    return np.stack(results)


def latencies_ms(models, image, rounds, invokes=20):
    """Milliseconds of one invoke on one thread, per model: the models take turns for
    `rounds` rounds of `invokes` invokes each (after a warm-up), so that a load on the machine
    falls on all of them; the least of the rounds' medians."""
    runners = {}
    for name, flatbuffer in models.items():
        runner = interpreter(flatbuffer)
        runner.set_tensor(runner.get_input_details()[0]["index"], image[None])
        for _ in range(3):
            runner.invoke()
        runners[name] = runner
    medians = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times = []
            for _ in range(invokes):
                start = time.perf_counter()
                runner.invoke()
                times.append(time.perf_counter() - start)
            medians[name].append(1000 * float(np.median(times)))
    return {name: min(values) for name, values in medians.items()}


def full_int8(concrete, calibration, float_ops, float_scopes=()):
    from keras_t2t.export import tflite

    converter = tflite.tflite_converter(concrete, "int8")
    return tflite.full_int8(converter, calibration, float_ops=float_ops, float_scopes=float_scopes)


def int16_activations(concrete, calibration, scopes):
    """16x8: int16 activations, int8 weights, builtin ops (TFLite's own 16x8 recipe)."""
    import tensorflow as tf

    from keras_t2t.export import tflite

    converter = tflite.tflite_converter(concrete, "int8")
    converter.representative_dataset = tflite.representative_dataset(calibration)
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
        tf.lite.OpsSet.TFLITE_BUILTINS,
    ]
    return converter.convert()


# Full-int8 variants measured beside the default:
# name -> function(concrete function, calibration images, performer scopes) -> flatbuffer.
VARIANTS = {
    "int8, DIV+ADD float (before)": lambda c, x, scopes: full_int8(c, x, ("DIV", "ADD")),
    "int8 default, but ADD int8": lambda c, x, scopes: full_int8(c, x, ("DIV",), scopes),
    "16x8 (int16 activations)": int16_activations,
}


def debug_layers(concrete, calibration, top):
    """Layer-by-layer errors of full int8 with every op int8 but DIV (whose int8 kernel
    refuses a denominator at the zero point), from the quantization debugger."""
    import csv

    import tensorflow as tf

    from keras_t2t.export import tflite

    converter = tflite.tflite_converter(concrete, "int8")
    dataset = tflite.representative_dataset(calibration)
    converter.representative_dataset = dataset
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=dataset,
        debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=["DIV"]),
    )
    debugger.run()
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    buffer.seek(0)
    rows = list(csv.DictReader(buffer))
    for row in rows:
        row["rmse/scale"] = np.sqrt(float(row["mean_squared_error"])) / float(row["scale"])
    by_op = {}
    for row in rows:
        by_op.setdefault(row["op_name"], []).append(row["rmse/scale"])
    print("\nquantization debugger, every op int8 but DIV: RMSE / output scale, by op")
    print(f"{'op':<22} {'layers':>6} {'median':>8} {'max':>8}")
    for op, values in sorted(by_op.items(), key=lambda item: -np.nanmax(item[1])):
        print(f"{op:<22} {len(values):>6} {np.nanmedian(values):>8.2f} {np.nanmax(values):>8.2f}")
    print(f"\nthe {top} layers with the largest RMSE / scale")
    ranked = sorted(
        (row for row in rows if np.isfinite(row["rmse/scale"])), key=lambda row: -row["rmse/scale"]
    )
    for row in ranked[:top]:
        print(f"{row['rmse/scale']:>8.2f}  {row['op_name']:<20} {row['tensor_name'][:90]}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train_per_class", type=int, default=200, help="crops per epoch")
    parser.add_argument("--val_per_class", type=int, default=50)
    parser.add_argument("--calibration", type=int, default=64, help="calibration crops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=10, help="rounds of 20 timed invokes")
    parser.add_argument("--model", help="a .keras file: load it if it exists, else save there")
    parser.add_argument("--debug", action="store_true", help="print the debugger's layer stats")
    parser.add_argument("--top", type=int, default=25, help="layers printed with --debug")
    args = parser.parse_args(argv)

    import keras

    from keras_t2t.export import tflite

    images = photos()
    val_x, val_y = crops(images, args.val_per_class, args.size, validation=True, seed=10_000)
    calibration, _ = crops(
        images, -(-args.calibration // len(images)), args.size, validation=False, seed=20_000
    )
    calibration = calibration[np.random.default_rng(0).permutation(len(calibration))]
    calibration = calibration[: args.calibration]
    print(
        f"{len(images)} photos; {args.train_per_class * len(images)} training crops per "
        f"epoch, {len(val_x)} validation crops, {len(calibration)} calibration crops, "
        f"{args.size}x{args.size}"
    )
    if args.model and os.path.exists(args.model):
        model = keras.saving.load_model(args.model)
    else:
        model = train(images, args.size, args.epochs, args.train_per_class, args.seed)
        if args.model:
            model.save(args.model)
    keras_top1 = np.mean(model.predict(val_x, verbose=0).argmax(-1) == val_y)
    print(f"keras float32 validation top-1: {keras_top1:.3f}")

    start = time.perf_counter()
    models = tflite.tflite_models(model, calibration, kinds=("float32", "dynamic_int8", "int8"))
    print(f"exported float32, dynamic int8, int8 in {time.perf_counter() - start:.0f} s")
    models = {
        "float32": models["float32"],
        "dynamic int8": models["dynamic_int8"],
        "int8 (default)": models["int8"],
    }
    concrete = tflite.tflite_function(model)
    scopes = tflite.attention_scopes(model)
    for name, make in VARIANTS.items():
        try:
            models[name] = make(concrete, calibration, scopes)
        except Exception as error:  # a variant that does not convert is reported, not fatal
            print(f"{name}: does not convert: {type(error).__name__}: {str(error)[:200]}")

    reference = predict(models["float32"], val_x).argmax(-1)
    results = {}
    for name, flatbuffer in list(models.items()):
        try:
            results[name] = predict(flatbuffer, val_x).argmax(-1)
        except Exception as error:
            print(f"{name}: does not run: {type(error).__name__}: {str(error)[:200]}")
            del models[name]
    latency = latencies_ms(models, val_x[0], args.rounds)
    print(
        f"\n{'TFLite model':<30} {'top-1':>6} {'agree':>6} {'ms/image':>9} {'KiB':>6}  "
        "ops computed in float"
    )
    for name, flatbuffer in models.items():
        top1 = np.mean(results[name] == val_y)
        agreement = np.mean(results[name] == reference)
        kept = float_ops(flatbuffer) if name != "float32" else "all"
        print(
            f"{name:<30} {top1:>6.3f} {agreement:>6.3f} {latency[name]:>9.2f} "
            f"{len(flatbuffer) / 1024:>6.0f}  {kept}",
            flush=True,
        )

    if args.debug:
        debug_layers(concrete, calibration, args.top)


def float_ops(flatbuffer):
    """The ops of a quantized model that compute in float32 (their first input is float)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    runner = Interpreter(  # without XNNPACK, whose DELEGATE op would hide the ops it takes
        model_content=flatbuffer,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    details = runner.get_tensor_details()
    dtypes = {tensor["index"]: tensor["dtype"] for tensor in details}
    kept = set()
    for op in runner._get_ops_details():
        if op["op_name"] in ("DEQUANTIZE", "QUANTIZE"):
            continue
        inputs = [i for i in op["inputs"] if i >= 0]
        if inputs and dtypes.get(inputs[0]) == np.float32:
            kept.add(op["op_name"])
    return ",".join(sorted(kept))


if __name__ == "__main__":
    main()
