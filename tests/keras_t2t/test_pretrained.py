"""weights="imagenet": the release table, download through a mirror, integrity, the cache."""

import hashlib
import http.server
import json
import os
import pathlib
import pickle
import re
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import DATA, GOLDEN, WITHOUT_TORCH, QuietHTTPHandler, register_tiny_releases

import keras_t2t
from keras_t2t import download, models, pretrained

ROOT = pathlib.Path(__file__).resolve().parents[2]
REFERENCE_RELEASES = {  # the paper's table and the official README's links
    ("t2t_vit_7", "imagenet", 224): ("71.7_T2T_ViT_7.pth.tar", 71.7),
    ("t2t_vit_10", "imagenet", 224): ("75.2_T2T_ViT_10.pth.tar", 75.2),
    ("t2t_vit_12", "imagenet", 224): ("76.5_T2T_ViT_12.pth.tar", 76.5),
    ("t2t_vit_14", "imagenet", 224): ("81.5_T2T_ViT_14.pth.tar", 81.5),
    ("t2t_vit_14", "imagenet", 384): ("83.3_T2T_ViT_14.pth.tar", 83.3),
    ("t2t_vit_19", "imagenet", 224): ("81.9_T2T_ViT_19.pth.tar", 81.9),
    ("t2t_vit_24", "imagenet", 224): ("82.3_T2T_ViT_24.pth.tar", 82.3),
    ("t2t_vit_t_14", "imagenet", 224): ("81.7_T2T_ViTt_14.pth.tar", 81.7),
    ("t2t_vit_t_19", "imagenet", 224): ("82.4_T2T_ViTt_19.pth.tar", 82.4),
    ("t2t_vit_t_24", "imagenet", 224): ("82.6_T2T_ViTt_24.pth.tar", 82.6),
    ("t2t_vit_14", "cifar10", 224): ("cifar10_t2t-vit_14_98.3.pth", 98.3),
    ("t2t_vit_14", "cifar100", 224): ("cirfar100_t2t-vit-14_88.4.pth", 88.4),
    ("t2t_vit_19", "cifar10", 224): ("cifar10_t2t-vit_19_98.4.pth", 98.4),
    ("t2t_vit_19", "cifar100", 224): ("cifar100_t2t-vit-19_89.0.pth", 89.0),
}


# --- the table ------------------------------------------------------------------------------


def test_release_table_is_the_official_list():
    table = {(r.model, r.weights, r.image_size): (r.file_name, r.top1) for r in pretrained.RELEASES}
    assert table == REFERENCE_RELEASES
    for release in pretrained.RELEASES:
        assert release.model in models.MODEL_CONFIGS
        expected_classes = {"imagenet": 1000, "cifar10": 10, "cifar100": 100}[release.weights]
        assert release.classes == expected_classes
        # The official repository's LICENSE (The Clear BSD License) covers its released files.
        assert release.license == "BSD-3-Clause-Clear"
        assert release.source_url == (
            f"https://github.com/yitu-opensource/T2T-ViT/releases/download/main/{release.file_name}"
        )
    t2t14 = pretrained.find_release("t2t_vit_14", "imagenet")
    assert t2t14.file_size == 86_212_823 and t2t14.sha384.startswith("98c8ae06a1e9997f")
    assert len(t2t14.sha384) == 96


def test_readme_model_table_agrees_with_the_releases():
    rows = re.findall(
        r"^\| `(T2TViT\w+)` \| `(\w+)` \|.*\| ([\d.]+)(?: \(([\d.]+) at 384\))? \|$",
        (ROOT / "README.md").read_text(),
        re.M,
    )
    assert len(rows) == 9
    for _, name, top1, top1_384 in rows:
        assert float(top1) == pretrained.find_release(name, "imagenet", 224).top1
        if top1_384:
            assert float(top1_384) == pretrained.find_release(name, "imagenet", 384).top1


