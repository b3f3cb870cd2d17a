"""Throughput and memory of T2T-ViT on this machine, against its measured matmul peak.

    python benchmarks/benchmark.py                         # T2T-ViT-14 at 224, the full run
    python benchmarks/benchmark.py --models=t2t_vit_7,t2t_vit_14,t2t_vit_t_14 --output=bench.json
    python benchmarks/benchmark.py --short                 # every path, a 1-block T2T-ViT-7 (CI)
    python benchmarks/benchmark.py --backend=jax           # the same model on JAX (or torch)
    # Training memory without and with gradient checkpointing, each in a fresh process:
    python benchmarks/benchmark.py --memory_only --models=t2t_vit_14 --memory_sizes=384

Prints, and writes to --output as JSON:
- the peak matmul throughput of TensorFlow here, float32 and bfloat16 (GFLOP/s);
- each model's FLOPs per image (`keras_t2t.count_flops`, 2 per multiply-add);
- images/s for inference at each batch size in float32 and bfloat16 through `model.predict`,
  `model.predict_on_batch`, a `tf.function` and XLA, the TFLite float32 model with XNNPACK,
  the exported models (the SavedModel's `serving_default`, loaded by `tf.saved_model.load` and
  into a TF1 session as TF Serving does, ONNX Runtime, OpenVINO f32 and bf16, timed in
  interleaved rounds, each with its ratio to OpenVINO on the same exported graph), and a
  training step (forward, backward, AdamW), each also as a percentage of the matching peak;
- with `--official_dir` (a checkout of yitu-opensource/T2T-ViT; needs torch), the official
  PyTorch model with our model's weights, eager and converted to OpenVINO f32 and bf16, and
  every row's ratio to it;
- a profile of the forward pass split into the T2T module, attention, MLP and the rest;
- the peak memory (resident set) of a training step, in a fresh process (`--memory_only`:
  only that, without and with gradient checkpointing, and the steps' images/s);
- ablations (`--ablations`): each inference transform (`keras_t2t.inference`) left out in turn,
  in the `tf.function` of the "tensorflow_onednn" twin and in OpenVINO float32 on the
  "openvino" twin, beside the model as built; interleaved rounds.

The models get random weights like released ones (`trained_like`: no zero biases, which
TensorFlow would drop, and with them a fusion that real weights get).

`--backend=jax|torch` runs on that Keras backend instead (in this process: the backend is set
before Keras is imported): its matmul peak, `model.predict`, a compiled forward pass
(`jax.jit` of `stateless_call`; on PyTorch, the eager call under `torch.no_grad`) and
`train_on_batch` (AdamW; XLA on JAX), in float32 and mixed bfloat16.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
BACKENDS = ("tensorflow", "jax", "torch")


def _requested_backend(argv):
    """The --backend value in argv (Keras reads KERAS_BACKEND once, when it is imported)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
    return None


if __name__ == "__main__" and _requested_backend(sys.argv[1:]) in BACKENDS:
    os.environ["KERAS_BACKEND"] = _requested_backend(sys.argv[1:])
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_t2t  # noqa: E402

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf


def _policies(dtypes):
    """(Keras dtype policy, compute dtype) for each of `dtypes`."""
    return [("float32" if d == "float32" else f"mixed_{d}", d) for d in dtypes]


def timed(fn, min_time, min_runs=3, warmup=1):
    """Median seconds of one call of `fn` (after `warmup` calls), over >= min_runs calls and
    >= min_time seconds."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return float(np.median(times))


def peak_matmul(dtype, size, min_time):
    """GFLOP/s of a square matmul chain in TensorFlow (the machine's practical peak)."""
    a = tf.cast(tf.random.normal((size, size)), dtype)
    b = tf.cast(tf.random.normal((size, size)) / size**0.5, dtype)

    @tf.function
    def chain(x):
        for _ in range(4):
            x = tf.matmul(x, b)
        return x

    seconds = timed(lambda: chain(a).numpy(), min_time)
    return 4 * 2 * size**3 / seconds / 1e9


def build(name, image_size, policy, **kwargs):
    """The model `name` with weights like released ones (`trained_like`)."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = keras_t2t.create_model(
            name, input_shape=(image_size, image_size, 3), classifier_activation=None, **kwargs
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return trained_like(model)


def trained_like(model, seed=0):
    """Gives every bias and LayerNorm offset of `model` small random values, and its
    LayerNorm scales values near 1, as in released weights; returns `model`.

    A fresh model's biases are zeros, and TensorFlow's graph optimizer drops a zero bias:
    the bias and exact-GELU fusion into the matmul (oneDNN) no longer matches, and the
    plain-graph paths of T2T-ViT-14 measured about 15% slower than with released weights.
    Speed figures need weights without such shortcuts."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        leaf = variable.path.rsplit("/", 1)[-1]
        if leaf in ("bias", "beta"):
            values = rng.normal(0.0, 0.02, variable.shape)
        elif leaf == "gamma":
            values = 1.0 + rng.normal(0.0, 0.02, variable.shape)
        else:
            continue
        variable.assign(values.astype(variable.dtype))
    return model


def official_model(official_dir, name, image_size, seed=0):
    """The official PyTorch model `name` (evaluation mode) from a checkout of
    yitu-opensource/T2T-ViT, with weights like released ones, as `trained_like` gives ours
    (needs torch; timm's 4 names come from `benchmarks.fidelity.import_official`)."""
    import torch

    from benchmarks.fidelity import import_official

    builder = getattr(import_official(official_dir), name, None)
    if builder is None:
        raise SystemExit(f"{official_dir} has no official builder {name!r}.")
    torch.manual_seed(seed)
    model = builder(img_size=image_size).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and bias is not None:
                bias.normal_(0.0, 0.02, generator=generator)
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.02, generator=generator)
    return model


