"""Crafted PyTorch checkpoints against the torch-free reader: every view is checked against its
storage, and what a file makes the reader allocate is bounded by what the file holds.

The files are written here opcode by opcode, as an attacker would, in both formats. Where torch
is installed, each refusal is checked against `torch.load(weights_only=True)` too.
"""

import pickle
import resource
import struct
import zipfile

import numpy as np
import pytest

from keras_t2t import pytorch_checkpoint

try:
    import torch
except ImportError:  # the reader needs no torch; only the comparison does
    torch = None


# Pickle opcodes (protocol 2), enough for a state dict of tensors.
def _int(v):
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    return b"\x8a\x08" + struct.pack("<q", v)


def _str(s):
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tuple(*items):
    return b"(" + b"".join(items) + b"t"


def _tensor(key, numel, offset, size, stride, view=None):
    """A tensor to write: a `_rebuild_tensor_v2` call on float32 storage `key`; `view` is a
    legacy storage view (offset, size)."""
    return key, numel, offset, size, stride, view


def _call(tensor, legacy):
    key, numel, offset, size, stride, view = tensor
    pid = [_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"), _int(numel)]
    if legacy:  # the legacy id ends in a storage view (key, offset, size), or None
        pid.append(b"N" if view is None else _tuple(_str(key + "v"), *map(_int, view)))
    return (
        _global("torch._utils", "_rebuild_tensor_v2")
        + b"("
        + _tuple(*pid)
        + b"Q"
        + _int(offset)
        + _tuple(*map(_int, size))
        + _tuple(*map(_int, stride))
        + b"\x89"
        + _global("collections", "OrderedDict")
        + b")R"
        + b"tR"
    )


def _state_dict(tensors, legacy):
    """A pickled dict {name: tensor}."""
    body = b"".join(_str(name) + _call(tensor, legacy) for name, tensor in tensors.items())
    return b"\x80\x02}(" + body + b"u."


def _zip(path, tensors, storages, compress=zipfile.ZIP_STORED, pickle_bytes=None):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "archive/data.pkl", pickle_bytes or _state_dict(tensors, legacy=False), compress
        )
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data, compress)
    return str(path)


def _legacy(path, tensors, storages, main_pickle=None):
    dump = lambda obj: pickle.dumps(obj, protocol=2)  # noqa: E731
    with open(path, "wb") as f:
        f.write(dump(pytorch_checkpoint.LEGACY_MAGIC) + dump(pytorch_checkpoint.LEGACY_PROTOCOL))
        f.write(dump({"protocol_version": 1001, "little_endian": True}))
        f.write(main_pickle or _state_dict(tensors, legacy=True))
        f.write(dump(list(storages)))
        for data in storages.values():
            if isinstance(data, tuple):  # (declared numel, bytes): a lying length field
                numel, data = data
            else:
                numel = len(data) // 4
            f.write(struct.pack("<q", numel) + data)
    return str(path)


def _floats(n):
    return np.arange(n, dtype="<f4").tobytes()


WRITERS = {"zip": _zip, "legacy": _legacy}


def _load_one(path):
    return pytorch_checkpoint.load(path)["w"]


def _torch_refuses(path):
    if torch is None:
        return True
    try:
        torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - any refusal
        return True
    return False


# (name, numel of storage "0", offset, size, stride, what our refusal says)
OUT_OF_BOUNDS = [
    ("size past the storage", 16, 0, (4096,), (1,), "reads past the end"),
    ("huge stride", 16, 0, (4,), (1 << 42,), "reads past the end"),
    ("stride past int64 range of bytes", 16, 0, (4,), (1 << 62,), "reads past the end"),
    ("offset past the storage", 16, 1000, (4,), (1,), "reads past the end"),
    ("negative offset", 16, -4, (4,), (1,), "below 0"),
    ("negative stride", 16, 12, (4,), (-1000,), "negative"),
    ("class token on one value", 1, 0, (1, 1, 256), (256, 256, 1), "reads past the end"),
    ("sizes and strides disagree", 16, 0, (2, 2), (1,), "2 sizes but 1 strides"),
]


@pytest.mark.parametrize("fmt", WRITERS)
@pytest.mark.parametrize("case", OUT_OF_BOUNDS, ids=[c[0] for c in OUT_OF_BOUNDS])
def test_views_outside_their_storage_are_refused(tmp_path, fmt, case):
    _, numel, offset, size, stride, reason = case
    path = WRITERS[fmt](
        tmp_path / "bad.pth",
        {"w": _tensor("0", numel, offset, size, stride)},
        {"0": _floats(numel)},
    )
    with pytest.raises(ValueError, match=reason):
        _load_one(path)
    assert _torch_refuses(path)


@pytest.mark.parametrize("fmt", WRITERS)
def test_well_formed_views_load_exactly(tmp_path, fmt):
    tensors = {
        "w": _tensor("0", 16, 0, (4, 4), (1, 4)),  # transposed
        "row": _tensor("0", 16, 6, (3,), (2,)),  # strided, at an offset
        "one": _tensor("0", 16, 15, (1, 1), (1 << 40, 7)),  # size-1 dims: strides unused
        "empty": _tensor("0", 16, 0, (0, 5), (5, 1)),
    }
    path = WRITERS[fmt](tmp_path / "ok.pth", tensors, {"0": _floats(16)})
    got = pytorch_checkpoint.load(path)
    values = np.arange(16, dtype="float32")
    np.testing.assert_array_equal(got["w"], values.reshape(4, 4).T)
    np.testing.assert_array_equal(got["row"], values[[6, 8, 10]])
    np.testing.assert_array_equal(got["one"], [[15.0]])
    assert got["empty"].shape == (0, 5)
    if torch is not None:
        theirs = torch.load(path, weights_only=True)
        for name, value in got.items():
            np.testing.assert_array_equal(value, theirs[name].numpy())


