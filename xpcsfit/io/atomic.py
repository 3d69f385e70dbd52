"""Write-then-rename: what xpcsfit writes appears whole or not at all.

Files (:func:`atomic_file`, :func:`atomic_write_text`): written as ``NAME.tmp-XXXXXXXX``
beside NAME, fsynced, and put in place with :func:`os.replace`.

Directories: built in a fresh sibling ``NAME.partial-XXXXXXXX``
(:func:`new_partial_directory`) and renamed into place when complete
(:func:`put_directory_in_place`; an earlier one is swapped out in one
``renameat2(RENAME_EXCHANGE)``). :func:`atomic_directory` does both (``xpcsfit ingest``:
a store is never replaced); result directories of fit and cmc are claimed first
(:mod:`xpcsfit.io.result_dir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

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
    partial = new_partial_directory(final, hidden=False)
    try:
        yield partial
        put_directory_in_place(partial, final, replace=False)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def new_partial_directory(final: Path, *, hidden: bool, mode: int = 0o777) -> Path:
    """Create the empty sibling directory ``[.]NAME.partial-XXXXXXXX`` of ``final``."""
    prefix = f"{'.' if hidden else ''}{final.name}.partial-"
    return _new_sibling(final, prefix, lambda p: os.mkdir(p, mode))


def put_directory_in_place(partial: Path, final: Path, *, replace: bool) -> None:
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