def load_official(model, official):
    """Gives the Keras `model` the official model's weights (the checkpoint converter's
    mapping), so that both compute the same function."""
    from keras_t2t import weights

    state = {key: value.detach().numpy() for key, value in official.state_dict().items()}
    weights.assign_state(model, weights.official_to_state(state, "the official model"))
    return model


INFERENCE_PATHS = ("predict", "predict_on_batch", "tf_function", "xla")


def inference_paths(model, images, min_time, paths=INFERENCE_PATHS):
    """images/s of `model` on `images` through `paths`: predict, predict_on_batch,
    tf.function and XLA."""
    batch = images.shape[0]
    tensor = tf.constant(images)
    runners = {
        "predict": lambda: model.predict(images, batch_size=batch, verbose=0),
        # The same compiled predict step, without predict's per-call tf.data pipeline and
        # callbacks: what a user with one batch in hand should call.
        "predict_on_batch": lambda: model.predict_on_batch(images),
    }
    if "tf_function" in paths:
        function = tf.function(lambda x: model(x, training=False))
        runners["tf_function"] = lambda: function(tensor).numpy()
    if "xla" in paths:
        xla = tf.function(lambda x: model(x, training=False), jit_compile=True)
        runners["xla"] = lambda: xla(tensor).numpy()
    return {path: batch / timed(runners[path], min_time) for path in paths}


def _without(runtime):
    """{row name: transforms}: `runtime`'s transforms (`keras_t2t.inference.RUNTIMES`), each
    left out in turn, and none (the model as built)."""
    from keras_t2t import inference

    transforms = inference.RUNTIMES[runtime]
    rows = {runtime: transforms}
    rows.update({f"without_{t}": tuple(u for u in transforms if u != t) for t in transforms})
    rows["as_built"] = ()
    return rows


def ablations(model, images, min_time):
    """images/s of the float32 `tf.function` of `keras_t2t.inference.prepare(model,
    "tensorflow_onednn")`, of the same with each of its transforms left out in turn, and of the
    model as built. Each is traced with a batch dimension of None (as a SavedModel's signature,
    and as the oneDNN LayerNorm needs) and timed round-robin with the others (`interleaved`)."""
    from keras_t2t import inference

    batch = images.shape[0]
    tensor = tf.constant(images)
    spec = tf.TensorSpec((None,) + images.shape[1:], tf.float32)
    calls = {}
    for row, transforms in _without("tensorflow_onednn").items():
        twin = inference.prepare(model, transforms=transforms)
        function = tf.function(lambda x, twin=twin: twin(x, training=False), input_signature=[spec])
        function(tensor)
        calls[row] = lambda function=function: function(tensor).numpy()
    return {path: batch / seconds for path, seconds in interleaved(calls, min_time).items()}


def openvino_ablations(model, images, min_time):
    """images/s of OpenVINO float32 on the "openvino" twin's pixel signature (what
    `export_openvino` writes), with each of its transforms left out in turn, and on the model
    as built; interleaved. {} where OpenVINO is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return {}
    from keras_t2t import export, inference

    pixels = np.clip(np.round(images), 0, 255).astype(np.uint8)
    core = ov.Core()
    calls = {}
    for row, transforms in _without("openvino").items():
        twin = inference.prepare(model, transforms=transforms)
        function = export.pixels_function(twin)[0]
        converted = ov.convert_model(function.get_concrete_function())
        compiled = core.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": ov.Type.f32})
        calls[row] = lambda compiled=compiled: compiled(pixels)
    seconds = interleaved(calls, min_time)
    return {path: images.shape[0] / s for path, s in seconds.items()}


def _openvino_runners(ov, model, prefix, runners, feed):
    """Compiles the OpenVINO `model` (a path or an ov.Model) for f32 and bf16 into
    `runners["<dtype>/<prefix>"]`, functions of uint8 pixels through `feed(pixels)` -> the
    model's inputs; a precision this CPU does not grant gets an error text."""
    core = ov.Core()
    for dtype, hint in (("float32", ov.Type.f32), ("bfloat16", ov.Type.bf16)):
        try:
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
            granted = compiled.get_property("INFERENCE_PRECISION_HINT")
        except RuntimeError as error:
            runners[f"{dtype}/{prefix}"] = str(error).strip().splitlines()[-1]
            continue
        if granted != hint:
            runners[f"{dtype}/{prefix}"] = (
                f"OpenVINO computes in {granted.get_type_name()} on this CPU, "
                f"not {hint.get_type_name()}"
            )
            continue
        runners[f"{dtype}/{prefix}"] = lambda x, c=compiled: c(feed(x))


