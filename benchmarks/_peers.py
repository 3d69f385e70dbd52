"""Single-process peers of benchmark B1: ``scipy.optimize.least_squares`` and nlsq.

Both fit exactly the points xpcsfit fits (t2 > t1 in the selected frames, every
(q, phi) bin) with the same JAX model (:func:`xpcsfit.model.c2_model`), from the same
start and within the same bounds, with the residual

    r = (c2_model(theta, contrast_k, offset_k, t1, t2) - c2) / sigma_k     one entry per point

(sigma_k the noise level xpcsfit estimated for bin k: its weights are 1/sigma_k², so all
three minimise the same cost)
evaluated point by point (``jax.vmap``), so neither peer pays for the lower triangle.
scipy gets the residual and its forward-mode Jacobian (``jax.jacfwd``), both jitted;
nlsq gets the JAX residual and differentiates it itself.

Run as a subprocess by ``bench_suite.py`` (``import nlsq`` switches JAX to float64
process-wide, and the peak memory of a peer is that of its own process)::

    python benchmarks/_peers.py PROBLEM.npz {scipy,nlsq} OUT.json [--repeats 2]

PROBLEM.npz is written by :func:`write_problem`; OUT.json receives one record per run
(wall time, cost = ½Σ(r/sigma)², evaluations, compilations) and the process's peak memory.

The module also holds :func:`install_compile_counter` / :func:`read_compile_counter`,
which count JAX compilations in a process (used here and, through ``client.run``, on
the Dask workers).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

_COUNTER_TAG = "xpcsfit_bench_compile_counter"


# --------------------------------------------------------------------------- compilations


def install_compile_counter() -> bool:
    """Register (once per process) a JAX monitoring listener that counts compilations.

    Every XLA backend compilation is counted under its function name; the seconds of
    tracing, lowering and compiling are summed. Returns True if newly installed.
    """
    import jax.monitoring
    from jax._src import dispatch, monitoring

    if any(getattr(cb, _COUNTER_TAG, False) for cb in monitoring.get_event_duration_listeners()):
        return False
    compile_events = {dispatch.JAXPR_TRACE_EVENT, dispatch.JAXPR_TO_MLIR_MODULE_EVENT,
                      dispatch.BACKEND_COMPILE_EVENT}
    backend_event = dispatch.BACKEND_COMPILE_EVENT

    class Counter:
        def __init__(self):
            self.by_name: dict[str, int] = {}
            self.seconds = 0.0

        def __call__(self, event, duration, **kwargs):
            if event in compile_events:
                self.seconds += duration
            if event == backend_event:
                name = str(kwargs.get("fun_name", "?"))
                self.by_name[name] = self.by_name.get(name, 0) + 1

    counter = Counter()
    setattr(counter, _COUNTER_TAG, True)
    jax.monitoring.register_event_duration_secs_listener(counter)
    return True


def read_compile_counter() -> dict:
    """Snapshot of this process's counter: ``{"by_name": {...}, "seconds": float}``."""
    from jax._src import monitoring

    for cb in monitoring.get_event_duration_listeners():
        if getattr(cb, _COUNTER_TAG, False):
            return {"by_name": dict(cb.by_name), "seconds": float(cb.seconds)}
    return {"by_name": {}, "seconds": 0.0}


def compile_delta(before: dict, after: dict) -> dict:
    """Compilations between two snapshots: ``{"n", "seconds", "by_name"}``."""
    names = {k: after["by_name"].get(k, 0) - before["by_name"].get(k, 0) for k in after["by_name"]}
    names = {k: v for k, v in names.items() if v}
    return {"n": sum(names.values()), "seconds": after["seconds"] - before["seconds"], "by_name": names}


