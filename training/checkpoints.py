"""A run's directory: its checkpoints (listed, verified, set aside when corrupt, restored
with retries), the check that a model_dir belongs to this model, and the writes that leave
either the whole file or the previous one (a full disk becomes a TrainingError that says so).

A read error is classified before anything is changed (`classify_checkpoint_error`): only a
checkpoint proven corrupt is renamed `corrupt-*`; a storage error is tried again, then stops
the run with every file kept.

Sections: listing and verifying -> classifying read errors -> the restore loop ->
a model_dir of another run -> writing the run directory.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import time

import tensorflow as tf

from training.config import normalization
from training.errors import TrainingError, first_line, is_disk_full

logger = logging.getLogger("keras_t2t.training")

# --- listing and verifying ------------------------------------------------------------------

_CHECKPOINT_INDEX = re.compile(r"^ckpt-(\d+)\.index$")


def list_checkpoints(directory):
    """Checkpoint prefixes in `directory`, newest first: those on disk and those the state
    file names (even if their files are missing)."""
    numbers = {}
    if tf.io.gfile.isdir(directory):
        for name in tf.io.gfile.listdir(directory):
            match = _CHECKPOINT_INDEX.match(name)
            if match:
                numbers[os.path.join(directory, f"ckpt-{match.group(1)}")] = int(match.group(1))
    state = tf.train.get_checkpoint_state(directory)
    for path in getattr(state, "all_model_checkpoint_paths", []) or []:
        path = path if os.path.isabs(path) or "://" in path else os.path.join(directory, path)
        match = re.search(r"ckpt-(\d+)$", path)
        numbers.setdefault(path, int(match.group(1)) if match else -1)
    return sorted(numbers, key=numbers.get, reverse=True)


def verify_checkpoint(path):
    """Reads every tensor of checkpoint `path`; raises what a truncated or altered file gives."""
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
        reader.get_tensor(name)


def quarantine_checkpoint(path):
    """Renames the files of checkpoint `path` to `corrupt-<name>.*` (never deletes them)."""
    folder, name = os.path.split(path)
    for file in tf.io.gfile.glob(path + ".*"):
        suffix = os.path.basename(file)[len(name) :]
        tf.io.gfile.rename(file, os.path.join(folder, f"corrupt-{name}{suffix}"), overwrite=True)
    return os.path.join(folder, f"corrupt-{name}.*")


def rewrite_checkpoint_state(directory, latest):
    """Makes the `checkpoint` state file list the readable checkpoints on disk, `latest` last,
    so that the manager neither saves over nor counts those that were skipped. With none
    left, the old state file is kept aside as `corrupt-checkpoint`."""
    state = os.path.join(directory, "checkpoint")
    if latest is None:
        if tf.io.gfile.exists(state):
            tf.io.gfile.rename(state, os.path.join(directory, "corrupt-checkpoint"), True)
        return
    older = [
        p for p in list_checkpoints(directory) if p != latest and tf.io.gfile.exists(p + ".index")
    ]
    tf.compat.v1.train.update_checkpoint_state(
        directory, latest, all_model_checkpoint_paths=[*older[::-1], latest]
    )


# --- classifying read errors ----------------------------------------------------------------


# What reading a checkpoint can raise. TF's checkpoint reader keeps the type of few errors:
# DataLoss (a bad index), IndexError (a truncated file: OUT_OF_RANGE), NotFound, ...; the
# others (a checksum mismatch, a storage error) come as a plain OpError (UNKNOWN) whose
# message alone tells, hence the message markers below.
CHECKPOINT_READ_ERRORS = (tf.errors.OpError, IndexError, OSError, ValueError)
CORRUPT, TRANSIENT, FATAL = "corrupt", "transient", "fatal"
# The waits, in seconds, before each new try of a read that failed with a transient error.
RESTORE_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)
_sleep = time.sleep  # (tests make the waits instant)
_TRANSIENT_TYPES = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.ResourceExhaustedError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
    tf.errors.InternalError,
)
_PERMISSION_TYPES = (tf.errors.PermissionDeniedError, tf.errors.UnauthenticatedError)
# Not corruption, and trying again does not help: "is a directory", a data type or layout
# that this TensorFlow cannot read (a newer writer), ...
_FATAL_TYPES = (
    *_PERMISSION_TYPES,
    tf.errors.FailedPreconditionError,
    tf.errors.UnimplementedError,
    tf.errors.AlreadyExistsError,
)
# The error types that say the bytes are bad (when the message says nothing else).
_CORRUPT_TYPES = (
    tf.errors.DataLossError,
    tf.errors.OutOfRangeError,
    tf.errors.NotFoundError,
    tf.errors.InvalidArgumentError,
    IndexError,
    ValueError,
)
# What the reader says of bad bytes, whatever the error's type.
_CORRUPT_TEXT = re.compile(
    r"checksum does not match|checksum mismatch|bad magic number|too short to be an sstable|"
    r"read less bytes than requested|corrupted",
    re.IGNORECASE,
)
_PERMISSION_TEXT = re.compile(
    r"permission denied|access denied|forbidden|unauthenticated|unauthorized|credentials|"
    r"\b40[13]\b",
    re.IGNORECASE,
)
_TRANSIENT_TEXT = re.compile(
    r"unavailable|deadline exceeded|timed? ?out|connection|socket|try again|temporar|"
    r"resource exhausted|too many requests|rate limit|http request|curl|broken pipe|"
    r"reset by peer|input/output error|failed to get matching files|\b(?:429|50[0-4])\b",
    re.IGNORECASE,
)
# Weaker signs of bad or missing files, taken when nothing above matched.
_MISSING_OR_BAD_TEXT = re.compile(
    r"unable to read file|corrupt|sstable|truncated|no such file|not found in checkpoint|"
    r"failed to find any matching files",
    re.IGNORECASE,
)


def classify_checkpoint_error(error, path=None):
    """What an error from reading checkpoint `path` proves: `CORRUPT` (its bytes are bad or
    its files missing: set it aside and try the previous one), `TRANSIENT` (the storage
    failed, or nothing is proven: try again, never set it aside) or `FATAL` (permission
    denied, a format this TensorFlow cannot read: stop, never set it aside)."""
    kind = _error_kind(error, path)
    return FATAL if kind == _PERMISSION else kind


_PERMISSION = "permission"  # a FATAL kind, with its own advice


def _error_kind(error, path):
    if isinstance(error, _TRANSIENT_TYPES):
        return TRANSIENT
    if isinstance(error, (*_PERMISSION_TYPES, PermissionError)):
        return _PERMISSION
    if isinstance(error, _FATAL_TYPES):
        return FATAL
    if isinstance(error, OSError):
        if isinstance(error, (IsADirectoryError, NotADirectoryError)):
            return FATAL
        return CORRUPT if isinstance(error, FileNotFoundError) else TRANSIENT
    text = getattr(error, "message", None) or str(error)
    if path:  # its words ("runs/timeout_503") are no evidence
        text = text.replace(os.path.dirname(os.path.normpath(path)), "")
    if _CORRUPT_TEXT.search(text):
        return CORRUPT
    # The reader calls a failed open "DataLoss: Unable to open table file ...", whatever
    # the cause: the cause's words come first.
    if _PERMISSION_TEXT.search(text):
        return _PERMISSION
    if _TRANSIENT_TEXT.search(text):
        return TRANSIENT
    if isinstance(error, _CORRUPT_TYPES) or _MISSING_OR_BAD_TEXT.search(text):
        return CORRUPT
    return TRANSIENT  # unknown (UNKNOWN): not proven corrupt


def _unreadable_message(what, path, error, tries, quarantined=()):
    """The message of a run stopped by an error that does not prove a checkpoint corrupt."""
    kind = _error_kind(error, path)
    cause = f"{type(error).__name__}: {first_line(error)}"
    kept = "no checkpoint was renamed or deleted, and config.json is unchanged"
    if quarantined:
        kept = (
            f"only the corrupt {', '.join(os.path.basename(p) for p in quarantined)} "
            f"{'was' if len(quarantined) == 1 else 'were'} set aside as corrupt-*; nothing "
            f"else was renamed or deleted"
        )
    if kind == TRANSIENT:
        return (
            f"Reading {what} {path} failed{f' {tries} times' if tries > 1 else ''} ({cause}). "
            f"That is a storage error (unavailable, a timeout, a quota), not a corrupt "
            f"checkpoint: {kept}. Run the same command again once the storage answers."
        )
    if kind == _PERMISSION:
        return (
            f"Cannot read {what} {path}: permission denied ({cause}). Give this job read and "
            f"write access to its --model_dir and run the same command again; {kept}."
        )
    return (
        f"Cannot read {what} {path} ({cause}). That does not prove the checkpoint corrupt: {kept}."
    )


# --- the restore loop -----------------------------------------------------------------------


def restore_newest(checkpoint, directory, chief):
    """Restores into `checkpoint` (a `tf.train.Checkpoint`) the newest checkpoint in
    `directory` that can be read; returns (its path or None, the checkpoints found, newest
    first). Only the `chief` renames files.

    A checkpoint proven corrupt (`classify_checkpoint_error`: a checksum, truncation or
    format error, files missing) is not deleted: its files are renamed `corrupt-ckpt-N.*`,
    with a warning that names it, and the next newest is tried. Checkpoints are found on
    disk as well as in the `checkpoint` state file, so a state file that names missing
    files, or none, is handled too. Any other error (storage unavailable, a timeout,
    permission denied) proves nothing about the checkpoint: a transient one is tried
    again (`RESTORE_RETRY_DELAYS`), then the run stops with a `TrainingError`, every file
    kept as it was. A checkpoint that reads but does not fit the model stops the run too.
    """
    candidates = _read_with_retries(
        "the checkpoints in", directory, lambda: list_checkpoints(directory)
    )
    restored = None
    quarantined = []
    for path in candidates:
        if not _read_with_retries(
            "the checkpoint",
            path,
            lambda path=path: tf.io.gfile.exists(path + ".index"),
            quarantined,
        ):
            logger.warning(
                "The checkpoint state in %s names %s, whose files are missing; skipping it.",
                directory,
                path,
            )
            continue
        # Every tensor is read (and its checksum checked) before anything is restored: a
        # restore that fails halfway leaves deferred restorations in the live objects.
        corrupt = _read_with_retries(
            "the checkpoint",
            path,
            lambda path=path: verify_checkpoint(path),
            quarantined,
            corrupt_ok=True,
        )
        if isinstance(corrupt, BaseException):
            # Only the chief renames files; the other workers read the same ones, and
            # skip the same checkpoint.
            kept = quarantine_checkpoint(path) if chief else "they are"
            quarantined.append(path)
            logger.warning(
                "The checkpoint %s cannot be read (%s: %s); its files are kept as %s. "
                "Trying the previous one.",
                path,
                type(corrupt).__name__,
                first_line(corrupt),
                kept,
            )
            continue
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except (ValueError, AssertionError) as error:
            raise TrainingError(
                f"The checkpoint {path} does not fit this run ({first_line(error)}). It "
                f"was written by another model, image size, number of classes or "
                f"--mixed_precision=float16; use another --model_dir, or the same flags."
            ) from None
        except tf.errors.OpError as error:  # read a moment ago: storage, not the file
            raise TrainingError(
                _unreadable_message("the checkpoint", path, error, 1, quarantined)
            ) from None
        restored = path
        break
    return restored, candidates


def _read_with_retries(what, path, read, quarantined=(), corrupt_ok=False):
    """`read()`, tried again after each transient error (`classify_checkpoint_error`)
    with the delays of `RESTORE_RETRY_DELAYS`. Returns what `read` returns, or, with
    `corrupt_ok`, the error that proves `path` corrupt. Otherwise (a fatal error, a
    transient one that lasts) raises a TrainingError naming `path` and the error; no file
    has been changed for it."""
    delays = list(RESTORE_RETRY_DELAYS)
    tries = 0
    while True:
        tries += 1
        try:
            return read()
        except CHECKPOINT_READ_ERRORS as error:
            kind = classify_checkpoint_error(error, path)
            if kind == CORRUPT and corrupt_ok:
                return error
            if kind != TRANSIENT or not delays:
                raise TrainingError(
                    _unreadable_message(what, path, error, tries, quarantined)
                ) from None
            delay = delays.pop(0)
            logger.warning(
                "Reading %s %s failed (%s: %s), which proves nothing about the checkpoint: "
                "trying again in %g s (%d more tries).",
                what,
                path,
                type(error).__name__,
                first_line(error),
                delay,
                len(delays) + 1,
            )
            _sleep(delay)


# --- a model_dir of another run -------------------------------------------------------------

# Config fields that fix the shapes of what a checkpoint holds.
IDENTITY_FIELDS = ("model", "image_size", "num_classes")


def check_compatible(config, checkpoint_dir):
    """Refuses a run whose model differs from the one that wrote the checkpoints; returns the
    previous run's record (config.json) when it goes on from it, else None."""
    previous_path = os.path.join(config.model_dir, "config.json")
    if not list_checkpoints(checkpoint_dir) or not tf.io.gfile.exists(previous_path):
        return None
    try:
        with tf.io.gfile.GFile(previous_path) as f:
            previous = json.load(f)
    except (ValueError, tf.errors.OpError):
        return None  # an unreadable record: the restore itself checks the shapes
    ours = dataclasses.asdict(config)
    differ = [k for k in IDENTITY_FIELDS if k in previous and previous[k] != ours[k]]
    if differ:
        was = ", ".join(f"--{k}={previous[k]}" for k in differ)
        now = ", ".join(f"--{k}={ours[k]}" for k in differ)
        raise TrainingError(
            f"--model_dir {config.model_dir} holds checkpoints of another model ({was}); this "
            f"run asks for {now}. Use another --model_dir to start anew, or the same flags to "
            f"resume; nothing in {config.model_dir} was changed."
        )
    # A resumed run keeps its recipe: another one would change the schedule and the
    # augmentation in mid-run, without a word in the record.
    if "recipe" in previous and previous["recipe"] != config.recipe:
        raise TrainingError(
            f"--model_dir {config.model_dir} holds checkpoints of a run with "
            f"--recipe={previous['recipe']}; this run asks for --recipe={config.recipe}. A run "
            f"resumes with its own recipe: pass --recipe={previous['recipe']} to resume (flags "
            f"such as --epochs may change), or use another --model_dir to start anew; nothing "
            f"in {config.model_dir} was changed."
        )
    # The normalization is built into the model from the release it started from, and a
    # checkpoint does not hold it: a run fine-tuned from "cifar10" resumes with CIFAR's.
    started = previous.get("weights")
    if (
        config.weights is None
        and started
        and normalization(previous, started) != (normalization(previous, None))
    ):
        raise TrainingError(
            f"--model_dir {config.model_dir} holds checkpoints of a run that started from "
            f"--weights={started}, whose images are normalized with that release's mean and "
            f"std; this run gives no --weights and would use ImageNet's. Pass "
            f"--weights={started} to resume (the checkpoint's weights replace the release's); "
            f"nothing in {config.model_dir} was changed."
        )
    return previous


