"""Discovery: the two-time result files under the roots of a batch run.

Every regular file below each ROOT whose name matches the pattern (default
:data:`DEFAULT_PATTERNS`) is a candidate; hidden files and directories are passed over
(``.NAME.partial-…`` directories and ``NAME.tmp-…`` files are xpcsfit's own writes in
progress). Each candidate is opened with :mod:`xpcsfit.io.hdf5` — the readers ``fit``
uses, so a file found here opens there — and is either *found* (a valid APS-U or legacy
result, with its :class:`~xpcsfit.io.hdf5.FileInfo` and time step) or *skipped* with the
one-line reason that the reader's :class:`~xpcsfit.errors.InputError` gives.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from xpcsfit.errors import InputError
from xpcsfit.io.hdf5 import FileInfo, detect_layout, open_h5, read_dt, read_info

DEFAULT_PATTERNS = ("*.hdf", "*.h5", "*.hdf5", "*.nxs")

NOT_A_RESULT = "not-a-result"
INVALID = "invalid"


@dataclass(frozen=True)
class Found:
    """A valid two-time result file.

    Attributes
    ----------
    path : Path
        Absolute path of the file, as reached from its ROOT (links not resolved).
    root : Path
        The absolute ROOT it was found under (its parent when ROOT is the file itself).
    info : FileInfo
        Layout, q and phi grids, maps and number of frames T.
    dt : float
        Two-time step, s, from the file's timing keys.
    """

    path: Path
    root: Path
    info: FileInfo
    dt: float


@dataclass(frozen=True)
class Skipped:
    """A candidate that is not fitted, and why.

    Attributes
    ----------
    path, root : Path
        As for :class:`Found`.
    kind : str
        :data:`NOT_A_RESULT` (not HDF5, or neither map group of the two layouts) or
        :data:`INVALID` (a two-time result whose content fails validation).
    reason : str
        One line, without the path: the reader's message.
    """

    path: Path
    root: Path
    kind: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    """What :func:`discover` found: ``found`` and ``skipped``, each sorted by path."""

    found: list[Found]
    skipped: list[Skipped]


def discover(roots, pattern: str | None = None, only=None) -> Discovery:
    """Find the two-time result files under ``roots``.

    Parameters
    ----------
    roots : str, Path or sequence of them
        Directories searched recursively (symbolic links to directories are not
        followed: they can loop), or single files. A file reached from two roots (or
        twice through links to files) is listed once, the first time.
    pattern : str, optional
        fnmatch pattern. Without a ``/`` it is matched against the file name (at any
        depth); with one, against the path relative to its root, part by part (each
        ``/``-separated part of the pattern matches one level: ``"sample*/*.hdf"``). Default: any of
        :data:`DEFAULT_PATTERNS`. A ROOT given as a file is taken whatever its name.
    only : collection of path, optional
        Examine only these candidates (absolute paths, as reached from their ROOT);
        the others are passed over unopened.

    Returns
    -------
    Discovery

    Raises
    ------
    InputError
        A ROOT does not exist.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    found, skipped, seen = [], [], set()
    wanted = None if only is None else {Path(os.path.abspath(p)) for p in only}
    for root in roots:
        for path, base in _candidates(Path(root), pattern):
            if wanted is not None and path not in wanted:
                continue
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            item = _examine(path, base)
            (found if isinstance(item, Found) else skipped).append(item)
    return Discovery(sorted(found, key=lambda f: f.path), sorted(skipped, key=lambda s: s.path))


def _candidates(root: Path, pattern: str | None):
    """(absolute path, absolute root) of every candidate file under ``root``.

    Paths are made absolute, not resolved: a file linked into the tree keeps its place
    in it (its settings cascade and mirrored result directory follow that place).
    """
    if not (root.exists() or root.is_symlink()):
        raise InputError(f"{root}: no such file or directory")
    root = Path(os.path.abspath(root))
    if root.is_file():
        yield root, root.parent
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_file():
                continue
            if _matches(path.relative_to(root).as_posix(), name, pattern):
                yield path, root


def is_candidate(path: Path, root: Path, pattern: str | None) -> bool:
    """Whether ``path`` (absolute, at or below the absolute directory ``root``) is a file
    :func:`discover` would examine: no hidden part below ``root``, and ``pattern`` matches."""
    relative = path.relative_to(root)
    if any(part.startswith(".") for part in relative.parts):
        return False
    return _matches(relative.as_posix(), path.name, pattern)


def _matches(relative: str, name: str, pattern: str | None) -> bool:
    if pattern is None:
        return any(fnmatch.fnmatch(name, p) for p in DEFAULT_PATTERNS)
    if "/" not in pattern:
        return fnmatch.fnmatch(name, pattern)
    # part by part: fnmatch's * alone would also match across "/"
    parts, wanted = relative.split("/"), pattern.strip("/").split("/")
    return len(parts) == len(wanted) and all(map(fnmatch.fnmatch, parts, wanted))


def _examine(path: Path, root: Path) -> Found | Skipped:
    """Open ``path`` with the io readers: Found, or Skipped with the reader's reason."""
    try:
        with open_h5(path) as f:
            detect_layout(f, path)
    except InputError as exc:
        return Skipped(path, root, NOT_A_RESULT, _reason(exc, path))
    try:
        info = read_info(path)
        dt = read_dt(path, info.layout)
    except InputError as exc:
        return Skipped(path, root, INVALID, _reason(exc, path))
    return Found(path, root, info, dt)


def _reason(exc: InputError, path: Path) -> str:
    # the readers start their messages with the path; Skipped holds it already
    return str(exc).removeprefix(f"{path}: ")
