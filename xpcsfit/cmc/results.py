"""CMC results: the combination of the shards, summary.json, posterior.zarr and PNGs.

:func:`summarise` turns the shard results of :func:`xpcsfit.cmc.driver.cmc` into a
:class:`CMCResult`: consensus (or parametric) combination, per-shard and combined
diagnostics, the effect of every shard that fails its diagnostics
(:func:`xpcsfit.cmc.combine.leave_one_out_effect`), J(t) and gamma_dot(t) bands.
:func:`report` is its text for the terminal; :func:`write` fills the result directory
(committed atomically).
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
from xpcsfit.cmc.coordinates import N_WINDOW, PRIOR_SD
from xpcsfit.cmc.plan import MAX_LEVEL_RELATIVE_SD, CMCRun
from xpcsfit.errors import SamplingError
from xpcsfit.io.result_dir import result_manifest
from xpcsfit.parameters import UNITS


@dataclass
class CMCResult:
    """Outcome of :func:`xpcsfit.cmc`; ``summary`` is the content of DIR/summary.json.

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
        The same in NUTS's sampling coordinates (see :mod:`xpcsfit.cmc.coordinates`).
    shard_names : list of str
    summary : dict
    shard_diverging : ndarray (K, chains, draws) of bool
        Divergent NUTS transitions.
    fit : FitResult
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
        return comb.transport_draws(self.mode, flat, np.atleast_1d(t))["J"]

    def gamma_dot_draws(self, t) -> np.ndarray:
        """gamma_dot(t) (1/s) for every combined draw (laminar_flow; zeros in static)."""
        flat = self.draws.reshape(-1, len(self.names))
        t = np.atleast_1d(t)
        if self.mode == "static":
            return np.zeros((flat.shape[0], t.size))
        return comb.transport_draws(self.mode, flat, t)["gamma_dot"]

    def J(self, t) -> np.ndarray:
        """Posterior mean of J(t), Å²/s."""
        return self.J_draws(t).mean(axis=0)

    def gamma_dot(self, t) -> np.ndarray:
        """Posterior mean of gamma_dot(t), 1/s."""
        return self.gamma_dot_draws(t).mean(axis=0)

    def to_json(self) -> str:
        return json.dumps(self.summary, indent=1, allow_nan=True)


def summarise(results: list[dict], run: CMCRun) -> CMCResult:
    """Combine the shards and describe the posterior; the result, not yet written.

    Parameters
    ----------
    results : list of dict
        One per shard, in shard order: :func:`xpcsfit.cmc.shard.run_shard`'s dict, or
        ``index``, ``name`` and ``error`` for a shard that failed.
    run : CMCRun
        What the run conditioned on and how.

    Raises
    ------
    SamplingError
        Every shard failed.
    """
    plan = run.plan
    ok = [r for r in results if "error" not in r]
    if not ok:
        raise SamplingError(f"all {plan.n_shards} cmc shards failed; first error: {results[0]['error']}")
    shard_w = np.stack([r["w"] for r in ok])
    w = comb.combine(shard_w, run.combine, run.sampler.seed)
    to_theta = _numpy_to_theta(plan.coords)
    theta = to_theta(w.reshape(-1, w.shape[-1])).reshape(w.shape)
    t = np.asarray(plan.ds["t1"].values, float)
    t_ref = np.quantile(t, [0.1, 0.5, 0.9]).round(6)
    shards, warn = _shard_summaries(results, shard_w, run, to_theta, t_ref)
    if run.shards.warning():
        warn.insert(0, run.shards.warning())
    names = list(plan.coords.names)
    params = comb.describe_all(names, theta)
    for n in names:
        params[n]["unit"] = UNITS[n]
    flat = theta.reshape(-1, len(names))
    outside = comb.outside_bounds(flat, plan.coords.lower, plan.coords.upper)
    if outside:
        warn.append(f"{outside} of {flat.shape[0]} combined draws lie outside the bounds (the consensus "
                    "average of in-bounds draws need not be in bounds); the shards' sub-posteriors "
                    "are not Gaussian enough there")
    warn += comb.identifiability_warnings(names, flat, w)
    combined = {
        "method": run.combine,
        "draws": int(flat.shape[0]),
        "r_hat_max": max(p["r_hat"] for p in params.values()),
        "ess_bulk_min": min(p["ess_bulk"] for p in params.values()),
        "divergences": int(sum(int(r["diverging"].sum()) for r in ok)),
        "outside_bounds": outside,
        "shards_combined": [r["name"] for r in ok],
    }
    summary = _summary(run, ok, params, _transport(plan.coords.mode, theta, t, t_ref), shards, combined, warn)
    return CMCResult(
        mode=plan.coords.mode, names=names, draws=theta, shard_draws=np.stack([r["theta"] for r in ok]),
        sampling_names=plan.coords.w_names, sampling_draws=w, shard_sampling_draws=shard_w,
        shard_names=[r["name"] for r in ok], summary=summary,
        shard_diverging=np.stack([r["diverging"] for r in ok]), fit=run.initial.result, warnings=warn,
    )