def serving_session(saved_model, inter_op_threads=1):
    """`serving_default` of `saved_model` as TF Serving runs it: loaded into a TF1 session
    (TF Serving's SavedModel bundle), with `inter_op_threads` (TF Serving's
    `--tensorflow_inter_op_parallelism`; 1 keeps this model's chain of ops on the calling
    thread, and intra-op threads on every core); a function of uint8 pixels."""
    config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=inter_op_threads)
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph, config=config)
    with graph.as_default():
        meta_graph = tf.compat.v1.saved_model.load(session, ["serve"], saved_model)
    signature = meta_graph.signature_def["serving_default"]
    images = signature.inputs["images"].name
    probabilities = signature.outputs["probabilities"].name
    return lambda x: session.run(probabilities, {images: x})


def engine_paths(model, batches, min_time, official=None, short=False):
    """images/s of the exported model where it is deployed, on uint8 pixels (`batches`: a list
    of float32 image batches): the SavedModel's `serving_default` (what TF Serving runs; loaded
    with `tf.saved_model.load`, and as TF Serving loads it, `serving_session`; float32, and
    bfloat16 with `compute_dtype="bfloat16"`), ONNX
    Runtime (float32) and OpenVINO (float32, and bfloat16 through INFERENCE_PRECISION_HINT).
    With `official` (the official PyTorch model, `official_model`, holding `model`'s weights):
    it too, eager under `torch.no_grad` and converted to OpenVINO from PyTorch (as OpenVINO's
    model zoo ships it), on normalized float32 NCHW images (its input; the exported models take
    uint8 pixels and normalize them inside). An engine that is not installed is left out; a
    precision this CPU does not run gets an error text instead of a figure. Keys:
    "<dtype>/<path>/batch_<n>", and "official_openvino_max_abs_diff": the largest difference
    between the probabilities of our OpenVINO model and the official one's, float32. Each model
    is exported once; `short`: two SavedModels, float32 for the "tensorflow" runtime and
    bfloat16 for "tensorflow_onednn" (each runtime's and each dtype's code, once)."""
    import tempfile

    from keras_t2t import export
    from keras_t2t.imagenet import preprocess_input

    pixels = [np.clip(np.round(images), 0, 255).astype(np.uint8) for images in batches]
    normalized = {
        x.shape[0]: np.ascontiguousarray(preprocess_input(x).transpose(0, 3, 1, 2)) for x in pixels
    }
    runners = {}
    with tempfile.TemporaryDirectory() as folder:
        saved_models = [  # (runtime, compute dtype, row suffix)
            ("tensorflow", "float32", ""),
            ("tensorflow_onednn", "float32", "_onednn"),
            ("tensorflow", "bfloat16", ""),
            ("tensorflow_onednn", "bfloat16", "_onednn"),
        ]
        if short:  # each runtime's and each dtype's code, once
            saved_models = [saved_models[0], saved_models[3]]
        for runtime, dtype, suffix in saved_models:
            saved = export.export_saved_model(
                model,
                os.path.join(folder, f"m_{dtype}{suffix}"),
                serving_runtime=runtime,
                compute_dtype=dtype,
            )
            signature = tf.saved_model.load(saved).signatures["serving_default"]
            runners[f"{dtype}/serving_default{suffix}"] = lambda x, s=signature: s(
                images=tf.constant(x)
            )["probabilities"].numpy()
            runners[f"{dtype}/serving_session{suffix}"] = serving_session(saved)
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        if ort is not None:
            path = export.export_onnx(model, os.path.join(folder, "m.onnx"))
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            runners["float32/onnxruntime"] = lambda x: session.run(None, {"images": x})
        try:
            import openvino as ov
        except ImportError:
            ov = None
        if ov is not None:
            xml = export.export_openvino(model, os.path.join(folder, "ov", "m.xml"))
            _openvino_runners(ov, xml, "openvino", runners, lambda x: {"images": x})
        if official is not None:
            import torch

            def eager(x):
                with torch.no_grad():
                    return official(torch.from_numpy(normalized[x.shape[0]])).numpy()

            runners["float32/official_pytorch"] = eager
            if ov is not None:
                size = pixels[0].shape[1]
                converted = ov.convert_model(
                    official,
                    example_input=torch.zeros(1, 3, size, size),
                    input=[ov.PartialShape([-1, 3, size, size])],
                )
                _openvino_runners(
                    ov, converted, "official_openvino", runners, lambda x: normalized[x.shape[0]]
                )
        results = {}
        ours, theirs = runners.get("float32/openvino"), runners.get("float32/official_openvino")
        if not isinstance(ours, (str, type(None))) and not isinstance(theirs, (str, type(None))):
            probabilities = ours(pixels[-1])["probabilities"]
            logits = next(iter(theirs(pixels[-1]).values()))
            e = np.exp(logits - logits.max(axis=-1, keepdims=True))
            reference = e / e.sum(axis=-1, keepdims=True)
            results["official_openvino_max_abs_diff"] = float(
                np.abs(probabilities - reference).max()
            )
        for x in pixels:
            calls = {}
            for path, run in runners.items():
                key = f"{path}/batch_{x.shape[0]}"
                if isinstance(run, str):
                    results[key] = run
                else:
                    calls[key] = lambda run=run, x=x: run(x)
            for key, seconds in interleaved(calls, min_time).items():
                results[key] = x.shape[0] / seconds
    return results


