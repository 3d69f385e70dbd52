"""Writing a fit's directory: fit.json, fitted.zarr, PNGs — all or nothing.

A result directory DIR is claimed before any work starts (:func:`claim_result_directory`):

- DIR may be absent, an empty directory, or an earlier xpcsfit result (a ``fit.json``
  written by xpcsfit, and nothing in DIR that its manifest does not list); anything else
  — a user's folder, a regular file, a place that cannot be written — is refused with a
  one-line :class:`~xpcsfit.ConfigError` before the data are read.
- A lock file ``.DIR.lock`` beside it (``flock``) keeps two xpcsfit runs from writing the
  same DIR at once; the second is refused at its start.
- Hidden ``.DIR.partial-*`` directories that earlier, interrupted xpcsfit runs left
  behind (each carries a marker file written by xpcsfit) are removed.
- Everything is written into a fresh ``.DIR.partial-XXXX`` and swapped with DIR in one
  ``renameat2(RENAME_EXCHANGE)`` when complete, so DIR is at every moment either the
  earlier complete result or the new complete one; the earlier one is then deleted.

fitted.zarr (Zarr v3, readable with ``xarray.open_zarr``): ``c2_fit`` and ``residual``
with dims (q, phi, t1, t2), chunks (1, n_phi, tile, tile) — the fit's tiles, each
written whole by the worker that holds it; tiles wholly below the diagonal are not
written (NaN fill).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import zarr

from xpcsfit.errors import ConfigError
from xpcsfit.engine.kernel import Tile, tile_model
from xpcsfit.parameters import ParameterLayout

PARTIAL_MARKER = ".xpcsfit-partial"
# The record file of a fit's and of a cmc's result directory; it lists what the
# directory holds ("files").
RECORDS = ("fit.json", "summary.json")
# What results written before the records had a manifest may hold.
_UNLISTED_RESULT_ENTRY = re.compile(
    r"^(fit\.json|fitted\.zarr|summary\.json|initial_fit\.json|posterior\.zarr|[A-Za-z0-9_.-]+\.png)$")


def is_xpcsfit_result(path: Path) -> tuple[bool, str]:
    """Whether the directory ``path`` holds an xpcsfit result and nothing else.

    Returns
    -------
    (bool, str)
        True and "" when it is one; else False and why not (for the error message).
    """
    name = next((n for n in RECORDS if (path / n).is_file()), None)
    if name is None:
        entries = sorted(os.listdir(path))
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        return False, f"it holds {shown} and no fit.json or summary.json written by xpcsfit"
    try:
        record = json.loads((path / name).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or "xpcsfit_version" not in record:
        return False, f"its {name} was not written by xpcsfit"
    listed = record.get("files")
    for entry in sorted(os.listdir(path)):
        known = entry in listed if isinstance(listed, list) else _UNLISTED_RESULT_ENTRY.match(entry)
        if not known:
            return False, f"it holds {entry!r}, which xpcsfit did not write"
    return True, ""


def _check_replaceable(final: Path) -> None:
    """Raise ConfigError unless ``final`` may be (re)placed by a result."""
    if not final.exists():
        return
    if not final.is_dir():
        raise ConfigError(f"--out {final}: exists and is not a directory; choose another --out")
    if not any(final.iterdir()):
        return
    ok, why = is_xpcsfit_result(final)
    if not ok:
        raise ConfigError(f"--out {final}: exists and is not an xpcsfit result ({why}); "
                          "xpcsfit replaces only its own results: choose another --out")


def _remove_stale_partials(final: Path) -> list[Path]:
    """Remove hidden partial directories of ``final`` left by interrupted xpcsfit runs.

    Only directories named ``.NAME.partial-*`` that carry :data:`PARTIAL_MARKER` are
    removed; called while holding the lock of ``final``, so none of them is in use.
    """
    removed = []
    for entry in final.parent.glob(f".{glob_escape(final.name)}.partial-*"):
        if entry.is_dir() and not entry.is_symlink() and (entry / PARTIAL_MARKER).is_file():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (Linux renameat2); False if unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # the file system cannot exchange (e.g. some network file systems)
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultDirectory:
    """A claimed result directory: a lock, and a partial directory to write into.

    Use :func:`claim_result_directory`; write into :attr:`partial`, then :meth:`commit`.

    Attributes
    ----------
    final : Path
        The result directory (absolute).
    partial : Path
        The hidden sibling being written.
    removed_partials : list of Path
        Stale partials of earlier interrupted runs removed when claiming.
    """

    def __init__(self, final: Path):
        self.final = final
        self._lock_path = final.parent / f".{final.name}.lock"
        self._lock_fd: int | None = None
        self.partial: Path | None = None
        self.removed_partials: list[Path] = []

    def _acquire(self) -> None:
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConfigError(f"--out {self.final}: another xpcsfit run ({holder}) is writing "
                                  "this result now; wait for it or choose another --out") from None
            # The holder before us may have unlinked the file between our open and flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self._lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    def open(self) -> "ResultDirectory":
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as exc:
            raise ConfigError(f"--out {self.final}: cannot write there ({exc.strerror})") from None
        try:
            _check_replaceable(self.final)
            self.removed_partials = _remove_stale_partials(self.final)
            self.partial = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-",
                                                 dir=self.final.parent))
            (self.partial / PARTIAL_MARKER).write_text(f"pid {os.getpid()}\n")
        except OSError as exc:
            self.abort()
            raise ConfigError(f"--out {self.final}: cannot write there ({exc.strerror})") from None
        except BaseException:
            self.abort()
            raise
        return self

    def commit(self) -> Path:
        """Put the partial directory in place of :attr:`final`; return ``final``.

        Raises
        ------
        ConfigError
            If ``final`` was changed during the fit into something that is not an
            xpcsfit result; the complete new result is then kept at a visible sibling
            ``NAME.new-XXXX``, named in the message.
        """
        tmp = self.partial
        (tmp / PARTIAL_MARKER).unlink()
        try:
            _check_replaceable(self.final)
        except ConfigError as exc:
            keep = self.final.with_name(f"{self.final.name}.new-{tmp.name.rsplit('-', 1)[-1]}")
            tmp.rename(keep)
            self.partial = None
            self._release()
            raise ConfigError(f"{exc}; the new result was kept at {keep}") from None
        if self.final.exists():
            if _exchange(tmp, self.final):
                shutil.rmtree(tmp, ignore_errors=True)  # now the earlier result
            else:
                old = self.final.with_name(f".{self.final.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
                self.final.rename(old)
                tmp.rename(self.final)
                shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(self.final)
        _fsync_dir(self.final.parent)
        self.partial = None
        self._release()
        return self.final

    def abort(self) -> None:
        """Remove the partial directory and release the lock (nothing at ``final`` changes)."""
        if self.partial is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial = None
        self._release()


@contextlib.contextmanager
def claim_result_directory(final):
    """Claim ``final`` for a new result; yield the :class:`ResultDirectory` (None when
    ``final`` is None: nothing is to be written).

    On leaving the block without :meth:`ResultDirectory.commit` (an error, an interrupt)
    the partial directory is removed and ``final`` is untouched.

    Raises
    ------
    ConfigError
        ``final`` exists and is not an xpcsfit result (or not an empty directory), is
        being written by another xpcsfit run, or cannot be written.
    """
    if final is None:
        yield None
        return
    claim = ResultDirectory(Path(final).resolve()).open()
    try:
        yield claim
    finally:
        claim.abort()


def result_manifest(directory: Path, record: str = "fit.json") -> list[str]:
    """Names of the entries of ``directory`` plus its ``record`` file: the manifest
    ("files") stored in the record (fit.json, or summary.json of ``xpcsfit cmc``)."""
    return sorted(set(os.listdir(directory)) - {PARTIAL_MARKER} | {record})


def create_fitted_store(path: Path, q, phi, t, tile: int) -> None:
    """Create fitted.zarr metadata (arrays c2_fit and residual, coordinates)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    n_t = len(t)
    shape = (len(q), len(phi), n_t, n_t)
    for name in ("c2_fit", "residual"):
        root.create_array(name, shape=shape, chunks=(1, len(phi), tile, tile), dtype="float32",
                          fill_value=np.nan, dimension_names=("q", "phi", "t1", "t2"))
    for name, values, unit in (("q", q, "1/Å"), ("phi", phi, "deg"), ("t1", t, "s"), ("t2", t, "s")):
        arr = root.create_array(name, shape=(len(values),), dtype="float64",
                                dimension_names=(name,))
        arr[:] = np.asarray(values, float)
        arr.attrs["units"] = unit


def write_fitted_tile(tile: Tile, x, layout: ParameterLayout, mode: str, L: float,
                      path: str, lead: int) -> np.ndarray:
    """Worker task: write this tile's model and residual chunks into the store at ``path``.

    ``lead`` is the number of unfitted frames before the first fitted one in the store
    (it starts at a frame that is a multiple of the tile size, so a tile is one chunk).
    Returns the model on the tile grid, (n_phi, size, size) float64 (padding included),
    for the caller's pictures.
    """
    model = tile_model(tile, x, layout, mode, L)
    iq = tile.index[0]
    r0, c0 = tile.start[0] + lead, tile.start[1] + lead
    n1, n2 = tile.extent
    w = tile.weight[:n1, :n2] > 0
    fit = np.where(w, model[:, :n1, :n2], np.nan).astype(np.float32)
    resid = np.where(w, tile.c2[:, :n1, :n2] - model[:, :n1, :n2], np.nan).astype(np.float32)
    region = (slice(iq, iq + 1), slice(None), slice(r0, r0 + n1), slice(c0, c0 + n2))
    root = zarr.open_group(path, mode="r+")
    root["c2_fit"][region] = fit[None]
    root["residual"][region] = resid[None]
    return model
