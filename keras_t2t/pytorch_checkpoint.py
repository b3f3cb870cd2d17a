"""Reads PyTorch checkpoint files (`torch.save`) without torch, and without running their code.

Both formats are read: the zip archive of torch >= 1.6 (`<name>/data.pkl` plus one file per
storage under `<name>/data/`) and the legacy format (a sequence of pickles followed by the raw
storages). The pickles are read by a restricted unpickler that knows only what a state dict
holds: tensor rebuild calls, typed storages, `OrderedDict`, and plain containers, strings and
numbers. Any other global (a class, a function such as `os.system`) is refused with a
`ValueError` that names it, before anything is called, so no file can run code.

Tensors come back as NumPy arrays with the tensor's dtype, shape and values
(`load(path)` equals `torch.load(path, weights_only=True)` with every tensor as `.numpy()`).
"""

import collections
import io
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


class _StorageType:
    def __init__(self, name):
        dtype = STORAGE_DTYPES[name]
        if dtype == "bfloat16":
            import ml_dtypes  # a dependency of keras

            dtype = ml_dtypes.bfloat16
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2: a view of `storage` as an array, copied."""
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data, *_):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its tensor here."""
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals of `_GLOBALS` and the typed storages; storages come from
    `load_storage(storage_type, key, numel)`."""

    def __init__(self, file, load_storage, source):
        super().__init__(file)
        self._load_storage = load_storage
        self._source = source

    def find_class(self, module, name):
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise ValueError(
            f"{self._source} holds a {module}.{name} object, which a checkpoint of weights does "
            f"not need and this reader does not build (it could run code). Only tensors, "
            f"OrderedDict and plain containers and numbers are read."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        storage = self._load_storage(storage_type, str(key), int(numel))
        view = pid[5] if len(pid) > 5 else None  # legacy storage views: (key, offset, size)
        if view is not None:
            _, offset, size = view
            storage = storage[offset : offset + size]
        return storage


def _storage_array(data, storage_type):
    """Raw little-endian storage bytes as a native array of the storage's dtype."""
    return np.frombuffer(data, dtype=storage_type.dtype.newbyteorder("<")).astype(
        storage_type.dtype, copy=False
    )


def _load_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path} is a zip file, but not a PyTorch checkpoint (no data.pkl).")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).strip() != b"little":
            raise ValueError(f"{path} was written big-endian, which this reader does not read.")
        storages = {}

        def load_storage(storage_type, key, numel):
            if key not in storages:
                storages[key] = _storage_array(archive.read(f"{prefix}data/{key}"), storage_type)
            if storages[key].size < numel:
                raise ValueError(f"{path}: storage {key} holds fewer values than it declares.")
            return storages[key]

        with archive.open(pickles[0]) as f:
            return _Unpickler(f, load_storage, path).load()


def _load_legacy(path):
    with open(path, "rb") as f:
        pending = {}  # key -> (storage type, numel)

        def load_storage(storage_type, key, numel):
            pending.setdefault(key, storage_type)
            return _LazyStorage(key)  # filled in once the raw storages are read

        def plain(file):
            return _Unpickler(file, lambda *_: None, path).load()

        if plain(f) != LEGACY_MAGIC:
            raise ValueError(f"{path} is not a PyTorch checkpoint.")
        if plain(f) != LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unknown legacy PyTorch checkpoint protocol.")
        plain(f)  # system info
        unpickler = _Deferred(f, load_storage, path)
        result = unpickler.load()
        keys = plain(f)
        storages = {}
        for key in keys:
            storage_type = pending[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            nbytes = numel * storage_type.dtype.itemsize
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise ValueError(f"{path} is truncated (storage {key}).")
            storages[str(key)] = _storage_array(data, storage_type)
        return unpickler.resolve(result, storages)


class _Deferred(_Unpickler):
    """The legacy format stores the raw storages after the pickle: tensors are rebuilt once
    they are read, from placeholders recorded while unpickling."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, *args: _Pending(storage, args)
        return super().find_class(module, name)

    def resolve(self, value, storages):
        if isinstance(value, _Pending):
            storage = value.storage
            return _rebuild_tensor(storages[storage.key][storage.window], *value.args)
        if isinstance(value, dict):
            return type(value)((k, self.resolve(v, storages)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(self.resolve(v, storages) for v in value)
        return value


class _Pending:
    def __init__(self, storage, args):
        self.storage, self.args = storage, args


class _LazyStorage:
    """A legacy storage not read yet; slicing it (a storage view) narrows its window."""

    def __init__(self, key, window=slice(None)):
        self.key, self.window = key, window

    def __getitem__(self, window):
        start = self.window.start or 0
        return _LazyStorage(self.key, slice(start + window.start, start + window.stop))


def load(path):
    """The object saved in the PyTorch checkpoint `path`, its tensors as NumPy arrays."""
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except ValueError:
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, struct.error,
            zipfile.BadZipFile, AttributeError, io.UnsupportedOperation) as error:  # fmt: skip
        raise ValueError(
            f"{path} is corrupt, truncated or not a PyTorch checkpoint "
            f"({type(error).__name__}: {error})."
        ) from None