def interleaved(calls, min_time, rounds=3):
    """Median seconds of one call of each of `calls` (`{key: fn}`), timed in `rounds`
    round-robin passes of `min_time / rounds` each: a slower or faster spell of a shared
    machine then falls on every row alike, and their ratios hold."""
    seconds = {key: [] for key in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            seconds[key].append(timed(fn, min_time / rounds))
    return {key: float(np.median(values)) for key, values in seconds.items()}


RATIO_BASES = {
    "openvino": "OpenVINO on our exported graph",
    "official_openvino": "the official PyTorch model through OpenVINO",
}


def ratios_to_openvino(inference):
    """Adds `ratio_to_<base>` to every row with a row of the base (`RATIO_BASES`: OpenVINO on
    our own exported graph, the engine to beat on Intel CPUs; the official model through
    OpenVINO, with --official_dir) of the same dtype and batch, and prints them."""
    for base_path, what in RATIO_BASES.items():
        lines = []
        for key, row in inference.items():
            dtype, path, batch = key.split("/")
            base = inference.get(f"{dtype}/{base_path}/{batch}", {}).get("images_per_second")
            if base and "images_per_second" in row and path != base_path:
                row[f"ratio_to_{base_path}"] = ratio = row["images_per_second"] / base
                lines.append(f"  {key:40s} {ratio:5.2f}x")
        if lines:
            print(f"  ratio to {what}, same dtype and batch:")
            print("\n".join(lines))


def tflite_throughput(model, image, min_time, threads):
    from ai_edge_litert.interpreter import Interpreter

    from keras_t2t import export

    flatbuffer = export.tflite_models(model, kinds=("float32",))["float32"]
    interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    interpreter.set_tensor(inp["index"], image[None].astype(np.uint8))
    return 1.0 / timed(interpreter.invoke, min_time)


def train_step_throughput(model, batch, min_time, jit_compile=True):
    optimizer = keras.optimizers.AdamW(1e-4, weight_decay=0.05)
    optimizer.build(model.trainable_variables)
    classes = model.output_shape[-1]
    size = model.input_shape[1]
    images = tf.random.uniform((batch, size, size, 3), 0, 255)
    labels = tf.one_hot(tf.random.uniform((batch,), 0, classes, tf.int32), classes)

    @tf.function(jit_compile=jit_compile)
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(x, training=True), tf.float32)
            loss = tf.reduce_mean(
                keras.losses.categorical_crossentropy(y, logits, from_logits=True)
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return batch / timed(lambda: step(images, labels).numpy(), min_time)


def profile(model, images, min_time):
    """ms per batch of the forward pass, split into T2T module, attention, MLP and the rest."""
    tensor = tf.constant(images)
    t2t_model = keras.Model(
        model.input, keras.tree.flatten(model.get_layer("tokens_to_token").output)[0]
    )
    blocks = [layer for layer in model.layers if layer.name.startswith("blocks_")]
    tokens = keras.Model(model.input, model.get_layer("pos_drop").output)(tensor)
    block = blocks[0]
    normed = block.norm1(tokens)

    def ms(fn):
        compiled = tf.function(fn, jit_compile=True)
        return 1000 * timed(lambda: compiled().numpy(), min_time)

    total = ms(lambda: model(tensor, training=False))
    t2t = ms(lambda: t2t_model(tensor, training=False))
    blocks_ms = len(blocks) * ms(lambda: block(tokens, training=False))
    attention = len(blocks) * ms(lambda: block.attn(normed))
    mlp = len(blocks) * ms(lambda: block.mlp(normed))
    # Measured apart, attention and MLP add up to a bit more than the blocks (each pays its
    # own launch); they are scaled to the blocks' time, the norms and residuals included.
    share = blocks_ms / max(attention + mlp, 1e-9)
    return dict(
        total_ms=total,
        t2t_module_ms=t2t,
        attention_ms=attention * share,
        mlp_ms=mlp * share,
        rest_ms=max(total - t2t - blocks_ms, 0.0),
    )


def t2t_module_train_step(name, image_size, batch):
    """Runs forward and backward of the T2T module alone (its memory is what grows with the
    token count); returns nothing."""
    config = keras_t2t.MODEL_CONFIGS[name]
    module = keras_t2t.layers.T2TModule(config["tokens_type"], config["embed_dim"])
    images = tf.random.uniform((batch, image_size, image_size, 3))
    module(images[:1])

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(module(x, training=True)))
        return tape.gradient(loss, module.trainable_variables)

    for _ in range(2):
        step(images)


