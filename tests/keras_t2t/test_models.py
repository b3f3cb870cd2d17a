"""Builders: official parameter counts, the keras.applications signature, errors, saving,
mixed precision and XLA."""

import inspect
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import DATA, GOLDEN, TINY_ARCH, tiny_model

import keras_t2t

# Totals and trainable counts of the official state dicts (shared/REFERENCE.md), and the
# paper's MACs (G).
OFFICIAL = {
    "T2TViT7": ("t2t_vit_7", 4_310_222, 4_255_694, 1.1),
    "T2TViT10": ("t2t_vit_10", 5_889_230, 5_834_702, 1.5),
    "T2TViT12": ("t2t_vit_12", 6_941_902, 6_887_374, 1.8),
    "T2TViT14": ("t2t_vit_14", 21_545_550, 21_465_806, 4.8),
    "T2TViT19": ("t2t_vit_19", 39_177_422, 39_085_070, 8.5),
    "T2TViT24": ("t2t_vit_24", 64_105_934, 64_000_974, 13.8),
    "T2TViTT14": ("t2t_vit_t_14", 21_541_070, 21_465_422, 6.1),
    "T2TViTT19": ("t2t_vit_t_19", 39_172_942, 39_084_686, 9.8),
    "T2TViTT24": ("t2t_vit_t_24", 64_101_454, 64_000_590, 15.0),
}
APPLICATIONS_SIGNATURE = [
    "include_top",
    "weights",
    "input_tensor",
    "input_shape",
    "pooling",
    "classes",
    "classifier_activation",
    "name",
]


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("builder", sorted(OFFICIAL))
def test_official_parameter_counts(builder):
    name, total, trainable, _ = OFFICIAL[builder]
    model = getattr(keras_t2t, builder)()
    assert model.name == name
    assert model.count_params() == total
    assert trainable_count(model) == trainable
    assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 1000)


def test_t2t_vit_14_at_384_counts_the_longer_position_table():
    model = keras_t2t.T2TViT14(input_shape=(384, 384, 3))
    assert model.count_params() == 21_691_470
    assert model.get_layer("pos_embed").pos_embed.shape == (1, 577, 384)


@pytest.mark.parametrize("builder", sorted(OFFICIAL))
def test_flop_counter_agrees_with_paper_macs(builder):
    """As the README says: within 4.5% for T2T-ViT-7, whose 1.1G the paper rounds to 0.1G
    (which alone allows +-4.5%), and within 2.5% for every other variant."""
    name, *_, macs = OFFICIAL[builder]
    tolerance = 0.045 if name == "t2t_vit_7" else 0.025
    assert keras_t2t.count_flops(name) / 2e9 == pytest.approx(macs, rel=tolerance)


def test_flop_counter_reads_a_model():
    model = keras_t2t.T2TViT7(input_shape=(64, 64, 3), classes=10)
    assert keras_t2t.count_flops(model) == keras_t2t.count_flops("t2t_vit_7", 64, classes=10)


def test_builders_use_the_applications_signature():
    for builder in OFFICIAL:
        params = list(inspect.signature(getattr(keras_t2t, builder)).parameters)
        assert params[: len(APPLICATIONS_SIGNATURE)] == APPLICATIONS_SIGNATURE
        assert params[len(APPLICATIONS_SIGNATURE) :] == [
            "include_preprocessing",
            "drop_path_rate",
            "dropout_rate",
            "dtype",
            "gradient_checkpointing",
        ]


def test_variants_are_rows_of_one_table():
    assert set(keras_t2t.list_models()) >= {name for name, *_ in OFFICIAL.values()}
    model = keras_t2t.create_model(
        "t2t-vit-t-14",  # dashes are accepted
        classes=3,
        input_shape=(32, 32, 3),
        drop_path_rate=0.1,
    )
    assert model.name == "t2t_vit_t_14" and model.output_shape == (None, 3)
    # The arguments it was built with, all of them (presets write them as their config).
    built_with = set(inspect.signature(keras_t2t.T2TViT).parameters) - {"weights", "input_tensor"}
    assert set(model.builder_config) == built_with
    rates = [model.get_layer(f"blocks_{i}").drop_path_rate for i in range(14)]
    np.testing.assert_allclose(rates, np.linspace(0, 0.1, 14), atol=1e-7)