def peak_rss_mib() -> float:
    """Peak resident memory of the calling process over its lifetime, MiB (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident memory of the calling process now, MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


# --------------------------------------------------------------------------- problem


def write_problem(path, *, mode, q, phi, t, c2_points, L, x0, lower, upper, sigma, ftol, xtol, gtol):
    """Save one least-squares problem for the peers.

    Parameters
    ----------
    c2_points : ndarray (n_q, n_phi, n_pairs), float32
        c2 at the pairs ``numpy.triu_indices(t.size, 1)`` (t2 > t1) of each bin.
    t : ndarray (n_t,)
        Times of the selected frames, s.
    x0, lower, upper : ndarray (P,)
        xpcsfit's layout: physics, contrast per bin, offset per bin; bins (q, phi).
    sigma : ndarray (n_q, n_phi)
        xpcsfit's noise level per bin (``FitResult.noise["sigma"]``); residuals are divided by it.
    """
    np.savez(path, mode=np.array(mode), q=np.asarray(q, float), phi=np.asarray(phi, float),
             t=np.asarray(t, float), c2=np.asarray(c2_points, np.float32), L=float(L),
             x0=np.asarray(x0, float), lower=np.asarray(lower, float), upper=np.asarray(upper, float),
             sigma=np.asarray(sigma, float), tol=np.array([ftol, xtol, gtol], float))


def load_problem(path) -> dict:
    """Inverse of :func:`write_problem`."""
    with np.load(path) as z:
        p = {k: z[k] for k in z.files}
    p["mode"] = str(p["mode"])
    p["L"] = float(p["L"])
    p["ftol"], p["xtol"], p["gtol"] = map(float, p.pop("tol"))
    return p


def residual_function(problem):
    """The JAX residual r(x, t1, t2, data) over every fitted point, and its data arguments.

    Returns
    -------
    residual : callable(x, t1, t2, data) -> (n_q · n_phi · n_pairs,)
    args : tuple (t1, t2, data) of JAX arrays
    """
    import jax
    import jax.numpy as jnp

    from xpcsfit.model import c2_model, enable_float64
    from xpcsfit.parameters import MODES

    enable_float64()  # the peers fit in float64, as xpcsfit does

    mode, L = problem["mode"], problem["L"]
    q, phi, t = problem["q"], problem["phi"], problem["t"]
    n_q, n_phi = q.size, phi.size
    p, nb = len(MODES[mode]), n_q * n_phi
    rows, cols = np.triu_indices(t.size, 1)
    phi_j = jnp.asarray(phi)
    sigma = jnp.asarray(problem["sigma"]).reshape(n_q, n_phi)

    def one_q(theta, contrast, offset, qk, t1, t2):
        def at(a, b):
            return c2_model(theta, contrast, offset, mode, qk, L, phi_j, a[None], b[None])[:, 0, 0]
        return jax.vmap(at, out_axes=1)(t1, t2)  # (n_phi, n_pairs)

    def residual(x, t1, t2, data):
        theta = x[:p]
        contrast = x[p : p + nb].reshape(n_q, n_phi)
        offset = x[p + nb :].reshape(n_q, n_phi)
        parts = [((one_q(theta, contrast[k], offset[k], q[k], t1, t2) - data[k]) / sigma[k][:, None]).ravel()
                 for k in range(n_q)]
        return jnp.concatenate(parts)

    args = (jnp.asarray(t[rows]), jnp.asarray(t[cols]),
            jnp.asarray(problem["c2"].astype(np.float64)))
    return residual, args


# --------------------------------------------------------------------------- peers


def run_scipy(problem, repeats: int) -> list[dict]:
    """scipy.optimize.least_squares (trf, x_scale="jac") with jitted residual and Jacobian."""
    import jax
    from scipy.optimize import least_squares

    residual, args = residual_function(problem)
    r_jit = jax.jit(residual)
    j_jit = jax.jit(jax.jacfwd(residual))

    def fun(x):
        return np.asarray(r_jit(x, *args))

    def jac(x):
        return np.asarray(j_jit(x, *args))

    def once():
        return least_squares(fun, problem["x0"], jac=jac, bounds=(problem["lower"], problem["upper"]),
                             method="trf", x_scale="jac", ftol=problem["ftol"],
                             xtol=problem["xtol"], gtol=problem["gtol"])

    return [_timed(once, lambda r: dict(nfev=int(r.nfev), njev=int(r.njev or 0), status=int(r.status),
                                        success=bool(r.status > 0), message=str(r.message)))
            for _ in range(repeats)]


def run_nlsq(problem, repeats: int) -> list[dict]:
    """nlsq.LeastSquares().least_squares (trf, x_scale="jac"); nlsq differentiates the residual."""
    import jax
    import nlsq

    residual, args = residual_function(problem)
    r_jit = jax.jit(residual)

    def fun(x):
        return r_jit(x, *args)

    solver = nlsq.LeastSquares()

    def once():
        return solver.least_squares(fun, problem["x0"], bounds=(problem["lower"], problem["upper"]),
                                    method="trf", x_scale="jac", ftol=problem["ftol"],
                                    xtol=problem["xtol"], gtol=problem["gtol"])

    def info(r):
        njev = r.get("njev")
        return dict(nfev=int(r.get("nfev") or 0), njev=int(njev) if njev is not None else None,
                    status=int(r.get("status", 0)), success=bool(r.get("success", False)),
                    message=str(r.get("message", "")))

    return [_timed(once, info) for _ in range(repeats)]


def _timed(solve, info) -> dict:
    """Run one solve; wall time, cost ½Σ(r/sigma)², x, compilations and the solver's own counts."""
    before = read_compile_counter()
    started = time.perf_counter()
    result = solve()
    wall = time.perf_counter() - started
    x = np.asarray(result["x"] if isinstance(result, dict) else result.x, float)
    cost = float(result["cost"] if isinstance(result, dict) else result.cost)
    return {"wall_s": wall, "cost": cost, "x": x.tolist(),
            "compiles": compile_delta(before, read_compile_counter())} | info(result)


PEERS = {"scipy": run_scipy, "nlsq": run_nlsq}


def peer_version(peer: str) -> str:
    """Version string of the peer library."""
    import importlib.metadata

    return importlib.metadata.version({"scipy": "scipy", "nlsq": "nlsq"}[peer])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run one B1 peer on a saved problem.")
    parser.add_argument("problem", type=Path)
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    install_compile_counter()
    problem = load_problem(args.problem)
    if args.peer == "nlsq":
        import nlsq  # noqa: F401  (imported before measuring the baseline)
    base = current_rss_mib()
    runs = PEERS[args.peer](problem, args.repeats)
    record = {"peer": args.peer, "version": peer_version(args.peer), "runs": runs,
              "n_residuals": int(problem["c2"].size), "rss_base_mib": base,
              "peak_rss_mib": peak_rss_mib()}
    args.out.write_text(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