@pytest.mark.parametrize("fmt", WRITERS)
def test_a_view_that_repeats_its_storage_is_refused(tmp_path, fmt):
    # One stored value broadcast to 2^26 values (stride 0): a 256 MiB copy from a tiny file.
    path = WRITERS[fmt](
        tmp_path / "bcast.pth", {"w": _tensor("0", 1, 0, (1 << 26,), (0,))}, {"0": _floats(1)}
    )
    with pytest.raises(ValueError, match="repeats the 1 values of its storage"):
        _load_one(path)


@pytest.mark.parametrize("fmt", WRITERS)
def test_many_tensors_on_one_storage_are_bounded(tmp_path, fmt):
    # 64 tensors that each copy the whole 64 KiB storage: 4 MiB from a 70 KiB file.
    numel = 1 << 14
    tensors = {f"t{i}": _tensor("0", numel, 0, (numel,), (1,)) for i in range(64)}
    path = WRITERS[fmt](tmp_path / "shared.pth", tensors, {"0": _floats(numel)})
    with pytest.raises(ValueError, match=r"more than 4x the 16384 values of its storages"):
        pytorch_checkpoint.load(path)
    # Tied weights (a few tensors on one storage) still load.
    tied = {f"t{i}": _tensor("0", numel, 0, (numel,), (1,)) for i in range(3)}
    path = WRITERS[fmt](tmp_path / "tied.pth", tied, {"0": _floats(numel)})
    assert len(pytorch_checkpoint.load(path)) == 3


def test_a_storage_whose_record_disagrees_with_its_pickle_is_refused(tmp_path):
    path = _zip(tmp_path / "bad.pth", {"w": _tensor("0", 1, 0, (1,), (1,))}, {"0": _floats(16)})
    with pytest.raises(ValueError, match="holds 64 bytes, but its pickle declares 1 values"):
        _load_one(path)
    assert _torch_refuses(path)


def test_zip_bombs_are_refused_before_inflating(tmp_path):
    # A storage of 8 MiB of zeros deflates to ~8 KiB; the pickle likewise.
    numel = 2 << 20
    bomb = _zip(
        tmp_path / "storage_bomb.pth",
        {"w": _tensor("0", numel, 0, (numel,), (1,))},
        {"0": bytes(4 * numel)},
        compress=zipfile.ZIP_DEFLATED,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"inflates from \d+ to 8388608 bytes"):
        _load_one(bomb)
    nones = b"\x80\x02]" + b"(" + b"N" * (8 << 20) + b"e."  # a list of 8M None
    bomb = _zip(
        tmp_path / "pickle_bomb.pth", {}, {}, compress=zipfile.ZIP_DEFLATED, pickle_bytes=nones
    )
    with pytest.raises(ValueError, match=r"member archive/data.pkl inflates"):
        pytorch_checkpoint.load(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 << 10  # KiB


def test_an_oversized_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(pytorch_checkpoint, "MAX_PICKLE_BYTES", 1000)
    big = {f"t{i}": _tensor("0", 16, 0, (16,), (1,)) for i in range(20)}
    path = _zip(tmp_path / "big.pth", big, {"0": _floats(16)})
    with pytest.raises(ValueError, match="its pickle has .* more than the 1000"):
        pytorch_checkpoint.load(path)


def test_legacy_storage_views_and_lengths_are_checked(tmp_path):
    # A storage view of 100,000 values on a 4-value storage.
    tensors = {"w": _tensor("0", 4, 0, (100_000,), (1,), view=(0, 100_000))}
    path = _legacy(tmp_path / "view.pth", tensors, {"0": _floats(4)})
    with pytest.raises(ValueError, match="reads past the end"):
        _load_one(path)
    # A length field that declares 2^61 values.
    tensors = {"w": _tensor("0", 4, 0, (4,), (1,))}
    path = _legacy(tmp_path / "long.pth", tensors, {"0": (1 << 61, _floats(4))})
    with pytest.raises(ValueError, match="more than the file holds"):
        _load_one(path)
    # Fewer values than the pickle declares.
    path = _legacy(tmp_path / "short.pth", tensors, {"0": (2, _floats(2))})
    with pytest.raises(ValueError, match="holds fewer values than it declares"):
        _load_one(path)


def test_deeply_nested_containers_are_refused_cleanly(tmp_path):
    depth = 200_000
    nested = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    path = _legacy(tmp_path / "deep.pth", {}, {}, main_pickle=nested)
    with pytest.raises(ValueError, match="corrupt, truncated or not a PyTorch checkpoint"):
        pytorch_checkpoint.load(path)


def test_weights_and_the_converter_refuse_a_crafted_release(tmp_path, capsys):
    """The reader's refusals reach users as a clear error: `weights=` and the converter CLI."""
    import keras_t2t
    from keras_t2t import convert

    path = _zip(
        tmp_path / "t2t.pth.tar",
        {"cls_token": _tensor("0", 1, 0, (1, 1, 256), (256, 256, 1))},
        {"0": _floats(1)},
    )
    with pytest.raises(ValueError, match="reads past the end of its storage of 1 values"):
        keras_t2t.T2TViT7(weights=path)
    assert convert.main([path, str(tmp_path / "out.weights.h5")]) != 0
    assert "reads past the end" in capsys.readouterr().err
    assert not (tmp_path / "out.weights.h5").exists()