@pytest.mark.parametrize("side", [16, 32, 48, 96])
def test_any_multiple_of_16_works(side):
    model = tiny_model(input_shape=(side, side, 3))
    grid = side // 16
    assert model.get_layer("pos_embed").pos_embed.shape == (1, grid * grid + 1, 64)
    out = model(np.random.default_rng(0).uniform(0, 255, (2, side, side, 3)).astype("float32"))
    assert out.shape == (2, 10)
    np.testing.assert_allclose(np.asarray(out).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "pooling,shape",
    [(None, (2, 17, 64)), ("token", (2, 64)), ("avg", (2, 64)), ("max", (2, 64))],
)
def test_features_without_top(pooling, shape):
    model = tiny_model(include_top=False, pooling=pooling)
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    assert np.asarray(model(x)).shape == shape


def test_pooled_features_are_the_token_sequence_pooled():
    x = np.random.default_rng(2).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    sequence_model = tiny_model(include_top=False)
    tokens = np.asarray(sequence_model(x))
    for pooling, expected in [
        ("token", tokens[:, 0]),
        ("avg", tokens[:, 1:].mean(1)),
        ("max", tokens[:, 1:].max(1)),
    ]:
        pooled = tiny_model(include_top=False, pooling=pooling)
        pooled.set_weights(sequence_model.get_weights())
        np.testing.assert_allclose(np.asarray(pooled(x)), expected, atol=1e-5)


@pytest.mark.parametrize("model", [None, "t2t_vit_7", keras.Sequential([keras.Input((4,))])])
def test_feature_and_pyramid_models_refuse_what_is_not_a_t2t_model(model):
    for make in (keras_t2t.feature_maps_model, keras_t2t.pyramid_model):
        with pytest.raises(ValueError, match="Expected a keras_t2t T2T-ViT model"):
            make(model)


def test_feature_maps_model():
    model = tiny_model(include_top=False, input_shape=(96, 96, 3))
    features = keras_t2t.feature_maps_model(model)
    out = features(np.zeros((1, 96, 96, 3), "float32"))
    assert tuple(out["t2t_1"].shape) == (1, 24, 24, 64)
    assert tuple(out["t2t_2"].shape) == (1, 12, 12, 64)
    assert tuple(out["tokens"].shape) == (1, 6, 6, 64)
    sequence = np.asarray(model(np.zeros((1, 96, 96, 3), "float32")))
    np.testing.assert_allclose(
        np.asarray(out["tokens"]).reshape(1, 36, 64), sequence[:, 1:], atol=1e-6
    )


def test_include_preprocessing_normalizes_inside():
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    raw = tiny_model(input_shape=(32, 32, 3))
    normalized = tiny_model(input_shape=(32, 32, 3), include_preprocessing=False)
    normalized.set_weights(raw.get_weights())
    np.testing.assert_allclose(
        np.asarray(raw(x)), np.asarray(normalized(keras_t2t.preprocess_input(x))), atol=1e-5
    )


