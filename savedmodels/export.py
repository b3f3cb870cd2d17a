"""Exports a T2T-ViT to a TF Serving SavedModel, TFLite (builtin ops only), ONNX and OpenVINO.

    python savedmodels/export.py --model=t2t_vit_14 --weights=81.5_T2T_ViT_14.pth.tar \
        --output=exports --format=saved_model,tflite --representative_data=photos/
    python savedmodels/export.py --model=t2t_vit_14 --weights=imagenet --output=exports \
        --format=saved_model,onnx,openvino --triton

Writes `exports/t2t_vit_14/1/` (SavedModel, TF Serving layout, warmup requests in
`assets.extra/`, `batching_parameters.txt` beside it) and
`exports/t2t_vit_14_tflite/t2t_vit_14_{float32,float16,dynamic_int8,int8}.tflite`; the full
int8 model needs --representative_data (a folder of JPEG/PNG images). `onnx` writes
`exports/t2t_vit_14.onnx` (with --triton also `exports/triton/t2t_vit_14/`), `openvino`
`exports/t2t_vit_14_openvino/t2t_vit_14.xml` and `.bin`. Without --weights the weights are
random, for trying the path. See savedmodels/README.md.
"""

import argparse
import errno
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import tensorflow as tf

from keras_t2t import export as formats_lib
from keras_t2t import optional_module
from keras_t2t.export.files import replaced_whole
from keras_t2t.export.image_bytes import check_max_image_pixels
from keras_t2t.export.saved_model import check_serving_runtime
from keras_t2t.export.serving import (
    check_crop_pct,
    check_input_dtype,
    check_model,
    image_size,
    serving_crop_pct,
)
from keras_t2t.inference import check_compute_dtype
from keras_t2t.models import model_for_command_line
from savedmodels import tf_serving
from savedmodels.triton_repository import export_triton


def _image_size(text):
    """--image_size: a side in pixels, or "any"."""
    if text == "any":
        return text
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a side in pixels (e.g. 224) nor 'any' (a model of any size)"
        )
    return size


def representative_images(folder, size, crop_pct=0.9, limit=64, max_pixels=None):
    """Up to `limit` images under `folder`, preprocessed as the evaluation, uint8; each read
    as `serving_bytes` reads it (`keras_t2t.export.decode_image_file`, `max_pixels`)."""
    max_pixels = formats_lib.DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith((".jpg", ".jpeg", ".png"))
    )[:limit]
    if not paths:
        raise ValueError(f"--representative_data {folder!r} holds no .jpg/.jpeg/.png images.")
    images = []
    for path in paths:
        try:
            image = formats_lib.decode_image_file(tf.io.read_file(path), size, crop_pct, max_pixels)
        except ValueError as error:
            raise ValueError(f"{path!r} is not a readable image: {error}") from None
        images.append(image.numpy().astype(np.uint8))
    return np.stack(images)


def _reason(error):
    text = getattr(error, "message", None) or getattr(error, "strerror", None) or str(error)
    return text.splitlines()[0] if text else type(error).__name__


def _check_output(output):
    """Refuses an --output that cannot be a folder (a file, or a path under a file), before
    the model is built. URLs (gs://...) are left to the writers."""
    if "://" in output:
        return
    path = os.path.abspath(output)
    while not os.path.lexists(path):  # the nearest existing path above
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)