def memory_of_training_step(
    name, image_size, batch, part="model", depth=None, gradient_checkpointing=False
):
    """Peak resident memory (GiB) of a fresh process that runs training steps of `name`
    (`depth`: with that many blocks; `part="t2t"`: of its T2T module alone), and the steps'
    images/s (of the whole model)."""
    code = (
        "import sys, resource; sys.path.insert(0, sys.argv[1]);"
        "from benchmarks.benchmark import build, train_step_throughput, t2t_module_train_step;"
        "name, size, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]);"
        "arch = {'depth': int(sys.argv[6])} if sys.argv[6] else {};"
        "ips = (t2t_module_train_step(name, size, batch) if sys.argv[5] == 't2t' else "
        "train_step_throughput(build(name, size, 'float32', "
        "gradient_checkpointing=sys.argv[7] == 'True', **arch), batch, 0.0));"
        "print(ips, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code, root, name, str(image_size), str(batch), part]
        + [str(depth or ""), str(gradient_checkpointing)],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    if result.returncode in (-9, 137):
        return dict(error="out of memory: the process was killed")
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return dict(error=lines[-1] if lines else f"exit code {result.returncode}")
    ips, rss = result.stdout.split()[-2:]
    figures = dict(peak_rss_gib=int(rss) / 2**20)
    if part == "model":
        figures["images_per_second"] = float(ips)
    return figures


def memory_with_gradient_checkpointing(args):
    """`--memory_only`: the peak memory and speed of a training step of each model at each
    --memory_sizes with --memory_batch, without and with gradient checkpointing, each in a
    fresh process (float32, XLA, AdamW)."""
    report = dict(
        machine=dict(processor=platform.processor() or platform.machine(), cores=os.cpu_count()),
        settings=vars(args),
        models={},
    )
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} cores")
    for name in args.models:
        entry = report["models"][name] = {}
        for side in args.memory_sizes:
            batch = args.memory_batch
            rows = {
                checkpointing: memory_of_training_step(
                    name, side, batch, depth=args.depth, gradient_checkpointing=checkpointing
                )
                for checkpointing in (False, True)
            }
            for checkpointing, figures in rows.items():
                key = f"train_memory_model_{side}_batch_{batch}" + (
                    "_gradient_checkpointing" if checkpointing else ""
                )
                entry[key] = figures
                what = "with" if checkpointing else "without"
                print(
                    f"{name} training step at {side}, batch {batch}, {what} gradient "
                    "checkpointing: "
                    + (
                        f"{figures['peak_rss_gib']:.2f} GiB peak RSS, "
                        f"{figures['images_per_second']:.1f} images/s"
                        if "peak_rss_gib" in figures
                        else figures["error"]
                    )
                )
    return report


def _peaks(report, args, measure):
    """Measures, records and prints the matmul peak of each of `args.dtypes`, with
    `measure(dtype name, side, min_time)` -> GFLOP/s."""
    size = args.peak_size
    peaks = {dtype: measure(dtype, size, args.min_time) for dtype in args.dtypes}
    report["peak_gflops"] = peaks
    report["models"] = {}
    print(
        f"peak matmul ({size}x{size}): "
        + ", ".join(f"{dtype} {gflops:.0f} GFLOP/s" for dtype, gflops in peaks.items())
    )
    return peaks


def _architecture(args):
    """The variant's architecture overrides of the command line (`--depth`)."""
    return {} if args.depth is None else dict(depth=args.depth)


def _model_entry(report, name, args, peaks):
    """(the report entry of model `name`, pct(images/s, dtype) -> % of that dtype's peak)."""
    counted = name
    if args.depth is not None:  # not the variant: count the model with its blocks
        shape = (args.image_size, args.image_size, 3)
        counted = keras_t2t.create_model(name, input_shape=shape, **_architecture(args))
    flops = keras_t2t.count_flops(counted, args.image_size)
    entry = dict(image_size=args.image_size, gflops_per_image=flops / 1e9, inference={})
    report["models"][name] = entry
    print(
        f"\n{name} at {args.image_size}: {flops / 1e9:.2f} GFLOP per image "
        f"({flops / 2e9:.2f} GMACs)"
    )

    def pct(images_per_second, dtype):
        if dtype not in peaks:  # a dtype left out of --dtypes
            return float("nan")
        return 100 * images_per_second * flops / 1e9 / peaks[dtype]

    return entry, pct


