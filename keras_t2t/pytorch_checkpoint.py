"""Reads PyTorch checkpoint files (`torch.save`) without torch, and without running their code.

Both formats are read: the zip archive of torch >= 1.6 (`<name>/data.pkl` plus one file per
storage under `<name>/data/`) and the legacy format (a sequence of pickles followed by the raw
storages). The pickles are read by a restricted unpickler that knows only what a state dict
holds: tensor rebuild calls, typed storages, `OrderedDict`, and plain containers, strings and
numbers. Any other global (a class, a function such as `os.system`) is refused with a
`ValueError` that names it, before anything is called, so no file can run code.

Tensors come back as NumPy arrays with the tensor's dtype, shape and values
(`load(path)` equals `torch.load(path, weights_only=True)` with every tensor as `.numpy()`).
A file is untrusted input, so everything it declares is checked before it is used:
- every tensor view (offset, sizes, strides) must lie inside its storage, as torch checks it,
  and a storage's record must hold exactly the values its pickle declares;
- memory is bounded by what the file holds: a storage is read only up to its declared size, a
  compressed member may not inflate beyond `MAX_INFLATION` times its packed size, a zip's
  pickle is at most `MAX_PICKLE_BYTES` (a legacy file's pickles are the file's own bytes), a
  tensor holds no more values than its storage, and all tensors together at most
  `MAX_VIEW_FACTOR` times the values of the storages read.
The last two refuse one thing torch accepts: a view that repeats its storage's values (an
`expand`ed tensor), which no checkpoint of weights holds and which could otherwise make a
small file ask for gigabytes. Every refusal is a `ValueError` that says what was wrong.
"""

import collections
import os
import pickle
import struct
import zipfile

import numpy as np

# Typed storages as torch pickles them (torch.FloatStorage, ...), by dtype.
STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_PICKLE_BYTES = 64 << 20  # a state dict's pickle is kilobytes; a large model's, a few MB
MAX_INFLATION = 100  # torch stores storages uncompressed; float weights deflate by ~1.1x
MAX_VIEW_FACTOR = 4  # tensors sharing a storage (tied weights) may copy it a few times
_INT64_MAX = (1 << 63) - 1


class CheckpointError(ValueError):
    """A file that this reader refuses, with the reason."""


class _StorageType:
    def __init__(self, name):
        dtype = STORAGE_DTYPES[name]
        if dtype == "bfloat16":
            import ml_dtypes  # a dependency of keras

            dtype = ml_dtypes.bfloat16
        self.dtype = np.dtype(dtype)


def _int(value, what):
    if not isinstance(value, int) or not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise CheckpointError(f"a tensor's {what} is {value!r}, not a 64-bit integer.")
    return value


def _ints(values, what):
    if not isinstance(values, (tuple, list)) or len(values) > 64:
        raise CheckpointError(f"a tensor's {what} is {values!r}, not a tuple of integers.")
    return tuple(_int(v, what) for v in values)


def _check_view(storage_numel, offset, size, stride):
    """Raises unless the view (offset, size, stride) lies inside a storage of `storage_numel`
    values, as torch's `Tensor.set_` checks it. Returns the view's number of values."""
    offset, size, stride = _int(offset, "offset"), _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointError(f"a tensor has {len(size)} sizes but {len(stride)} strides.")
    if offset < 0:
        raise CheckpointError(f"a tensor has the storage offset {offset}, below 0.")
    if any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"a tensor has negative sizes or strides ({size}, {stride}).")
    numel = 1
    for s in size:
        numel *= s
    if numel == 0:
        return 0
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage_numel:
        raise CheckpointError(
            f"a tensor of size {size}, strides {stride} at offset {offset} reads past the end "
            f"of its storage of {storage_numel} values."
        )
    if numel > storage_numel:
        raise CheckpointError(
            f"a tensor of size {size} repeats the {storage_numel} values of its storage "
            f"(strides {stride}); a checkpoint of weights holds no such view."
        )
    return numel


