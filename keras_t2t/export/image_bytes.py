"""Image files sent to `serving_bytes`, read safely: the header is checked (format, declared
pixels) in stock TF ops before anything is decoded, then the image is decoded and
preprocessed as the official evaluation."""

import functools
import re

import tensorflow as tf

from keras_t2t import layers as t2t_layers
from keras_t2t.imagenet import CROP_PCT, decode_rgb, resize_and_center_crop

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # about 16 megapixels
IMAGE_FORMATS = "JPEG, PNG, GIF, BMP or WebP"
_HEADER_BYTES = 32
# A GIF is read block by block (`_read_gif`): each step reads an extension's or a frame's
# header (or neither), then a run of up to _GIF_RUN data sub-blocks of one length (encoders
# write 255-byte ones), one more, and the terminator if it follows: about two steps a frame.
# A GIF that needs more steps is refused (a step takes tens of microseconds).
GIF_MAX_STEPS = 1 << 13
_GIF_RUN = 1024
# code, width, height and flags of a frame descriptor, from its first 10 bytes
_GIF_DESCRIPTOR = [
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 256, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 1, 256, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
]


def _read_gif(data):
    """(pixels of all the frames, the file cut after its first frame, whether it was read to
    its end within GIF_MAX_STEPS steps) of a GIF file, in stock TF ops.

    TensorFlow's GIF decoder sizes its output by the largest frame descriptor (not the logical
    screen) and decodes every frame, even with `expand_animations=False`; so the descriptors of
    all the frames are summed, and the decoder is given the first frame only (closed with a
    trailer), the one it returns. Only the bytes read here reach the decoder.
    """
    size = tf.strings.length(data)
    raw = tf.io.decode_raw(tf.strings.join([data, b"\0" * 16]), tf.uint8)

    def byte(position):
        return tf.cast(raw[tf.minimum(position, size)], tf.int32)  # 0 past the end

    def color_table(flags):  # bytes of the color table that a descriptor's flags announce
        return tf.where(flags >= 128, 3 * tf.bitwise.left_shift(2, flags % 8), 0)

    def step(position, in_data, in_frame, pixels, first_end, steps, stopped):
        head = tf.cast(raw[position : position + 10], tf.int32)
        code, width, height, flags = tf.unstack(tf.linalg.matvec(_GIF_DESCRIPTOR, head))
        # Outside data: an extension (0x21, label, data) or a frame (0x2C, descriptor, color
        # table, LZW code size, data); any other byte (0x3B: the trailer) ends the file, and so
        # does an extension without data: giflib reads the sub-blocks after its terminator too.
        is_extension = ~in_data & (code == 0x21) & (head[2] != 0)
        is_frame = ~in_data & (code == 0x2C)
        stops = ~in_data & ~is_extension & ~is_frame
        header = tf.where(is_extension, 2, 11 + color_table(flags))
        start = position + tf.where(in_data, 0, header)
        # Data: sub-blocks (a length byte, that many bytes) up to a 0 length byte. Reads the
        # run of sub-blocks of the first one's length, one more sub-block (an encoder's last
        # one is shorter), and the terminator if it follows.
        length = byte(start)
        stride = length + 1
        run = tf.cast(raw[start : start + stride * _GIF_RUN : stride] == raw[start], tf.int32)
        rest = start + tf.where(length == 0, 0, stride * tf.reduce_sum(tf.math.cumprod(run)))
        last = rest + byte(rest) + 1
        ends = (byte(rest) == 0) | (byte(last) == 0)
        after = tf.where(byte(rest) == 0, rest + 1, tf.where(byte(last) == 0, last + 1, last))
        in_frame = is_frame | (in_frame & in_data)
        frame_ends = in_frame & ends & (first_end < 0)
        frame_pixels = tf.cast(width, tf.int64) * tf.cast(height, tf.int64)
        return (
            tf.where(stops, position, after),
            ~stops & ~ends,
            in_frame,
            pixels + tf.where(is_frame, frame_pixels, tf.constant(0, tf.int64)),
            tf.where(frame_ends, after, first_end),
            steps + 1,
            stops,
        )

    def more(position, in_data, in_frame, pixels, first_end, steps, stopped):
        return ~stopped & (position < size) & (steps < GIF_MAX_STEPS)

    start = 13 + color_table(byte(10))  # after the header, screen descriptor and color table
    no, zero = tf.constant(False), tf.constant(0)
    position, _, _, pixels, first_end, _, stopped = tf.while_loop(
        more, step, (start, no, no, tf.constant(0, tf.int64), zero - 1, zero, no)
    )
    cut = tf.minimum(tf.where(first_end >= 0, first_end, position), size)
    first_frame = tf.strings.join([tf.strings.substr(data, 0, cut), b";"])
    return pixels, first_frame, stopped | (position >= size)


def declared_pixels(data):
    """Width x height that an image file declares in its header, int64; -1 for another format.

    Reads the header only (JPEG: its frame header; GIF: its block structure, for the
    descriptors of all its frames, summed), in stock TF ops, so that a huge image can be
    refused before it is decoded. Formats: JPEG, PNG, GIF, BMP, WebP (VP8, VP8L, VP8X), those that
    `tf.io.decode_image` reads.
    """
    return _declared(data)[0]


