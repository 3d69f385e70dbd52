"""CMC results: the combination of the shards, summary.json, posterior.zarr and PNGs.

``finish`` turns the shard results of :func:`xpcsfit.cmc.driver.cmc` into a :class:`CMCResult`:
consensus (or parametric) combination, per-shard and combined diagnostics, the effect of
every shard that fails its diagnostics (``_cmc_combine.leave_one_out_effect``), J(t) and
gamma_dot(t) bands, and, with ``out``, the result directory (written atomically).
"""

from __future__ import annotations

import importlib.metadata
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xpcsfit.cmc import combine as comb
from xpcsfit.cmc.shard import PRIOR_SD
from xpcsfit.io.atomic import result_manifest
from xpcsfit.parameters import UNITS


def _say(progress, message: str) -> None:
    if progress:
        print(message, flush=True)


@dataclass
class CMCResult:
    """Outcome of :func:`cmc`; ``summary`` is the content of DIR/summary.json.

    Attributes
    ----------
    mode : str
    names : list of str
        Physics parameter names (units in ``xpcsfit.parameters.UNITS``).
    draws : ndarray (chains, draws, p)
        Combined posterior draws of the physics parameters.
    shard_draws : ndarray (K, chains, draws, p)
        Sub-posterior draws of the shards that ran (``shard_names``).
    sampling_names : list of str
    sampling_draws, shard_sampling_draws : ndarray
        The same in NUTS's sampling coordinates (see ``xpcsfit.cmc.shard``).
    shard_names : list of str
    summary : dict
    shard_diverging : ndarray (K, chains, draws) of bool
        Divergent NUTS transitions.
    fit : FitResult or dict
        The least-squares fit the shards started from.
    out : Path or None
    """

    mode: str
    names: list
    draws: np.ndarray
    shard_draws: np.ndarray
    sampling_names: list
    sampling_draws: np.ndarray
    shard_sampling_draws: np.ndarray
    shard_names: list
    summary: dict
    shard_diverging: np.ndarray | None = None
    fit: object = None
    out: Path | None = None
    warnings: list = field(default_factory=list)

    @property
    def mean(self) -> np.ndarray:
        return self.draws.reshape(-1, len(self.names)).mean(axis=0)

    @property
    def sd(self) -> np.ndarray:
        return self.draws.reshape(-1, len(self.names)).std(axis=0, ddof=1)

    @property
    def parameters(self) -> dict[str, float]:
        """Posterior means by name."""
        return dict(zip(self.names, map(float, self.mean)))

    @property
    def shards(self) -> list[dict]:
        return self.summary["shards"]

    def J_draws(self, t) -> np.ndarray:
        """J(t) (Å²/s) for every combined draw: (chains·draws, n) for t (n,) in s."""
        flat = self.draws.reshape(-1, len(self.names))
        return comb.transport_draws(self.mode, self.names, flat, np.atleast_1d(t))["J"]

    def gamma_dot_draws(self, t) -> np.ndarray:
        """gamma_dot(t) (1/s) for every combined draw (laminar_flow; zeros in static)."""
        flat = self.draws.reshape(-1, len(self.names))
        t = np.atleast_1d(t)
        if self.mode == "static":
            return np.zeros((flat.shape[0], t.size))
        return comb.transport_draws(self.mode, self.names, flat, t)["gamma_dot"]

    def J(self, t) -> np.ndarray:
        """Posterior mean of J(t), Å²/s."""
        return self.J_draws(t).mean(axis=0)

    def gamma_dot(self, t) -> np.ndarray:
        """Posterior mean of gamma_dot(t), 1/s."""
        return self.gamma_dot_draws(t).mean(axis=0)

    def to_json(self) -> str:
        return json.dumps(self.summary, indent=1, allow_nan=True)