def _shard_summaries(results, shard_w, run: CMCRun, to_theta, t_ref) -> tuple[list[dict], list[str]]:
    """summary.json's entry of every shard, and a warning for each one that failed or
    fails its diagnostics (with its effect on the combination)."""
    K = run.plan.n_shards
    names = list(run.plan.coords.names)
    ok_index = [r["index"] for r in results if "error" not in r]
    entries, warn = [], []
    ok_names = [r["name"] for r in results if "error" not in r]
    discrepancy = {k: d | {"compared_with": [ok_names[j] for j in d["compared_with"]]}
                   for k, d in zip(ok_index, comb.shard_discrepancy(shard_w))}
    for r in results:
        entry = {"name": r["name"], "index": r["index"]}
        entries.append(entry)
        if "error" in r:
            entry.update(passed=False, problems=[r["error"]],
                         effect=f"not combined: the posterior conditions on {len(ok_index)} of {K} shards "
                                f"(prior kept at the power 1/{K} per shard)")
            warn.append(f"{r['name']} failed ({r['error']}); combined without it")
            continue
        stats = reported_stats(names, r["theta"], run.plan.coords.mode, t_ref)
        div = int(r["diverging"].sum())
        problems = comb.shard_problems(stats, div, run.sampler.chains, run.sampler.samples)
        disc = discrepancy.get(r["index"])
        if disc is not None and disc["p_value"] < comb.DISCREPANCY_P_LIMIT:
            problems.append(f"its sub-posterior disagrees with the other shards' combination (Mahalanobis "
                            f"distance² {disc['d2']:.1f} on {disc['dof']} degrees of freedom, chi-square tail "
                            f"probability {disc['p_value']:.2g} < {comb.DISCREPANCY_P_LIMIT:g}): its data are not "
                            "like the others' (corrupted frames?)")
        entry.update(consistency=disc)
        entry.update(
            worker=r["worker"], n_points=r["n_points"],
            wall_time_s=r["wall_time_s"], divergences=div, step_size=r["step_size"].tolist(),
            mean_leapfrog_steps=float(r["num_steps"].mean()), parameters=stats,
            r_hat_max=max(s["r_hat"] for s in stats.values()),
            ess_bulk_min=min(s["ess_bulk"] for s in stats.values()),
            passed=not problems, problems=problems,
        )
        if problems:
            eff = comb.leave_one_out_effect(shard_w, ok_index.index(r["index"]), run.combine, to_theta, names,
                                            run.plan.coords.mode, t_ref, run.sampler.seed)
            entry["effect"] = eff
            text = "; ".join(problems)
            if eff:
                text += (f". Effect: leaving it out moves the combined posterior by up to "
                         f"{eff['max_shift_sd']:.2f} sd ({eff['worst']}) and scales sds by "
                         f"{eff['sd_ratio_range'][0]:.2f}-{eff['sd_ratio_range'][1]:.2f}; it is kept in the combination")
            warn.append(f"{r['name']} fails its diagnostics: {text}")
    return entries, warn