def test_input_tensor():
    inputs = keras.Input((32, 32, 3))
    model = keras_t2t.T2TViT7(input_tensor=inputs, classes=4)
    assert model.inputs[0] is inputs and model.output_shape == (None, 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_shape=(200, 200, 3)), r"multiple of 16.*received 200.*192 and 208"),
        (dict(input_shape=(224, None, 3)), r"fixed size or of any size.*\(None, None, 3\)"),
        (dict(input_shape=(224, 200, 3)), r"multiple of 16.*received 200"),
        (dict(input_shape=(224, 224, 1)), "3 channels"),
        (dict(input_shape=(224, 224)), r"\(height, width, 3\)"),
        (dict(pooling="mean"), "`pooling` must be one of"),
        (dict(classes=0), "`classes` must be an integer >= 1"),
        (dict(weights="/nonexistent/t2t.pth.tar"), "does not exist"),
        (dict(weights="cifar10"), r"no released 'cifar10' weights for 't2t_vit_7'.*t2t_vit_14"),
        (dict(input_shape=(8, 8, 3)), r"received 8\. The smallest allowed side is 16\.$"),
        (dict(input_shape=(-5, -5, 3)), r"received -5\. The smallest allowed side is 16\.$"),
        (dict(drop_path_rate=1.5), r"`drop_path_rate` must be a float in \[0, 1\), received 1\.5"),
        (dict(dropout_rate=-0.1), r"`dropout_rate` must be a float in \[0, 1\), received -0\.1"),
        (dict(weights=str(pathlib.Path(__file__).parent)), r"`weights` is a folder, .*pass a file"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_t2t.T2TViT7(**kwargs)


def test_unknown_variant_name():
    with pytest.raises(ValueError, match=r"Unknown T2T-ViT variant 't2t_vit_15'.*t2t_vit_14"):
        keras_t2t.create_model("t2t_vit_15")


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_keras_save_and_load_gives_identical_outputs(tokens_type, tmp_path):
    model = tiny_model(tokens_type, drop_path_rate=0.1)
    x = np.random.default_rng(4).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    features = keras_t2t.feature_maps_model(loaded)
    assert tuple(features(x)["t2t_2"].shape) == (2, 8, 8, 64)


def test_a_model_of_any_size_gives_the_fixed_size_models_logits(tmp_path):
    """input_shape=(None, None, 3) with the golden checkpoint: the file's 4x4 table, kept; at
    64 the official logits; at 96, 128 and 64x96 (stand-ins for 288, 384 and a non-square
    size) those of models built at those sizes from the file (tables resized by the NumPy
    reference as it loads); called eagerly and in a graph of unknown size (a SavedModel's).
    Sides of 72 and 100 are refused in both; a `.keras` file keeps the outputs."""
    golden = GOLDEN["t2t_tiny_performer"]

    def build(shape):
        return keras_t2t.T2TViT(
            tokens_type="performer",
            **TINY_ARCH,
            include_preprocessing=False,
            classifier_activation=None,
            weights=str(DATA / golden["checkpoint"]),
            input_shape=shape,
        )

    model = build((None, None, 3))
    assert model.input_shape == (None, None, None, 3)
    assert tuple(model.get_layer("pos_embed").pos_embed.shape) == (1, 17, 64)
    graph = tf.function(model, input_signature=[tf.TensorSpec([None, None, None, 3])])
    io = np.load(DATA / golden["io"])
    images = io["images_nchw"].transpose(0, 2, 3, 1)
    for outputs in (model(images), graph(images)):
        assert np.abs(np.asarray(outputs) - io["logits"]).max() <= 1e-4
    rng = np.random.default_rng(5)
    for size in [(96, 96), (128, 128), (64, 96)]:
        images = rng.normal(size=(2, *size, 3)).astype("float32")
        expected = np.asarray(build((*size, 3))(images))
        for outputs in (model(images), graph(images)):
            assert np.abs(np.asarray(outputs) - expected).max() <= 1e-4, size
    for side in (72, 100):
        bad = np.zeros((1, side, 64, 3), "float32")
        with pytest.raises(ValueError, match=f"multiples of 16, received {side} x 64"):
            model(bad)
        with pytest.raises(tf.errors.InvalidArgumentError, match=rf"16, received\] \[{side}\]"):
            graph(bad)
    model.save(tmp_path / "any_size.keras")
    revived = keras.saving.load_model(tmp_path / "any_size.keras")
    np.testing.assert_array_equal(np.asarray(revived(images)), np.asarray(model(images)))


def test_a_model_of_any_size_pools_and_says_what_it_cannot_do():
    """Without weights the table is the default 224's (14x14); "avg" pools a dynamic number of
    patch tokens (the mean of the sequence model's); feature maps, FLOPs and explain, which
    need one size, say so (count_flops counts at a given size)."""
    pooled = tiny_model(input_shape=(None, None, 3), include_top=False, pooling="avg")
    sequence = tiny_model(input_shape=(None, None, 3), include_top=False)
    sequence.set_weights(pooled.get_weights())
    assert tuple(pooled.get_layer("pos_embed").pos_embed.shape) == (1, 197, 64)
    assert pooled.output_shape == (None, 64) and sequence.output_shape == (None, None, 64)
    images = np.random.default_rng(2).uniform(0, 255, (2, 32, 48, 3)).astype("float32")
    tokens = np.asarray(sequence(images))
    assert tokens.shape == (2, 1 + 2 * 3, 64)
    np.testing.assert_allclose(np.asarray(pooled(images)), tokens[:, 1:].mean(1), atol=1e-5)
    with pytest.raises(ValueError, match=r"fixed image size.*input_shape=\(h, w, 3\)"):
        keras_t2t.feature_maps_model(pooled)
    with pytest.raises(ValueError, match="any size: pass the `image_size`"):
        keras_t2t.count_flops(pooled)
    fixed = tiny_model(input_shape=(64, 64, 3), include_top=False, pooling="avg")
    assert keras_t2t.count_flops(pooled, image_size=64) == keras_t2t.count_flops(fixed)
    from keras_t2t import explain

    with pytest.raises(ValueError, match="square images of a fixed size.*takes any size"):
        explain.attention_maps(pooled, images)


def _fit_steps(model, steps=3, jit_compile=False):
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        jit_compile=jit_compile,
    )
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 255, (8 * steps, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 8 * steps)
    return model.fit(x, y, batch_size=8, epochs=1, verbose=0).history["loss"]


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_mixed_precision_trains_without_nan(policy, tokens_type):
    keras.mixed_precision.set_global_policy(policy)
    model = tiny_model(tokens_type, input_shape=(32, 32, 3), drop_path_rate=0.1)
    assert model.get_layer("blocks_0").compute_dtype == policy.split("_")[1]
    assert model.output.dtype == "float32"
    losses = _fit_steps(model)
    assert np.all(np.isfinite(losses))
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.slow
@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_xla_forward_and_train_step(tokens_type):
    model = tiny_model(tokens_type, input_shape=(32, 32, 3), drop_path_rate=0.1, dropout_rate=0.1)
    x = np.random.default_rng(6).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    forward = tf.function(lambda t: model(t, training=False), jit_compile=True)
    np.testing.assert_allclose(np.asarray(forward(x)), np.asarray(model(x)), atol=1e-5)
    if tokens_type == "performer":
        return  # it trains under XLA in the trainer's tests (two_checkpoints: a performer)
    losses = _fit_steps(model, jit_compile=True)
    assert np.all(np.isfinite(losses))