def finish(results, specs, coords, cfg, L, ds, fitted, fit_result, noise, thin, size, combine,
            seed, out, started, progress, n_lattice):
    names = list(coords.names)
    mode = cfg.mode
    K = len(specs)
    ok = [r for r in results if "error" not in r]
    if not ok:
        raise RuntimeError(f"all {K} cmc shards failed; first error: {results[0]['error']}")
    chains, samples = specs[0].chains, specs[0].samples
    shard_w = np.stack([r["w"] for r in ok])
    shard_theta = np.stack([r["theta"] for r in ok])
    w = comb.combine(shard_w, combine, seed)
    to_theta = _numpy_to_theta(coords)
    theta = to_theta(w.reshape(-1, w.shape[-1])).reshape(w.shape)
    t = np.asarray(ds["t1"].values, float)
    t_grid = np.linspace(t[0], t[-1], 100)
    t_ref = np.quantile(t, [0.1, 0.5, 0.9]).round(6)
    warn = []

    shard_summaries = []
    for r in results:
        entry = {"name": r["name"], "index": r["index"]}
        if "error" in r:
            entry.update(passed=False, problems=[r["error"]],
                         effect=f"not combined: the posterior conditions on {len(ok)} of {K} shards "
                                f"(prior kept at the power 1/{K} per shard)")
            warn.append(f"{r['name']} failed ({r['error']}); combined without it")
            shard_summaries.append(entry)
            continue
        stats = comb.describe_all(names, r["theta"])
        div = int(r["diverging"].sum())
        problems = comb.shard_problems(stats, div, chains, samples)
        entry.update(
            worker=r["worker"], n_points=r["n_points"],
            wall_time_s=r["wall_time_s"], divergences=div, step_size=r["step_size"].tolist(),
            mean_leapfrog_steps=float(r["num_steps"].mean()), parameters=stats,
            r_hat_max=max(s["r_hat"] for s in stats.values()),
            ess_bulk_min=min(s["ess_bulk"] for s in stats.values()),
            passed=not problems, problems=problems,
        )
        if problems:
            k = [o["index"] for o in ok].index(r["index"])
            eff = comb.leave_one_out_effect(shard_w, k, combine, to_theta, names, mode, t_ref, seed)
            entry["effect"] = eff
            text = "; ".join(problems)
            if eff:
                text += (f". Effect: leaving it out moves the combined posterior by up to "
                         f"{eff['max_shift_sd']:.2f} sd ({eff['worst']}) and scales sds by "
                         f"{eff['sd_ratio_range'][0]:.2f}-{eff['sd_ratio_range'][1]:.2f}; it is kept in the combination")
            warn.append(f"{r['name']} fails its diagnostics: {text}")
        shard_summaries.append(entry)

    params = comb.describe_all(names, theta)
    for n in names:
        params[n]["unit"] = UNITS[n]
    div_total = int(sum(int(r["diverging"].sum()) for r in ok))
    lo, hi = np.asarray(coords.lower), np.asarray(coords.upper)
    flat = theta.reshape(-1, len(names))
    outside = int(np.sum(np.any((flat < lo) | (flat > hi), axis=1)))
    if outside:
        warn.append(f"{outside} of {flat.shape[0]} combined draws lie outside the bounds (the consensus "
                    "average of in-bounds draws need not be in bounds); the shards' sub-posteriors "
                    "are not Gaussian enough there")
    ident = _identifiability(names, flat, w, coords)
    warn += ident
    tr_grid = comb.transport_draws(mode, names, flat, t_grid)
    tr_ref = comb.transport_draws(mode, names, flat, t_ref)
    transport = {"t": t_grid.tolist(), "reference_times": t_ref.tolist()}
    for key in tr_grid:
        transport[key] = comb.bands(tr_grid[key])
        transport[key]["unit"] = "Å²/s" if key == "J" else "1/s"
        per_chain = tr_ref[key].reshape(theta.shape[0], theta.shape[1], -1)
        transport[key + "_at_reference"] = {f"{tt:g}": comb.describe(per_chain[..., j])
                                            for j, tt in enumerate(t_ref)}
    combined = {
        "method": combine,
        "draws": int(flat.shape[0]),
        "r_hat_max": max(p["r_hat"] for p in params.values()),
        "ess_bulk_min": min(p["ess_bulk"] for p in params.values()),
        "divergences": div_total,
        "outside_bounds": outside,
        "shards_combined": [r["name"] for r in ok],
    }
    failing = [s["name"] for s in shard_summaries if not s["passed"]]
    summary = {
        "xpcsfit_version": _version("xpcsfit"),
        "mode": mode,
        "input": _input_info(ds, n_lattice),
        "parameters": params,
        "transport": transport,
        "shards": shard_summaries,
        "combined": combined,
        "shards_failing_diagnostics": failing,
        "likelihood": {
            "kind": "Gaussian, contrast and offset per bin integrated out analytically (flat prior), per shard",
            "points": int(sum(r["n_points"] for r in ok)),
            "thin": thin,
            "conditions_on": f"points with t2 > t1 on the lattice of every {thin}. frame in t1 and t2 "
                             f"of frames {list(ds.attrs['frames'])}, dealt to the shards by a hash of "
                             "(t1, t2)",
            "noise": {
                "treatment": "estimated from the least-squares residuals (fixed, not sampled), times kappa",
                "sigma": noise["sigma"].reshape(ds.sizes["q"], ds.sizes["phi"]).tolist(),
                "kappa": noise["kappa"].tolist(),
                "kappa_thin_1": noise["kappa_full"].tolist(),
                "correlation_length_frames": noise["correlation_length"].tolist(),
                "lag_window_frames": noise["window"].tolist(),
                "lag1_correlation": noise["rho1"].tolist(),
            },
        },
        "prior": {
            "kind": "on the sampling coordinates: u (log amplitude inside its allowed interval, logit "
                    "scale) ~ Normal(0, 1); slope s ~ Normal(0, s_max^2); value at 1 s y ~ Normal(centre, "
                    "half-range^2) of the bounds; logit-normal (logit sd 1) factors on alpha, beta, phi0; "
                    "zero outside the bounds",
            "normal_scales": {n: list(v) for n, v in coords.prior_scales().items()},
            "logit_sd": PRIOR_SD,
            "bounds": {n: [a, b] for n, a, b in zip(names, coords.lower, coords.upper)},
            "tempering": f"prior density of the sampling coordinates raised to 1/{K} in each shard "
                         "(Scott et al. 2016)",
            "sampling_coordinates": coords.w_names,
        },
        "settings": {"shards": K, "warmup": specs[0].warmup, "samples": samples, "chains": chains,
                     "thin": thin, "tile": size, "seed": seed, "combine": combine, "gap": float(L),
                     "target_accept": specs[0].target_accept},
        "initial_fit": {"source": fitted["source"],
                        "parameters": dict(zip(names, map(float, fitted["theta"])))},
        "warnings": warn,
        "reference": "Scott, Blocker, Bonassi, Chipman, George, McCulloch: Bayes and big data: the "
                     "consensus Monte Carlo algorithm, Int. J. Management Science and Engineering "
                     "Management 11(2), 78-88 (2016)",
        "wall_time_s": None,
    }
    result = CMCResult(
        mode=mode, names=names, draws=theta, shard_draws=shard_theta, sampling_names=coords.w_names,
        sampling_draws=w, shard_sampling_draws=shard_w, shard_names=[r["name"] for r in ok],
        summary=summary, shard_diverging=np.stack([r["diverging"] for r in ok]),
        fit=fit_result if fit_result is not None else fitted, warnings=warn,
    )
    _say(progress, _report(result))
    if out is not None:
        result.out = _write(out, result, ds, fit_result, started)
    summary["wall_time_s"] = time.perf_counter() - started
    return result


