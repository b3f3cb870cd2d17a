"""keras_t2t.explain: attention maps against the official code, rollout, feature maps, CLI."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import WITHOUT_TORCH, tiny_model

import keras_t2t
from keras_t2t import explain, reference
from keras_t2t import weights as weights_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _golden_model(golden, **kwargs):
    return tiny_model(
        golden["tokens_type"],
        weights=golden["checkpoint"],
        include_preprocessing=False,
        classifier_activation=None,
        **kwargs,
    )


@pytest.mark.torch
def test_attention_maps_equal_the_officials(golden):
    pytest.importorskip("torch")
    official = {}
    logits = (
        reference.official_logits(
            weights_lib.read_official_checkpoint(golden["checkpoint"]),
            golden["images_nchw"],
            2,
            attention=official,
        )
        .detach()
        .numpy()
    )
    np.testing.assert_allclose(logits, golden["logits"], atol=1e-4)  # the reference is official
    ours = explain.attention_maps(_golden_model(golden), golden["images"])
    assert sorted(ours) == sorted(official) == ["block_0", "block_1", "t2t_1", "t2t_2"]
    assert ours["t2t_1"].shape == (4, 256, 256) and ours["block_0"].shape == (4, 2, 17, 17)
    for name, attention in official.items():
        np.testing.assert_allclose(ours[name], attention.detach().numpy(), atol=1e-5, err_msg=name)


def test_attention_maps_leave_the_model_as_it_was():
    model = keras_t2t.T2TViT7(input_shape=(48, 48, 3), classes=5)
    outputs = len(model.outputs)
    images = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype("float32")
    maps = explain.attention_maps(model, images)  # any input size (a multiple of 16)
    assert maps["t2t_1"].shape == (2, 144, 144) and maps["t2t_2"].shape == (2, 36, 36)
    assert maps["block_6"].shape == (2, 4, 10, 10) and len(model.outputs) == outputs
    np.testing.assert_allclose(maps["block_3"].sum(-1), 1.0, rtol=1e-5)
    # Made explicit, the performer's kernel attention is a distribution too (the golden
    # weights, scaled up, sit where the 1e-8 of the normalizer dominates; these do not).
    for name in ("t2t_1", "t2t_2"):
        np.testing.assert_allclose(maps[name].sum(-1), 1.0, atol=1e-4)


def test_rollout_has_the_image_size_and_follows_the_attention():
    model = keras_t2t.T2TViT7(input_shape=(64, 64, 3), classes=5)
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    rollout = explain.attention_rollout(model, images)
    assert rollout.shape == (2, 64, 64) and np.all(np.isfinite(rollout)) and rollout.min() >= 0

    # Constructed: every backbone block's class token attends to patch token 5 alone (row 1,
    # column 1 of the 4x4 grid); the T2T layers attend to themselves.
    maps = explain.attention_maps(model, images)
    for name in maps:
        if name.startswith("block_"):
            attention = np.zeros_like(maps[name])
            attention[..., :, :] = np.eye(attention.shape[-1])
            attention[..., 0, :] = 0.0
            attention[..., 0, 1 + 5] = 1.0
            maps[name] = attention
        else:
            maps[name] = np.broadcast_to(np.eye(maps[name].shape[-1]), maps[name].shape).copy()
    focused = explain.attention_rollout(model, images, maps=maps)[0]
    # Token (1, 1) of the stride-16 grid is the window around position 2 of the stride-8
    # map, around position 4 of the stride-4 map, whose 7x7 window covers pixels 14..20:
    # the relevance is centred on pixel 17 and covers nothing far from it.
    grid = np.arange(64)
    total = focused.sum()
    centroid = (focused.sum(1) @ grid / total, focused.sum(0) @ grid / total)
    assert centroid == pytest.approx((17.0, 17.0), abs=0.5)
    assert focused[40:].sum() == 0 and focused[:, 40:].sum() == 0
    row, column = np.unravel_index(np.argmax(focused), focused.shape)
    assert 8 <= row <= 26 and 8 <= column <= 26, (row, column)


def test_spread_is_the_transpose_of_the_unfold():
    """<spread(r), x> equals <r, unfold-mean(x)> for any r and x: the adjoint."""
    import tensorflow as tf

    from keras_t2t.layers import SoftSplit

    rng = np.random.default_rng(0)
    for kernel, stride, padding in explain.SOFT_SPLITS:
        size = 16
        x = rng.standard_normal((1, size, size, 1)).astype("float32")
        windows = np.asarray(SoftSplit(kernel, stride, padding)(tf.constant(x)))  # (1, T, k*k)
        out = int(np.sqrt(windows.shape[1]))
        r = rng.standard_normal((1, out, out))
        lhs = float(np.sum(explain.spread(r, kernel, stride, padding, size) * x[..., 0]))
        rhs = float(np.sum(r.reshape(1, -1) * windows.mean(-1)))
        assert lhs == pytest.approx(rhs, rel=1e-5)


def test_feature_maps_are_the_feature_model_s():
    model = keras_t2t.T2TViT7(input_shape=(32, 32, 3), classes=5)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    ours = explain.feature_maps(model, images)
    expected = keras_t2t.feature_maps_model(model)(images)
    for key, shape in (
        ("t2t_1", (2, 8, 8, 64)),
        ("t2t_2", (2, 4, 4, 64)),
        ("tokens", (2, 2, 2, 256)),
    ):
        assert ours[key].shape == shape
        np.testing.assert_allclose(ours[key], np.asarray(expected[key]), atol=1e-5)


def _photo(path, seed=0):
    import tensorflow as tf

    image = np.random.default_rng(seed).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    path.write_bytes(tf.io.encode_jpeg(image).numpy())
    return path


def test_cli_writes_pictures(tmp_path):
    pytest.importorskip("matplotlib")
    photo = _photo(tmp_path / "photo.jpg")
    weights = tmp_path / "t2t_vit_7.weights.h5"
    keras_t2t.T2TViT7(input_shape=(32, 32, 3), classes=10).save_weights(weights)
    code = explain.main(
        [
            str(photo),
            "--model=t2t_vit_7",
            f"--weights={weights}",
            "--image_size=32",
            f"--output={tmp_path / 'out'}",
        ]
    )
    assert code == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["photo_rollout.png", "photo_t2t_maps.png"]
    for name in written:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert explain.main(["missing.jpg", "--model=t2t_vit_7", f"--output={tmp_path}"]) == 2


def test_cli_without_matplotlib_says_how_to_install_it(tmp_path):
    script = WITHOUT_TORCH.replace('"torch"', '"matplotlib"') + (
        "from keras_t2t import explain\nsys.exit(explain.main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(_photo(tmp_path / "p.jpg")),
            "--model=t2t_vit_7",
            f"--output={tmp_path}",
        ],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "pip install keras-t2t[viz]" in result.stderr and "Traceback" not in result.stderr


def _in_a_thread(function, within):
    """function()'s result, run in a thread that must end within `within` seconds."""
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=function()), daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"still running after {within} s: a download hangs"
    return outcome["result"]