def _size(path):
    """Bytes of an export: a folder's files, or a file with the files it needs beside it (an
    OpenVINO IR's .xml and its .bin of weights)."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    size = os.path.getsize(path)
    if path.endswith(".xml") and os.path.isfile(path[: -len(".xml")] + ".bin"):
        size += os.path.getsize(path[: -len(".xml")] + ".bin")
    return size


def export(
    model,
    output_dir,
    formats=formats_lib.FORMATS[:2],
    version=1,
    representative_images=None,
    name=None,
    overwrite=False,
    max_image_pixels=formats_lib.DEFAULT_MAX_IMAGE_PIXELS,
    crop_pct=None,
    input_dtype="uint8",
    triton=False,
    serving_runtime="tensorflow",
    compute_dtype="float32",
    warmup=True,
):
    """Writes the chosen formats under `output_dir`; returns `{artifact: path}`.

    The SavedModel is written in TF Serving's layout by `tf_serving.export` (`<name>/<version>/`,
    the first 4 `representative_images` as warmup requests, `batching_parameters.txt` beside
    the version folders); see `keras_t2t.export.saved_model_archive` for `max_image_pixels`,
    `crop_pct`, `serving_runtime` and `compute_dtype` (the SavedModel's; each other format is
    prepared for its runtime, in float32). `representative_images` (uint8
    `[n, size, size, 3]`) also calibrate the full int8 TFLite model, written only with them;
    `warmup=False` writes no warmup requests (they need tensorflow-serving-api).
    `input_dtype` is that of the ONNX and OpenVINO inputs; `triton` also writes a Triton
    model repository (`output_dir/triton/<name>/`) around the ONNX model.
    Each format's output (the SavedModel's version folder, `<name>_tflite/`, `<name>.onnx`,
    `<name>_openvino/`, `triton/<name>/`) is written under a temporary name and put in place
    whole, so it holds one export's files only. Where one exists, nothing is written (or
    converted) unless `overwrite`; then each is replaced whole.
    """
    for fmt in formats:
        if fmt not in formats_lib.FORMATS:
            raise ValueError(
                f"Unknown export format {fmt!r}; choose from {', '.join(formats_lib.FORMATS)}."
            )
    if not formats and not triton:
        raise ValueError(
            f"Nothing to export: no format given; choose from {', '.join(formats_lib.FORMATS)}."
        )
    # Refused before anything is written:
    check_input_dtype(input_dtype)
    check_serving_runtime(serving_runtime)
    check_model(model)
    check_compute_dtype(compute_dtype, model)
    name = name or model.name
    paths = {}
    warmup = warmup and representative_images is not None
    if "saved_model" in formats and warmup:
        tf_serving.prediction_log_protos()  # for the warmup requests
    if "saved_model" in formats:
        check_max_image_pixels(max_image_pixels)
        if crop_pct is not None:
            check_crop_pct(crop_pct)
        version = tf_serving.check_version(version)
        paths["saved_model"] = os.path.join(output_dir, name, str(version))
    if "tflite" in formats:
        paths["tflite"] = os.path.join(output_dir, f"{name}_tflite")
    if "onnx" in formats:
        paths["onnx"] = os.path.join(output_dir, f"{name}.onnx")
    if "openvino" in formats:
        paths["openvino"] = os.path.join(output_dir, f"{name}_openvino")
    if triton:
        paths["triton"] = os.path.join(output_dir, "triton", name)
    existing = [path for path in paths.values() if tf.io.gfile.exists(path)]
    if existing and not overwrite:
        raise ValueError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
            f"nothing was written. Pass overwrite=True (--overwrite) to replace "
            f"{'it' if len(existing) == 1 else 'each'} whole, or export to another folder."
        )
    # Each optional converter is looked for before anything is written.
    if "onnx" in formats or triton:
        optional_module("tf2onnx", "onnx", "The ONNX export")
        optional_module("onnx", "onnx", "The ONNX export")
    if "openvino" in formats:
        optional_module("openvino", "openvino", "The OpenVINO export")
    written = {}
    if "saved_model" in formats:
        warmup_images = representative_images[:4] if warmup else None
        written["saved_model"] = tf_serving.export(
            model,
            output_dir,
            name,
            version,
            warmup_images,
            overwrite,
            max_image_pixels,
            crop_pct,
            serving_runtime,
            compute_dtype,
        )
        written["tf_serving_batching"] = os.path.join(output_dir, name, tf_serving.BATCHING_FILE)
    if "tflite" in formats:
        kinds = formats_lib.TFLITE_KINDS
        if representative_images is None:
            kinds = kinds[:3]  # full int8 needs them
        with replaced_whole(paths["tflite"]) as staging:
            tf.io.gfile.makedirs(staging)
            flatbuffers = formats_lib.tflite_models(model, representative_images, kinds)
            for kind, flatbuffer in flatbuffers.items():
                with tf.io.gfile.GFile(os.path.join(staging, f"{name}_{kind}.tflite"), "wb") as f:
                    f.write(flatbuffer)
        for kind in kinds:
            written[f"tflite_{kind}"] = os.path.join(paths["tflite"], f"{name}_{kind}.tflite")
    if "onnx" in formats:
        os.makedirs(output_dir, exist_ok=True)
        written["onnx"] = formats_lib.export_onnx(model, paths["onnx"], input_dtype)
    if triton:
        written["triton"] = export_triton(
            model, os.path.dirname(paths["triton"]), name, input_dtype, written.get("onnx")
        )
    if "openvino" in formats:
        with replaced_whole(paths["openvino"]) as staging:
            os.makedirs(staging)
            formats_lib.export_openvino(model, os.path.join(staging, f"{name}.xml"), input_dtype)
        written["openvino"] = os.path.join(paths["openvino"], f"{name}.xml")
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        help="variant, e.g. t2t_vit_14 (default: the run's, with a --model_dir, or read from "
        "an official checkpoint)",
    )
    parser.add_argument(
        "--weights",
        help=".pth.tar / .pth / .weights.h5, or the --model_dir of a train_imagenet.py run "
        "(default: random)",
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--format",
        default="saved_model,tflite",
        help="comma-separated: saved_model, tflite, onnx, openvino",
    )
    parser.add_argument(
        "--input_dtype",
        default="uint8",
        choices=["uint8", "float32"],
        help="pixel dtype of the ONNX and OpenVINO inputs (values in [0, 255] either way; "
        "float32: an image with a NaN or infinite pixel gets class -1 and NaN scores)",
    )
    parser.add_argument(
        "--triton",
        action="store_true",
        help="also write a Triton model repository (ONNX Runtime backend) under OUTPUT/triton",
    )
    parser.add_argument(
        "--image_size",
        type=_image_size,
        help="default: 224, or the size of --weights; 'any': a model of any size, whose "
        "serving_default, ONNX and OpenVINO take any height and width that are multiples of "
        "16 (serving_bytes and TFLite take the size of the weights)",
    )
    parser.add_argument("--classes", type=int, help="default: the run's, or 1000")
    parser.add_argument(
        "--num_heads", type=int, help="heads of a custom architecture (an official checkpoint)"
    )
    parser.add_argument("--version", type=int, default=1, help="SavedModel version folder (>= 1)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing exports whole (each format's folder or file); without it, an "
        "existing one stops the export before anything is written",
    )
    parser.add_argument(
        "--max_image_pixels",
        type=int,
        default=None,
        help="serving_bytes refuses images whose header declares more pixels (default: 4096^2)",
    )
    parser.add_argument(
        "--crop_pct",
        type=float,
        help="serving_bytes resizes the short side to size / crop_pct, then center-crops "
        "(default: the run's --crop_pct with a --model_dir, that of the release with imagenet "
        "weights, else 0.9)",
    )
    parser.add_argument("--representative_data", help="images for the full int8 TFLite model")
    parser.add_argument(
        "--serving_runtime",
        default="tensorflow",
        choices=["tensorflow", "tensorflow_onednn", "generic"],
        help="the machine that serves the SavedModel (keras_t2t.inference.prepare): "
        "tensorflow (any TensorFlow or TF Serving); tensorflow_onednn (x86-64 Linux TF Serving "
        "or TensorFlow with oneDNN on, their default: LayerNorms as one oneDNN op, slower "
        "where oneDNN is off)",
    )
    parser.add_argument(
        "--compute_dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="what the SavedModel computes in: bfloat16 for serving CPUs with bfloat16 units "
        "(AVX-512 BF16, AMX), slower on others; inputs and outputs stay uint8/bytes and float32",
    )
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    max_image_pixels = args.max_image_pixels
    if max_image_pixels is None:
        max_image_pixels = formats_lib.DEFAULT_MAX_IMAGE_PIXELS
    try:  # the flags are checked before the model is built
        for fmt in formats:
            if fmt not in formats_lib.FORMATS:
                raise ValueError(
                    f"Unknown --format {fmt!r}; choose from {', '.join(formats_lib.FORMATS)}."
                )
        if not formats and not args.triton:
            raise ValueError(
                f"--format={args.format!r} names no format; choose from "
                f"{', '.join(formats_lib.FORMATS)}."
            )
        if "saved_model" in formats:
            tf_serving.check_version(args.version)
        check_max_image_pixels(max_image_pixels)
        if args.crop_pct is not None:
            check_crop_pct(args.crop_pct)
        _check_output(args.output)
        model = model_for_command_line(
            args.model, args.weights, args.image_size, args.classes, args.num_heads
        )
        crop_pct = args.crop_pct
        if crop_pct is None:
            crop_pct = serving_crop_pct(model, args.weights)
        samples = None
        if args.representative_data:
            samples = representative_images(
                args.representative_data,
                image_size(model),  # for a model of any size, that of its weights
                crop_pct,
                max_pixels=max_image_pixels,
            )
        elif "tflite" in formats:
            print("note: no --representative_data, so no full int8 TFLite model")
        warmup = tf_serving.has_prediction_log_protos()
        if samples is not None and "saved_model" in formats and not warmup:
            print(
                "note: no TF Serving warmup requests: they are written with "
                "tensorflow-serving-api (pip install --no-deps 'tensorflow-serving-api>=2.20')"
            )
        if args.weights is None:
            print("note: no --weights, exporting random weights")
        written = export(
            model,
            args.output,
            formats,
            args.version,
            samples,
            overwrite=args.overwrite,
            max_image_pixels=max_image_pixels,
            crop_pct=crop_pct,
            input_dtype=args.input_dtype,
            triton=args.triton,
            serving_runtime=args.serving_runtime,
            compute_dtype=args.compute_dtype,
            warmup=warmup,
        )
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, tf.errors.OpError) as error:  # a folder that cannot be written
        print(f"error: cannot write to --output {args.output!r}: {_reason(error)}", file=sys.stderr)
        return 2
    for artifact, path in written.items():
        print(f"{artifact:20s} {_size(path) / 2**20:8.2f} MiB  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