def _numpy_to_theta(coords):
    import jax
    import jax.numpy as jnp

    f = jax.jit(jax.vmap(coords.to_theta))

    def to_theta(w):
        return np.asarray(f(jnp.asarray(np.asarray(w, float))))

    return to_theta


def _identifiability(names, flat, w, coords) -> list[str]:
    out = []
    if flat.shape[0] > 2:
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.corrcoef(flat.T)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                if abs(c[i, j]) > 0.99:
                    out.append(f"{names[i]} and {names[j]} are not separately determined (posterior "
                               f"correlation {c[i, j]:+.3f}); rely on J(t) and gamma_dot(t)")
    wf = w.reshape(-1, w.shape[-1])
    for col, name in ((0, "D0"), (3, "gamma_dot_t0")):
        if col < wf.shape[1] and name in names:
            sd = wf[:, col].std()
            if sd > 0.5 * PRIOR_SD:
                out.append(f"{name} is determined mostly by its prior (posterior sd of its position "
                           f"coordinate u {sd:.2f}, prior {PRIOR_SD}); its bounds shape its posterior")
    return out


def _report(result: CMCResult) -> str:
    s = result.summary
    lines = [f"xpcsfit cmc: combined {len(result.shard_names)} shards ({s['combined']['method']}): "
             f"R-hat max {s['combined']['r_hat_max']:.3f}, bulk ESS min {s['combined']['ess_bulk_min']:.0f}, "
             f"{s['combined']['divergences']} divergences"]
    for n, p in s["parameters"].items():
        lines.append(f"  {n:20s} {p['mean']:12.5g} ± {p['sd']:.3g}  [{p['q03']:.5g}, {p['q97']:.5g}] {p['unit']}")
    for key in ("J", "gamma_dot"):
        if key + "_at_reference" in s["transport"]:
            for tt, p in s["transport"][key + "_at_reference"].items():
                lines.append(f"  {key}({tt} s){'':{max(1, 13 - len(key) - len(tt))}} {p['mean']:12.5g} ± {p['sd']:.3g}")
    for w in s["warnings"]:
        lines.append(f"xpcsfit cmc: warning: {w}")
    return "\n".join(lines)