@pytest.fixture
def silent_server():
    """A loopback server that accepts connections and never answers: (url, connections)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)
    connections, stopping = [], threading.Event()

    def serve():
        while not stopping.is_set():
            try:
                connections.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/imagenet_class_index.json", connections
    stopping.set()
    thread.join(5)
    for connection in connections:
        connection.close()
    listener.close()


def _class_names_from(monkeypatch, tmp_path, url):
    """The class index comes from `url` (ours and Keras' own download) into an empty cache."""
    from keras.src.applications import imagenet_utils

    from keras_t2t import imagenet

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(imagenet, "CLASS_INDEX_URL", url, raising=False)
    monkeypatch.setattr(imagenet, "_CLASS_INDEX", None, raising=False)
    monkeypatch.setattr(imagenet_utils, "CLASS_INDEX_PATH", url)
    monkeypatch.setattr(imagenet_utils, "CLASS_INDEX", None)


def test_cli_falls_back_to_class_ids_when_the_class_names_stall(
    tmp_path, monkeypatch, capsys, silent_server
):
    pytest.importorskip("matplotlib")
    url, connections = silent_server
    _class_names_from(monkeypatch, tmp_path, url)
    monkeypatch.setenv("KERAS_T2T_DOWNLOAD_TIMEOUT", "1")
    photos = [_photo(tmp_path / "a.jpg"), _photo(tmp_path / "b.jpg", seed=1)]
    weights = tmp_path / "t2t_vit_7.weights.h5"
    keras_t2t.T2TViT7(input_shape=(32, 32, 3)).save_weights(weights)  # 1000 classes
    started = time.monotonic()
    code = _in_a_thread(
        lambda: explain.main(
            [
                *map(str, photos),
                "--model=t2t_vit_7",
                f"--weights={weights}",
                "--image_size=32",
                f"--output={tmp_path / 'out'}",
            ]
        ),
        within=30,
    )
    assert code == 0
    assert time.monotonic() - started < 20
    out, err = capsys.readouterr()
    assert "warning: class ids instead of names" in err and url in err
    assert "no data for 1 s" in err
    assert str(tmp_path / "keras_home" / "models" / "imagenet_class_index.json") in err
    assert err.count("warning:") == 1 and len(connections) == 1  # one try, for both images
    assert f"{photos[0]}: class " in out and f"{photos[1]}: class " in out
    assert len(list((tmp_path / "out").glob("*.png"))) == 4
    assert not list((tmp_path / "keras_home" / "models").glob("*.partial"))


def test_cli_names_the_classes_from_the_class_index(tmp_path, monkeypatch, capsys):
    """The class index downloaded (from a loopback server), checked and cached once."""
    import hashlib
    import http.server

    from keras_t2t import imagenet

    pytest.importorskip("matplotlib")
    index = json.dumps({str(i): [f"n{i:08d}", f"name_{i}"] for i in range(1000)}).encode()
    requests = []

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(index)))
            self.end_headers()
            self.wfile.write(index)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/imagenet_class_index.json"
    _class_names_from(monkeypatch, tmp_path, url)
    monkeypatch.setattr(imagenet, "CLASS_INDEX_MD5", hashlib.md5(index).hexdigest())
    weights = tmp_path / "t2t_vit_7.weights.h5"
    keras_t2t.T2TViT7(input_shape=(32, 32, 3)).save_weights(weights)
    photo = _photo(tmp_path / "a.jpg")
    try:
        code = explain.main(
            [
                str(photo),
                "--model=t2t_vit_7",
                f"--weights={weights}",
                "--image_size=32",
                f"--output={tmp_path / 'out'}",
            ]
        )
        assert code == 0
        out, err = capsys.readouterr()
        assert f"{photo}: name_" in out and "warning" not in err
        monkeypatch.setattr(imagenet, "_CLASS_INDEX", None)  # read again: from the cache
        assert imagenet.class_index()["7"] == ["n00000007", "name_7"]
    finally:
        server.shutdown()
        server.server_close()
    assert len(requests) == 1
    assert (tmp_path / "keras_home" / "models" / "imagenet_class_index.json").read_bytes() == index


