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


def representative_images(folder, size, crop_pct=0.9, limit=64, max_pixels=None):
    """Up to `limit` images under `folder`, preprocessed as the evaluation, uint8; each read
    as `serving_bytes` reads it (`keras_t2t.export.decode_image_file`, `max_pixels`)."""
    import tensorflow as tf

    from keras_t2t import export

    max_pixels = export.DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
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
            image = export.decode_image_file(tf.io.read_file(path), size, crop_pct, max_pixels)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="variant, e.g. t2t_vit_14 (default: the run's, with a --model_dir)"
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
    parser.add_argument("--image_size", type=int, help="default: 224, or the size of --weights")
    parser.add_argument("--classes", type=int, help="default: the run's, or 1000")
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
    args = parser.parse_args(argv)

    import tensorflow as tf

    from keras_t2t import export
    from keras_t2t.models import model_for_command_line

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    max_image_pixels = args.max_image_pixels
    if max_image_pixels is None:
        max_image_pixels = export.DEFAULT_MAX_IMAGE_PIXELS
    try:  # the flags are checked before the model is built
        for fmt in formats:
            if fmt not in export.FORMATS:
                raise ValueError(
                    f"Unknown --format {fmt!r}; choose from {', '.join(export.FORMATS)}."
                )
        if not formats and not args.triton:
            raise ValueError(
                f"--format={args.format!r} names no format; choose from "
                f"{', '.join(export.FORMATS)}."
            )
        if "saved_model" in formats:
            export.check_version(args.version)
        export.check_max_image_pixels(max_image_pixels)
        if args.crop_pct is not None:
            export.check_crop_pct(args.crop_pct)
        _check_output(args.output)
        model = model_for_command_line(args.model, args.weights, args.image_size, args.classes)
        crop_pct = args.crop_pct
        if crop_pct is None:
            crop_pct = export.serving_crop_pct(model, args.weights)
        samples = None
        if args.representative_data:
            samples = representative_images(
                args.representative_data,
                model.input_shape[1],
                crop_pct,
                max_pixels=max_image_pixels,
            )
        elif "tflite" in formats:
            print("note: no --representative_data, so no full int8 TFLite model")
        if args.weights is None:
            print("note: no --weights, exporting random weights")
        written = export.export(
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