class _Budget:
    """Counts the values of the storages read and of the tensors built from them."""

    def __init__(self):
        self.storage_values = self.tensor_values = 0

    def take(self, numel):
        self.tensor_values += numel
        if self.tensor_values > MAX_VIEW_FACTOR * self.storage_values + 4096:
            raise CheckpointError(
                f"its tensors hold {self.tensor_values} values, more than {MAX_VIEW_FACTOR}x "
                f"the {self.storage_values} values of its storages."
            )


def _rebuild(storage, offset, size, stride, budget):
    """torch._utils._rebuild_tensor_v2: a checked view of `storage`, copied."""
    if not isinstance(storage, np.ndarray):
        raise CheckpointError(f"a tensor is built on {type(storage).__name__}, not a storage.")
    numel = _check_view(storage.size, offset, size, stride)
    budget.take(numel)
    if numel == 0:
        return np.zeros(tuple(size), storage.dtype)
    itemsize = storage.dtype.itemsize
    strides = tuple(s * itemsize if n > 1 else 0 for n, s in zip(size, stride))  # n <= 1: unused
    view = np.lib.stride_tricks.as_strided(
        storage[offset:],
        shape=tuple(size),
        strides=strides,
        writeable=False,
    )
    return np.array(view)


def _rebuild_parameter(data, *_):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its tensor here."""
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals of `_GLOBALS`, tensor rebuilds and the typed storages;
    storages come from `load_storage(storage_type, key, numel)`."""

    def __init__(self, file, load_storage, budget):
        super().__init__(file)
        self._load_storage = load_storage
        self._budget = budget

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"it holds a {module}.{name} object, which a checkpoint of weights does "
            f"not need and this reader does not build (it could run code). Only tensors, "
            f"OrderedDict and plain containers and numbers are read; checkpoints that need "
            f"code to unpickle are refused on purpose."
        )

    def _rebuild_tensor(self, storage, offset, size, stride, *_):
        return _rebuild(storage, offset, size, stride, self._budget)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        numel = _int(numel, "storage size")
        if numel < 0:
            raise CheckpointError(f"storage {key} declares {numel} values.")
        storage = self._load_storage(storage_type, str(key), numel)
        view = pid[5] if len(pid) > 5 else None  # legacy storage views: (key, offset, size)
        if view is not None:
            if not isinstance(view, tuple) or len(view) != 3:
                raise CheckpointError(f"storage {key} has the view {view!r}.")
            offset, size = _int(view[1], "storage view offset"), _int(view[2], "storage view size")
            _check_view(numel, offset, (size,), (1,))
            storage = storage[offset : offset + size]
        return storage


def _storage_array(data, storage_type):
    """Raw little-endian storage bytes as a native array of the storage's dtype."""
    return np.frombuffer(data, dtype=storage_type.dtype.newbyteorder("<")).astype(
        storage_type.dtype, copy=False
    )


def _check_inflation(info):
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(
        MAX_INFLATION * info.compress_size, 1 << 20
    ):
        raise CheckpointError(
            f"its member {info.filename} inflates from {info.compress_size} to "
            f"{info.file_size} bytes (more than {MAX_INFLATION}x; torch stores checkpoints "
            f"uncompressed)."
        )


def _load_zip(path):
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in members if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError("it is a zip file, but not a PyTorch checkpoint (no data.pkl).")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in members:
            _check_inflation(members[byteorder])
            with archive.open(byteorder) as f:
                if f.read(16).strip() != b"little":
                    raise CheckpointError(
                        "it was written big-endian, which this reader does not read."
                    )
        storages = {}
        budget = _Budget()

        def load_storage(storage_type, key, numel):
            if key not in storages:
                name = f"{prefix}data/{key}"
                if name not in members:
                    raise CheckpointError(f"its storage {key} is missing.")
                info, nbytes = members[name], numel * storage_type.dtype.itemsize
                if info.file_size != nbytes:
                    raise CheckpointError(
                        f"its storage {key} holds {info.file_size} bytes, but its pickle "
                        f"declares {numel} values of {storage_type.dtype.itemsize} bytes."
                    )
                _check_inflation(info)
                with archive.open(name) as f:
                    data = f.read(nbytes)
                if len(data) != nbytes:
                    raise CheckpointError(f"its storage {key} is truncated.")
                storages[key] = _storage_array(data, storage_type)
                budget.storage_values += numel
            if storages[key].size != numel:
                raise CheckpointError(f"its storage {key} is declared with two sizes.")
            return storages[key]

        info = members[pickles[0]]
        _check_inflation(info)
        if info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(
                f"its pickle has {info.file_size} bytes, more than the {MAX_PICKLE_BYTES} that "
                f"a state dict needs."
            )
        with archive.open(info) as f:  # reads no more than the member's declared size
            return _Unpickler(f, load_storage, budget).load()