@pytest.fixture(scope="module")
def model32():
    return keras_t2t.T2TViT7(input_shape=(32, 32, 3), classes=10)


_FUNCTIONS = {
    "attention_maps": explain.attention_maps,
    "attention_rollout": explain.attention_rollout,
    "feature_maps": explain.feature_maps,
}


@pytest.mark.parametrize("function", sorted(_FUNCTIONS))
@pytest.mark.parametrize(
    "images, message",
    [
        pytest.param(np.zeros((1, 64, 64, 3)), r"takes 32x32 images; received 64x64", id="64px"),
        pytest.param(np.zeros((1, 16, 16, 3)), r"takes 32x32 images; received 16x16", id="16px"),
        pytest.param(np.zeros((2, 48, 32, 3)), r"takes 32x32 images; received 48x32", id="48x32"),
        pytest.param(
            np.zeros((1, 32, 32, 1)), r"RGB images with 3 channels; received 1", id="gray"
        ),
        pytest.param(
            np.zeros((1, 32, 32, 4)), r"RGB images with 3 channels; received 4", id="rgba"
        ),
        pytest.param(np.zeros((0, 32, 32, 3)), r"holds no image", id="batch0"),
        pytest.param(
            np.zeros((32, 32, 3)),
            r"\(batch, 32, 32, 3\); received shape \(32, 32, 3\) "
            r"\(one image",
            id="rank3",
        ),
        pytest.param(
            np.zeros((1, 1, 32, 32, 3)), r"\(batch, 32, 32, 3\); received shape", id="rank5"
        ),
        pytest.param(None, r"\(batch, 32, 32, 3\); received None", id="None"),
        pytest.param("photo.jpg", r"of numbers; received dtype", id="str"),
    ],
)
def test_the_api_refuses_wrong_images_in_its_own_words(model32, function, images, message):
    """F18: one check at the entry of attention_maps / attention_rollout / feature_maps: a
    ValueError that says what the model takes, not a TF shape error deep in a layer, and no
    answer for what the model itself refuses (one channel, batch 0)."""
    with pytest.raises(ValueError, match=message):
        _FUNCTIONS[function](model32, images)


