"""Resumable fits: the solver's state saved beside the output after every iteration.

A fit with an output directory ``DIR`` keeps ``.DIR.checkpoint.json`` in DIR's parent
(hidden, next to where the result will go). It is rewritten atomically after every
solver iteration and removed once the complete result has been written, so it exists
only while a fit is under way or after one was killed. A rerun of the same fit — same
input, selection and settings — finds it and continues from the saved iteration (see
:meth:`xpcsfit.solver.TrustRegionLM.restore`): one normal-equations pass instead of
every pass already made, and bit for bit the parameters of an uninterrupted fit, since
the evaluator's sums are deterministic.

Whether a checkpoint belongs to this fit is decided by its *fingerprint*: the sha256 of
a canonical JSON (sorted keys, no whitespace) of

- the input's content: the sha256 of the HDF5 file (for an ingested store, the sha256
  of the file it was ingested from, which the store records, plus the store format and
  chunk side),
- the resolved selection (q, q_index, phi, frames, dt),
- mode, gap L and tile size,
- the resolved configuration (bounds, initial values, solver options, memory),
- the starting point x0 and the bounds, and the xpcsfit version.

A checkpoint with another fingerprint, one that is unreadable, or not xpcsfit's, is not
used; the caller prints why in one line and the fit starts over (overwriting it).

File layout (JSON)::

    {"kind": "xpcsfit-checkpoint", "format": 3, "xpcsfit_version": "0.1.0",
     "input": "/path/of/input.hdf", "saved_at": "2026-…Z",
     "fingerprint": "<sha256 hex>", "fingerprint_of": {…the hashed mapping…},
     "state": {"x": […], "scale": […], "damping": …, "cost": …, "iteration": …,
               "normal_passes": …, "cost_passes": …, "settled_steps": …, "termination": null}}

``state`` is :meth:`xpcsfit.solver.SolverState.saved`; ``termination`` is null while the
fit runs, else a :class:`xpcsfit.solver.Termination` value ("ftol", …). Format 1 (before
the Termination enum) stored done/converged flags and the message; format 2 lacked
``settled_steps`` (the DETERMINED test); neither is read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from pathlib import Path

import numpy as np

from xpcsfit.io.atomic import atomic_write_text
from xpcsfit.io.store import STORE_VERSION

KIND = "xpcsfit-checkpoint"
FORMAT = 3


def checkpoint_path(out: str | Path) -> Path:
    """Where the checkpoint of a fit into directory ``out`` lives: ``<parent>/.<name>.checkpoint.json``."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.checkpoint.json"


def xpcsfit_version() -> str:
    """The installed xpcsfit version (the one fit.json records)."""
    return importlib.metadata.version("xpcsfit")


def fingerprint(ds, cfg, L: float, tile: int, x0, lower, upper) -> dict:
    """The mapping whose canonical JSON is hashed into a fit's fingerprint.

    Parameters
    ----------
    ds : xarray.Dataset
        As from :func:`xpcsfit.open_dataset` (attributes sha256, layout, q_index,
        frames, dt, and for a store tile).
    cfg : FitConfig
        The resolved configuration.
    L : float
        Gap, Å, as used.
    tile : int
        Tile edge, frames, as used.
    x0, lower, upper : ndarray (P,)
        Starting point and bounds of the solver.

    Returns
    -------
    dict
        Top-level keys ``input``, ``selection``, ``mode``, ``gap``, ``tile``, ``config``,
        ``start``, ``bounds``, ``xpcsfit_version`` (the names a mismatch is reported by).
    """
    content = {"sha256": ds.attrs["sha256"], "layout": ds.attrs["layout"]}
    if "store" in ds.attrs:
        content["store"] = {"format": STORE_VERSION, "chunk": int(ds.attrs["tile"])}
    return {
        "input": content,
        "selection": {
            "q": [float(v) for v in ds["q"].values],
            "q_index": [int(i) for i in ds.attrs["q_index"]],
            "phi": [float(v) for v in ds["phi"].values],
            "frames": [int(f) for f in ds.attrs["frames"]],
            "dt": float(ds.attrs["dt"]),
        },
        "mode": cfg.mode,
        "gap": float(L),
        "tile": int(tile),
        "config": json.loads(cfg.model_dump_json()),
        "start": [float(v) for v in np.asarray(x0)],
        "bounds": [[float(v) for v in np.asarray(lower)], [float(v) for v in np.asarray(upper)]],
        "xpcsfit_version": xpcsfit_version(),
    }


