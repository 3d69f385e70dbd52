"""Units of work: one fit of one file at one q, or one joint fit of its selected q.

:func:`units_of` turns a found file and its resolved settings into the fits to run,
checking the selection against the file's grid before any fit starts, so a bad
``q_index`` or ``frames`` in an xpcsfit.yaml is one line for that file, not a fit error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xpcsfit.batch.discover import Found
from xpcsfit.batch.settings import BatchSettings, Resolved
from xpcsfit.errors import ConfigError


@dataclass(frozen=True)
class Unit:
    """One fit of a batch run.

    Attributes
    ----------
    path, root : Path
        The input file (absolute) and the ROOT it was found under.
    layout : str
        "aps-u" or "legacy".
    q_index : tuple of int
        Positions in the file's q grid fitted together (one, unless ``joint``).
    q : tuple of float
        Their q values, 1/Å.
    frames : (int, int)
        Inclusive 0-based frame range, resolved (default 1 .. T-1).
    settings : BatchSettings
    sources : tuple of str
        The files the settings were merged from (see :class:`Resolved`).
    n_points : int
        Fitted points (t2 > t1, every phi with a map, every q of the unit): the size the
        batch runner places the fit by (one worker task, or its tiles fanned out).
    """

    path: Path
    root: Path
    layout: str
    q_index: tuple[int, ...]
    q: tuple[float, ...]
    frames: tuple[int, int]
    settings: BatchSettings
    sources: tuple[str, ...]
    n_points: int = 0

    @property
    def label(self) -> str:
        """``<path> q_index=3`` or ``<path> q_index=3,8`` (joint): the unit's name in lines."""
        return f"{self.path} q_index={','.join(map(str, self.q_index))}"

    def selection(self) -> dict:
        """``{"q_index": [...], "q": [...], "frames": [A, B]}``: what of the file is fitted."""
        return {"q_index": list(self.q_index), "q": list(self.q), "frames": list(self.frames)}


def units_of(found: Found, resolved: Resolved) -> list[Unit]:
    """The fits of one file: one per selected q, or one joint fit.

    Parameters
    ----------
    found : Found
        From :func:`xpcsfit.batch.discover.discover`.
    resolved : Resolved
        Its settings (:meth:`SettingsCascade.resolve`).

    Returns
    -------
    list of Unit
        In ascending q index.

    Raises
    ------
    ConfigError
        A selected q index is outside the file's q grid or has no maps, or the last
        frame is beyond T-1; the message names the file, the key and the files the
        settings came from.
    """
    s, info = resolved.settings, found.info
    with_maps = sorted({iq for iq, _ in info.maps})
    where = f"{found.path}: settings from {', '.join(resolved.sources) or 'defaults'}"
    if s.q_index == "all":
        chosen = with_maps
    else:
        missing = [i for i in s.q_index if i not in with_maps]
        if missing:
            raise ConfigError(
                f"{where}: q_index {missing[0]} has no two-time maps in this file "
                f"(q indices with maps: {', '.join(map(str, with_maps))})"
            )
        chosen = list(s.q_index)
    frames = tuple(s.frames) if s.frames is not None else (1, info.n_frames - 1)
    if frames[1] > info.n_frames - 1:
        raise ConfigError(f"{where}: frames {list(frames)} ends beyond the last frame {info.n_frames - 1}")
    groups = [tuple(chosen)] if s.joint else [(i,) for i in chosen]
    pairs = (frames[1] - frames[0] + 1) * (frames[1] - frames[0]) // 2
    return [
        Unit(found.path, found.root, info.layout, g, tuple(float(info.q_grid[i]) for i in g),
             frames, s, resolved.sources, pairs * sum(iq in g for iq, _ in info.maps))
        for g in groups
    ]
