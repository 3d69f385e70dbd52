"""The plan of a batch run: every unit of work, to fit or to skip, and why.

:func:`make_plan` runs discovery, the settings cascade, the units of each file and
their fingerprints, and compares them with the catalogue; it fits nothing and writes
nothing (``xpcsfit batch --dry-run`` prints :meth:`Plan.lines`). A unit is skipped only
when the catalogue's current result has the same fingerprint and its result directory
still holds that complete result (an xpcsfit fit.json); otherwise it is fitted, with the
reason: no result yet, the last attempt failed or did not finish, the input or the
settings (selection, version) changed, the result directory is gone, or ``--force``.

Result directories (:func:`result_dir`): ``<stem>_q<K>_fit`` (``_q3-8_fit`` for a joint
fit) beside the input, or under ``out_root`` at the input's path relative to its ROOT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from xpcsfit.batch.catalogue import Catalogue
from xpcsfit.batch.discover import Skipped, discover
from xpcsfit.batch.fingerprint import fingerprint
from xpcsfit.batch.settings import SettingsCascade
from xpcsfit.batch.units import Unit, units_of
from xpcsfit.errors import ConfigError
from xpcsfit.io.hdf5 import sha256_file
from xpcsfit.io.result_dir import is_xpcsfit_result

FIT, SKIP, ERROR = "fit", "skip", "error"


@dataclass(frozen=True)
class Step:
    """One line of the plan.

    Attributes
    ----------
    path : Path
        The input file.
    action : str
        :data:`FIT`, :data:`SKIP`, or :data:`ERROR` (the file's settings or selection are
        bad, or it cannot be read: ``why`` is the one-line error, and it has no unit).
    why : str
        One line.
    unit : Unit or None
    sha256, fingerprint : str or None
        Of the input file and of the unit.
    result_dir : Path or None
        Where the unit's fit directory goes (or is, for a skip).
    """

    path: Path
    action: str
    why: str
    unit: Unit | None = None
    sha256: str | None = None
    fingerprint: str | None = None
    result_dir: Path | None = None

    def line(self) -> str:
        """``fit   <file> q_index=3  mode=static  {"gap": 2e6}  (no result yet) -> <dir>``."""
        if self.unit is None:
            return f"{self.action:<5} {self.path}  ({self.why})"
        set_here = self.unit.settings.model_dump(mode="json", exclude_defaults=True)
        shown = json.dumps(set_here, separators=(",", ":")) if set_here else "defaults"
        return (f"{self.action:<5} {self.unit.label}  mode={self.unit.settings.mode}  frames="
                f"{self.unit.frames[0]}-{self.unit.frames[1]}  {shown}  ({self.why}) -> {self.result_dir}")


@dataclass(frozen=True)
class Plan:
    """The steps (sorted by file, then q index) and the files discovery skipped."""

    steps: list[Step]
    skipped: list[Skipped]

    @property
    def to_fit(self) -> list[Step]:
        return [s for s in self.steps if s.action == FIT]

    def lines(self) -> list[str]:
        """The plan as ``--dry-run`` prints it: the steps, the skipped files, a count."""
        out = [s.line() for s in self.steps]
        out += [f"skip  {s.path}  (not fitted: {s.reason})" for s in self.skipped]
        counts = {a: sum(s.action == a for s in self.steps) for a in (FIT, SKIP, ERROR)}
        out.append(f"{counts[FIT]} to fit, {counts[SKIP]} done already, {counts[ERROR]} with errors, "
                   f"{len(self.skipped)} files not two-time results")
        return out


def result_dir(unit: Unit, out_root: str | Path | None = None) -> Path:
    """The fit directory of ``unit``: beside its input, or mirrored under ``out_root``."""
    name = f"{unit.path.stem}_q{'-'.join(map(str, unit.q_index))}_fit"
    if out_root is None:
        return unit.path.parent / name
    return Path(out_root).resolve() / unit.path.parent.relative_to(unit.root) / name


def make_plan(roots, *, pattern: str | None = None, config=None, out_root=None,
              catalogue: Catalogue | None = None, force: bool = False, only=None) -> Plan:
    """The plan of a batch run over ``roots``; fits nothing, writes nothing.

    Parameters
    ----------
    roots : str, Path or sequence of them
        As for :func:`xpcsfit.batch.discover.discover`.
    pattern : str, optional
        The ``--glob`` pattern.
    config : None, str, Path or dict
        The ``--config`` file or mapping (see :class:`SettingsCascade`).
    out_root : str or Path, optional
        Where result directories go (default: beside each input).
    catalogue : Catalogue, optional
        The catalogue of earlier runs; None: every unit is to fit. Its sha256 cache
        (:meth:`Catalogue.sha256`) spares re-reading unchanged inputs.
    force : bool
        Fit every unit, whatever the catalogue holds.
    only : collection of Path, optional
        Plan these files only (absolute paths under ``roots``: ``--watch``'s new files),
        with the settings and result directories they have as part of the tree.

    Returns
    -------
    Plan

    Raises
    ------
    InputError
        A ROOT does not exist.
    ConfigError
        The ``--config`` file cannot be read (a bad xpcsfit.yaml is an :data:`ERROR`
        step of each file below it, and the others go on).
    """
    found = discover(roots, pattern, only=only)
    cascade = SettingsCascade(config)
    steps: list[Step] = []
    for f in found.found:
        try:
            units = units_of(f, cascade.resolve(f.path, f.root))
            sha = catalogue.sha256(f.path) if catalogue is not None else sha256_file(f.path)
        except ConfigError as exc:
            steps.append(Step(f.path, ERROR, str(exc)))
            continue
        except OSError as exc:
            steps.append(Step(f.path, ERROR, f"{f.path}: cannot read ({exc.strerror or exc})"))
            continue
        for u in units:
            fp, out = fingerprint(u, sha), result_dir(u, out_root)
            action, why = _decide(catalogue, u, sha, fp, out, force)
            steps.append(Step(f.path, action, why, u, sha, fp, out))
    return Plan(steps, found.skipped)


def _decide(catalogue, unit: Unit, sha: str, fp: str, out: Path, force: bool) -> tuple[str, str]:
    if force:
        return FIT, "--force"
    if catalogue is None:
        return FIT, "no result yet"
    current = catalogue.complete(unit.path, unit.q_index, fp)
    if current is not None:
        done = Path(current["result_path"]) if current["result_path"] else None
        if done is not None and (done / "fit.json").is_file() and is_xpcsfit_result(done)[0]:
            return SKIP, f"done with the same fingerprint (attempt {current['attempt']})"
        return FIT, "its result directory is gone or incomplete"
    last = catalogue.last_attempt(unit.path, unit.q_index)
    if last is None:
        return FIT, "no result yet"
    if last["fingerprint"] == fp and last["status"] in ("failed", "interrupted", "running"):
        return FIT, "the last attempt failed" if last["status"] == "failed" else "the last attempt did not finish"
    if last["sha256"] != sha:
        return FIT, "the input changed"
    return FIT, "the settings, selection or xpcsfit version changed"
