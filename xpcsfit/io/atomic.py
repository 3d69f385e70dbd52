"""Write-then-rename: what xpcsfit writes appears whole or not at all.

Files (:func:`atomic_file`, :func:`atomic_write_text`): written as ``NAME.tmp-XXXXXXXX``
beside NAME, fsynced, and put in place with :func:`os.replace`.

Directories: built in a fresh sibling ``NAME.partial-XXXXXXXX`` and renamed into place
when complete. :func:`atomic_directory` does only that (``xpcsfit ingest``: a store is
never replaced). A fit's or a cmc's result directory DIR is claimed before any work
starts (:func:`claim_result_directory`, :class:`ResultDirectory`):

- DIR may be absent, an empty directory, or an earlier xpcsfit result (a ``fit.json``
  or ``summary.json`` written by xpcsfit, and nothing in DIR that its manifest does not
  list); anything else — a user's folder, a regular file, a place that cannot be
  written — is refused with a one-line :class:`~xpcsfit.ConfigError` before the data
  are read.
- A lock file ``.DIR.lock`` beside it (``flock``) keeps two xpcsfit runs from writing the
  same DIR at once; the second is refused at its start.
- Hidden ``.DIR.partial-*`` directories that earlier, interrupted xpcsfit runs left
  behind (each carries :data:`PARTIAL_MARKER`) are removed.
- Everything is written into a fresh ``.DIR.partial-XXXXXXXX`` and swapped with DIR in
  one ``renameat2(RENAME_EXCHANGE)`` when complete, so DIR is at every moment either the
  earlier complete result or the new complete one; the earlier one is then deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from xpcsfit.errors import ConfigError

PARTIAL_MARKER = ".xpcsfit-partial"
# The record file of a fit's and of a cmc's result directory; it lists what the
# directory holds ("files").
RECORDS = ("fit.json", "summary.json")
# What results written before the records had a manifest may hold.
_UNLISTED_RESULT_ENTRY = re.compile(
    r"^(fit\.json|fitted\.zarr|summary\.json|initial_fit\.json|posterior\.zarr|[A-Za-z0-9_.-]+\.png)$")

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a new, empty temporary file beside ``path``; on success it replaces ``path``.

    Write and close the temporary file inside the block (any writer, e.g.
    ``h5py.File(tmp, "w")``). On a normal exit it is fsynced, renamed over ``path``
    (:func:`os.replace`) and the directory fsynced: a reader sees the old content or the
    new, never a part, and the new content survives a crash once the block has exited.
    On an exception the temporary file is removed and ``path`` is unchanged.

    Parameters
    ----------
    path : str or Path
        The file to (re)place. The temporary file is ``NAME.tmp-XXXXXXXX`` in the same
        directory (one file system: the rename is atomic); its mode follows the umask.

    Raises
    ------
    OSError
        The directory is missing or not writable, or the disk is full.
    """
    path = Path(path)
    tmp = _new_sibling(path, f"{path.name}.tmp-",
                       lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace the file ``path`` by one holding ``text`` (UTF-8), atomically (:func:`atomic_file`).

    Raises
    ------
    OSError
        If the directory is missing or not writable, or the disk is full; ``path`` is
        then unchanged and the temporary file removed.
    """
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path``: makes a rename inside it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_sibling(path: Path, prefix: str, create: Callable[[Path], None]) -> Path:
    """Create (``create(candidate)``, exclusive) and return ``path.parent / prefix + 8 hex``."""
    while True:
        candidate = path.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue  # another writer drew the same name


# --------------------------------------------------------------------------- directories


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a new, empty sibling directory ``NAME.partial-XXXXXXXX``; on success it becomes ``final``.

    On an exception (or interrupt) in the block the partial directory is removed and
    the exception propagates; nothing at ``final`` changes.

    Raises
    ------
    FileExistsError
        On leaving the block: ``final`` appeared meanwhile (e.g. another process built
        it first) and is not an empty directory; the partial directory is removed.
    OSError
        The parent directory cannot be written.
    """
    final = Path(final)
    partial = _new_partial(final, hidden=False)
    try:
        yield partial
        _put_in_place(partial, final, replace=False)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _new_partial(final: Path, *, hidden: bool, mode: int = 0o777) -> Path:
    """Create the empty sibling directory ``[.]NAME.partial-XXXXXXXX`` of ``final``."""
    prefix = f"{'.' if hidden else ''}{final.name}.partial-"
    return _new_sibling(final, prefix, lambda p: os.mkdir(p, mode))


def _put_in_place(partial: Path, final: Path, *, replace: bool) -> None:
    """Rename the complete directory ``partial`` to ``final``; fsync their parent.

    ``replace``: an existing ``final`` is swapped out in one exchange (where the file
    system cannot, renamed aside to ``.NAME.old-XXXX`` first) and deleted. Else an
    existing ``final`` other than an empty directory raises FileExistsError.
    """
    if replace and final.exists():
        if _exchange(partial, final):
            shutil.rmtree(partial, ignore_errors=True)  # now the earlier result
        else:
            old = final.with_name(f".{final.name}.old-{partial.name.rsplit('-', 1)[-1]}")
            final.rename(old)
            partial.rename(final)
            shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(partial, final)
        except OSError as exc:
            if replace or not (final.exists() or final.is_symlink()):
                raise
            raise FileExistsError(errno.EEXIST, "exists already", str(final)) from exc
    fsync_dir(final.parent)


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


# --------------------------------------------------------------------------- result directories


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


def result_manifest(directory: Path, record: str = "fit.json") -> list[str]:
    """Names of the entries of ``directory`` plus its ``record`` file: the manifest
    ("files") stored in the record (fit.json, or summary.json of ``xpcsfit cmc``)."""
    return sorted(set(os.listdir(directory)) - {PARTIAL_MARKER} | {record})


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


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
        """Take the lock, check ``final``, remove stale partials, create :attr:`partial`.

        Raises
        ------
        ConfigError
            As :func:`claim_result_directory`; nothing is left behind.
        """
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as exc:
            raise ConfigError(f"--out {self.final}: cannot write there ({exc.strerror})") from None
        try:
            _check_replaceable(self.final)
            self.removed_partials = _remove_stale_partials(self.final)
            # owner-only while written, as results have always been (tempfile.mkdtemp's mode)
            self.partial = _new_partial(self.final, hidden=True, mode=0o700)
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
        _put_in_place(tmp, self.final, replace=True)
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
