"""training/evaluate_imagenet.py on the golden checkpoints: the whole evaluation path
(TFRecords -> decode -> resize and crop -> model) against the official forward pass."""

import json

import numpy as np
import pytest
import tensorflow as tf

from keras_t2t import preprocess_input, reference
from keras_t2t import weights as weights_lib
from training import build_tfrecords, evaluate_imagenet

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _records(folder, images_uint8, labels):
    examples = (
        build_tfrecords.make_example(
            tf.io.encode_png(image).numpy(), label + 1, str(label), f"{i}.png", *image.shape[:2]
        )
        for i, (image, label) in enumerate(zip(images_uint8, labels))
    )
    build_tfrecords.write_shards(examples, str(folder), "validation", 2)
    return str(folder)


def _softmax_ce(logits, labels):
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]


def test_evaluation_matches_the_official_forward(golden, tmp_path, capsys):
    # The golden images, back to RGB 0..255 as JPEG/PNG files hold them.
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    images = np.clip(np.round((golden["images"] * std + mean) * 255), 0, 255).astype("uint8")
    labels = np.array([2, 2, 6, 9])
    data_dir = _records(tmp_path / "records", images, labels)

    state_dict = weights_lib.read_official_checkpoint(golden["checkpoint"])
    official = reference.official_forward(
        state_dict, preprocess_input(images.astype("float32")).transpose(0, 3, 1, 2), 2
    )
    top5 = np.argsort(-official, -1)[:, :5]
    expected = dict(
        top1=float(np.mean(official.argmax(-1) == labels)),
        top5=float(np.mean([label in row for label, row in zip(labels, top5)])),
        loss=float(_softmax_ce(official, labels).mean()),
    )

    results = evaluate_imagenet.evaluate(
        golden["checkpoint"], data_dir, num_heads=2, crop_pct=1.0, batch_size=3
    )
    assert results["examples"] == 4
    assert results["top1"] == expected["top1"] and results["top5"] == expected["top5"]
    assert results["loss"] == pytest.approx(expected["loss"], abs=1e-4)

    out = tmp_path / "results.json"
    assert (
        evaluate_imagenet.main(
            [
                "--weights",
                golden["checkpoint"],
                "--data_dir",
                data_dir,
                "--num_heads",
                "2",
                "--crop_pct",
                "1.0",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert f"top1 {100 * expected['top1']:.2f}" in capsys.readouterr().out
    assert json.loads(out.read_text())["top5"] == expected["top5"]


def test_evaluation_errors(golden, tmp_path, capsys):
    args = ["--weights", golden["checkpoint"], "--data_dir", str(tmp_path), "--num_heads", "2"]
    assert evaluate_imagenet.main(args) == 2
    assert "No validation TFRecords found" in capsys.readouterr().err
    data_dir = _records(tmp_path / "records", np.zeros((2, 64, 64, 3), np.uint8), [0, 1])
    assert evaluate_imagenet.main(["--weights", golden["checkpoint"], "--data_dir", data_dir]) == 2
    assert "matches no official variant" in capsys.readouterr().err
    missing = str(tmp_path / "x.weights.h5")
    assert (
        evaluate_imagenet.main(
            ["--weights", missing, "--data_dir", data_dir, "--model", "t2t_vit_7"]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