def test_release_by_input_size():
    assert pretrained.find_release("t2t_vit_14", "imagenet", 384).file_name.startswith("83.3")
    assert pretrained.find_release("t2t_vit_14", "imagenet", 224).file_name.startswith("81.5")
    # No release at 256: the 224 file, whose position table is then interpolated.
    assert pretrained.find_release("t2t_vit_14", "imagenet", 256).file_name.startswith("81.5")
    assert pretrained.find_release("t2t_vit_7", "ImageNet1k").file_name.startswith("71.7")
    with pytest.raises(ValueError, match=r"no released 'cifar100' weights for 't2t_vit_t_14'"):
        pretrained.find_release("t2t_vit_t_14", "cifar100")


def test_custom_architecture_cannot_take_a_release_name():
    with pytest.raises(ValueError, match="needs a known variant"):
        keras_t2t.T2TViT(embed_dim=96, depth=2, num_heads=2, weights="imagenet")


# --- download, cache, integrity -------------------------------------------------------------


# `mirror` (a local HTTP server of a copy of tests/data: (url, folder)) is conftest.py's.


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home / "models" / "keras_t2t"


def load(name, **kwargs):
    return keras_t2t.create_model(
        name,
        weights="imagenet",
        include_preprocessing=False,
        classifier_activation=None,
        **kwargs,
    )


def test_imagenet_weights_from_a_mirror_then_from_the_cache(mirror, keras_home, monkeypatch):
    register_tiny_releases(monkeypatch)
    url, _ = mirror
    monkeypatch.setenv(pretrained.URL_VARIABLE, url)
    for name, entry in GOLDEN.items():
        images = np.load(DATA / entry["io"])["images_nchw"].transpose(0, 2, 3, 1)
        official = np.load(DATA / entry["io"])["logits"]
        model = load(name)  # size and classes come from the release
        assert model.input_shape == (None, 64, 64, 3) and model.output_shape == (None, 10)
        np.testing.assert_allclose(np.asarray(model(images)), official, atol=1e-4)
        assert (keras_home / entry["checkpoint"]).is_file()
        assert (keras_home / entry["checkpoint"].replace(".pth.tar", ".weights.h5")).is_file()

    monkeypatch.setenv(pretrained.URL_VARIABLE, closed_port_url())  # the mirror is gone
    for name, entry in GOLDEN.items():
        (keras_home / entry["checkpoint"]).unlink()  # the conversion alone suffices
        io = np.load(DATA / entry["io"])
        again = load(name)
        np.testing.assert_allclose(
            np.asarray(again(io["images_nchw"].transpose(0, 2, 3, 1))), io["logits"], atol=1e-4
        )
    assert not list(keras_home.glob("*.partial")) and not list(keras_home.glob(".*.weights.h5"))


def test_imagenet_weights_keep_working_with_other_heads_and_sizes(mirror, keras_home, monkeypatch):
    register_tiny_releases(monkeypatch)
    monkeypatch.setenv(pretrained.URL_VARIABLE, mirror[0])
    backbone = load("t2t_tiny_performer", include_top=False, pooling="token")
    assert backbone.output_shape == (None, 64)
    assert load("t2t_tiny_performer", classes=3).output_shape == (None, 3)
    bigger = load("t2t_tiny_performer", input_shape=(96, 96, 3))
    assert bigger.get_layer("pos_embed").weights[0].shape == (1, 37, 64)


def test_release_normalization_is_the_models(mirror, keras_home, monkeypatch):
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    register_tiny_releases(monkeypatch, mean=mean, std=std)
    monkeypatch.setenv(pretrained.URL_VARIABLE, mirror[0])
    model = keras_t2t.create_model("t2t_tiny_performer", weights="imagenet")
    pixels = np.full((1, 1, 1, 3), 200.0, np.float32)
    normalized = np.asarray(model.get_layer("preprocessing")(pixels)).ravel()
    np.testing.assert_allclose(normalized, (200 / 255 - np.array(mean)) / np.array(std), rtol=1e-5)
    assert model.pretrained_release.mean == mean