@pytest.mark.parametrize("function", sorted(_FUNCTIONS))
@pytest.mark.parametrize("model", [None, "t2t_vit_7", keras_t2t.T2TViT7])
def test_the_api_refuses_what_is_not_a_t2t_model(function, model):
    with pytest.raises(ValueError, match=r"`model` must be a keras_t2t T2T-ViT"):
        _FUNCTIONS[function](model, np.zeros((1, 32, 32, 3)))


def test_rollout_refuses_maps_of_another_model_or_incomplete(model32):
    images = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    maps = explain.attention_maps(model32, images)
    np.testing.assert_allclose(
        explain.attention_rollout(model32, images, maps=maps),
        explain.attention_rollout(model32, images),
    )
    other = keras_t2t.T2TViT7(input_shape=(48, 48, 3), classes=10)
    wrong = {
        "another model's": explain.attention_maps(other, np.zeros((1, 48, 48, 3))),
        "without a block": {k: v for k, v in maps.items() if k != "block_3"},
        "with an extra block": {**maps, "block_7": maps["block_6"]},
        "without the T2T maps": {k: v for k, v in maps.items() if k.startswith("block_")},
        "None values": dict.fromkeys(maps),
        "a list": list(maps.values()),
    }
    for bad in wrong.values():
        with pytest.raises(ValueError, match=r"`maps` must be attention_maps\(model, images\)"):
            explain.attention_rollout(model32, images, maps=bad)
    with pytest.raises(ValueError, match=r"for the 2 image\(s\) given: 't2t_1' has shape"):
        explain.attention_rollout(model32, np.concatenate([images, images]), maps=maps)


def test_cli_refuses_a_folder_and_same_named_images_before_writing(tmp_path, capsys):
    """F14: a folder as the image gets an error without a traceback; images whose pictures
    would have one name (dup1/same.jpg and dup2/same.png, flower.jpg and flower.bmp) are
    refused before anything is written, never overwritten. The same path twice is drawn once."""
    (tmp_path / "a_folder.jpg").mkdir()
    for one, two in (
        ("dup1/same.jpg", "dup2/same.png"),
        ("flower.jpg", "Flower.bmp"),
        ("a/x.jpg", "b/x.jpg"),
    ):
        paths = [tmp_path / one, tmp_path / two]
        for seed, path in enumerate(paths):
            path.parent.mkdir(exist_ok=True)
            _photo(path, seed)
        code = explain.main(
            [
                *map(str, paths),
                "--model=t2t_vit_7",
                "--image_size=32",
                f"--output={tmp_path / 'out'}",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and "would both be drawn as" in err and str(paths[1]) in err, err
        assert not (tmp_path / "out").exists()
    code = explain.main(
        [str(tmp_path / "a_folder.jpg"), "--model=t2t_vit_7", f"--output={tmp_path / 'out'}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is a folder, not an image file" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="is a folder"):  # the reader, called directly
        explain._load_image(str(tmp_path / "a_folder.jpg"), 32, 0.9)
    photo = str(tmp_path / "flower.jpg")
    assert explain._output_names([photo, photo]) == [(photo, "flower")]


def test_top5_gives_an_unsure_model_s_probabilities_in_readable_digits():
    """F19: a 1000-class model unsure between its classes (each well under 1%) printed 0.00
    for every one."""
    probabilities = np.full(1000, 0.4 / 995)
    probabilities[[3, 1, 4, 5, 9]] = [0.2, 0.15, 0.1, 0.1, 0.05]
    probabilities[::97] = 0.4 / 995 / 1e4  # tiny ones elsewhere
    probabilities /= probabilities.sum()
    top = explain._top5(lambda images: probabilities[None], np.zeros((32, 32, 3)))
    assert top[0].startswith("class 3 ") and top[0].endswith("%")
    assert "0.00" not in " ".join(top) and top[-1] == f"class 9 {100 * probabilities[9]:.3g}%"
    uniform = explain._top5(lambda images: np.full((1, 1000), 1e-3), np.zeros((32, 32, 3)))
    assert all(entry.endswith(" 0.1%") for entry in uniform), uniform
    assert explain._percent(0.87312) == "87.3%" and explain._percent(1e-9) == "<0.001%"
