"""TFDS as a data source: every input pipeline (host) reads only its own files (#10, item 11)."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import read_batches_only

from training import data, trainer
from training.config import Config

tfds = pytest.importorskip("tensorflow_datasets")

SHARDS = (5, 3, 4, 2)  # examples per file: pipelines get unequal shares


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A prepared TFDS dataset of 4 classes in the layout `tfds build` writes: files
    `tiny-{split}.tfrecord-0000i-of-00004` and their metadata."""
    folder = tmp_path_factory.mktemp("tfds") / "tiny" / "1.0.0"
    folder.mkdir(parents=True)
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=4),
        }
    )
    rng = np.random.default_rng(0)
    index = 0
    for split in ("train", "validation"):
        for shard, count in enumerate(SHARDS):
            name = folder / f"tiny-{split}.tfrecord-{shard:05d}-of-{len(SHARDS):05d}"
            with tf.io.TFRecordWriter(str(name)) as writer:
                for _ in range(count):
                    # The pixel at (0, 0) numbers the example, to tell examples apart.
                    image = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
                    image[:8, :8] = index
                    writer.write(features.serialize_example({"image": image, "label": index % 4}))
                    index += 1
    tfds.folder_dataset.write_metadata(
        data_dir=folder, features=features, check_data=False, supervised_keys=("image", "label")
    )
    return tfds.builder_from_directory(folder)


class _Context:  # tf.distribute.InputContext, as a strategy gives it to dataset_fn
    def __init__(self, pipelines, pipeline_id):
        self.num_input_pipelines, self.input_pipeline_id = pipelines, pipeline_id
        self.num_replicas_in_sync = pipelines


def _examples(source, context):
    dataset = data._examples(source, context, False, None, 4, 0)
    return [(int(image[0, 0, 0]), int(label)) for image, label in dataset.as_numpy_iterator()]


def test_each_pipeline_reads_only_its_own_files(tiny_tfds):
    source = data.TFDSSource("validation", builder=tiny_tfds)
    assert source.num_examples == sum(SHARDS)
    assert list(source.shard_lengths.values()) == list(SHARDS)
    everything = _examples(source, None)
    shares = [_examples(source, tf.distribute.InputContext(2, i, 2)) for i in range(2)]
    # Files 0 and 2 to pipeline 0, 1 and 3 to pipeline 1: 9 and 5 examples, no overlap.
    assert [len(share) for share in shares] == [SHARDS[0] + SHARDS[2], SHARDS[1] + SHARDS[3]]
    assert sorted(shares[0] + shares[1]) == sorted(everything)
    assert len(set(everything)) == sum(SHARDS)
    # The evaluation pads both pipelines to the batches of the fuller one.
    batches = data.eval_batches(source.shard_lengths, 2, 4)
    assert batches == 3  # ceil(9 / 4)
    counts = []
    for i in range(2):
        dataset = data.eval_dataset(
            source,
            4,
            32,
            4,
            label_offset=0,
            input_context=tf.distribute.InputContext(2, i, 2),
            num_batches=batches,
        )
        masks = [mask for _, _, mask in dataset.as_numpy_iterator()]
        assert len(masks) == batches
        counts.append(int(np.sum(masks)))
    assert counts == [9, 5]


def test_training_batches_from_tfds_crop_the_encoded_images(tiny_tfds):
    source = data.TFDSSource("train", builder=tiny_tfds)
    dataset = data.train_dataset(
        source,
        6,
        32,
        4,
        data.Augmentation.none(),
        label_offset=0,
        seed=1,
        input_context=tf.distribute.InputContext(2, 1, 2),
    )
    images, targets = next(iter(dataset))
    assert images.shape == (6, 32, 32, 3) and targets.shape == (6, 4)
    assert float(tf.reduce_min(images)) >= 0 and float(tf.reduce_max(images)) <= 255


def test_a_run_on_tfds_evaluates_every_example(tiny_tfds, tmp_path, monkeypatch):
    """The trainer reads TFDS for training and evaluates the model on every example."""
    opened = {}

    class Tiny(data.TFDSSource):  # the trainer's source, on the tiny dataset
        def __init__(self, split, data_dir=None):
            opened[split] = data_dir
            super().__init__(split, builder=tiny_tfds)

    monkeypatch.setattr(data, "TFDSSource", Tiny)

    read_batches_only(monkeypatch)
    config = Config(
        model="t2t_vit_7",
        data_source="tfds",
        data_dir="somewhere",
        model_dir=str(tmp_path),
        image_size=32,
        num_classes=4,
        batch_size=4,
        epochs=1,
        warmup_epochs=0,
        cooldown_epochs=0,
        steps_per_epoch=2,
        steps_per_loop=2,
        drop_path_rate=0.0,
        jit_compile=False,
        eval_batch_size=4,
        aug=data.Augmentation.none(),
    )
    results = trainer.Trainer(config).run()
    assert opened == {"train": "somewhere", "validation": "somewhere"}
    assert results["examples"] == sum(SHARDS) and results["step"] == 2


def test_tfds_not_prepared_says_how(tmp_path):
    with pytest.raises(data.DataError, match=r"not prepared in .*tfds build imagenet2012"):
        data.TFDSSource("validation", data_dir=str(tmp_path))
