"""Presets (#24): written by `python -m keras_t2t.convert --preset` from the golden checkpoint,
loaded from a folder, `file://` and a loopback HTTP mirror in a process where torch cannot be
imported, with the official logits; overrides; a preset for every file and release convert is
given; clear errors. (JAX and PyTorch load a preset written here: test_portable.py.)"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import pytest
from conftest import DATA, GOLDEN, WITHOUT_TORCH, register_tiny_releases

import keras_t2t
from keras_t2t import convert, presets, pretrained

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4  # max abs difference on the official logits, as in test_weights.py
PERFORMER = GOLDEN["t2t_tiny_performer"]
CHECKPOINT = DATA / PERFORMER["checkpoint"]
PRESET_FILES = ["config.json", "metadata.json", "model.weights.h5"]


def _json(folder, name):
    return json.loads((pathlib.Path(folder) / name).read_text())


def _sha384(path):
    return hashlib.sha384(pathlib.Path(path).read_bytes()).hexdigest()


LOAD_WITHOUT_TORCH = (
    WITHOUT_TORCH
    + """import json
import numpy as np
import keras_t2t
io = np.load(sys.argv[1])
images = io["images_nchw"].transpose(0, 2, 3, 1)
for uri in sys.argv[2:]:
    model = keras_t2t.from_preset(uri, include_preprocessing=False, classifier_activation=None)
    print("max abs diff", float(np.abs(np.asarray(model(images)) - io["logits"]).max()), uri)