def test_no_network_and_no_cache_is_a_clear_error(keras_home, monkeypatch):
    register_tiny_releases(monkeypatch)
    dead = closed_port_url()
    monkeypatch.setenv(pretrained.URL_VARIABLE, dead)
    with pytest.raises(pretrained.WeightsDownloadError) as error:
        load("t2t_tiny_performer")
    message = str(error.value)
    assert f"{dead}/t2t_tiny_performer.pth.tar" in message
    assert str(keras_home / "t2t_tiny_performer.pth.tar") in message
    assert pretrained.URL_VARIABLE in message
    assert not keras_home.exists() or not list(keras_home.iterdir())


def test_missing_file_on_the_mirror(mirror, keras_home, monkeypatch):
    register_tiny_releases(monkeypatch)
    url, folder = mirror
    (folder / "t2t_tiny_performer.pth.tar").unlink()
    monkeypatch.setenv(pretrained.URL_VARIABLE, url)
    with pytest.raises(pretrained.WeightsDownloadError, match="404"):
        load("t2t_tiny_performer")


@pytest.mark.parametrize("what", ["size", "sha384"])
def test_wrong_file_fails_the_integrity_check(mirror, keras_home, monkeypatch, what):
    url, folder = mirror
    if what == "size":
        register_tiny_releases(monkeypatch, file_size=123)
        pattern = r"has [\d,]+ bytes, the release 123"
    else:
        register_tiny_releases(monkeypatch, sha384="0" * 96)
        pattern = "its sha384 is [0-9a-f]{96}, the release's 0{96}"
    monkeypatch.setenv(pretrained.URL_VARIABLE, url)
    with pytest.raises(pretrained.WeightsDownloadError, match=pattern):
        load("t2t_tiny_performer")
    bad = keras_home / "t2t_tiny_performer.pth.tar.bad"
    assert bad.is_file()  # kept for inspection, never used
    assert not (keras_home / "t2t_tiny_performer.pth.tar").exists()
    assert not (keras_home / "t2t_tiny_performer.weights.h5").exists()


