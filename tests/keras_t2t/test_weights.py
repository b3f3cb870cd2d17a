"""Official checkpoints: golden parity through `weights=` and through the converted
`.weights.h5`, containers, head and resolution handling, strict errors, the converter CLI."""

import logging
import os
import sys

import keras
import numpy as np
import pytest
from conftest import TINY_ARCH, tiny_model

import keras_t2t
from keras_t2t import convert, reference
from keras_t2t import weights as weights_lib

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
TOLERANCE = 1e-4  # max abs difference on the official logits


def golden_model(golden, **kwargs):
    kwargs.setdefault("weights", golden["checkpoint"])
    kwargs.setdefault("input_shape", None)  # read from the checkpoint
    return tiny_model(
        golden["tokens_type"], include_preprocessing=False, classifier_activation=None, **kwargs
    )


def test_golden_manifest_matches_the_architecture(golden):
    model = golden_model(golden, weights=None, input_shape=(64, 64, 3))
    assert model.count_params() == golden["params_total"]
    assert TINY_ARCH == {k: golden[k] for k in TINY_ARCH}


def test_golden_logits_through_weights_argument(golden):
    model = golden_model(golden)
    assert model.input_shape == (None, 64, 64, 3)  # the size is read from the checkpoint
    logits = model.predict(golden["images"], verbose=0)
    assert np.abs(logits - golden["logits"]).max() <= TOLERANCE


def test_golden_logits_with_builtin_only_soft_split(golden):
    model = golden_model(golden, soft_split_implementation="slices")
    assert np.abs(np.asarray(model(golden["images"])) - golden["logits"]).max() <= TOLERANCE


def test_golden_logits_through_converted_weights_h5(golden, tmp_path, monkeypatch):
    dst = str(tmp_path / "tiny.weights.h5")
    report = convert.convert(golden["checkpoint"], dst, num_heads=golden["num_heads"])
    assert report["max_abs_diff_official"] <= TOLERANCE
    assert report["max_abs_diff_reload"] == 0.0
    monkeypatch.setitem(sys.modules, "torch", None)  # the .weights.h5 path must not need torch
    model = golden_model(golden, weights=dst)
    assert np.abs(np.asarray(model(golden["images"])) - golden["logits"]).max() <= TOLERANCE