def _load_legacy(path):
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pending = {}  # key -> (storage type, numel)
        budget = _Budget()

        def load_storage(storage_type, key, numel):
            pending.setdefault(key, (storage_type, numel))
            return _LazyStorage(key)  # filled in once the raw storages are read

        def plain(file):
            return _Unpickler(file, lambda *_: None, budget).load()

        if plain(f) != LEGACY_MAGIC:
            raise CheckpointError("it is not a PyTorch checkpoint.")
        if plain(f) != LEGACY_PROTOCOL:
            raise CheckpointError("it has an unknown legacy PyTorch checkpoint protocol.")
        plain(f)  # system info
        unpickler = _Deferred(f, load_storage, budget)  # pickles are read from the file itself
        result = unpickler.load()
        keys = plain(f)
        storages = {}
        if not isinstance(keys, list):
            raise CheckpointError(f"its list of storages is {type(keys).__name__}, not a list.")
        for key in keys:
            if str(key) not in pending or str(key) in storages:
                raise CheckpointError(f"its storage {key!r} is not one its pickle declares.")
            storage_type, declared = pending[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            nbytes = numel * storage_type.dtype.itemsize
            if numel < 0 or nbytes > size - f.tell():
                raise CheckpointError(
                    f"its storage {key} declares {numel} values, more than the file holds."
                )
            if numel < declared:
                raise CheckpointError(f"its storage {key} holds fewer values than it declares.")
            storages[str(key)] = _storage_array(f.read(nbytes), storage_type)
            budget.storage_values += numel
        return unpickler.resolve(result, storages)


class _Deferred(_Unpickler):
    """The legacy format stores the raw storages after the pickle: tensors are rebuilt once
    they are read, from placeholders recorded while unpickling."""

    def _rebuild_tensor(self, storage, *args):
        return _Pending(storage, args)

    def resolve(self, value, storages):
        if isinstance(value, _Pending):
            storage = value.storage
            if not isinstance(storage, _LazyStorage) or storage.key not in storages:
                raise CheckpointError("a tensor is built on a storage the file does not hold.")
            data = storages[storage.key]
            start, stop = storage.window
            if stop is not None:
                _check_view(data.size, start, (stop - start,), (1,))
            return _rebuild(data[start:stop], *value.args[:3], self._budget)
        if isinstance(value, dict):
            return type(value)((k, self.resolve(v, storages)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(self.resolve(v, storages) for v in value)
        return value


class _Pending:
    def __init__(self, storage, args):
        if len(args) < 3:
            raise CheckpointError("a tensor is declared without its offset, size and stride.")
        self.storage, self.args = storage, args


class _LazyStorage:
    """A legacy storage not read yet; slicing it (a storage view) narrows its window."""

    def __init__(self, key, window=(0, None)):
        self.key, self.window = key, window

    def __getitem__(self, window):
        start = self.window[0]
        return _LazyStorage(self.key, (start + window.start, start + window.stop))


def load(path):
    """The object saved in the PyTorch checkpoint `path`, its tensors as NumPy arrays.

    Raises `ValueError` (a `CheckpointError`) for a file this reader refuses or cannot read,
    with the reason, and `OSError` where the file cannot be opened.
    """
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except CheckpointError as error:
        raise CheckpointError(f"{path} is refused: {error}") from None
    except OSError:
        raise
    except Exception as error:  # anything else (RecursionError, OverflowError...): malformed
        raise CheckpointError(
            f"{path} is corrupt, truncated or not a PyTorch checkpoint "
            f"({type(error).__name__}: {str(error)[:200]})."
        ) from None