def _pickle_that_runs_code(path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > /tmp/keras_t2t_pwned",))

    with open(path, "wb") as f:
        pickle.dump({"state_dict": Exploit()}, f, protocol=2)


@pytest.mark.parametrize(
    "content,match",
    [
        ("not a checkpoint", "not the released"),
        ("exploit", r"not the released.*(refus|not allowed)"),
        ("other variant", r"not the released.*another architecture: tokens_type 'transformer'"),
    ],
)
def test_mirror_serving_something_else(mirror, keras_home, monkeypatch, content, match):
    register_tiny_releases(monkeypatch, file_size=None, sha384=None)  # no integrity data
    url, folder = mirror
    target = folder / "t2t_tiny_performer.pth.tar"
    if content == "exploit":
        _pickle_that_runs_code(target)
    elif content == "other variant":  # a T2T-ViT checkpoint, of another architecture
        shutil.copy(folder / "t2t_tiny_transformer.pth.tar", target)
    else:
        target.write_text("<html>404 page of a proxy</html>")
    monkeypatch.setenv(pretrained.URL_VARIABLE, url)
    with pytest.raises(pretrained.WeightsDownloadError, match=match):
        load("t2t_tiny_performer")
    assert not os.path.exists("/tmp/keras_t2t_pwned")
    assert (keras_home / "t2t_tiny_performer.pth.tar.bad").is_file()
    assert not (keras_home / "t2t_tiny_performer.pth.tar").exists()


def test_damaged_cached_conversion_is_made_again(mirror, keras_home, monkeypatch):
    register_tiny_releases(monkeypatch)
    monkeypatch.setenv(pretrained.URL_VARIABLE, mirror[0])
    load("t2t_tiny_performer")
    converted = keras_home / "t2t_tiny_performer.weights.h5"
    converted.write_bytes(b"garbage")
    io = np.load(DATA / "t2t_tiny_performer_io.npz")
    model = load("t2t_tiny_performer")
    logits = np.asarray(model(io["images_nchw"].transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(logits, io["logits"], atol=1e-4)
    assert converted.stat().st_size > 1000


def count_models(monkeypatch):
    """A list that gets one entry per `keras.Model` built from now on (functional ones too)."""
    import keras

    built, init = [], keras.Model.__init__

    def counting(self, *args, **kwargs):
        built.append(type(self).__name__)
        return init(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "__init__", counting)
    return built


def test_weights_build_exactly_one_model(mirror, keras_home, monkeypatch, tmp_path):
    """As keras.applications: a release (first call: download and conversion; later calls:
    the cache), an official file, a .weights.h5 and a run's model_dir each build the one
    model that is returned, and no other."""
    register_tiny_releases(monkeypatch)
    monkeypatch.setenv(pretrained.URL_VARIABLE, mirror[0])
    io = np.load(DATA / "t2t_tiny_performer_io.npz")
    images = io["images_nchw"].transpose(0, 2, 3, 1)
    built = count_models(monkeypatch)
    first = load("t2t_tiny_performer")  # downloaded and converted
    assert len(built) == 1 and (keras_home / "t2t_tiny_performer.weights.h5").is_file()
    cached = load("t2t_tiny_performer")  # from the cached conversion
    assert len(built) == 2
    for model in (first, cached):
        np.testing.assert_allclose(np.asarray(model(images)), io["logits"], atol=1e-4)

    checkpoint = str(DATA / "t2t_tiny_performer.pth.tar")
    loaded = {}
    for kind, weights in [("pth.tar", checkpoint), ("weights.h5", None), ("run", None)]:
        if kind == "weights.h5":
            weights = str(tmp_path / "tiny.weights.h5")
            loaded["pth.tar"].save_weights(weights)
        elif kind == "run":
            run = tmp_path / "run"
            run.mkdir()
            shutil.copy(tmp_path / "tiny.weights.h5", run / "model.weights.h5")
            record = {"model": "t2t_tiny_performer", "saved_weights": {"raw": "model.weights.h5"}}
            (run / "config.json").write_text(json.dumps(record))
            weights = str(run)
        before = len(built)
        loaded[kind] = keras_t2t.create_model(
            "t2t_tiny_performer",
            weights=weights,
            include_preprocessing=False,
            classifier_activation=None,
        )
        assert len(built) == before + 1, f"weights={kind} built {len(built) - before} models"
        np.testing.assert_allclose(np.asarray(loaded[kind](images)), io["logits"], atol=1e-4)


NO_TORCH = (
    WITHOUT_TORCH
    + """import os
import numpy as np
from conftest import register_tiny_releases
import keras_t2t
from keras_t2t import pretrained
register_tiny_releases()
io = np.load(sys.argv[1])
for url in sys.argv[2:]:
    os.environ[pretrained.URL_VARIABLE] = url
    model = keras_t2t.create_model("t2t_tiny_performer", weights="imagenet",
                                   include_preprocessing=False, classifier_activation=None)
    logits = np.asarray(model(io["images_nchw"].transpose(0, 2, 3, 1)))
    print("max abs diff", float(np.abs(logits - io["logits"]).max()))
assert "torch" not in sys.modules
"""
)


def test_imagenet_weights_without_torch_then_offline(mirror, tmp_path):
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
        KERAS_HOME=str(tmp_path / "home"),
    )
    io = str(DATA / "t2t_tiny_performer_io.npz")
    # One process: from the mirror, then with no mirror (a closed port): from the cache.
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, io, mirror[0], closed_port_url()],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    differences = re.findall(r"^max abs diff (\S+)$", result.stdout, re.M)
    assert len(differences) == 2, result.stdout
    assert all(float(difference) <= 1e-4 for difference in differences), differences


def test_evaluation_script_takes_a_release_name(mirror, keras_home, monkeypatch):
    from training import evaluate_imagenet

    register_tiny_releases(monkeypatch)
    monkeypatch.setenv(pretrained.URL_VARIABLE, mirror[0])
    model = evaluate_imagenet.build_model("imagenet", model="t2t_tiny_transformer")
    assert model.output_shape == (None, 10) and model.input_shape == (None, 64, 64, 3)
    with pytest.raises(ValueError, match="needs --model"):
        evaluate_imagenet.build_model("imagenet")


def test_file_put_in_the_cache_by_hand_is_checked_too(keras_home, monkeypatch):
    register_tiny_releases(monkeypatch)
    monkeypatch.setenv(pretrained.URL_VARIABLE, closed_port_url())
    keras_home.mkdir(parents=True)
    placed = keras_home / "t2t_tiny_performer.pth.tar"
    placed.write_bytes(b"x" * (DATA / "t2t_tiny_performer.pth.tar").stat().st_size)  # same size
    with pytest.raises(pretrained.WeightsDownloadError, match="its sha384 is"):
        load("t2t_tiny_performer")
    assert (keras_home / "t2t_tiny_performer.pth.tar.bad").is_file()
    shutil.copy(DATA / "t2t_tiny_performer.pth.tar", placed)  # the right file: used offline
    io = np.load(DATA / "t2t_tiny_performer_io.npz")
    logits = np.asarray(load("t2t_tiny_performer")(io["images_nchw"].transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(logits, io["logits"], atol=1e-4)


# --- downloads that stall (F5) --------------------------------------------------------------


class StallingServer:
    """A loopback server that accepts every connection and then either never answers
    ("silent") or reads the request, sends a 200 with the Content-Length of `size` bytes and
    half of them, and nothing more ("half"). Closing it ends every connection."""

    def __init__(self, mode, size=64 * 1024):
        self.mode, self.size = mode, size
        self.connections = []
        self.stopping = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:  # the accept timeout, or closed
                continue
            self.connections.append(connection)
            if self.mode == "half":
                connection.settimeout(5)
                request = b""
                while b"\r\n\r\n" not in request and (data := connection.recv(4096)):
                    request += data
                header = f"HTTP/1.1 200 OK\r\nContent-Length: {self.size}\r\n\r\n".encode()
                connection.sendall(header + b"\0" * (self.size // 2))

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        for connection in self.connections:
            connection.close()
        self.listener.close()


@pytest.fixture
def stalling():
    servers = []
    yield lambda mode: servers.append(StallingServer(mode)) or servers[-1]
    for server in servers:
        server.close()


def finishes(function, within):
    """function()'s result or exception, run in a thread that must end `within` seconds."""
    outcome = {}

    def target():
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: B036 - handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"still running after {within} s: the download hangs"
    return outcome


@pytest.mark.parametrize("mode", ["silent", "half"])
def test_stalled_mirror_times_out_tries_again_and_leaves_nothing(
    stalling, keras_home, monkeypatch, mode
):
    register_tiny_releases(monkeypatch)
    server = stalling(mode)
    monkeypatch.setenv(pretrained.URL_VARIABLE, server.url)
    monkeypatch.setenv("KERAS_T2T_DOWNLOAD_TIMEOUT", "1")
    monkeypatch.setattr(download, "DOWNLOAD_ATTEMPTS", 2, raising=False)
    monkeypatch.setattr(download, "RETRY_BACKOFF", 0.1, raising=False)
    outcome = finishes(lambda: load("t2t_tiny_performer"), within=20)
    error = outcome.get("error")
    assert isinstance(error, pretrained.WeightsDownloadError), outcome
    message = str(error)
    assert f"{server.url}/t2t_tiny_performer.pth.tar" in message
    assert "no data for 1 s" in message and "KERAS_T2T_DOWNLOAD_TIMEOUT" in message
    assert "(2 tries)" in message and pretrained.URL_VARIABLE in message
    assert str(keras_home / "t2t_tiny_performer.pth.tar") in message  # where to put it by hand
    assert len(server.connections) == 2  # tried again
    assert not keras_home.exists() or not list(keras_home.iterdir())  # no .partial, nothing


def test_fetch_tries_again_after_a_server_error(tmp_path, monkeypatch):
    """An HTTP 503 is tried again (and a 404 is not); the file arrives whole."""
    body = os.urandom(3000)
    statuses = [503, 200]

    class Flaky(QuietHTTPHandler):
        def do_GET(self):
            status = statuses.pop(0) if statuses else 404
            self.send_response(status)
            self.send_header("Content-Length", str(len(body) if status == 200 else 0))
            self.end_headers()
            if status == 200:
                self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(download, "RETRY_BACKOFF", 0.05)
    origin = f"http://127.0.0.1:{server.server_address[1]}/file"
    try:
        path = download.fetch(origin, str(tmp_path / "cache" / "file"), timeout=5)
        assert open(path, "rb").read() == body
        with pytest.raises(download.DownloadError, match=r"HTTP 404") as error:
            download.fetch(origin, str(tmp_path / "cache" / "other"), timeout=5)
        assert "tries" not in str(error.value) and statuses == []  # one try: a 404 stays
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(os.listdir(tmp_path / "cache")) == ["file"]


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_download_timeout_setting(monkeypatch, value):
    monkeypatch.setenv(download.TIMEOUT_VARIABLE, "2.5")
    assert download.download_timeout() == 2.5
    monkeypatch.setenv(download.TIMEOUT_VARIABLE, value)
    with pytest.raises(ValueError, match="KERAS_T2T_DOWNLOAD_TIMEOUT must be a positive number"):
        download.download_timeout()


# --- the cached conversion is checked against its record (F11) -----------------------------


@pytest.mark.parametrize("damage", ["bit_flip", "substituted", "record_removed"])
def test_cached_conversion_that_differs_from_its_record_is_made_again(
    mirror, keras_home, monkeypatch, caplog, damage
):
    import h5py
    from conftest import tiny_model

    register_tiny_releases(monkeypatch)
    monkeypatch.setenv(pretrained.URL_VARIABLE, mirror[0])
    io = np.load(DATA / "t2t_tiny_performer_io.npz")
    images = io["images_nchw"].transpose(0, 2, 3, 1)
    load("t2t_tiny_performer")
    converted = keras_home / "t2t_tiny_performer.weights.h5"
    record = keras_home / "t2t_tiny_performer.weights.h5.json"
    assert record.is_file()  # written beside the conversion
    if damage == "bit_flip":  # an exponent bit of the first head weight
        with h5py.File(converted, "r") as f:
            offset = f["layers/dense/vars/0"].id.get_offset()
        data = bytearray(converted.read_bytes())
        data[offset + 3] ^= 0x40
        converted.write_bytes(bytes(data))
    elif damage == "substituted":  # a valid file of the same architecture, other weights
        tiny_model("performer", classes=10).save_weights(converted)
    else:
        record.unlink()
    monkeypatch.setenv(pretrained.URL_VARIABLE, closed_port_url())  # from the cached .pth.tar
    with caplog.at_level("WARNING", logger="keras_t2t"):
        logits = np.asarray(load("t2t_tiny_performer")(images))
    np.testing.assert_allclose(logits, io["logits"], atol=1e-4)
    assert "is not the conversion of t2t_tiny_performer.pth.tar" in caplog.text
    assert "converting it again" in caplog.text
    recorded = json.loads(record.read_text())
    assert recorded["sha256"] == hashlib.sha256(converted.read_bytes()).hexdigest()
    assert (
        recorded["release_sha384"]
        == pretrained.find_release("t2t_tiny_performer", "imagenet").sha384
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="keras_t2t"):
        load("t2t_tiny_performer")  # the remade conversion passes its check
    assert "converting it again" not in caplog.text