def test_reference_forward_reproduces_the_official_logits(golden):
    state_dict = weights_lib.read_official_checkpoint(golden["checkpoint"])
    logits = reference.official_forward(state_dict, golden["images_nchw"], golden["num_heads"])
    assert np.abs(logits - golden["logits"]).max() <= TOLERANCE


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("container", ["state_dict_ema", "state_dict", "model", "net", "bare"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_every_release_container(golden, tmp_path, container, prefix):
    raw = torch.load(golden["checkpoint"], map_location="cpu", weights_only=True)["state_dict_ema"]
    state = {prefix + k: v for k, v in raw.items()}
    obj = state if container == "bare" else {container: state, "epoch": 309}
    path = _save(obj, tmp_path / "ckpt.pth")
    model = golden_model(golden, weights=path)
    assert np.abs(np.asarray(model(golden["images"])) - golden["logits"]).max() <= TOLERANCE


def test_ema_weights_are_preferred(golden, tmp_path):
    raw = torch.load(golden["checkpoint"], map_location="cpu", weights_only=True)["state_dict_ema"]
    noisy = {k: v + 1.0 for k, v in raw.items()}
    path = _save({"state_dict": noisy, "state_dict_ema": raw}, tmp_path / "both.pth.tar")
    model = golden_model(golden, weights=path)
    assert np.abs(np.asarray(model(golden["images"])) - golden["logits"]).max() <= TOLERANCE


def test_head_dropped_without_top_or_with_other_classes(golden, caplog):
    full = golden_model(golden, include_top=False)
    with caplog.at_level(logging.WARNING, logger="keras_t2t"):
        other = golden_model(golden, classes=5)
    assert "has 10 classes, the model 5" in caplog.text
    assert other.output_shape == (None, 5)
    for layer in ("tokens_to_token", "blocks_1", "norm"):
        for a, b in zip(full.get_layer(layer).get_weights(), other.get_layer(layer).get_weights()):
            np.testing.assert_array_equal(a, b)
    # The features are the official ones: the head applied to them gives the golden logits.
    head = torch.load(golden["checkpoint"], map_location="cpu", weights_only=True)["state_dict_ema"]
    features = np.asarray(
        golden_model(golden, include_top=False, pooling="token")(golden["images"])
    )
    logits = features @ head["head.weight"].numpy().T + head["head.bias"].numpy()
    assert np.abs(logits - golden["logits"]).max() <= TOLERANCE


def test_head_of_another_width_is_reported_by_shape(golden, caplog):
    """Same classes, another width: the message compares the kernels, not "10 classes, 10"."""
    with caplog.at_level(logging.WARNING, logger="keras_t2t"), pytest.raises(ValueError):
        keras_t2t.T2TViT(
            tokens_type=golden["tokens_type"],
            **dict(TINY_ARCH, embed_dim=128),
            weights=golden["checkpoint"],
            classes=10,
        )
    assert "its kernel is (64, 10), the model's (128, 10)" in caplog.text
    assert "10 classes, the model 10" not in caplog.text


def test_position_table_interpolated_at_another_size(golden, caplog):
    with caplog.at_level(logging.WARNING, logger="keras_t2t"):
        model = golden_model(golden, input_shape=(96, 96, 3))
    assert (
        "Interpolating the position table" in caplog.text and "from 16 to 36 tokens" in caplog.text
    )
    table = model.get_layer("pos_embed").pos_embed.numpy()
    source = torch.load(golden["checkpoint"], map_location="cpu", weights_only=True)
    source = source["state_dict_ema"]["pos_embed"].numpy()
    np.testing.assert_array_equal(table[0, 0], source[0, 0])  # class row kept
    # The official resize_pos_embed: torch's bicubic on the 4x4 grid, to 6x6.
    grid = torch.tensor(source[0, 1:]).reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    official = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic")
    official = official.permute(0, 2, 3, 1).reshape(36, -1).numpy()
    np.testing.assert_allclose(table[0, 1:], official, atol=1e-6)
    # Bicubic on the grid: the mean of the grid is nearly kept, and it is not a copy.
    assert table.shape == (1, 37, 64)
    assert abs(table[0, 1:].mean() - source[0, 1:].mean()) < 0.05
    out = np.asarray(model(np.zeros((1, 96, 96, 3), "float32")))
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("old,new", [(14, 24), (24, 14), (7, 9), (4, 6), (6, 2), (1, 4)])
def test_bicubic_resize_is_torchs(old, new):
    grid = np.random.default_rng(old * new).normal(size=(old, old, 5))
    expected = (
        torch.nn.functional.interpolate(
            torch.tensor(grid).permute(2, 0, 1)[None],
            size=(new, new),
            mode="bicubic",
            align_corners=False,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    np.testing.assert_allclose(weights_lib.bicubic_resize(grid, new), expected, atol=1e-12)


def test_interpolation_to_the_same_grid_is_identity():
    table = np.random.default_rng(0).normal(size=(1, 17, 8)).astype("float32")
    np.testing.assert_allclose(weights_lib.interpolate_pos_embed(table, 16), table, atol=1e-5)


def test_wrong_variant_names_every_tensor_and_the_file_variant(golden):
    other = "transformer" if golden["tokens_type"] == "performer" else "performer"
    with pytest.raises(ValueError) as info:
        tiny_model(other, weights=golden["checkpoint"])
    message = str(info.value)
    assert "missing from the file" in message and "unexpected in the file" in message
    assert "tokens_to_token.attention1" in message  # named as in the file
    with pytest.raises(
        ValueError,
        match=r"of another shape.*blocks\.0\.mlp\.fc1\.weight: file \(128, 64\), model \(256, 64\)",
    ):
        keras_t2t.T2TViT(
            tokens_type=golden["tokens_type"],
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=4.0,
            weights=golden["checkpoint"],
            classes=10,
        )


def test_real_variant_is_named_in_errors():
    model = keras_t2t.T2TViT7(input_shape=(32, 32, 3))
    state = {w.path: w.numpy() for w in model.weights}
    ws = weights_lib.WeightsState(
        arrays=state,
        source="x",
        names={},
        config=dict(tokens_type="performer", embed_dim=256, depth=7, mlp_ratio=2.0),
    )
    assert ws.variant == "t2t_vit_7"
    with pytest.raises(ValueError, match="looks like 't2t_vit_7'"):
        weights_lib.assign_state(keras_t2t.T2TViT10(input_shape=(32, 32, 3)), ws)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "Could not read"),
        (b"not a checkpoint at all", "Could not read"),
        ("truncated", "Could not read"),
    ],
)
def test_corrupt_files(golden, tmp_path, content, match):
    path = tmp_path / "bad.pth.tar"
    if content == "truncated":
        data = open(golden["checkpoint"], "rb").read()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        golden_model(golden, weights=str(path))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = _save({"state_dict": {"x": Evil()}}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused on purpose"):
        weights_lib.read_weights(path, {})


def test_not_a_t2t_checkpoint(tmp_path):
    path = _save({"state_dict": {"conv.weight": torch.zeros(3)}}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="does not look like a T2T-ViT checkpoint"):
        keras_t2t.T2TViT7(weights=path)


def test_unknown_file_type(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="Cannot tell the format"):
        keras_t2t.T2TViT7(weights=str(path))


def test_corrupt_weights_h5(tmp_path):
    path = tmp_path / "bad.weights.h5"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="Could not read .* as keras_t2t weights"):
        keras_t2t.T2TViT7(weights=str(path))


POS = "layers/position_embedding/vars/0"


def _rewrite_dataset(path, name, **create):
    import h5py

    with h5py.File(path, "r+") as f:
        del f[name]
        f.create_dataset(name, **create)


@pytest.mark.parametrize(
    "name,create,match",
    [
        # A 1 MB file that declares a 16 GiB position table, never written: loading it used to
        # allocate the whole table (filled with zeros) before any check.
        (
            "layers/position_embedding/vars/0",
            dict(shape=(1, 16777217, 64), dtype="float32"),
            r"position_embedding/vars/0 \(declared shape \(1, 16777217, 64\)\) is not stored whole",
        ),
        (  # the same as a compression bomb
            "layers/dense/vars/0",
            dict(shape=(64, 2**28), dtype="float32", chunks=(64, 2**16), compression="gzip"),
            "not stored whole",
        ),
        (
            "layers/position_embedding/vars/0",
            dict(data=np.zeros((1, 17, 32), "float32")),
            r"position table .* has shape \(1, 17, 32\); a model of width 64",
        ),
        (
            "layers/position_embedding/vars/0",
            dict(data=np.zeros((1, 16, 64), "float32")),
            r"has shape \(1, 16, 64\)",
        ),
        ("layers/dense/vars/0", dict(data=np.zeros((32, 10), "float32")), r"head .* \(32, 10\)"),
        ("layers/class_token/vars/0", dict(data=np.array([b"x"])), "not numeric"),
        (
            "layers/class_token/vars/0",
            dict(data=np.zeros((1, 2, 64), "float32")),
            r"of another shape \(1\): cls_token/token: file \(1, 2, 64\), model \(1, 1, 64\)",
        ),
    ],
    ids=[
        "unallocated_huge",
        "compressed_huge",
        "pos_width",
        "pos_not_square",
        "head",
        "dtype",
        "other_shape",
    ],
)
def test_crafted_weights_h5_is_refused_before_reading(tmp_path, name, create, match):
    path = str(tmp_path / "crafted.weights.h5")
    tiny_model(input_shape=(32, 32, 3)).save_weights(path)
    _rewrite_dataset(path, name, **create)
    with pytest.raises(ValueError, match=match):
        tiny_model(input_shape=(32, 32, 3), weights=path)


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built to read a weights file")


@pytest.mark.parametrize("where", ["external_file", "external_dev_zero", "virtual", "past_eof"])
def test_weights_h5_with_data_outside_the_file_is_refused(tmp_path, monkeypatch, where):
    """Every tensor's bytes must lie in the file: external storage (a file beside it, or
    /dev/zero, which reports the whole declared size as stored), a virtual dataset, or a data
    address past the file's end are refused before any tensor is read (and no model is built)."""
    import struct

    import h5py

    path = str(tmp_path / "crafted.weights.h5")
    tiny_model(input_shape=(32, 32, 3)).save_weights(path)
    table = np.zeros((1, 5, 64), "float32")
    if where == "external_file":
        outside = tmp_path / "outside.bin"
        outside.write_bytes(table.tobytes())
        _rewrite_dataset(
            path,
            POS,
            shape=table.shape,
            dtype="float32",
            external=[(str(outside), 0, table.nbytes)],
        )
        match = "not stored whole in the file: its data is in external files"
    elif where == "external_dev_zero":
        # A 48 x 48 grid (768 px, 590 KB declared) on /dev/zero: not the 32 GiB of the report,
        # and the file (1.2 MB) could hold it; its bytes are elsewhere all the same.
        shape = (1, 1 + 48 * 48, 64)
        _rewrite_dataset(
            path,
            POS,
            shape=shape,
            dtype="float32",
            external=[("/dev/zero", 0, int(np.prod(shape)) * 4)],
        )
        match = "not stored whole in the file: its data is in external files"
    elif where == "virtual":
        source = str(tmp_path / "source.h5")
        with h5py.File(source, "w") as f:
            f["table"] = table
        layout = h5py.VirtualLayout(shape=table.shape, dtype="float32")
        layout[:] = h5py.VirtualSource(source, "table", shape=table.shape)
        with h5py.File(path, "r+") as f:
            del f[POS]
            f.create_virtual_dataset(POS, layout)
        match = "not stored whole in the file: a virtual dataset"
    else:  # the table's address rewritten to near the end of the file
        with h5py.File(path, "r") as f:
            offset = f[POS].id.get_offset()
            size = os.path.getsize(path)
            assert weights_lib._dataset_info(f[POS], size)[2] is None
            # The check itself, on a file that would end 1 byte short of the table:
            problem = weights_lib._dataset_info(f[POS], offset + 1279)[2]
            assert problem == (
                f"its 1,280 bytes, at offset {offset:,}, do not lie within the file's "
                f"{offset + 1279:,} bytes"
            )
        data = bytearray(open(path, "rb").read())
        assert data.count(struct.pack("<Q", offset)) == 1
        at = data.index(struct.pack("<Q", offset))
        data[at : at + 8] = struct.pack("<Q", len(data) - 16)
        open(path, "wb").write(bytes(data))
        # HDF5 1.14 itself refuses to open the dataset (h5py raises KeyError): a ValueError.
        match = r"do not lie within the file|Could not read .* as keras_t2t weights"
    monkeypatch.setattr(keras.Model, "__init__", _no_model)  # reading builds no model
    with pytest.raises(ValueError, match=match):
        weights_lib.read_weights(path, dict(tokens_type="performer", **TINY_ARCH))


def test_weights_h5_with_a_huge_position_table_is_refused_before_building(tmp_path, monkeypatch):
    """A table of a 65 x 65 grid (1040 px), stored whole (1 MB): past MAX_POSITION_SIDE."""
    path = str(tmp_path / "big_table.weights.h5")
    tiny_model(input_shape=(32, 32, 3)).save_weights(path)
    _rewrite_dataset(path, POS, data=np.zeros((1, 1 + 65 * 65, 64), "float32"))
    monkeypatch.setattr(keras.Model, "__init__", _no_model)
    with pytest.raises(
        ValueError, match=r"a 65 x 65 token grid \(1040 x 1040 pixels\).*at most 64"
    ):
        weights_lib.read_weights(path, dict(tokens_type="performer", **TINY_ARCH))
    _rewrite_dataset(path, POS, data=np.zeros((1, 1 + 64 * 64, 64), "float32"))  # the limit
    assert weights_lib.keras_weights_info(path, 64)[0] == (1, 1 + 64 * 64, 64)


def test_weights_h5_into_other_head_and_size(tmp_path, caplog):
    source = tiny_model(input_shape=(32, 32, 3))
    path = str(tmp_path / "fine_tuned.weights.h5")
    source.save_weights(path)
    loaded = tiny_model(input_shape=None, weights=path)  # size read from the file
    assert loaded.input_shape == (None, 32, 32, 3)
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(source(x)))
    with caplog.at_level(logging.WARNING, logger="keras_t2t"):
        bigger = tiny_model(input_shape=(64, 64, 3), include_top=False, weights=path)
    assert "Interpolating" in caplog.text and "no head" in caplog.text
    np.testing.assert_array_equal(
        bigger.get_layer("blocks_0").get_weights()[0], source.get_layer("blocks_0").get_weights()[0]
    )