def _declared(data):
    """(`declared_pixels(data)`, the bytes to decode: a GIF's first frame only, whether the
    file was read far enough to tell: False for a GIF of more than GIF_MAX_STEPS blocks)."""
    padded = tf.strings.join([data, b"\0" * _HEADER_BYTES])
    head = tf.io.decode_raw(tf.strings.substr(padded, 0, _HEADER_BYTES), tf.uint8)
    head = tf.cast(head, tf.int64)

    def little(offset, count):
        return sum(head[offset + i] * (1 << (8 * i)) for i in range(count))

    def big(offset, count):
        return sum(head[offset + i] * (1 << (8 * (count - 1 - i))) for i in range(count))

    def starts(offset, signature):
        return tf.reduce_all(tf.equal(head[offset : offset + len(signature)], list(signature)))

    def signed32(value):
        return tf.abs(tf.where(value >= 1 << 31, value - (1 << 32), value))

    vp8l = little(21, 4)
    candidates = [  # (is this format, its declared pixels)
        (starts(0, b"\x89PNG\r\n\x1a\n"), big(16, 4) * big(20, 4)),
        (starts(0, b"BM"), signed32(little(18, 4)) * signed32(little(22, 4))),
        (
            starts(0, b"RIFF") & starts(8, b"WEBPVP8X"),
            (little(24, 3) + 1) * (little(27, 3) + 1),
        ),
        (
            starts(0, b"RIFF") & starts(8, b"WEBPVP8L"),
            (vp8l % (1 << 14) + 1) * ((vp8l // (1 << 14)) % (1 << 14) + 1),
        ),
        (
            starts(0, b"RIFF") & starts(8, b"WEBPVP8 "),
            (little(26, 2) % (1 << 14)) * (little(28, 2) % (1 << 14)),
        ),
    ]
    pixels = tf.constant(-1, tf.int64)
    for is_format, count in reversed(candidates):
        pixels = tf.where(is_format, count, pixels)

    def jpeg():
        shape = tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64)
        return tf.reduce_prod(shape), data, tf.constant(True)

    return tf.cond(
        starts(0, b"\xff\xd8\xff"),
        jpeg,
        lambda: tf.cond(
            starts(0, b"GIF8"), lambda: _read_gif(data), lambda: (pixels, data, tf.constant(True))
        ),
    )


def decode_images(image_bytes, size, crop_pct=0.9, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """string `[batch]` of image files -> float32 `[batch, size, size, 3]` in [0, 255].

    Each file's header is read first: a format other than JPEG, PNG, GIF, BMP and WebP, or an
    image of more than `max_pixels` pixels (a GIF: all its frames together), is refused
    (InvalidArgument) before decoding, so a small file that declares a huge image cannot take
    the server's memory. A GIF is decoded from its first frame only.
    """

    def one(data):
        pixels, data, read = _declared(data)
        checks = [
            tf.debugging.Assert(
                pixels >= 0, [f"Unknown image file format: send {IMAGE_FORMATS} files."]
            ),
            tf.debugging.Assert(
                read,
                [
                    f"The GIF has too many blocks to read (more than {GIF_MAX_STEPS} steps: "
                    "about two a frame, more for data sub-blocks of unusual lengths). Send a "
                    "still image, or an animation of fewer frames."
                ],
            ),
            tf.debugging.Assert(
                pixels <= max_pixels,
                [
                    "The image is too large: its header declares",
                    pixels,
                    f"pixels (a GIF: all its frames together), more than the limit of "
                    f"{max_pixels} (max_image_pixels). Resize it first.",
                ],
            ),
        ]
        with tf.control_dependencies(checks):
            data = tf.identity(data)
        return resize_and_center_crop(decode_rgb(data), size, crop_pct)

    return tf.map_fn(
        one, image_bytes, fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32)
    )


@functools.cache
def _file_decoder(size, crop_pct, max_pixels):
    return tf.function(
        lambda data: decode_images(data[None], size, crop_pct, max_pixels)[0],
        input_signature=[tf.TensorSpec([], tf.string)],
    )


def decode_image_file(data, size, crop_pct=CROP_PCT, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """One image file's bytes -> float32 `[size, size, 3]` in [0, 255], checked and decoded as
    `serving_bytes` does (`decode_images`, in a graph also when called eagerly). Raises a
    ValueError that says why for a file it refuses or cannot decode."""
    try:
        return _file_decoder(size, float(crop_pct), max_pixels)(data)
    except tf.errors.InvalidArgumentError as error:
        raise ValueError(op_error_reason(error)) from None


def op_error_reason(error):
    """The first line of a TF op error's message, without the names of graph nodes and of the
    op (`[Op:DecodeImage]`); an assertion's data joined into one sentence."""
    lines = [line.strip() for line in re.sub(r"\{\{[^}]*\}\}", "", error.message).splitlines()]
    lines = [line for line in lines if line]
    # An assertion's own line, where it is not the first ("Graph execution error:" is).
    text = next((line for line in lines if line.startswith("assertion failed:")), lines[0])
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
    if text.startswith("assertion failed:"):
        text = " ".join(re.findall(r"\[([^\[\]]*)\]", text))
    return text


def check_max_image_pixels(max_image_pixels):
    """`max_image_pixels`, checked: a positive integer."""
    return t2t_layers._check_int("max_image_pixels", max_image_pixels)
