"""Runs `test_portable.py` under JAX and PyTorch (#13), each in its own process (a Keras
backend is chosen once per process; the two run side by side), with a `.keras` file and a
preset written here on TensorFlow for them to load."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_t2t import convert, presets
from tests.conftest import DATA, GOLDEN, tiny_model

PORTABLE = pathlib.Path(__file__).parent / "test_portable.py"
BACKENDS = [b for b in ("jax", "torch") if importlib.util.find_spec(b) is not None]


@pytest.mark.slow
@pytest.mark.skipif(not BACKENDS, reason="neither jax nor torch is installed")
def test_the_portable_tests_pass_under_jax_and_torch(tmp_path):
    assert keras.backend.backend() == "tensorflow"
    model = tiny_model(input_shape=(32, 32, 3), classes=5)
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    path = str(tmp_path / "written_on_tensorflow.keras")
    model.save(path)
    np.savez(path + ".npz", images=images, outputs=np.asarray(model(images)))
    # Beside it, the golden checkpoint as a preset (convert --preset), to load there.
    checkpoint = DATA / GOLDEN["t2t_tiny_performer"]["checkpoint"]
    argv = [str(checkpoint), "--preset", str(tmp_path), "--num_heads=2", "--no_check"]
    assert convert.main(argv) == 0
    preset = str(tmp_path / presets.preset_name(source=checkpoint))
    processes = {}
    for backend in BACKENDS:
        env = dict(
            os.environ,
            KERAS_BACKEND=backend,
            KERAS_T2T_FOREIGN_KERAS=path,
            KERAS_T2T_FOREIGN_PRESET=preset,
        )
        if backend == "jax":
            # Two CPU devices, for the DataParallel test.
            flags = [env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2"]
            env["XLA_FLAGS"] = " ".join(flags).strip()
        processes[backend] = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(PORTABLE)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=PORTABLE.parents[2],  # the repository's root
        )
    outputs = {}
    try:
        for backend, process in processes.items():
            outputs[backend] = process.communicate(timeout=900)[0]
    finally:
        for process in processes.values():
            process.kill()
    for backend, process in processes.items():
        output = outputs[backend]
        assert process.returncode == 0, f"{backend}:\n{output[-6000:]}"
        skipped = [line for line in output.splitlines() if line.startswith("SKIPPED")]
        # Only what is another backend's own may be skipped (the DataParallel fit is JAX's).
        assert all("JAX's" in line for line in skipped), (backend, skipped)
    assert set(BACKENDS) == {"jax", "torch"}, f"only {BACKENDS} installed: install the other"