def _strip_layer_names(path):
    """Removes the layer names that Keras records on each `vars` group, as in files of
    Keras versions that did not write them."""
    import h5py

    with h5py.File(path, "r+") as f:
        groups = []
        f.visititems(lambda name, item: groups.append(item) if name.endswith("/vars") else None)
        for group in groups:
            if "name" in group.attrs:
                del group.attrs["name"]


@pytest.mark.parametrize(
    "tokens_type,kwargs",
    [("performer", {}), ("transformer", dict(include_top=False, include_preprocessing=False))],
)
@pytest.mark.parametrize("layer_names", ["recorded", "not_recorded"])
def test_weights_h5_is_read_under_the_variable_paths(tmp_path, tokens_type, kwargs, layer_names):
    """A .weights.h5 gives every variable of the model that saved it, under its path, with
    no model built; the state written back in Keras' layout (the cache of the releases) loads
    with Keras' own `load_weights` too. 11 blocks: `transformer_block_10` is `blocks_10`."""
    arch = dict(TINY_ARCH, depth=11)
    model = keras_t2t.T2TViT(tokens_type, **arch, input_shape=(32, 32, 3), classes=7, **kwargs)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    if layer_names == "not_recorded":
        _strip_layer_names(path)
    state = weights_lib.read_keras_weights(path, dict(arch, tokens_type=tokens_type))
    expected = {v.path: v.numpy() for v in model.weights}
    assert sorted(state.arrays) == sorted(expected)
    for variable, array in expected.items():
        np.testing.assert_array_equal(state.arrays[variable], array)
    assert state.image_size == 32
    assert state.classes == (7 if kwargs.get("include_top", True) else None)

    written = str(tmp_path / "written.weights.h5")
    weights_lib.write_keras_weights(state, written)
    again = keras_t2t.T2TViT(tokens_type, **arch, input_shape=(32, 32, 3), classes=7, **kwargs)
    again.load_weights(written)
    for a, b in zip(model.weights, again.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert sorted(weights_lib.read_keras_weights(written).arrays) == sorted(expected)


def test_weights_h5_of_a_compiled_model_leaves_the_optimizer_out(tmp_path):
    model = tiny_model(input_shape=(32, 32, 3))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    path = str(tmp_path / "compiled.weights.h5")
    model.save_weights(path)
    import h5py

    with h5py.File(path, "r") as f:
        assert "optimizer" in f
    loaded = tiny_model(input_shape=None, weights=path)
    x = np.random.default_rng(2).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


def test_converter_cli(golden, tmp_path, capsys):
    dst = str(tmp_path / "out.weights.h5")
    assert convert.main([golden["checkpoint"], dst]) == 2
    assert "matches no official variant" in capsys.readouterr().err
    assert convert.main([golden["checkpoint"], dst, "--num_heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "max abs difference vs the official forward (torch)" in out
    assert convert.main([golden["checkpoint"], str(tmp_path / "out.h5"), "--num_heads", "2"]) == 2
    assert "must end in .weights.h5" in capsys.readouterr().err
    assert convert.main(["/nonexistent.pth", dst]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_converter_infers_official_variant(tmp_path):
    model = keras_t2t.T2TViT7(input_shape=(32, 32, 3), classes=3)
    # Write an official-layout checkpoint from a Keras model, the inverse of the mapping.
    official = _to_official({w.path: w.numpy() for w in model.weights})
    src = _save(
        {"state_dict_ema": {k: torch.from_numpy(v) for k, v in official.items()}},
        tmp_path / "71.7_T2T_ViT_7.pth.tar",
    )
    report = convert.convert(src, str(tmp_path / "t7.weights.h5"))
    assert report["model"] == "t2t_vit_7" and report["image_size"] == 32 and report["classes"] == 3
    assert report["max_abs_diff_official"] <= TOLERANCE


def _to_official(keras_arrays):
    """Keras-layout arrays -> official names and layouts, by inverting the forward mapping."""
    names = {}
    for key in _official_names(keras_arrays):
        path, is_kernel = weights_lib._keras_path(key)
        names[path] = (key, is_kernel)
    official = {}
    for path, array in keras_arrays.items():
        key, is_kernel = names[path]
        reader = weights_lib._patch_reader(key, 3, 64)
        if reader is not None:
            array = array[np.argsort(weights_lib.patch_permutation(*reader))]
        official[key] = np.ascontiguousarray(array.T if is_kernel else array)
    return official


def _official_names(keras_arrays):
    depth = 1 + max(int(p.split("/")[0][7:]) for p in keras_arrays if p.startswith("blocks_"))
    names = [
        "cls_token",
        "pos_embed",
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
        "tokens_to_token.project.weight",
        "tokens_to_token.project.bias",
    ]
    for a in (1, 2):
        p = f"tokens_to_token.attention{a}"
        names += [f"{p}.w"] + [
            f"{p}.{m}.{t}"
            for m in ("kqv", "proj", "norm1", "norm2", "mlp.0", "mlp.2")
            for t in ("weight", "bias")
        ]
    for i in range(depth):
        p = f"blocks.{i}"
        names += [f"{p}.attn.qkv.weight"] + [
            f"{p}.{m}.{t}"
            for m in ("attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2")
            for t in ("weight", "bias")
        ]
    return names
