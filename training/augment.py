"""Per-image training augmentation of the official recipe, on tf.data, stateless.

- `RandAugment`: timm's `rand-m9-mstd0.5-inc1` (the T2T-ViT and DeiT default). Each of the
  `num_ops` slots picks one of the 15 "increasing" ops, applies it with probability 0.5 at a
  magnitude drawn per application from N(9, 0.5) clipped to [0, 10], and runs only that op
  (`tf.switch_case`). Keras core's RandAugment computes all of its ops for every slot and
  keeps one (22 full-image transforms per image, 8x slower input) and has no magnitude std.
- `random_erasing`: timm's RandomErasing (mode "pixel", one box): a box of 2% to 1/3 of the
  image, aspect ratio in [0.3, 3.3], filled with per-pixel normal noise of the normalized
  image. Keras core's layer fills with N(0, 1) * 255 clipped to [0, 255] instead.

Every random draw takes its randomness from a per-image seed (`tf.random.stateless_*`), so
the output depends only on the seed and the image: reproducible whatever the order in which
a parallel `map` runs its calls (stateful random ops are not).

Images are float32 RGB holding integer values in [0, 255], as the PIL images that timm
transforms; each op rounds its result as PIL does.
"""

import math

import tensorflow as tf

from keras_t2t.imagenet import IMAGENET_MEAN, IMAGENET_STD

# timm's fill colour for geometric ops: the ImageNet mean as uint8 (its `img_mean`).
FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)
MAX_LEVEL = 10.0


def _split(seed, count):
    return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def _uniform(seed, low=0.0, high=1.0, shape=()):
    return tf.random.stateless_uniform(shape, seed, low, high)


def _sign(seed):
    """+1 or -1 with equal probability (timm's `_randomly_negate`)."""
    return tf.where(_uniform(seed) > 0.5, -1.0, 1.0)


def _blend(degenerate, image, factor):
    """PIL's `ImageEnhance` blend: degenerate + factor * (image - degenerate), truncated."""
    return tf.floor(tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0))


def _grayscale(image):
    """PIL's RGB -> L conversion (ITU-R 601-2 luma, rounded), as float."""
    r, g, b = tf.unstack(image, axis=-1)
    return tf.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)


def _lookup(image, tables):
    """Applies a per-channel 256-entry table (3, 256) to integer-valued pixels."""
    index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512])
    return tf.gather(tf.reshape(tables, [-1]), index)


def _affine(image, transform, fill=FILL):
    """Output pixel (x, y) <- input (a0 x + a1 y + a2, b0 x + b1 y + b2), bilinear; outside
    the image, `fill` (per channel)."""
    fill = tf.constant(fill, tf.float32)
    transform = tf.concat([tf.cast(transform, tf.float32), tf.zeros(2)], axis=0)[None]
    shape = tf.shape(image)[:2]
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=(image - fill)[None],
        transforms=transform,
        output_shape=shape,
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    return tf.round(tf.clip_by_value(moved + fill, 0.0, 255.0))


# --- the ops: f(image, level in [0, 10], sign seed) -------------------------------------------


def auto_contrast(image, level, seed):
    del level, seed
    low = tf.reduce_min(image, axis=[0, 1])
    high = tf.reduce_max(image, axis=[0, 1])
    scale = 255.0 / tf.maximum(high - low, 1.0)
    stretched = tf.clip_by_value(tf.floor((image - low) * scale), 0.0, 255.0)
    return tf.where(high > low, stretched, image)


def equalize(image, level, seed):
    """PIL's `ImageOps.equalize`, per channel."""
    del level, seed
    index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512])
    histogram = tf.reshape(tf.math.bincount(tf.reshape(index, [-1]), minlength=768), (3, 256))
    histogram = tf.cast(histogram, tf.float32)
    # step = (pixels - the count of the last non-empty bin) // 255
    last = tf.reduce_max(tf.where(histogram > 0, tf.range(256.0), -1.0), axis=1, keepdims=True)
    last_count = tf.reduce_sum(tf.where(tf.range(256.0) == last, histogram, 0.0), axis=1)
    step = tf.floor((tf.reduce_sum(histogram, axis=1) - last_count) / 255.0)[:, None]
    before = tf.cumsum(histogram, axis=1, exclusive=True)
    tables = tf.minimum(tf.floor((tf.floor(step / 2.0) + before) / tf.maximum(step, 1.0)), 255.0)
    tables = tf.where(step > 0, tables, tf.range(256.0))
    return _lookup(image, tables)


def invert(image, level, seed):
    del level, seed
    return 255.0 - image


def rotate(image, level, seed):
    """PIL's `rotate` (counter-clockwise about the centre) by up to +-30 degrees."""
    degrees = level / MAX_LEVEL * 30.0 * _sign(seed)
    angle = degrees * math.pi / 180.0
    height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    # PIL's inverse map: input = R (output - centre) + centre, with y pointing down.
    return _affine(image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])


def posterize(image, level, seed):
    """Keeps 4 down to 0 most significant bits (timm's PosterizeIncreasing)."""
    del seed
    bits = 4 - tf.cast(tf.floor(level / MAX_LEVEL * 4.0), tf.int32)
    shift = tf.cast(8 - bits, tf.float32)
    return tf.floor(image / 2.0**shift) * 2.0**shift


def solarize(image, level, seed):
    """Inverts the pixels at or above 256 - level/10 * 256 (timm's SolarizeIncreasing)."""
    del seed
    threshold = 256.0 - tf.floor(level / MAX_LEVEL * 256.0)
    return tf.where(image >= threshold, 255.0 - image, image)