def digest(doc: dict) -> str:
    """sha256 (hex) of the canonical JSON of ``doc`` (sorted keys, no whitespace)."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


class Checkpoint:
    """The checkpoint file of one fit into ``out``.

    Parameters
    ----------
    out : str or Path
        The fit's output directory; the file is :func:`checkpoint_path` of it.
    resume : bool
        Whether :meth:`open` may return a saved state.

    Use: :meth:`open` once with the fit's fingerprint mapping (before the solver starts),
    :meth:`save` after every solver iteration, :meth:`remove` when the result is written.
    """

    def __init__(self, out: str | Path, resume: bool = True):
        self.path = checkpoint_path(out)
        self.resume = bool(resume)
        self.fingerprint_of: dict | None = None
        self.fingerprint: str | None = None
        self.input: str | None = None

    def open(self, fingerprint_of: dict, input: str) -> tuple[dict | None, str | None]:
        """Bind this fit's fingerprint; return the saved state if it may be resumed.

        Parameters
        ----------
        fingerprint_of : dict
            From :func:`fingerprint`.
        input : str
            The input's path, recorded for people reading the file.

        Returns
        -------
        (state, note)
            ``state``: the ``"state"`` mapping of a checkpoint of this very fit (for
            :meth:`TrustRegionLM.restore`), else None. ``note``: one line saying why an
            existing checkpoint is not used, else None. Never raises for the file's
            content: a missing, unreadable or foreign file only yields a note.
        """
        self.fingerprint_of = fingerprint_of
        self.fingerprint = digest(fingerprint_of)
        self.input = str(input)
        if not (self.path.exists() or self.path.is_symlink()):
            return None, None
        if not self.resume:
            return None, f"xpcsfit: not resuming (asked to start over): checkpoint {self.path} is ignored and will be replaced"
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as exc:
            return None, self.not_used(f"cannot read it ({exc.strerror or exc})")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, self.not_used(f"not valid JSON ({exc}), e.g. a truncated file")
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            return None, self.not_used(f'not an xpcsfit checkpoint (no "kind": "{KIND}")')
        if doc.get("format") != FORMAT:
            return None, self.not_used(f"checkpoint format {doc.get('format')!r}, this xpcsfit reads {FORMAT}")
        if doc.get("fingerprint") != self.fingerprint:
            other = doc.get("fingerprint_of")
            if isinstance(other, dict):
                keys = sorted(k for k in set(other) | set(fingerprint_of) if other.get(k) != fingerprint_of.get(k))
            else:
                keys = []
            what = ", ".join(keys) if keys else "fingerprint"
            return None, self.not_used(f"it was saved by a fit with a different {what}")
        state = doc.get("state")
        if not isinstance(state, dict):
            return None, self.not_used("it holds no solver state")
        return state, None

    def not_used(self, why: str) -> str:
        """The one progress line for a checkpoint that is not resumed from."""
        return f"xpcsfit: checkpoint {self.path} not used: {why}; starting over"

    def save(self, state: dict) -> None:
        """Write ``state`` (:meth:`SolverState.saved`) atomically (:func:`atomic_write_text`).

        Raises
        ------
        OSError
            If the file cannot be written (the previous checkpoint is then unchanged).
        RuntimeError
            If :meth:`open` was not called first.
        """
        if self.fingerprint is None:
            raise RuntimeError("Checkpoint.open must bind the fit's fingerprint before save")
        doc = {
            "kind": KIND,
            "format": FORMAT,
            "xpcsfit_version": self.fingerprint_of["xpcsfit_version"],
            "input": self.input,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fingerprint": self.fingerprint,
            "fingerprint_of": self.fingerprint_of,
            "state": state,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(doc, indent=1))

    def remove(self) -> None:
        """Delete the checkpoint and temporary files of ours a killed write left behind.

        Only files: a directory in the checkpoint's place is not xpcsfit's and stays.
        """
        if self.path.is_file() or self.path.is_symlink():
            self.path.unlink()
        for stale in self.path.parent.glob(f"{self.path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
