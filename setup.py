"""keras-t2t: T2T-ViT for Keras 3 and TensorFlow.

TensorFlow is deliberately not a hard requirement, so that installing keras-t2t never pulls a
second TensorFlow distribution on top of the one you have (tensorflow, tensorflow-cpu or
tensorflow-tpu). Pick it with an extra: `pip install -e .[cpu]`, `.[gpu]` or `.[tpu]`.
"""

import re

from setuptools import find_packages, setup

TF = ">=2.20,<2.22"
# The one home of the version is keras_t2t/version.py (read, not imported: no TF at setup).
with open("keras_t2t/version.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

setup(
    name="keras-t2t",
    version=VERSION,
    description="T2T-ViT (Tokens-to-Token Vision Transformer) for Keras 3 and TensorFlow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["keras_t2t", "keras_t2t.*"]),
    install_requires=["keras>=3.13", "numpy>=1.26", "h5py>=3.10"],
    extras_require={
        "cpu": [f"tensorflow-cpu{TF}"],
        "gpu": [f"tensorflow[and-cuda]{TF}"],
        "tpu": [f"tensorflow-tpu{TF}"],
        "torch": ["torch>=2.1"],
        "train": ["scikit-learn>=1.3", "tensorboard>=2.20"],
        "tfds": ["tensorflow-datasets>=4.9"],
        "tflite": ["ai-edge-litert>=2.0"],
        "onnx": ["tf2onnx>=1.16", "onnx>=1.14", "onnxruntime>=1.17"],
        "openvino": ["openvino>=2024.0"],
        "serving": ["tensorflow-serving-api>=2.20"],
        "viz": ["matplotlib>=3.7"],
        "jax": ["jax>=0.4.30"],
        "bench": ["scikit-image>=0.22", "ai-edge-litert>=2.0"],  # benchmarks/int8_accuracy.py
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.17.6,<0.18",
            "matplotlib>=3.7",
            # The versions whose XLA knows the suite's XLA_FLAGS (tests/conftest.py; XLA
            # aborts on a flag it does not know): 0.4.30 lacks --xla_cpu_use_fusion_emitters.
            "jax>=0.6.2,<0.11",
        ],
    },
    entry_points={"console_scripts": ["keras-t2t-convert=keras_t2t.convert:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
