"""The benchmark's short mode runs every path (the bfloat16 Keras model through tf.function
only, the oneDNN SavedModel in bfloat16 only), so that it cannot rot (figures are not judged
here: speed targets live in the benchmark's output, not in tests)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_short_mode(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--short", f"--output={out}"],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["peak_gflops"]) == {"float32", "bfloat16"}
    entry = report["models"]["t2t_vit_7"]
    assert entry["gflops_per_image"] > 0
    paths = {key.split("/")[1] for key in entry["inference"]}
    assert paths == {
        "predict",
        "predict_on_batch",
        "tf_function",
        "xla",
        "tflite_xnnpack",
        "serving_default",
        "serving_session",
        "serving_default_onednn",
        "serving_session_onednn",
        "onnxruntime",
        "openvino",
    }
    # OpenVINO on our graph is the yardstick of the other float32 rows.
    assert entry["inference"]["float32/serving_default/batch_2"]["ratio_to_openvino"] > 0
    assert {key.split("/")[0] for key in entry["inference"]} == {"float32", "bfloat16"}
    for row in ("serving_default_onednn", "serving_session_onednn"):
        assert entry["inference"][f"bfloat16/{row}/batch_2"]["ratio_to_openvino"] > 0
    for key, figures in entry["inference"].items():
        if "error" in figures:  # only OpenVINO's bfloat16, on a CPU without bf16 units
            assert key.startswith("bfloat16/openvino/"), (key, figures)
            continue
        assert figures["images_per_second"] > 0 and figures["pct_of_peak"] > 0
    assert set(entry["profile_float32_xla"]) == {
        "total_ms",
        "t2t_module_ms",
        "attention_ms",
        "mlp_ms",
        "rest_ms",
    }
    assert entry["train_step_float32_batch_2"]["images_per_second"] > 0
    assert entry["train_step_bfloat16_batch_2"]["images_per_second"] > 0
    assert entry["train_memory_model_32_batch_2"]["peak_rss_gib"] > 0
    assert entry["train_memory_t2t_32_batch_2"]["peak_rss_gib"] > 0
    # Each inference transform left out in turn, beside the model as built.
    tf_rows = (
        "tensorflow_onednn",
        "without_class_token_block",
        "without_extract_patches",
        "without_onednn_layer_norm",
        "as_built",
    )
    openvino_rows = ("openvino", "without_class_token_block", "without_split_qkv", "as_built")
    assert set(entry["ablations"]) == {
        *(f"float32/tf_function_{row}/batch_2" for row in tf_rows),
        *(f"float32/openvino_{row}/batch_2" for row in openvino_rows),
    }
    assert "% of peak" in result.stdout


@pytest.mark.slow
def test_benchmark_short_mode_on_jax_and_torch(tmp_path):
    """--backend=jax and --backend=torch, side by side (each its own process and backend),
    one dtype each: the portable runner's code is the same for both dtypes."""
    dtypes = {"jax": "float32", "torch": "bfloat16"}
    runs = {}
    for backend, dtype in dtypes.items():
        runs[backend] = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "benchmark.py"),
                "--short",
                f"--backend={backend}",
                f"--dtypes={dtype}",
                f"--output={tmp_path / backend}.json",
            ],
            env=dict(
                os.environ,
                TF_CPP_MIN_LOG_LEVEL="2",
                PYTHONPATH=str(ROOT),
                KERAS_BACKEND="tensorflow",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for backend, process in runs.items():
        stdout, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, (backend, stderr[-3000:])
        report = json.loads((tmp_path / f"{backend}.json").read_text())
        assert report["machine"]["backend"] == backend
        assert "tensorflow" not in report["machine"]
        entry = report["models"]["t2t_vit_7"]
        compiled = "jit" if backend == "jax" else "eager_no_grad"
        dtype = dtypes[backend]
        assert set(report["peak_gflops"]) == {dtype}
        paths = ("predict", compiled)
        assert set(entry["inference"]) == {f"{dtype}/{path}/batch_2" for path in paths}
        for figures in entry["inference"].values():
            assert figures["images_per_second"] > 0 and figures["pct_of_peak"] > 0
        assert entry[f"train_step_{dtype}_batch_2"]["images_per_second"] > 0
        assert f"on {backend}" in stdout


def _refusal(argv, capsys):
    from benchmarks import benchmark

    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_benchmark_refuses_ablations_off_tensorflow(capsys):
    error = _refusal(["--backend=torch", "--ablations"], capsys)
    assert "--ablations times TensorFlow graphs; use it with --backend=tensorflow" in error


def test_benchmark_rejects_unknown_model(capsys):
    assert "unknown model 't2t_vit_15'" in _refusal(["--models=t2t_vit_15"], capsys)


@pytest.mark.slow
def test_fidelity_benchmark_runs_ours_on_its_own_data(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fidelity.py"),
            "--which=ours",
            "--seeds=0",
            "--epochs=2",
            "--train_per_class=4",
            "--val_per_class=2",
            "--image_size=32",
            "--batch_size=8",
            f"--data_dir={tmp_path / 'records'}",
        ],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "seed 0 keras-t2t top-1" in result.stdout
    assert "ours      mean" in result.stdout and "official" not in result.stdout.split("AdamW")[1]
    manifest = json.loads((tmp_path / "records" / "manifest-validation.json").read_text())
    assert manifest["records"] == 20


def test_benchmark_refuses_an_official_dir_without_the_official_code(tmp_path, capsys):
    error = _refusal([f"--official_dir={tmp_path}"], capsys)
    assert "holds no models/t2t_vit.py" in error


@pytest.mark.skipif(
    not os.environ.get("T2T_VIT_OFFICIAL_DIR"),
    reason="set T2T_VIT_OFFICIAL_DIR to a checkout of yitu-opensource/T2T-ViT",
)
def test_official_rows_have_our_weights_and_every_ratio():
    """With the official code: the official model gets our weights' mapping (the same
    function), its OpenVINO conversion matches ours, and each row gets both ratios."""
    pytest.importorskip("torch")
    pytest.importorskip("openvino")
    import numpy as np

    from benchmarks import benchmark

    official = benchmark.official_model(os.environ["T2T_VIT_OFFICIAL_DIR"], "t2t_vit_7", 32)
    model = benchmark.load_official(benchmark.build("t2t_vit_7", 32, "float32"), official)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    results = benchmark.engine_paths(model, [images], 0.0, official)
    assert results.pop("official_openvino_max_abs_diff") < 1e-5
    inference = {
        key: dict(images_per_second=ips) for key, ips in results.items() if not isinstance(ips, str)
    }
    assert {
        "float32/official_pytorch/batch_2",
        "float32/official_openvino/batch_2",
        "float32/serving_session/batch_2",
    } <= set(inference)
    benchmark.ratios_to_openvino(inference)
    row = inference["float32/serving_default/batch_2"]
    assert row["ratio_to_openvino"] > 0 and row["ratio_to_official_openvino"] > 0


def test_benchmark_models_have_weights_like_released_ones():
    """No zero biases or offsets and no unit scales (TensorFlow would drop a zero bias, and
    with it the bias and GELU fusion that released weights get)."""
    import numpy as np

    from benchmarks import benchmark

    model = benchmark.build("t2t_vit_7", 32, "float32")
    leaves = {}
    for variable in model.weights:
        leaves.setdefault(variable.path.rsplit("/", 1)[-1], []).append(np.asarray(variable))
    assert len(leaves["bias"]) > 10 and len(leaves["gamma"]) > 10
    for values in leaves["bias"] + leaves["beta"]:
        assert np.all(values != 0.0)
    for values in leaves["gamma"]:
        assert np.all(values != 1.0) and np.all(np.abs(values - 1.0) < 0.2)