def run(args):
    report = dict(
        machine=dict(
            processor=platform.processor() or platform.machine(),
            cores=os.cpu_count(),
            tensorflow=tf.__version__,
            keras=keras.__version__,
        ),
        settings=vars(args),
    )
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} cores")
    peaks = _peaks(report, args, lambda dtype, *rest: peak_matmul(getattr(tf, dtype), *rest))
    for name in args.models:
        entry, pct = _model_entry(report, name, args, peaks)
        official = None
        if args.official_dir and not args.skip_engines:
            official = official_model(args.official_dir, name, args.image_size)

        for policy, dtype in _policies(args.dtypes):
            model = build(name, args.image_size, policy, **_architecture(args))
            if official is not None:
                load_official(model, official)
            for batch in args.batch_sizes:
                images = (
                    np.random.default_rng(0)
                    .uniform(0, 255, (batch, args.image_size, args.image_size, 3))
                    .astype("float32")
                )
                # --short: the float32 model through every path, the bfloat16 one through
                # tf.function only (the same code with another policy).
                short_bf16 = args.short and dtype == "bfloat16"
                paths = inference_paths(
                    model,
                    images,
                    args.min_time,
                    ("tf_function",) if short_bf16 else INFERENCE_PATHS,
                )
                for path, ips in paths.items():
                    key = f"{dtype}/{path}/batch_{batch}"
                    entry["inference"][key] = dict(
                        images_per_second=ips, pct_of_peak=pct(ips, dtype)
                    )
                    print(
                        f"  inference {key:40s} {ips:8.1f} images/s {pct(ips, dtype):5.1f}% of peak"
                    )
            if dtype == "float32" and not args.skip_engines:
                batches = [
                    np.random.default_rng(0)
                    .uniform(0, 255, (batch, args.image_size, args.image_size, 3))
                    .astype("float32")
                    for batch in args.batch_sizes
                ]
                engines = engine_paths(model, batches, args.min_time, official, args.short)
                if "official_openvino_max_abs_diff" in engines:
                    entry["official_openvino_max_abs_diff"] = difference = engines.pop(
                        "official_openvino_max_abs_diff"
                    )
                    print(
                        f"  our OpenVINO model against the official one: probabilities "
                        f"within {difference:.1e}"
                    )
                for key, ips in engines.items():
                    engine_dtype = key.split("/")[0]
                    if isinstance(ips, str):
                        entry["inference"][key] = dict(error=ips)
                        print(f"  inference {key:40s} {ips}")
                        continue
                    if engine_dtype not in peaks:  # OpenVINO's bf16, without bf16 in --dtypes
                        entry["inference"][key] = dict(images_per_second=ips)
                        print(
                            f"  inference {key:40s} {ips:8.1f} images/s (no {engine_dtype} "
                            f"peak: not in --dtypes)"
                        )
                        continue
                    entry["inference"][key] = dict(
                        images_per_second=ips, pct_of_peak=pct(ips, engine_dtype)
                    )
                    print(
                        f"  inference {key:40s} {ips:8.1f} images/s "
                        f"{pct(ips, engine_dtype):5.1f}% of peak"
                    )
            if dtype == "float32" and args.ablations:
                batch = max(args.batch_sizes)
                images = (
                    np.random.default_rng(0)
                    .uniform(0, 255, (batch, args.image_size, args.image_size, 3))
                    .astype("float32")
                )
                rows = [
                    ("tf_function", ablations(model, images, args.min_time)),
                    ("openvino", openvino_ablations(model, images, args.min_time)),
                ]
                for engine, figures in rows:
                    for path, ips in figures.items():
                        key = f"float32/{engine}_{path}/batch_{batch}"
                        entry.setdefault("ablations", {})[key] = dict(
                            images_per_second=ips, pct_of_peak=pct(ips, "float32")
                        )
                        print(
                            f"  ablation  {key:40s} {ips:8.1f} images/s "
                            f"{pct(ips, 'float32'):5.1f}% of peak"
                        )
            if dtype == "float32" and not args.skip_tflite:
                image = np.random.default_rng(1).uniform(0, 255, (args.image_size,) * 2 + (3,))
                ips = tflite_throughput(model, image, args.min_time, os.cpu_count())
                entry["inference"]["float32/tflite_xnnpack/batch_1"] = dict(
                    images_per_second=ips, pct_of_peak=pct(ips, "float32")
                )
                print(
                    f"  inference {'float32/tflite_xnnpack/batch_1':28s} {ips:8.1f} images/s "
                    f"{pct(ips, 'float32'):5.1f}% of peak"
                )
            if dtype == "float32" and not args.skip_profile:
                batch = max(args.batch_sizes)
                images = (
                    np.random.default_rng(0)
                    .uniform(0, 255, (batch, args.image_size, args.image_size, 3))
                    .astype("float32")
                )
                entry["profile_float32_xla"] = split = profile(model, images, args.min_time)
                total = split["total_ms"]
                print(
                    f"  profile (XLA, batch {batch}): total {total:.1f} ms = "
                    + ", ".join(
                        f"{k[:-3]} {v:.1f} ms ({100 * v / total:.0f}%)"
                        for k, v in split.items()
                        if k != "total_ms"
                    )
                )
            # Training: 3 FLOPs-equivalents of the forward pass (forward + backward).
            ips = train_step_throughput(model, args.train_batch, args.min_time)
            train_pct = 3 * pct(ips, dtype)
            entry[f"train_step_{dtype}_batch_{args.train_batch}"] = dict(
                images_per_second=ips, pct_of_peak=train_pct
            )
            print(
                f"  training step {dtype} batch {args.train_batch}: {ips:.1f} images/s "
                f"{train_pct:.1f}% of peak (3x forward FLOPs)"
            )
            del model
            keras.backend.clear_session()
        ratios_to_openvino(entry["inference"])
        if not args.skip_memory:
            for part in ("model", "t2t"):
                for side in args.memory_sizes:
                    batches = [args.memory_batch] + (
                        [args.memory_batch // 2] if part == "model" and not args.short else []
                    )
                    for batch in batches:
                        memory = memory_of_training_step(name, side, batch, part, args.depth)
                        key = f"train_memory_{part}_{side}_batch_{batch}"
                        entry[key] = memory
                        what = "training step" if part == "model" else "T2T module fwd+bwd"
                        print(
                            f"  {what} memory at {side}, batch {batch}: "
                            + (
                                f"{memory['peak_rss_gib']:.2f} GiB peak RSS"
                                if "peak_rss_gib" in memory
                                else memory["error"]
                            )
                        )
                        if "peak_rss_gib" in memory:
                            break  # the smaller batch only where the larger does not fit
    report["peak_rss_gib_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return report


# --- JAX and PyTorch ------------------------------------------------------------------------


def _sync(value):
    """Waits for `value` (JAX dispatches asynchronously; PyTorch on the CPU does not)."""
    if keras.backend.backend() == "jax":
        value.block_until_ready()
    return value


def portable_peak(dtype, size, min_time):
    """GFLOP/s of a square matmul chain on the current backend (compiled by `jax.jit` on JAX,
    eager on PyTorch)."""
    a = keras.ops.cast(keras.random.normal((size, size), seed=0), dtype)
    b = keras.ops.cast(keras.random.normal((size, size), seed=1) / size**0.5, dtype)

    def chain(x, b):
        for _ in range(4):
            x = keras.ops.matmul(x, b)
        return x

    if keras.backend.backend() == "jax":
        import jax

        chain = jax.jit(chain)
    seconds = timed(lambda: _sync(chain(a, b)), min_time)
    return 4 * 2 * size**3 / seconds / 1e9


def compiled_forward(model):
    """The inference call that the backend runs fastest: `jax.jit` of `stateless_call` on JAX;
    the eager call under `torch.no_grad()` on PyTorch."""
    if keras.backend.backend() == "jax":
        import jax

        call = jax.jit(lambda t, f, x: model.stateless_call(t, f, x, training=False)[0])

        def forward(x):
            # The values are read at each call: `predict` and `fit` replace their buffers.
            trainable = [v.value for v in model.trainable_variables]
            frozen = [v.value for v in model.non_trainable_variables]
            return _sync(call(trainable, frozen, x))

        return forward
    import torch

    def call(x):
        with torch.no_grad():
            return model(x, training=False)

    return call


def _portable_rows(name, policy, dtype, args, entry, pct):
    """Inference and training rows of one model in one dtype policy, into `entry`."""
    compiled_name = "jit" if keras.backend.backend() == "jax" else "eager_no_grad"
    model = keras_t2t.create_model(
        name,
        input_shape=(args.image_size, args.image_size, 3),
        classifier_activation=None,
        dtype=policy,
        **_architecture(args),
    )
    call = compiled_forward(model)
    for batch in args.batch_sizes:
        images = (
            np.random.default_rng(0)
            .uniform(0, 255, (batch, args.image_size, args.image_size, 3))
            .astype("float32")
        )
        paths = {
            "predict": lambda: model.predict(images, batch_size=batch, verbose=0),  # noqa: B023
            compiled_name: lambda: call(images),  # noqa: B023
        }
        for path, fn in paths.items():
            ips = batch / timed(fn, args.min_time)
            key = f"{dtype}/{path}/batch_{batch}"
            entry["inference"][key] = dict(images_per_second=ips, pct_of_peak=pct(ips, dtype))
            print(f"  inference {key:40s} {ips:8.1f} images/s {pct(ips, dtype):5.1f}% of peak")
    batch = args.train_batch
    classes = model.output_shape[-1]
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, (batch, args.image_size, args.image_size, 3)).astype("float32")
    y = np.eye(classes, dtype="float32")[rng.integers(0, classes, batch)]
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4, weight_decay=0.05),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        jit_compile=keras.backend.backend() == "jax",
    )
    ips = batch / timed(lambda: model.train_on_batch(x, y), args.min_time)
    train_pct = 3 * pct(ips, dtype)
    entry[f"train_step_{dtype}_batch_{batch}"] = dict(images_per_second=ips, pct_of_peak=train_pct)
    print(
        f"  training step {dtype} batch {batch}: {ips:.1f} images/s "
        f"{train_pct:.1f}% of peak (3x forward FLOPs)"
    )