def _fpn_segmenter(pyramid, classes, width=32):
    """The FPN head of docs/explainability.md: laterals 1x1, top-down upsampling, logits at
    full size."""
    inputs = keras.Input(pyramid.input.shape[1:])
    levels = pyramid(inputs)
    x = keras.layers.Conv2D(width, 1)(levels["P5"])
    for name in ("P4", "P3", "P2"):
        x = keras.layers.UpSampling2D(2)(x) + keras.layers.Conv2D(width, 1)(levels[name])
    x = keras.layers.Conv2D(classes, 3, padding="same")(x)
    return keras.Model(inputs, keras.layers.UpSampling2D(4, interpolation="bilinear")(x))


def test_pyramid_model_feeds_an_fpn_segmentation_head():
    # The official T2T module (64 channels) and a small trunk of width 128 (T2T-ViT-7's is
    # 256), so that each level's channels tell which maps it comes from.
    backbone = keras_t2t.T2TViT(
        embed_dim=128,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        include_top=False,
        input_shape=(64, 64, 3),
    )
    pyramid = keras_t2t.pyramid_model(backbone)
    shapes = {k: tuple(v.shape[1:]) for k, v in pyramid.output.items()}
    assert shapes == {"P2": (16, 16, 64), "P3": (8, 8, 64), "P4": (4, 4, 128), "P5": (2, 2, 128)}
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    levels = pyramid(images)
    maps = keras_t2t.feature_maps_model(backbone)(images)
    np.testing.assert_allclose(levels["P4"], maps["tokens"], atol=1e-6)
    np.testing.assert_allclose(levels["P5"][:, 0, 0], np.max(maps["tokens"][:, :2, :2], (1, 2)))
    # A segmentation head on the pyramid trains: the mask of the bright square.
    segmenter = _fpn_segmenter(pyramid, 2)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 100, (16, 64, 64, 3)).astype("float32")
    masks = np.zeros((16, 64, 64), "int32")
    for i, (top, left) in enumerate(rng.integers(0, 40, (16, 2))):
        images[i, top : top + 24, left : left + 24] += 150
        masks[i, top : top + 24, left : left + 24] = 1
    segmenter.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = segmenter.fit(images, masks, batch_size=8, epochs=6, verbose=0).history["loss"]
    assert segmenter.output_shape == (None, 64, 64, 2)
    assert history[-1] < 0.7 * history[0], history


def test_the_command_line_model(tmp_path):
    """The one function behind --model/--weights/--num_heads of the export, evaluate and
    explain commands: official checkpoints name their variant, other files need --model, and
    a file without a head is refused (its classifier would answer at random)."""
    from keras_t2t.models import model_for_command_line

    checkpoint = str(pathlib.Path(__file__).parents[1] / "data" / "t2t_tiny_performer.pth.tar")
    with pytest.raises(ValueError, match="matches no official variant"):
        model_for_command_line(weights=checkpoint)
    model = model_for_command_line(weights=checkpoint, num_heads=2, classifier_activation=None)
    assert model.output_shape == (None, 10) and model.input_shape == (None, 64, 64, 3)
    headed, headless = str(tmp_path / "headed.weights.h5"), str(tmp_path / "headless.weights.h5")
    tiny_model().save_weights(headed)
    tiny_model(include_top=False).save_weights(headless)
    for kwargs, message in (
        (dict(), "does not say its variant"),
        (dict(model="t2t_vit_7", num_heads=2), "leave --num_heads out"),
    ):
        with pytest.raises(ValueError, match=message):
            model_for_command_line(weights=headed, **kwargs)
    with pytest.raises(ValueError, match="has no classification head"):
        model_for_command_line(model="t2t_vit_7", weights=headless)
    with pytest.raises(ValueError, match="needs --model"):
        model_for_command_line(weights="imagenet")
