"""The per-image augmentation (training/augment.py) against its reference, PIL as timm
calls it, and the stateless pipeline's properties."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from keras_t2t.imagenet import IMAGENET_MEAN, IMAGENET_STD
from training import augment, build_tfrecords, data

LEVEL = 9.0
FILL = (124, 116, 104)  # timm's img_mean for ImageNet


@pytest.fixture(scope="module")
def picture():
    """A smooth 64x48 RGB picture (an 8x8 random image, upsampled), as uint8."""
    small = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((64, 48), Image.BICUBIC))


def _seed_with_sign(sign):
    for i in range(100):
        seed = tf.constant([i, 0], tf.int64)
        if float(augment._sign(seed)) == sign:
            return seed
    raise AssertionError("no seed")


def _pil_reference(name, pil):
    """timm's op at magnitude 9 (positive direction), on a PIL image."""
    factor = 1 + LEVEL / 10 * 0.9
    affine = dict(resample=Image.BILINEAR, fillcolor=FILL)
    width, height = pil.size
    return {
        "AutoContrast": lambda: ImageOps.autocontrast(pil),
        "Equalize": lambda: ImageOps.equalize(pil),
        "Invert": lambda: ImageOps.invert(pil),
        "PosterizeIncreasing": lambda: ImageOps.posterize(pil, 4 - int(LEVEL / 10 * 4)),
        "SolarizeIncreasing": lambda: ImageOps.solarize(pil, 256 - int(LEVEL / 10 * 256)),
        "SolarizeAdd": lambda: pil.point(
            [min(255, i + int(LEVEL / 10 * 110)) if i < 128 else i for i in range(256)] * 3
        ),
        "ColorIncreasing": lambda: ImageEnhance.Color(pil).enhance(factor),
        "ContrastIncreasing": lambda: ImageEnhance.Contrast(pil).enhance(factor),
        "BrightnessIncreasing": lambda: ImageEnhance.Brightness(pil).enhance(factor),
        "SharpnessIncreasing": lambda: ImageEnhance.Sharpness(pil).enhance(factor),
        "Rotate": lambda: pil.rotate(LEVEL / 10 * 30, **affine),
        "ShearX": lambda: pil.transform(
            pil.size, Image.AFFINE, (1, LEVEL / 10 * 0.3, 0, 0, 1, 0), **affine
        ),
        "ShearY": lambda: pil.transform(
            pil.size, Image.AFFINE, (1, 0, 0, LEVEL / 10 * 0.3, 1, 0), **affine
        ),
        "TranslateXRel": lambda: pil.transform(
            pil.size, Image.AFFINE, (1, 0, LEVEL / 10 * 0.45 * width, 0, 1, 0), **affine
        ),
        "TranslateYRel": lambda: pil.transform(
            pil.size, Image.AFFINE, (1, 0, 0, 0, 1, LEVEL / 10 * 0.45 * height), **affine
        ),
    }[name]()


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.mark.parametrize("name", list(augment.OPS))
def test_each_op_is_timms_pil_op(picture, name):
    ours = augment.OPS[name](tf.constant(picture, tf.float32), LEVEL, _seed_with_sign(1.0))
    reference = np.asarray(_pil_reference(name, Image.fromarray(picture)), np.float64)
    difference = np.abs(ours.numpy() - reference)
    if name in GEOMETRIC:
        # Bilinear in both; they differ only in how a sample half a pixel past the border
        # mixes in the fill colour.
        assert difference.mean() < 1.5 and (difference > 1).mean() < 0.05, name
    else:
        np.testing.assert_array_equal(ours.numpy(), reference)


def test_randaugment_runs_the_chosen_op_reproducibly(picture):
    image = tf.constant(picture, tf.float32)
    only_invert = augment.RandAugment(num_ops=1, prob=1.0, ops=["Invert"])
    np.testing.assert_array_equal(only_invert(image, tf.constant([1, 2], tf.int64)), 255 - picture)
    never = augment.RandAugment(num_ops=2, prob=0.0)
    np.testing.assert_array_equal(never(image, tf.constant([1, 2], tf.int64)), picture)
    full = augment.RandAugment()  # rand-m9-mstd0.5-inc1
    outputs = [full(image, tf.constant([s, 0], tf.int64)).numpy() for s in range(12)]
    np.testing.assert_array_equal(outputs[3], full(image, tf.constant([3, 0], tf.int64)))
    changed = [not np.array_equal(o, picture) for o in outputs]
    # Each slot applies with probability 0.5: about 3 in 4 images change.
    assert 4 <= sum(changed) <= 12
    for output in outputs:
        assert output.min() >= 0 and output.max() <= 255
        np.testing.assert_array_equal(output, np.round(output))
    with pytest.raises(ValueError, match="magnitude must be in"):
        augment.RandAugment(magnitude=11)


def test_random_erasing_is_timms_pixel_mode():
    image = tf.fill((40, 48, 3), 7.0)
    seeds = [tf.constant([s, 1], tf.int64) for s in range(400)]
    erased = [augment.random_erasing(image, seed, 0.25) for seed in seeds]
    masks = [np.any(e.numpy() != 7.0, axis=-1) for e in erased]
    hit = [m for m in masks if m.any()]
    assert 0.18 < len(hit) / len(masks) < 0.32  # probability 0.25
    for mask in hit:  # one axis-aligned box of 2% to 1/3 of the image
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert mask.sum() == box and 0.02 * 40 * 48 - 40 <= box <= 40 * 48 / 3 + 48
    noise = np.concatenate([e.numpy()[m] for e, m in zip(erased, masks) if m.any()])
    np.testing.assert_allclose(noise.mean(0), 255 * np.array(IMAGENET_MEAN), atol=4)
    np.testing.assert_allclose(noise.std(0), 255 * np.array(IMAGENET_STD), rtol=0.05)


def test_the_jpeg_crop_decodes_only_the_crop_and_equals_the_full_decode():
    rng = np.random.default_rng(3)
    picture = np.asarray(
        Image.fromarray(rng.integers(0, 256, (12, 9, 3)).astype(np.uint8)).resize((90, 120))
    )
    encoded = tf.constant(build_tfrecords.to_jpeg(picture))
    decoded = tf.io.decode_jpeg(encoded, channels=3)
    png = tf.io.encode_png(decoded)
    for s in range(5):
        seed = tf.constant([s, 4], tf.int64)
        from_pixels = data.random_resized_crop(decoded, 32, 0.08, seed).numpy()
        np.testing.assert_array_equal(from_pixels, data.random_resized_crop(png, 32, 0.08, seed))
        # The same window; libjpeg upsamples the chroma at the window's edge from fewer
        # neighbours than in the full decode: a few levels apart there, equal elsewhere.
        difference = np.abs(data.random_resized_crop(encoded, 32, 0.08, seed) - from_pixels)
        assert difference.mean() < 0.5 and difference.max() <= 24
