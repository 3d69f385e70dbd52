"""Validated readers of single HDF5 keys, shared by both layouts (DESIGN.md §3).

Each reader returns the value of one dataset or raises :class:`InputError` naming the
file, the key and what is wrong with the value (shape, dtype and, when small, the
values). h5py failures on damaged content (metadata that cannot be parsed, a dangling
link, a chunk that cannot be read) become the same one-line InputError through
:func:`hdf5_errors`.
"""

from __future__ import annotations

import contextlib

import h5py
import numpy as np

from xpcsfit.errors import InputError


@contextlib.contextmanager
def hdf5_errors(path, what):
    """Turn an HDF5 failure while reading ``what`` into InputError naming file and key.

    h5py reports damaged metadata, dangling links and unreadable chunks of a file as
    OSError, KeyError or RuntimeError.
    """
    try:
        yield
    except (OSError, KeyError, RuntimeError) as exc:
        raise InputError(f"{path}: cannot read {what} ({one_line(exc)})") from exc


def require(f, key, path) -> h5py.Dataset:
    """The dataset ``key`` of ``f``; InputError naming ``path`` and ``key`` if missing or a group."""
    with hdf5_errors(path, key):
        present = key in f
        obj = f[key] if present else None
    if not present:
        raise InputError(f"{path}: missing key {key}")
    if not isinstance(obj, h5py.Dataset):
        raise InputError(f"{path}: {key} is a group, expected a dataset")
    return obj


def read(f, key, path) -> np.ndarray:
    """The whole value of dataset ``key`` (an HDF5 empty dataset reads as a 0-d object array)."""
    obj = require(f, key, path)
    with hdf5_errors(path, key):
        return np.asarray(obj[()])


def scalar(f, key, path) -> float:
    """The one real number stored at ``key`` (any shape of size 1); InputError otherwise."""
    value = read(f, key, path)
    # legacy files often store scalars as (1, 1) arrays
    if value.size != 1 or not _is_real(value):
        raise InputError(f"{path}: {key} should be one real number, got {_describe(value)}")
    return float(value.ravel()[0])


def float_vector(f, key, path, allow_row=False, distinct=False) -> np.ndarray:
    """Non-empty, finite 1-D float64 array of real numbers at ``key``.

    ``allow_row`` also accepts shape (1, n); ``distinct`` refuses repeated values (grid
    bins).
    """
    value = read(f, key, path)
    if allow_row and value.ndim == 2 and value.shape[0] == 1:
        value = value[0]
    if value.ndim != 1 or value.size == 0 or not _is_real(value):
        raise InputError(f"{path}: {key} should be a non-empty 1-D array of real numbers, got {_describe(value)}")
    value = value.astype(np.float64)
    if not np.all(np.isfinite(value)):
        raise InputError(f"{path}: {key} holds non-finite values")
    if distinct and np.unique(value).size != value.size:
        raise InputError(f"{path}: {key} holds repeated values; grid bins must be distinct")
    return value


def int_vector(f, key, path) -> np.ndarray:
    """1-D int64 array at ``key`` (stored as any integer type that fits); InputError otherwise."""
    value = read(f, key, path)
    if value.ndim != 1 or value.dtype.kind not in "iu":
        raise InputError(f"{path}: {key} should be a 1-D integer array, got {_describe(value)}")
    if value.dtype.kind == "u" and value.size and value.max() > np.iinfo(np.int64).max:
        raise InputError(f"{path}: {key} holds {value.max()}, too large for a bin index")
    return value.astype(np.int64)


def decode(value) -> str:
    """An HDF5 string value (bytes or str) as str."""
    # undecodable bytes show as U+FFFD in the message instead of failing the decode
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def one_line(exc: BaseException | str) -> str:
    """A message on one line; a KeyError's text without the quotes its str() adds."""
    if isinstance(exc, KeyError) and exc.args:
        exc = str(exc.args[0])
    return " ".join(str(exc).split())


def _describe(value: np.ndarray) -> str:
    """Shape, dtype and, when small, the values themselves, for messages."""
    text = f"shape {value.shape}, dtype {value.dtype}"
    if 0 < value.size <= 4:
        text += f": {one_line(np.array2string(value.ravel(), max_line_width=80, threshold=4))[:80]}"
    return text


def _is_real(value: np.ndarray) -> bool:
    return value.dtype.kind in "iuf"  # bool, complex, strings and objects are not numbers here