backbone = keras_t2t.from_preset(
    sys.argv[2], include_top=False, pooling="token", input_shape=(96, 96, 3)
)
other_head = keras_t2t.from_preset(sys.argv[2], classes=3)
pos_embed = [int(d) for d in backbone.get_layer("pos_embed").weights[0].shape]
print("SHAPES", json.dumps([backbone.output_shape, pos_embed, other_head.output_shape]))
assert "torch" not in sys.modules
"""
)


def test_a_converted_preset_loads_from_a_folder_file_and_http_without_torch(
    mirror, tmp_path, monkeypatch, capsys
):
    register_tiny_releases(monkeypatch, license=pretrained.OFFICIAL_LICENSE)
    url, served = mirror
    assert convert.main([str(CHECKPOINT), "--preset", str(served / "presets")]) == 0
    printed = capsys.readouterr().out
    folder = served / "presets" / "t2t_tiny_performer_imagenet_64"  # a known release: its name
    assert f"max abs difference after reloading {folder}: 0" in printed
    assert sorted(os.listdir(folder)) == PRESET_FILES

    config, metadata = _json(folder, "config.json"), _json(folder, "metadata.json")
    assert {k: config[k] for k in ("module", "class_name", "variant")} == {
        "module": "keras_t2t",
        "class_name": "T2TViT",
        "variant": "t2t_tiny_performer",
    }
    architecture = {k: PERFORMER[k] for k in ("tokens_type", "embed_dim", "depth", "num_heads")}
    assert architecture.items() <= config["config"].items()
    assert config["config"]["mlp_ratio"] == PERFORMER["mlp_ratio"]
    assert config["config"]["classes"] == PERFORMER["num_classes"]
    assert config["config"]["input_shape"] == [PERFORMER["image_size"]] * 2 + [3]
    assert metadata["parameter_count"] == PERFORMER["params_total"]
    assert metadata["keras_t2t_version"] == keras_t2t.__version__
    assert metadata["keras_version"] == keras.__version__
    assert metadata["source"] == {
        "file_name": CHECKPOINT.name,
        "sha384": _sha384(CHECKPOINT),
        "url": f"{pretrained.BASE_URL}/{CHECKPOINT.name}",
        "license": "BSD-3-Clause-Clear",
    }
    release = metadata["release"]
    assert (release["model"], release["image_size"], release["license"]) == (
        "t2t_tiny_performer",
        64,
        "BSD-3-Clause-Clear",
    )
    assert release["mean"] == [0.485, 0.456, 0.406] and release["crop_pct"] == 0.9

    # A builder refuses a preset of another variant; the weights are the preset's.
    with pytest.raises(ValueError, match=r"is a t2t_tiny_performer, not t2t_vit_7: load it"):
        keras_t2t.T2TViT7.from_preset(str(folder))
    with pytest.raises(ValueError, match=r"overrides, received weights"):
        keras_t2t.from_preset(str(folder), weights="imagenet")
    with pytest.raises(ValueError, match=r"fixed by its weights: it has embed_dim=64"):
        keras_t2t.from_preset(str(folder), embed_dim=32)
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    with open(damaged / "model.weights.h5", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=r"model.weights.h5 is not the file this preset was"):
        keras_t2t.from_preset(str(damaged))

    # gs:// copies through tf.io.gfile: its calls, on a local folder here.
    home = tmp_path / "home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    copied = presets._download(str(folder), presets._gfile_copy)
    assert sorted(os.listdir(copied)) == PRESET_FILES
    assert presets.read_preset(copied)[1] == metadata
    shutil.rmtree(home)

    # In one fresh process where torch cannot be imported: the folder, file:// and the mirror.
    http = f"{url}presets/{folder.name}"
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_TORCH, str(DATA / PERFORMER["io"])]
        + [str(folder), folder.as_uri(), http],
        env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", KERAS_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    differences = [line for line in result.stdout.splitlines() if line.startswith("max abs")]
    assert len(differences) == 3, result.stdout
    assert all(float(line.split()[3]) <= TOLERANCE for line in differences), differences
    shapes = json.loads(result.stdout.split("SHAPES", 1)[1])
    assert shapes == [[None, 64], [1, 37, 64], [None, 3]]  # token pooled; 6x6 grid; new head
    cached = list((home / "models" / "keras_t2t" / "presets").iterdir())
    assert len(cached) == 2  # file:// and http://, each downloaded once into Keras' cache
    assert all(sorted(os.listdir(c)) == PRESET_FILES for c in cached)


def test_convert_writes_a_preset_for_every_file_and_release_it_is_given(
    mirror, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "presets"
    # A file of no known release: named after the file, of unknown source and license.
    argv = ["--preset", str(out), "--num_heads", "2", "--no_check"]
    assert convert.main([str(CHECKPOINT), *argv]) == 0
    unknown = _json(out / "t2t_tiny_performer", "metadata.json")
    assert unknown["release"] is None and unknown["variant"] is None
    assert unknown["source"] == {
        "file_name": CHECKPOINT.name,
        "sha384": _sha384(CHECKPOINT),
        "url": None,
        "license": "unknown",
    }

    # The golden files as releases: one renamed (known by its sha384), one downloaded.
    register_tiny_releases(monkeypatch, license=pretrained.OFFICIAL_LICENSE)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(pretrained.URL_VARIABLE, mirror[0])
    renamed = tmp_path / "renamed.pth.tar"
    shutil.copyfile(CHECKPOINT, renamed)
    release = ["--release", "t2t_tiny_transformer:imagenet"]
    assert convert.main([str(renamed), *release, "--preset", str(out), "--no_check"]) == 0
    assert sorted(os.listdir(out)) == [
        "t2t_tiny_performer",
        "t2t_tiny_performer_imagenet_64",
        "t2t_tiny_transformer_imagenet_64",
    ]
    for name, file_name in [("t2t_tiny_performer", renamed.name), ("t2t_tiny_transformer", None)]:
        metadata = _json(out / f"{name}_imagenet_64", "metadata.json")
        assert metadata["release"]["model"] == metadata["variant"] == name
        assert metadata["source"]["file_name"] == (file_name or GOLDEN[name]["checkpoint"])
        assert metadata["source"]["sha384"] == _sha384(DATA / GOLDEN[name]["checkpoint"])
        assert metadata["source"]["license"] == "BSD-3-Clause-Clear"
    with pytest.raises(SystemExit):  # --release writes presets only
        convert.main(["--release", "t2t_tiny_transformer:imagenet"])
    assert "--preset DIR" in capsys.readouterr().err


def test_bad_presets_and_uris_are_clear_errors(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match=r"No preset folder at .*nowhere.*: it does not exist"):
        keras_t2t.from_preset(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"has no config.json\. A preset is a folder holding"):
        keras_t2t.from_preset(str(empty))
    (empty / "config.json").write_text('{"module": "keras_t2t", ')
    with pytest.raises(ValueError, match=r"config.json cannot be read as JSON"):
        keras_t2t.from_preset(str(empty))
    (empty / "metadata.json").write_text("{}")
    (empty / "config.json").write_text(json.dumps({"module": "keras_hub", "class_name": "ViT"}))
    with pytest.raises(ValueError, match=r"names the builder keras_hub\.ViT; keras_t2t presets"):
        keras_t2t.from_preset(str(empty))
    with pytest.raises(ValueError, match=r"Cannot download the preset file .*config.json: HTTP"):
        keras_t2t.from_preset(f"{mirror[0]}no_such_preset")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as where it is not installed
    with pytest.raises(ValueError, match=r"`huggingface_hub` package.*pip install huggingface_hub"):
        keras_t2t.from_preset("hf://keras-t2t/t2t_vit_14_imagenet")
    monkeypatch.setitem(sys.modules, "kagglehub", None)
    with pytest.raises(ValueError, match=r"pip install kagglehub"):
        keras_t2t.from_preset("kaggle://owner/t2t-vit/keras/t2t_vit_14_imagenet")
    with pytest.raises(ValueError, match=r"Unknown preset address 's3://b/p': presets load from"):
        keras_t2t.from_preset("s3://b/p")
    with pytest.raises(ValueError, match=r"needs a model built by a keras_t2t builder"):
        keras_t2t.save_preset(keras.Sequential([keras.layers.Dense(2)]), tmp_path / "p")
