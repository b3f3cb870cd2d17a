"""The torch-free checkpoint reader against torch.load(weights_only=True), in both formats."""

import argparse
import collections
import os
import pathlib
import re

import numpy as np
import pytest
from conftest import DATA, WITHOUT_TORCH

from keras_t2t import pytorch_checkpoint

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
FORMATS = {"zip": True, "legacy": False}


def _save(obj, path, fmt):
    torch.save(obj, str(path), _use_new_zipfile_serialization=FORMATS[fmt])
    return str(path)


def _assert_same(ours, theirs):
    if isinstance(theirs, torch.Tensor):
        theirs = theirs.detach()
        expected = theirs.float().numpy() if theirs.dtype == torch.bfloat16 else theirs.numpy()
        got = ours.astype(np.float32) if theirs.dtype == torch.bfloat16 else ours
        assert isinstance(ours, np.ndarray) and got.dtype == expected.dtype
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs)
        for key in theirs:
            _assert_same(ours[key], theirs[key])
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            _assert_same(a, b)
    else:
        assert ours == theirs and type(ours) is type(theirs)


def _state():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=generator)
    return {
        "state_dict_ema": collections.OrderedDict(
            [
                ("blocks.0.attn.qkv.weight", torch.randn(12, 4, generator=generator)),
                ("transposed", base.t()),  # non-contiguous strides
                ("row", base[2]),  # a view at an offset of a shared storage
                ("half", torch.randn(3, 2, generator=generator).half()),
                ("bf16", torch.randn(3, 2, generator=generator).bfloat16()),
                ("steps", torch.arange(7)),
                ("mask", torch.tensor([True, False, True])),
                ("scalar", torch.tensor(3.5)),
                ("bytes", torch.arange(4, dtype=torch.uint8)),
                ("param", torch.nn.Parameter(torch.ones(2, 2))),
                ("empty", torch.zeros(0, 3)),
            ]
        ),
        "epoch": 299,
        "metric": 81.5,
        "arch": "t2t_vit_14",
        "nested": [1, (2.0, "three"), {"four": None}],
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_what_torch_load_reads(tmp_path, fmt):
    path = _save(_state(), tmp_path / f"state.{fmt}.pth", fmt)
    _assert_same(pytorch_checkpoint.load(path), torch.load(path, weights_only=True))


def test_reads_the_golden_checkpoints_as_torch_does():
    for name in ("t2t_tiny_performer.pth.tar", "t2t_tiny_transformer.pth.tar"):
        path = str(DATA / name)
        _assert_same(pytorch_checkpoint.load(path), torch.load(path, weights_only=True))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, fmt):
    marker = tmp_path / "ran"
    path = _save(
        {"state_dict": {"w": torch.ones(1)}, "x": _RunsCode(marker)}, tmp_path / "evil", fmt
    )
    with pytest.raises(ValueError, match=r"holds a (posix|os|nt)\.system object.*could run code"):
        pytorch_checkpoint.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_objects_are_refused_by_name(tmp_path, fmt):
    path = _save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "args", fmt)
    with pytest.raises(ValueError, match=r"holds a argparse\.Namespace object"):
        pytorch_checkpoint.load(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_and_garbage_files(tmp_path, fmt):
    path = pathlib.Path(_save(_state(), tmp_path / "state", fmt))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match="corrupt, truncated or not a PyTorch checkpoint"):
        pytorch_checkpoint.load(str(path))
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="corrupt, truncated or not a PyTorch checkpoint"):
        pytorch_checkpoint.load(str(path))


NO_TORCH = (
    WITHOUT_TORCH
    + """import numpy as np
from conftest import DATA, GOLDEN, tiny_model
from keras_t2t import convert
for entry in GOLDEN.values():  # the official checkpoints, of both tokens types
    io = np.load(DATA / entry["io"])
    model = tiny_model(entry["tokens_type"], weights=str(DATA / entry["checkpoint"]),
                       input_shape=None, include_preprocessing=False, classifier_activation=None)
    logits = np.asarray(model(io["images_nchw"].transpose(0, 2, 3, 1)))
    print(entry["tokens_type"], "max abs diff", float(np.abs(logits - io["logits"]).max()))
code = convert.main([str(DATA / "t2t_tiny_performer.pth.tar"), sys.argv[1], "--num_heads=2"])
assert "torch" not in sys.modules
sys.exit(code)
"""
)


def test_official_weights_and_the_converter_work_without_torch(tmp_path):
    """In one process where torch cannot be imported: the official checkpoints load (the
    official logits), and the converter skips only its comparison with the official forward."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    dst = tmp_path / "tiny.weights.h5"
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(dst)],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=f"{root}:{root / 'tests'}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    differences = dict(re.findall(r"^(\w+) max abs diff (\S+)$", result.stdout, re.M))
    assert set(differences) == {"performer", "transformer"}, result.stdout
    assert all(float(d) <= 1e-4 for d in differences.values()), differences
    assert "official forward skipped: torch is not installed" in result.stdout
    assert re.search(r"max abs difference after reloading \S+: 0\b", result.stdout)
    assert dst.exists()
