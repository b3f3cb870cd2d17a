"""How a run stops, and what it says: `TrainingError` (a message the user can act on),
`Preempted` (after SIGTERM), and the detection and one-line messages of the errors that the
input pipeline and the disk raise.

Sections: the exceptions -> errors of the input pipeline -> a full disk.
"""

import errno
import logging
import re

import tensorflow as tf

from training import data as data_lib

logger = logging.getLogger("keras_t2t.training")


# --- the exceptions -------------------------------------------------------------------------


class TrainingError(RuntimeError):
    """A run stopped for a reason the user can act on; the message says which."""


class Preempted(Exception):
    """Raised after SIGTERM, once the checkpoint is saved."""

    def __init__(self, step):
        super().__init__(
            f"stopped by SIGTERM at step {step}; a checkpoint was saved, run the "
            f"same command again to resume."
        )
        self.step = step


def first_line(error):
    """The first line of an error's message (at most 300 characters), or its type's name."""
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0][:300]


# --- errors of the input pipeline -----------------------------------------------------------

# Where TF says an error came from the input pipeline: the iterator op of the step, or the
# tf.data iterator chain ("Iterator::Root::Prefetch::...").
_INPUT_PIPELINE_MARKERS = ("IteratorGetNext", "Iterator::", "MultiDeviceIterator")


def is_data_error(error):
    """Whether an error raised by a step comes from reading, parsing or decoding the data.

    Only those become "Bad data" messages; anything else (an XLA or TPU compilation failure,
    a shape error in the model) keeps its own type, message and traceback.
    """
    if isinstance(error, tf.errors.DataLossError):
        return True
    text = getattr(error, "message", None) or str(error)
    return any(marker in text for marker in _INPUT_PIPELINE_MARKERS)


# What TF puts around an op's own words: "Graph execution error:", the node's trace, the
# names of graph nodes ({{function_node ...}}, [[{{node ...}}]]) and the op ([Op:...]).
_NOISE_LINES = ("Graph execution error", "Detected at node", "<stack traces", "[[", "File ", "}}")
_NODE_NAMES = re.compile(r"\{\{[^}]*\}\}|\s*\[\[[^\]]*\]\]|\s*\[Op:[^\]]*\].*$")


def _error_detail(error):
    """The op's own words in a TF error's message (its first line that is not noise)."""
    text = getattr(error, "message", None) or str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    detail = next((line for line in lines if not line.startswith(_NOISE_LINES)), lines[0])
    return _NODE_NAMES.sub("", detail).strip()[:300]


def data_error_message(error):
    """The "Bad data: ..." message of a data error (`is_data_error`) that is not a missing
    file (`DATA_READ_ERRORS`): a label out of range, or a record that cannot be decoded."""
    text = getattr(error, "message", str(error))
    if "label out of range" in text:
        # The assertion's message, without the brackets and the values TF prints after it
        # ("] [Condition x < y did not hold element-wise:] [x (sub:0) = ] [2] ..."), nor the
        # escaped quote of its summary.
        detail = text[text.index("label out of range") :].split("\n")[0].split("]")[0]
        detail = detail.replace("\\'", "'").rstrip(" .")
        return f"Bad data: {detail}."
    return (
        f"Bad data: a record could not be read or decoded ({type(error).__name__}: "
        f"{_error_detail(error)}). The TFRecords are corrupt or not in the ImageNet "
        f"layout (image/encoded JPEG, image/class/label); rewrite them with "
        f"training/build_tfrecords.py. Checkpoints already saved are kept."
    )


# What the input pipeline raises for a file that is gone or cannot be opened, not for its
# bytes: a shard deleted, moved or made unreadable after the files were checked.
DATA_READ_ERRORS = (tf.errors.NotFoundError, tf.errors.PermissionDeniedError)
# Every error of the input pipeline that becomes a one-line message (see `is_data_error`).
DATA_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError, *DATA_READ_ERRORS)


def unreadable_data_message(error, split, then):
    """The message for a TFRecord shard that could not be opened in the middle of a pass
    (`DATA_READ_ERRORS`); `then` says what is kept and how to go on."""
    how = "deleted or moved" if isinstance(error, tf.errors.NotFoundError) else "made unreadable"
    return (
        f"Cannot read the {split} TFRecords: {_error_detail(error)} ({type(error).__name__}). "
        f"A shard was {how} after the files were checked at the start. {then}"
    )


def input_pipeline_error(error, split, shards, latest):
    """The TrainingError of a run for an error of its input pipeline (`DATA_ERRORS`): a shard
    that cannot be opened any more, or bad data, with the bad record named where `shards`
    (`{shard: records}` of `split`, or None) let it be found. `latest`: the newest checkpoint,
    which is kept."""
    if isinstance(error, DATA_READ_ERRORS):
        kept = (
            f"The last checkpoint, {latest}, is kept"
            if latest
            else "No checkpoint had been saved yet"
        )
        then = (
            f"{kept}: put the shard back (or rebuild the TFRecords with "
            f"training/build_tfrecords.py), then run the same command again to "
            f"{'resume' if latest else 'start again'}."
        )
        return TrainingError(unreadable_data_message(error, split, then))
    message = data_error_message(error)
    if shards and "label out of range" not in message:
        logger.info("Looking for the bad %s record (at most 5 minutes)...", split)
        found = data_lib.find_bad_record(list(shards), shards)
        if found:
            shard, index, filename, problem = found
            named = f" (image/filename {filename!r})" if filename else ""
            message += (
                f" The bad record: number {index} of {shard}{named}, which {problem}. "
                f"Replace it, or pass --skip_bad_records to skip such records."
            )
    return TrainingError(message)


# --- a full disk ----------------------------------------------------------------------------

# A full disk: ENOSPC or EDQUOT, as TF, h5py and Python word it.
_DISK_FULL_TEXT = re.compile(r"no space left on device|disk quota exceeded", re.IGNORECASE)


def is_disk_full(error):
    """Whether `error` says that the disk (or the quota) is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = getattr(error, "message", None) or str(error)
    return bool(_DISK_FULL_TEXT.search(text))
