"""The result of a fit: parameters, uncertainties, derived J(t) and gamma_dot(t).

Covariance (DESIGN.md §5): C = (JᵀJ)⁻¹ · χ²/(n − P) at the optimum, with χ² = Σ r²
(the noise level is unknown, so it is estimated from the residuals). Bands of derived
quantities use the delta method: var f = ∇fᵀ C ∇f.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xpcsfit.errors import InputError
from xpcsfit.model import shear_rate, transport_coefficient
from xpcsfit.parameters import MODES, UNITS

CORRELATION_LIMIT = 0.99


@dataclass
class FitResult:
    """Outcome of :func:`xpcsfit.fit`; ``to_dict()`` is the content of fit.json (DESIGN.md §6).

    Attributes
    ----------
    mode : str
    names : list of str
        Physics parameter names, in order.
    values, stderr : ndarray (p,)
        Physics parameters and their standard errors (units in :data:`UNITS`).
    q : ndarray (n_q,), phi : ndarray (n_phi,)
        1/Å and degrees.
    contrast, offset, contrast_stderr, offset_stderr, residual_rms : ndarray (n_q, n_phi)
    covariance : ndarray (P, P)
        Over all parameters: physics, then contrast and offset per bin.
    covariance_names : list of str
    chi2, reduced_chi2 : float
    dof, n_points : int
    converged : bool
    termination : str
    iterations : int
    data_passes : int
        Passes over the data made by the solver (normal-equation and cost passes). The
        pass for the start values and the one writing the fitted c2 come on top; they
        are counted in ``engine["other_passes"]``.
    wall_time_s : float
    transport : dict
        ``t`` (s) over the fitted window and J(t) (Å²/s), gamma_dot(t) (1/s) with their
        1-sigma standard errors.
    warnings : list of str
    input, provenance : dict
    x, start, lower, upper : ndarray (P,)
        Final and starting solver vectors and the bounds, over all parameters
        (physics, contrast per bin, offset per bin).
    resumed_from : dict or None
        For a fit resumed from a checkpoint (see :mod:`xpcsfit.leastsq.checkpoint`): the
        ``iteration`` it continued from, the ``data_passes`` made before it (by the
        killed run; ``data_passes`` above counts only this run's), and the
        ``checkpoint`` path. None for a fit run from the start.
    engine : dict
        What the engine did: tile size, tiles and parts, ``storage`` ("hold" or
        "stream", the config's ``memory`` as chosen), passes,
        seconds per solver pass, bytes to/from the workers per pass, kernels compiled
        per worker during the fit and after every kernel had run once.
    """

    mode: str
    names: list[str]
    values: np.ndarray
    stderr: np.ndarray
    q: np.ndarray
    phi: np.ndarray
    contrast: np.ndarray
    offset: np.ndarray
    contrast_stderr: np.ndarray
    offset_stderr: np.ndarray
    residual_rms: np.ndarray
    covariance: np.ndarray
    covariance_names: list[str]
    chi2: float
    reduced_chi2: float
    dof: int
    n_points: int
    converged: bool
    termination: str
    iterations: int
    data_passes: int
    wall_time_s: float
    transport: dict
    warnings: list[str] = field(default_factory=list)
    input: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    x: np.ndarray | None = None
    start: np.ndarray | None = None
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    engine: dict = field(default_factory=dict)
    resumed_from: dict | None = None

    @property
    def parameters(self) -> dict[str, float]:
        """Physics parameter values by name."""
        return dict(zip(self.names, map(float, self.values)))

    def J(self, t) -> np.ndarray:
        """Transport coefficient J(t) (Å²/s) at times t (s): :func:`xpcsfit.model.transport_coefficient`."""
        return transport_coefficient(np.asarray(self.values, float), np.asarray(t, float))

    def gamma_dot(self, t) -> np.ndarray:
        """Shear rate gamma_dot(t) (1/s) at times t (s): :func:`xpcsfit.model.shear_rate`;
        zeros in static mode."""
        if self.mode == "static":
            return np.zeros_like(np.asarray(t, float))
        return shear_rate(np.asarray(self.values, float), np.asarray(t, float))

    def to_dict(self) -> dict:
        def lst(a):
            return np.asarray(a, float).tolist()

        return {
            "xpcsfit_version": self.provenance.get("versions", {}).get("xpcsfit", ""),
            "mode": self.mode,
            "input": self.input,
            "parameters": {
                n: {"value": float(v), "stderr": float(s), "unit": UNITS[n]}
                for n, v, s in zip(self.names, self.values, self.stderr)
            },
            "per_angle": {
                "q": lst(self.q),
                "phi": lst(self.phi),
                "contrast": lst(self.contrast),
                "contrast_stderr": lst(self.contrast_stderr),
                "offset": lst(self.offset),
                "offset_stderr": lst(self.offset_stderr),
                "residual_rms": lst(self.residual_rms),
            },
            "covariance": {"names": self.covariance_names, "matrix": lst(self.covariance)},
            "chi2": self.chi2,
            "reduced_chi2": self.reduced_chi2,
            "dof": self.dof,
            "converged": self.converged,
            "termination": self.termination,
            "iterations": self.iterations,
            "data_passes": self.data_passes,
            "resumed_from": self.resumed_from,
            "wall_time_s": self.wall_time_s,
            "transport": {k: lst(v) for k, v in self.transport.items()},
            "warnings": self.warnings,
            "engine": self.engine,
            "provenance": self.provenance,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=True)

    @classmethod
    def from_json(cls, source) -> "FitResult":
        """The FitResult of a fit.json: its text, or the path of the file.

        The inverse of :meth:`to_dict` / :meth:`to_json`:
        ``FitResult.from_json(r.to_json()).to_dict() == r.to_dict()``. What fit.json does
        not hold is derived (``n_points`` = dof + number of covariance names; ``x`` the
        physics values, then contrast and offset per bin) or None (``start``, ``lower``,
        ``upper``).

        Parameters
        ----------
        source : str or Path
            JSON text (a str starting with "{") or the path of a fit.json.

        Raises
        ------
        InputError
            No such file, not readable JSON, or a missing key, unknown mode or value of
            the wrong type or shape (the message names the file and what is wrong).
        """
        where = "fit.json text"
        try:
            if isinstance(source, str) and source.lstrip().startswith("{"):
                d = json.loads(source)
            else:
                where = str(source)
                if not Path(source).is_file():
                    raise InputError(f"{where}: no such fit file")
                d = json.loads(Path(source).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{where}: not a readable fit.json ({str(exc).splitlines()[0]})") from None
        try:
            return cls._from_dict(d)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
            raise InputError(f"{where}: malformed fit.json ({what})") from None

    @classmethod
    def _from_dict(cls, d: dict) -> "FitResult":
        mode = d["mode"]
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} unknown")
        names = list(MODES[mode])
        params = d["parameters"]
        pa = d["per_angle"]
        q, phi = np.asarray(pa["q"], float), np.asarray(pa["phi"], float)
        shape = (q.size, phi.size)

        def per_angle(key):
            return np.asarray(pa[key], float).reshape(shape)

        values = np.array([float(params[n]["value"]) for n in names])
        contrast, offset = per_angle("contrast"), per_angle("offset")
        cov_names = list(d["covariance"]["names"])
        return cls(
            mode=mode, names=names, values=values,
            stderr=np.array([float(params[n]["stderr"]) for n in names]), q=q, phi=phi,
            contrast=contrast, offset=offset, contrast_stderr=per_angle("contrast_stderr"),
            offset_stderr=per_angle("offset_stderr"), residual_rms=per_angle("residual_rms"),
            covariance=np.asarray(d["covariance"]["matrix"], float).reshape(len(cov_names), len(cov_names)),
            covariance_names=cov_names, chi2=float(d["chi2"]), reduced_chi2=float(d["reduced_chi2"]),
            dof=int(d["dof"]), n_points=int(d["dof"]) + len(cov_names), converged=bool(d["converged"]),
            termination=d["termination"], iterations=int(d["iterations"]), data_passes=int(d["data_passes"]),
            wall_time_s=float(d["wall_time_s"]),
            transport={k: np.asarray(v, float) for k, v in d["transport"].items()},
            warnings=list(d.get("warnings", [])), input=dict(d.get("input") or {}),
            provenance=dict(d.get("provenance") or {}),
            x=np.concatenate([values, contrast.ravel(), offset.ravel()]),
            engine=dict(d.get("engine") or {}), resumed_from=d.get("resumed_from"),
        )


def input_record(ds, n_points: int, L: float) -> dict:
    """fit.json's ``input``: the file, its sha256 and layout, the selection (q, q_index,
    phi, dt, frames), the gap L used (Å) and the number of points; ``store`` for a store."""
    info = {
        "path": ds.attrs.get("source"),
        "sha256": ds.attrs.get("sha256"),
        "layout": ds.attrs.get("layout"),
        "q": ds["q"].values.tolist(),
        "q_index": list(ds.attrs.get("q_index", [])),
        "phi": ds["phi"].values.tolist(),
        "dt": float(ds.attrs["dt"]),
        "frames": list(map(int, ds.attrs["frames"])),
        "L": L,
        "n_points": int(n_points),
    }
    if "store" in ds.attrs:
        info["store"] = ds.attrs["store"]
    return info


def provenance_record(cfg, gap_defaulted: bool, cluster: str) -> dict:
    """fit.json's ``provenance``: the resolved config (without the gap, which is recorded
    once, as used, in ``input.L``), whether the gap is the default, package versions
    and the cluster."""
    config = json.loads(cfg.model_dump_json())
    del config["gap"]
    return {"config": config, "gap_defaulted": gap_defaulted, "versions": dict(_versions()), "cluster": cluster}


@functools.cache
def _versions() -> dict:
    # Once per process: reading the installed metadata took 0.1 s per fit.
    versions = {}
    for pkg in ("xpcsfit", "jax", "numpy", "scipy", "dask", "distributed", "zarr", "h5py", "xarray"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def covariance_from_normal_equations(jtj: np.ndarray, chi2: float, dof: int) -> tuple[np.ndarray, list[str]]:
    """(JᵀJ)⁻¹ · χ²/dof, and a warning if JᵀJ is (nearly) singular.

    The inverse is taken in the eigenbasis of the scaled JᵀJ with eigenvalues floored
    at 1e-15 of the largest: a direction the data do not determine gets a huge, honest
    variance — never the zero a pseudo-inverse would report for it.

    Parameters
    ----------
    jtj : ndarray (P, P)
    chi2 : float
        Σ r² at the optimum.
    dof : int
        n − P (> 0).
    """
    warnings = []
    d = np.sqrt(np.diag(jtj))
    d = np.where(d > 0, d, 1.0)
    eigenvalues, vectors = np.linalg.eigh(jtj / np.outer(d, d))
    floor = 1e-15 * eigenvalues.max()
    if eigenvalues.min() < 1e3 * floor:
        warnings.append(
            f"JᵀJ is (nearly) singular (condition {eigenvalues.max() / max(eigenvalues.min(), floor):.1e} "
            "after scaling): some parameter combination is not determined by the data"
        )
    inverse = (vectors / np.maximum(eigenvalues, floor)) @ vectors.T
    return inverse / np.outer(d, d) * (chi2 / dof), warnings


def correlation_warnings(names, covariance, limit=CORRELATION_LIMIT) -> list[str]:
    """One warning per group of physics parameters linked by |correlation| > ``limit``.

    Pairs are joined into groups (connected components), so a three-way degeneracy
    such as D0 / alpha / D_offset at alpha ≈ 0 gives one warning, not three.
    """
    sd = np.sqrt(np.abs(np.diag(covariance)))[: len(names)]
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = covariance[: len(names), : len(names)] / np.outer(sd, sd)
    linked = np.abs(np.nan_to_num(corr)) > limit
    group = list(range(len(names)))

    def root(i):
        while group[i] != i:
            i = group[i]
        return i

    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if linked[i, j]:
                group[root(j)] = root(i)
    out = []
    for r in sorted({root(i) for i in range(len(names))}):
        members = [i for i in range(len(names)) if root(i) == r]
        if len(members) < 2:
            continue
        worst = max(abs(corr[i, j]) for i in members for j in members if i < j and linked[i, j])
        out.append(
            f"{', '.join(names[i] for i in members)} are not separately determined "
            f"(|correlation| up to {worst:.4f}); only their combination is: see J(t) and "
            "gamma_dot(t) with their bands"
        )
    return out


def transport_bands(mode: str, theta, covariance, t) -> dict:
    """J(t) and gamma_dot(t) with 1-sigma standard errors (delta method).

    The curves are :func:`xpcsfit.model.transport_coefficient` and
    :func:`~xpcsfit.model.shear_rate`; both are a power law a0·t**a + b in three of
    the parameters, whose gradient (t**a, a0·t**a·ln t, 1) gives var = ∇ᵀ C ∇.

    Parameters
    ----------
    mode : str
    theta : ndarray (p,)
        Physics parameters in MODES order (the first rows/columns of ``covariance``).
    covariance : ndarray (≥p, ≥p)
    t : ndarray (n,)
        Times, s (> 0).

    Returns
    -------
    dict of arrays (n,): t, J, J_stderr, and in laminar_flow gamma_dot, gamma_dot_stderr.
    """
    t = np.asarray(t, float)
    theta = np.asarray(theta, float)
    p = theta.size
    cov = covariance[:p, :p]

    def stderr(first):  # the power law's parameters are theta[first : first + 3]
        a0, a = theta[first], theta[first + 1]
        grad = np.zeros((t.size, p))
        grad[:, first] = t**a
        grad[:, first + 1] = a0 * t**a * np.log(t)
        grad[:, first + 2] = 1.0
        var = np.einsum("ni,ij,nj->n", grad, cov, grad)
        return np.sqrt(np.maximum(var, 0.0))

    out = {"t": t, "J": transport_coefficient(theta, t), "J_stderr": stderr(0)}
    if mode == "laminar_flow":
        out.update(gamma_dot=shear_rate(theta, t), gamma_dot_stderr=stderr(3))
    return out