# --- writing the run directory --------------------------------------------------------------


@contextlib.contextmanager
def writing(what, manager, model_dir, note=None):
    """Turns a full disk (`is_disk_full`) while writing `what` into a TrainingError that
    says so, where, and which checkpoint of `manager` is kept (`note`: what else was kept or
    undone). `model_dir`: the run's, named in the message."""
    latest = manager.latest_checkpoint  # read first: a failed save may change it
    try:
        yield
    except Exception as error:
        if isinstance(error, TrainingError) or not is_disk_full(error):
            raise
        text = getattr(error, "message", None) or str(error)
        full = (
            "the disk quota is exceeded (Disk quota exceeded)"
            if "quota" in text.lower() or getattr(error, "errno", None) == errno.EDQUOT
            else "the disk is full (No space left on device)"
        )
        kept = (
            f"The last good checkpoint, {latest}, is kept"
            if latest
            else "No checkpoint had been saved yet"
        )
        raise TrainingError(
            f"Cannot write {what}: {full}. {kept}{f'; {note}' if note else ''}. Free some "
            f"space on the disk of --model_dir {model_dir} (or move the run to "
            f"another --model_dir), then run the same command again to "
            f"{'resume' if latest else 'start again'}."
        ) from None


@contextlib.contextmanager
def no_partial_checkpoint(prefix):
    """Undoes a failed save of checkpoint `prefix` (a full disk, a storage error): removes the
    `<prefix>_temp` folder of its shards and the files of `prefix` that were not there before
    it. The state file, written last, still names the previous checkpoint."""
    before = set(tf.io.gfile.glob(prefix + ".*"))
    try:
        yield
    except BaseException:
        partial = [path for path in tf.io.gfile.glob(prefix + ".*") if path not in before]
        for path in (prefix + "_temp", *partial):
            remove_quietly(path)
        raise


def remove_quietly(path):
    """Removes file or folder `path` if it exists; a failure is logged, not raised."""
    try:
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        elif tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)
    except (tf.errors.OpError, OSError) as error:
        logger.warning("Could not remove %s (%s).", path, first_line(error))


def write_whole(path, write):
    """`write(partial)`, then `partial` renamed to `path`: a write that fails (a full disk)
    leaves `path` as it was and no partial file. (`partial` keeps the name's ending, which
    Keras checks.)"""
    folder, name = os.path.split(path)
    partial = os.path.join(folder, f"partial-{name}")
    try:
        write(partial)
        tf.io.gfile.rename(partial, path, overwrite=True)
    except BaseException:
        remove_quietly(partial)
        raise


def write_json(path, value, **kwargs):
    """Writes `value` to `path` (local or gs://) as indented JSON, whole (`write_whole`)."""

    def write(partial):
        with tf.io.gfile.GFile(partial, "w") as f:
            json.dump(value, f, indent=2, **kwargs)

    write_whole(path, write)
