"""Writing an export whole: under a temporary name, put in place when complete, so that a
server that loads what appears (TF Serving loads numbered folders as they appear) never sees
a half-written export, or files of an earlier one."""

import contextlib
import os

import tensorflow as tf


def remove(path):
    """Removes the folder or file `path` (local or a `tf.io.gfile` URL), if there is one."""
    if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


@contextlib.contextmanager
def replaced_whole(path):
    """Yields a temporary path beside `path` (`.<name>.partial`) to write an export into; when
    the block ends, it replaces `path` whole (a folder or a file), so that `path` never holds a
    half-written export, or files of an earlier one. On an error the temporary path is removed
    and `path` is left as it was."""
    parent, base = os.path.split(path.rstrip("/"))
    staging = os.path.join(parent, f".{base}.partial")
    remove(staging)
    if parent:
        tf.io.gfile.makedirs(parent)
    try:
        yield staging
    except BaseException:
        remove(staging)
        raise
    previous = os.path.join(parent, f".{base}.previous")
    remove(previous)
    if tf.io.gfile.exists(path):
        tf.io.gfile.rename(path, previous)
    tf.io.gfile.rename(staging, path)
    remove(previous)


def write_atomically(path, data):
    """Writes the bytes `data` to the local file `path` through a `.partial` file."""
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)
