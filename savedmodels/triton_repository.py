"""A Triton Inference Server model repository entry around the ONNX export: `config.pbtxt`
(ONNX Runtime backend, dynamic batching) and `<version>/model.onnx`."""

import os
import shutil

from keras_t2t.export.files import replaced_whole
from keras_t2t.export.onnx import export_onnx
from keras_t2t.export.serving import check_input_dtype, pixels_shape
from savedmodels.tf_serving import check_version

TRITON_DTYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}


def triton_config(model, name, input_dtype="uint8", max_batch_size=32, queue_delay_us=2000):
    """`config.pbtxt` of a Triton model repository entry serving the ONNX model with ONNX
    Runtime, with dynamic batching."""
    check_input_dtype(input_dtype)
    height, width = (-1 if side is None else side for side in pixels_shape(model)[1:3])
    classes = int(model.output_shape[-1])
    preferred = [b for b in (4, 8, 16, 32) if b <= max_batch_size]
    return f"""name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [
  {{ name: "images", data_type: {TRITON_DTYPES[input_dtype]}, dims: [ {height}, {width}, 3 ] }}
]
output [
  {{ name: "probabilities", data_type: TYPE_FP32, dims: [ {classes} ] }},
  {{ name: "classes", data_type: TYPE_INT32, dims: [ 1 ], reshape: {{ shape: [ ] }} }},
  {{ name: "scores", data_type: TYPE_FP32, dims: [ 1 ], reshape: {{ shape: [ ] }} }}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(b) for b in preferred)} ]
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
"""


def export_triton(model, output_dir, name, input_dtype="uint8", onnx_path=None, version=1):
    """A Triton model repository entry: `output_dir/<name>/config.pbtxt` and
    `output_dir/<name>/<version>/model.onnx` (copied from `onnx_path`, else exported), written
    under a temporary name and put in place whole: it replaces an existing entry. Returns the
    entry's folder."""
    version = check_version(version)
    config = triton_config(model, name, input_dtype)
    folder = os.path.join(output_dir, name)
    with replaced_whole(folder) as staging:
        os.makedirs(os.path.join(staging, str(version)))
        target = os.path.join(staging, str(version), "model.onnx")
        if onnx_path is None:
            export_onnx(model, target, input_dtype)
        else:
            shutil.copyfile(onnx_path, target)
        with open(os.path.join(staging, "config.pbtxt"), "w") as f:
            f.write(config)
    return folder