def reported_stats(names, theta, mode, t_ref) -> dict:
    """describe() of every reported quantity of draws theta (chains, draws, p): the
    physics parameters, and J(t) and gamma_dot(t) at the reference times t_ref."""
    stats = comb.describe_all(names, theta)
    per_chain = comb.transport_draws(mode, theta, t_ref)
    for key, v in per_chain.items():
        for j, tt in enumerate(t_ref):
            stats[f"{key}({tt:g} s)"] = comb.describe(v[..., j])
    return stats


def _transport(mode, theta, t, t_ref) -> dict:
    """summary.json's "transport": J(t) and gamma_dot(t) bands on a grid over the
    window t (s), and their description at the reference times t_ref."""
    t_grid = np.linspace(t[0], t[-1], 100)
    flat = theta.reshape(-1, theta.shape[-1])
    tr_grid = comb.transport_draws(mode, flat, t_grid)
    tr_ref = comb.transport_draws(mode, flat, t_ref)
    transport = {"t": t_grid.tolist(), "reference_times": t_ref.tolist()}
    for key in tr_grid:
        transport[key] = comb.bands(tr_grid[key])
        transport[key]["unit"] = "Å²/s" if key == "J" else "1/s"
        per_chain = tr_ref[key].reshape(theta.shape[0], theta.shape[1], -1)
        transport[key + "_at_reference"] = {f"{tt:g}": comb.describe(per_chain[..., j])
                                            for j, tt in enumerate(t_ref)}
    return transport


def _summary(run: CMCRun, ok, params, transport, shards, combined, warn) -> dict:
    """The content of summary.json (``wall_time_s`` filled in when the run ends)."""
    plan = run.plan
    return {
        "xpcsfit_version": _version("xpcsfit"),
        "mode": plan.coords.mode,
        "input": _input_info(plan.ds, plan.n_lattice),
        "parameters": params,
        "transport": transport,
        "shards": shards,
        "combined": combined,
        "shards_failing_diagnostics": [s["name"] for s in shards if not s["passed"]],
        "likelihood": _likelihood_record(run, ok),
        "prior": _prior_record(plan.coords, plan.n_shards),
        "sampling": _sampling_record(run),
        "shard_count": _shard_count_record(run.shards),
        "settings": {"shards": plan.n_shards, "warmup": run.sampler.warmup, "samples": run.sampler.samples,
                     "chains": run.sampler.chains, "thin": plan.thin, "tile": plan.tile,
                     "seed": run.sampler.seed, "combine": run.combine, "gap": float(plan.L),
                     "target_accept": run.sampler.target_accept},
        "initial_fit": {"source": run.initial.source,
                        "parameters": run.initial.result.parameters},
        "warnings": warn,
        "reference": "Scott, Blocker, Bonassi, Chipman, George, McCulloch: Bayes and big data: the "
                     "consensus Monte Carlo algorithm, Int. J. Management Science and Engineering "
                     "Management 11(2), 78-88 (2016)",
        "wall_time_s": None,
    }


def _shard_count_record(choice) -> dict:
    return {
        "K": choice.n_shards,
        "how": "given" if choice.given else "the smaller of the worker threads and the shards the data support",
        "worker_threads": choice.worker_threads,
        "most_by_information": choice.most_by_information,
        "rule": f"each shard's Laplace sd of every level (window mean of J, gamma_dot) at most "
                f"{MAX_LEVEL_RELATIVE_SD:g} of its value; a shard has sqrt(K) times the sd on all points",
        "level_relative_sd_all_points": choice.level_relative_sd,
        "level_relative_sd_per_shard": choice.shard_relative_sd(),
    }


def _likelihood_record(run: CMCRun, ok) -> dict:
    plan, noise, thin = run.plan, run.noise, run.plan.thin
    return {
        "kind": "Gaussian, contrast and offset per bin integrated out analytically (flat prior), per shard",
        "points": int(sum(r["n_points"] for r in ok)),
        "thin": thin,
        "conditions_on": f"points with t2 > t1 on the lattice of every {thin}. frame in t1 and t2 "
                         f"of frames {list(plan.ds.attrs['frames'])}, dealt to the shards by a hash of "
                         "(t1, t2)",
        "noise": {
            "treatment": "estimated from the least-squares residuals (fixed, not sampled), times kappa",
            "sigma": noise["sigma"].reshape(plan.ds.sizes["q"], plan.ds.sizes["phi"]).tolist(),
            "kappa": noise["kappa"].tolist(),
            "kappa_thin_1": noise["kappa_full"].tolist(),
            "correlation_length_frames": noise["correlation_length"].tolist(),
            "lag_window_frames": noise["window"].tolist(),
            "lag1_correlation": noise["rho1"].tolist(),
        },
    }


