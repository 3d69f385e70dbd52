"""The fingerprint of a unit of work: what makes a stored result the result of this fit.

The sha256 (:func:`xpcsfit.leastsq.checkpoint.digest`: canonical JSON, sorted keys) of

- ``input``: the sha256 of the file's bytes (:func:`xpcsfit.io.hdf5.sha256_file`) and
  its layout — not its path, so a tree moved elsewhere is not refitted;
- ``selection``: q indices, q values (1/Å) and the resolved frame range;
- ``settings``: the resolved FitConfig (mode, gap, tile, memory, initial, bounds,
  solver) — the values, not the files they came from, so moving a key from a sample's
  xpcsfit.yaml into its parent's changes nothing;
- ``xpcsfit_version``.

It is computed before any fit starts, from the file and the settings alone. The fit's
own checkpoint fingerprint (:func:`xpcsfit.leastsq.checkpoint.fingerprint`) also covers
the start values and bounds of the solver, which exist only after the start-value data
pass; it decides whether a killed fit resumes, this one whether a fit is run at all.
Both hash with the same :func:`~xpcsfit.leastsq.checkpoint.digest`.
"""

from __future__ import annotations

from xpcsfit.batch.units import Unit
from xpcsfit.io.hdf5 import sha256_file
from xpcsfit.leastsq.checkpoint import digest, xpcsfit_version


def fingerprint_of(unit: Unit, sha256: str) -> dict:
    """The mapping hashed into the fingerprint of ``unit``.

    Parameters
    ----------
    unit : Unit
    sha256 : str
        Hex sha256 of the unit's input file.

    Returns
    -------
    dict
        Keys ``input``, ``selection``, ``settings``, ``xpcsfit_version``; JSON values only.
    """
    return {
        "input": {"sha256": sha256, "layout": unit.layout},
        "selection": unit.selection(),
        "settings": unit.settings.fit_config().model_dump(mode="json"),
        "xpcsfit_version": xpcsfit_version(),
    }


def fingerprint(unit: Unit, sha256: str | None = None) -> str:
    """The fingerprint of ``unit``: 64 hex digits, the same in every run for the same fit.

    Parameters
    ----------
    unit : Unit
    sha256 : str, optional
        The input's sha256 when already known (a file holds several units); else the
        file is hashed.

    Raises
    ------
    OSError
        The input cannot be read (only when ``sha256`` is not given).
    """
    return digest(fingerprint_of(unit, sha256 if sha256 is not None else sha256_file(unit.path)))