def solarize_add(image, level, seed):
    del seed
    add = tf.floor(level / MAX_LEVEL * 110.0)
    return tf.where(image < 128.0, tf.minimum(image + add, 255.0), image)


def _enhance_factor(level, seed):
    """timm's `_enhance_increasing_level_to_arg`: 1 +- level/10 * 0.9, at least 0.1."""
    return tf.maximum(0.1, 1.0 + _sign(seed) * level / MAX_LEVEL * 0.9)


def color(image, level, seed):
    gray = _grayscale(image)[..., None]
    return _blend(tf.broadcast_to(gray, tf.shape(image)), image, _enhance_factor(level, seed))


def contrast(image, level, seed):
    mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
    return _blend(tf.fill(tf.shape(image), mean), image, _enhance_factor(level, seed))


def brightness(image, level, seed):
    return _blend(tf.zeros_like(image), image, _enhance_factor(level, seed))


def sharpness(image, level, seed):
    """Blend with PIL's SMOOTH filter (3x3: 1 1 1 / 1 5 1 / 1 1 1, / 13), border kept."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.round(tf.clip_by_value(smooth, 0.0, 255.0))
    interior = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
    return _blend(degenerate, image, _enhance_factor(level, seed))


def shear_x(image, level, seed):
    factor = level / MAX_LEVEL * 0.3 * _sign(seed)
    return _affine(image, [1.0, factor, 0.5 * factor, 0.0, 1.0, 0.0])


def shear_y(image, level, seed):
    factor = level / MAX_LEVEL * 0.3 * _sign(seed)
    return _affine(image, [1.0, 0.0, 0.0, factor, 1.0, 0.5 * factor])


def translate_x(image, level, seed):
    pixels = level / MAX_LEVEL * 0.45 * _sign(seed) * tf.cast(tf.shape(image)[1], tf.float32)
    return _affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0])


def translate_y(image, level, seed):
    pixels = level / MAX_LEVEL * 0.45 * _sign(seed) * tf.cast(tf.shape(image)[0], tf.float32)
    return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels])


# timm's _RAND_INCREASING_TRANSFORMS, in its order.
OPS = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "PosterizeIncreasing": posterize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "ColorIncreasing": color,
    "ContrastIncreasing": contrast,
    "BrightnessIncreasing": brightness,
    "SharpnessIncreasing": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x,
    "TranslateYRel": translate_y,
}


class RandAugment:
    """timm's RandAugment (`rand-m{magnitude}-mstd{magnitude_std}-inc1`), one image at a time.

    `num_ops` slots; each picks an op uniformly (with replacement), applies it with
    probability `prob`, at a magnitude from N(magnitude, magnitude_std) clipped to [0, 10].
    """

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, ops=None):
        self.num_ops = int(num_ops)
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.prob = float(prob)
        self.names = list(ops or OPS)
        unknown = [name for name in self.names if name not in OPS]
        if unknown:
            raise ValueError(f"Unknown RandAugment ops {unknown}; known: {list(OPS)}.")
        if not 0 <= self.magnitude <= MAX_LEVEL:
            raise ValueError(f"The RandAugment magnitude must be in [0, 10], got {magnitude}.")

    def __call__(self, image, seed):
        """`image`: (H, W, 3) float32 with integer values in [0, 255]; `seed`: shape (2,)."""
        shape = image.shape
        for slot_seed in _split(seed, self.num_ops):
            choice, apply, level, sign = _split(slot_seed, 4)
            index = tf.random.stateless_uniform((), choice, 0, len(self.names), tf.int32)
            level = self.magnitude + self.magnitude_std * tf.random.stateless_normal((), level)
            level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
            image = tf.ensure_shape(self._slot(image, apply, index, level, sign), shape)
        return image

    def _slot(self, image, apply, index, level, sign):
        """Only the chosen op runs, and only when the slot applies."""
        branches = [lambda op=OPS[name]: op(image, level, sign) for name in self.names]
        return tf.cond(
            _uniform(apply) < self.prob,
            lambda: tf.switch_case(index, branches),
            lambda: image,
        )


def random_erasing(image, seed, probability=0.25, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """timm's RandomErasing (mode "pixel", count 1, area 0.02-1/3, log-uniform aspect ratio in
    [0.3, 1/0.3], up to 10 attempts), in pixel units: the noise is `N(0, 1)` of the
    normalized image, i.e. `255 * (mean + std * N(0, 1))` per channel, not clipped."""
    apply, area_seed, ratio_seed, top_seed, left_seed, noise_seed = _split(seed, 6)
    height, width = image.shape[0], image.shape[1]
    area = _uniform(area_seed, 0.02, 1.0 / 3.0, (10,)) * float(height * width)
    ratio = tf.exp(_uniform(ratio_seed, math.log(0.3), math.log(1.0 / 0.3), (10,)))
    h = tf.round(tf.sqrt(area * ratio))
    w = tf.round(tf.sqrt(area / ratio))
    fits = (w < width) & (h < height)
    first = tf.argmax(tf.cast(fits, tf.int32))  # the first attempt that fits
    h, w = tf.gather(h, first), tf.gather(w, first)
    top = tf.floor(_uniform(top_seed) * (height - h + 1.0))
    left = tf.floor(_uniform(left_seed) * (width - w + 1.0))
    rows = tf.range(float(height))[:, None, None]
    cols = tf.range(float(width))[None, :, None]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)

    def erase():  # the noise is drawn only for the images erased (a quarter of them)
        noise = tf.random.stateless_normal(image.shape, noise_seed)
        return tf.where(inside, 255.0 * (tf.constant(mean) + tf.constant(std) * noise), image)

    return tf.cond(tf.reduce_any(fits) & (_uniform(apply) < probability), erase, lambda: image)