def _prior_record(coords, K: int) -> dict:
    return {
        "kind": "on the sampling coordinates: u (window-mean amplitude inside its allowed interval, logit "
                "scale) ~ Normal(0, 1); signed rms variation over the window ~ Normal(0, largest the bounds "
                "allow^2); window mean ~ Normal(centre, half-range^2) of the bounds of amplitude + offset; "
                "logit(phi0 on its bounds) ~ Normal(0, 1); zero outside the bounds",
        "normal_scales": {n: list(v) for n, v in coords.prior_scales().items()},
        "logit_sd": PRIOR_SD,
        "bounds": {n: [a, b] for n, a, b in zip(coords.names, coords.lower, coords.upper)},
        "tempering": f"prior density of the sampling coordinates raised to 1/{K} in each shard "
                     "(Scott et al. 2016)",
        "sampling_coordinates": coords.w_names,
    }


def _sampling_record(run: CMCRun) -> dict:
    """summary.json's "sampling": how NUTS walked, and what posterior it targets."""
    from xpcsfit.cmc.shard import CHAIN_METHOD

    return {
        "posterior": "the full model as asked (every physics parameter free, within its bounds); no "
                     "parameter is fixed or reduced, so the reported J(t) and gamma_dot(t) are its posterior",
        "coordinates": "NUTS walks the sampling coordinates of xpcsfit.cmc.coordinates (per power law the mean and "
                       "signed rms variation over the measured window of its moving average, which the data "
                       "determine, and the position u of its window-mean amplitude, which they may not; phi0 on the "
                       "logit scale), whitened by the Hessian of the shard target at the least-squares point",
        "moving_average": {"window_times": run.plan.coords.averaged, "of": N_WINDOW,
                           "seconds": run.plan.coords.averaged_seconds},
        "known_limit": "when alpha ≈ 0 and beta ≈ 0 an amplitude and its offset are not separately determined: "
                       "u is then set by its prior; J(t) and gamma_dot(t) over the window are not",
        "least_squares_warnings": [w for w in run.initial.result.warnings if "determined" in w],
        "mass_matrix": "dense, adapted in the whitened coordinates (started from the identity there)",
        "init": "over-dispersed around the least-squares point (about 1 posterior sd), one start per chain",
        "chain_method": CHAIN_METHOD,
        "chain_method_why": "on a CPU worker vectorised chains cost more than the chains in turn (README, CMC)",
        "target_accept": run.sampler.target_accept,
    }


def _numpy_to_theta(coords):
    import jax
    import jax.numpy as jnp

    f = jax.jit(jax.vmap(coords.to_theta))

    def to_theta(w):
        return np.asarray(f(jnp.asarray(np.asarray(w, float))))

    return to_theta


def report(result: CMCResult) -> str:
    """The terminal lines of a result: combined diagnostics, parameters, J and gamma_dot, warnings."""
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


def write(target, result: CMCResult, run: CMCRun, started: float) -> Path:
    """Write the result into the claimed ``target`` (a ResultDirectory) and commit it.

    DIR/posterior.zarr, corner.png, trace.png, transport.png, summary.json (with the
    wall time since ``started``, a ``time.perf_counter()`` value, and a manifest of the
    files) and, for a least-squares fit run by cmc, initial_fit.json. Returns the
    committed directory.
    """
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
    if run.initial.ran_here:
        (tmp / "initial_fit.json").write_text(run.initial.result.to_json())
    result.summary["wall_time_s"] = time.perf_counter() - started
    record = json.loads(result.to_json()) | {"files": result_manifest(tmp, "summary.json")}
    (tmp / "summary.json").write_text(json.dumps(record, indent=1, allow_nan=True))
    return target.commit()