def _input_info(ds, n_lattice) -> dict:
    return {
        "path": ds.attrs.get("source"), "sha256": ds.attrs.get("sha256"),
        "q": ds["q"].values.tolist(), "q_index": list(ds.attrs.get("q_index", [])),
        "phi": ds["phi"].values.tolist(), "dt": float(ds.attrs["dt"]),
        "frames": list(map(int, ds.attrs["frames"])), "n_points_lattice": int(n_lattice),
    }


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _write(target, result: CMCResult, ds, fit_result, started) -> Path:
    """Write the result into the claimed ``target`` (a ResultDirectory) and commit it."""
    import xarray as xr

    from xpcsfit.cmc.plots import bands_png, corner_png, trace_png

    tmp = target.partial
    post = xr.Dataset(
        {
            "shard_draws": (("shard", "chain", "draw", "parameter"), result.shard_draws),
            "draws": (("chain", "draw", "parameter"), result.draws),
            "shard_sampling_draws": (("shard", "chain", "draw", "coordinate"), result.shard_sampling_draws),
            "sampling_draws": (("chain", "draw", "coordinate"), result.sampling_draws),
            "diverging": (("shard", "chain", "draw"), result.shard_diverging),
        },
        coords={"shard": result.shard_names, "parameter": result.names,
                "coordinate": result.sampling_names},
        attrs={"mode": result.mode, "combine": result.summary["combined"]["method"],
               "units": json.dumps({n: UNITS[n] for n in result.names})},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post.to_zarr(tmp / "posterior.zarr", mode="w", consolidated=False)
    flat = result.draws.reshape(-1, len(result.names))
    corner_png(tmp / "corner.png", result.names, flat)
    trace_png(tmp / "trace.png", result.names, result.draws, result.shard_draws, result.shard_names)
    tr = result.summary["transport"]
    bands_png(tmp / "transport.png", np.asarray(tr["t"]), tr)
    if fit_result is not None:
        (tmp / "initial_fit.json").write_text(fit_result.to_json())
    result.summary["wall_time_s"] = time.perf_counter() - started
    record = json.loads(result.to_json()) | {"files": result_manifest(tmp, "summary.json")}
    (tmp / "summary.json").write_text(json.dumps(record, indent=1, allow_nan=True))
    return target.commit()
