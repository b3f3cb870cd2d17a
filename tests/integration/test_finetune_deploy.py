"""The README's "Fine-tune and deploy" path, end to end on small data:

weights="imagenet" through a mirror (KERAS_T2T_WEIGHTS_URL; the golden checkpoint plays the
release) -> build_tfrecords -> --recipe=finetune -> export of the run's model_dir -> the
SavedModel's bytes signature on the validation JPEGs, which must score the run's own top-1.
"""

import json

import numpy as np
import pytest
import tensorflow as tf
from conftest import register_tiny_releases

import keras_t2t
from keras_t2t import export, pretrained
from training import build_tfrecords, data, trainer
from training.config import Config

CLASSES = 4


def _pattern_examples(count, seed):
    """Noisy stripes at random orientations over a tint that is the class (red, green, blue
    or gray), at sizes that are not square, so the evaluation's resize and crop matter."""
    rng = np.random.default_rng(seed)
    tints = np.array([[1.0, 0.25, 0.25], [0.25, 1.0, 0.25], [0.25, 0.25, 1.0], [0.6, 0.6, 0.6]])
    for i in range(count):
        label = i % CLASSES
        height, width = rng.integers(56, 90, 2)
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        coordinate = [y, x, x + y, x - y][rng.integers(4)]
        wave = np.sin(2 * np.pi * coordinate / rng.uniform(6, 14) + rng.uniform(0, 2 * np.pi))
        brightness = rng.uniform(90, 200) + 50 * wave[..., None]
        image = brightness * tints[label] + rng.normal(0, 15, (height, width, 3))
        image = np.clip(image, 0, 255).astype(np.uint8)
        yield build_tfrecords.make_example(
            build_tfrecords.to_jpeg(image), label + 1, str(label), f"{i}.jpg", height, width
        )


def _validation_jpegs(folder):
    files = data.list_files(str(folder), "validation")
    jpegs, labels = [], []
    for record in tf.data.TFRecordDataset(files):
        example = tf.train.Example.FromString(record.numpy())
        jpegs.append(example.features.feature["image/encoded"].bytes_list.value[0])
        labels.append(example.features.feature["image/class/label"].int64_list.value[0] - 1)
    return jpegs, np.array(labels)


def test_finetune_from_imagenet_weights_then_serve(mirror, tmp_path, monkeypatch):
    register_tiny_releases(monkeypatch)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv(pretrained.URL_VARIABLE, mirror[0])
    records = tmp_path / "records"
    build_tfrecords.write_shards(_pattern_examples(96, 0), str(records), "train", 2)
    build_tfrecords.write_shards(_pattern_examples(40, 1), str(records), "validation", 1)

    run = tmp_path / "run"
    config = Config(
        model="t2t_tiny_performer",
        weights="imagenet",
        recipe="finetune",
        data_dir=str(records),
        model_dir=str(run),
        image_size=64,
        num_classes=CLASSES,
        batch_size=16,
        epochs=8,
        learning_rate=3e-2,
        steps_per_loop=6,
        eval_every_epochs=8,
        jit_compile=False,
        eval_batch_size=20,
        crop_pct=0.8,
    )
    job = trainer.Trainer(config)
    assert job.config.aug.mixup_alpha == 0 and job.config.aug.randaugment_ops == 0
    results = job.run()
    record = json.loads((run / "config.json").read_text())
    assert record["weights"] == "imagenet" and record["recipe"] == "finetune"
    best = record["saved_weights"]["best"]
    run_top1 = results["ema_top1" if best == "ema" else "top1"]
    assert run_top1 > 1 / CLASSES + 0.2, results  # it learns (the golden weights are random)

    # The model_dir is what the builders (and export.py) take: variant, size, classes.
    model = keras_t2t.create_model("t2t_tiny_performer", weights=str(run))
    assert model.output_shape == (None, CLASSES)
    crop_pct = export.serving_crop_pct(model, str(run))  # as savedmodels/export.py does
    path = export.export_saved_model(model, str(tmp_path / "saved_model"), crop_pct=crop_pct)
    served = tf.saved_model.load(path).signatures["serving_bytes"]
    jpegs, labels = _validation_jpegs(records)
    answer = served(image_bytes=tf.constant(jpegs))
    classes = answer["classes"].numpy()
    served_top1 = float(np.mean(classes == labels))
    assert served_top1 == pytest.approx(run_top1, abs=1e-6), (served_top1, run_top1)
    # The serving preprocessing is the evaluation's, image for image: the run's evaluation
    # input pipeline through the same model gives the same probabilities.
    evaluation = data.eval_dataset(
        data.list_files(str(records), "validation"), 40, 64, CLASSES, crop_pct=config.crop_pct
    )
    images, eval_labels, _ = next(iter(evaluation))
    np.testing.assert_array_equal(eval_labels.numpy(), labels)
    expected = model.predict(images.numpy(), verbose=0)
    np.testing.assert_allclose(answer["probabilities"].numpy(), expected, atol=1e-5)

    # The full-int8 TFLite model of the same export runs and agrees with float32.
    from keras_t2t.imagenet import resize_and_center_crop

    pixels = np.stack(
        [
            resize_and_center_crop(tf.io.decode_jpeg(j, channels=3), 64, config.crop_pct).numpy()
            for j in jpegs
        ]
    ).astype(np.uint8)
    flatbuffer = export.tflite_models(model, pixels, kinds=("int8",))["int8"]
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    interpreter = litert.Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    int8_classes = []
    for image in pixels:
        interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
        interpreter.invoke()
        int8_classes.append(int(np.argmax(interpreter.get_tensor(out["index"])[0])))
    assert np.mean(np.array(int8_classes) == classes) >= 0.9