def run_portable(args):
    """The benchmark on the JAX or PyTorch backend: peak, inference and training step."""
    backend = keras.backend.backend()
    module = __import__(backend)
    report = dict(
        machine=dict(
            processor=platform.processor() or platform.machine(),
            cores=os.cpu_count(),
            backend=backend,
            **{backend: module.__version__},
            keras=keras.__version__,
        ),
        settings=vars(args),
    )
    print(f"Keras {keras.__version__} on {backend} {module.__version__}, {os.cpu_count()} cores")
    peaks = _peaks(report, args, portable_peak)
    for name in args.models:
        entry, pct = _model_entry(report, name, args, peaks)
        for policy, dtype in _policies(args.dtypes):
            _portable_rows(name, policy, dtype, args, entry, pct)
            keras.backend.clear_session()
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="t2t_vit_14", help="comma-separated variants")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_sizes", default="1,8,32")
    parser.add_argument("--train_batch", type=int, default=32)
    parser.add_argument("--memory_batch", type=int, default=64)
    parser.add_argument("--memory_sizes", default="224,384")
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="compute dtypes to measure: float32 and/or bfloat16 (mixed_bfloat16 models)",
    )
    parser.add_argument(
        "--peak_size",
        type=int,
        default=4096,
        help="side of the matmuls that measure the peak (1024 with --short)",
    )
    parser.add_argument("--min_time", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--skip_tflite", action="store_true")
    parser.add_argument("--skip_profile", action="store_true")
    parser.add_argument(
        "--skip_engines",
        action="store_true",
        help="leave out the exported models: serving_default, ONNX Runtime, OpenVINO",
    )
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument(
        "--memory_only",
        action="store_true",
        help="only the peak memory (and speed) of a training step at --memory_sizes and "
        "--memory_batch, without and with gradient checkpointing, each in a fresh process",
    )
    parser.add_argument(
        "--official_dir",
        help="a checkout of yitu-opensource/T2T-ViT (needs torch): adds the official model, "
        "eager and through OpenVINO, to the exported-model rows, with the same weights",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=keras.backend.backend(),
        help="the Keras backend to measure (default: this process's, KERAS_BACKEND)",
    )
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also time the float32 tf.function with each TF-graph fast path turned off",
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help="a quick run of every path (CI): T2T-ViT-7 with one block (--depth=1) at 32x32, "
        "batch 2; the bfloat16 Keras model through tf.function only",
    )
    parser.add_argument(
        "--depth",
        type=int,
        help="blocks of each model (default: the variant's; 1 with --short): a quick run of "
        "every path, whose figures are not the variant's",
    )
    parser.add_argument("--output", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.short:
        args.ablations = args.ablations or args.backend == "tensorflow"
        # One batch size: each is another trace or compilation of every path.
        args.models, args.image_size, args.batch_sizes = "t2t_vit_7", 32, "2"
        args.train_batch, args.memory_batch, args.memory_sizes = 2, 2, "32"
        args.min_time, args.peak_size = 0.0, 1024
        args.depth = 1 if args.depth is None else args.depth
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for dtype in args.dtypes:
        if dtype not in ("float32", "bfloat16"):
            parser.error(f"unknown dtype {dtype!r} in --dtypes; choose float32 and/or bfloat16")
    args.memory_sizes = [int(s) for s in str(args.memory_sizes).split(",")]
    for name in args.models:
        if name not in keras_t2t.MODEL_CONFIGS:
            parser.error(f"unknown model {name!r}; known: {', '.join(keras_t2t.list_models())}")
    # The flags' own combinations first, then what they ask of this process.
    if args.backend != "tensorflow" and args.ablations:
        parser.error("--ablations times TensorFlow graphs; use it with --backend=tensorflow")
    if args.backend != keras.backend.backend():
        parser.error(
            f"--backend={args.backend}, but Keras was already imported with the "
            f"{keras.backend.backend()} backend; run this script with --backend on its "
            f"command line (or KERAS_BACKEND={args.backend})"
        )
    if args.depth is not None and args.depth < 1:
        parser.error(f"--depth must be at least 1, received {args.depth}")
    if args.depth is not None and args.official_dir:
        parser.error("--depth changes the variant, which the official model then does not match")
    if args.official_dir and not os.path.isfile(
        os.path.join(args.official_dir, "models", "t2t_vit.py")
    ):
        parser.error(
            f"--official_dir={args.official_dir} holds no models/t2t_vit.py; give a checkout of "
            "https://github.com/yitu-opensource/T2T-ViT"
        )
    if args.memory_only and args.backend != "tensorflow":
        parser.error("--memory_only measures TensorFlow training steps; use the TF backend")
    if args.memory_only:
        report = memory_with_gradient_checkpointing(args)
    else:
        report = run(args) if args.backend == "tensorflow" else run_portable(args)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
