"""The result directory DIR of a fit or a cmc run, claimed before any work starts.

- DIR may be absent, an empty directory, or an earlier xpcsfit result (a ``fit.json``
  or ``summary.json`` written by xpcsfit, and nothing in DIR that its manifest does not
  list); anything else — a user's folder, a regular file, a place that cannot be
  written — is refused with a one-line :class:`~xpcsfit.ConfigError` before the data
  are read (:func:`claim_result_directory`).
- A lock file ``.DIR.lock`` beside it (``flock``) keeps two xpcsfit runs from writing the
  same DIR at once; the second is refused at its start.
- Hidden ``.DIR.partial-*`` directories that earlier, interrupted xpcsfit runs left
  behind (each carries :data:`PARTIAL_MARKER`) are removed.
- Everything is written into a fresh ``.DIR.partial-XXXXXXXX`` and swapped with DIR in
  one ``renameat2(RENAME_EXCHANGE)`` when complete
  (:func:`xpcsfit.io.atomic.put_directory_in_place`), so DIR is at every moment either
  the earlier complete result or the new complete one; the earlier one is then deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from xpcsfit.errors import ConfigError
from xpcsfit.io.atomic import new_partial_directory, put_directory_in_place
from xpcsfit.io.lockfile import LockHeld, release_lock, take_lock

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
        try:
            self._lock_fd = take_lock(self._lock_path)
        except LockHeld as held:
            raise ConfigError(f"--out {self.final}: another xpcsfit run ({held.holder}) is writing "
                              "this result now; wait for it or choose another --out") from None

    def _release(self) -> None:
        if self._lock_fd is not None:
            release_lock(self._lock_path, self._lock_fd)
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
            self.partial = new_partial_directory(self.final, hidden=True, mode=0o700)
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
            put_directory_in_place(tmp, keep, replace=False)
            self.partial = None
            self._release()
            raise ConfigError(f"{exc}; the new result was kept at {keep}") from None
        put_directory_in_place(tmp, self.final, replace=True)
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
