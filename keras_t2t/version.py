"""The version of keras-t2t, apart from the package's `__init__` so that any module can read
it (presets record it) without importing the package that imports them."""

__version__ = "0.1.0"
