"""Benchmark suite of xpcsfit: the workloads B1, B2, B3 of DESIGN.md §8.

    python benchmarks/bench_suite.py B1|B2|B3|all [--workers 2] [--plot scaling.png]
                                     [--data-dir DIR] [--frames T] [--verbose]

Each workload is simulated by ``xpcsfit simulate`` with a fixed seed (B3 is then
ingested into a Zarr store and streamed), cached under ``--data-dir`` so that reruns
skip generation, and fitted on a fresh LocalCluster. One table per workload gives
points, iterations, data passes, wall time with and without JAX compilation and
cluster start, time per data pass, peak memory per worker, bytes moved between the
driver and the workers, compilations per worker, final cost and convergence; B1 adds
scipy.optimize.least_squares and nlsq on the same points, model, start and bounds.
The targets of issue 3 are printed as PASS/FAIL lines (printed, not asserted).
``--plot`` writes time per data pass against points (log-log) and against workers.
See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _peers  # noqa: E402
import cloudpickle  # noqa: E402

import xpcsfit  # noqa: E402
from xpcsfit.engine.cluster import local_cluster  # noqa: E402
from xpcsfit.parameters import DEFAULT_GAP  # noqa: E402
from xpcsfit.simulate import truth_path  # noqa: E402

# The workers cannot import benchmarks/_peers.py: ship its functions by value.
cloudpickle.register_pickle_by_value(_peers)

DEFAULT_DATA_DIR = Path.home() / ".cache" / "xpcsfit-bench"
Q = 0.0055  # 1/Å, the one q of every workload
STORE_TILE = 256  # frames per chunk of the B3 store
MIB, GIB = 2**20, 2**30
SOLVER_TOLERANCES = {"ftol": 1e-8, "xtol": 1e-10, "gtol": 1e-8}  # xpcsfit's defaults; peers use them too


@dataclass(frozen=True)
class Workload:
    """One benchmark workload (DESIGN.md §8).

    Attributes
    ----------
    name : "B1" | "B2" | "B3"
    mode : fit mode, also the simulated model
    n_phi, n_frames : simulated phi bins and frames (maps are n_frames²)
    seed : simulation seed
    store : fit a Zarr store made by ``xpcsfit.ingest`` (else the HDF5 file)
    memory : the fit's ``memory`` setting ("auto" | "hold" | "stream")
    repeat : fit twice on the same cluster; the second fit is the warm one
    peers : run scipy and nlsq on the same problem
    what : what the workload shows
    """

    name: str
    mode: str
    n_phi: int
    n_frames: int
    seed: int
    store: bool
    memory: str
    repeat: bool
    peers: bool
    what: str

    @property
    def label(self) -> str:
        return f"{self.name} {self.mode} {self.n_phi} phi × {self.n_frames} frames"


WORKLOADS = {
    "B1": Workload("B1", "static", 3, 600, 1, False, "auto", True, True,
                   "small interactive fit; side by side with scipy and nlsq"),
    "B2": Workload("B2", "laminar_flow", 23, 1000, 2, False, "auto", True, False,
                   "a real beamline dataset on one machine"),
    "B3": Workload("B3", "laminar_flow", 23, 8000, 3, True, "stream", False, False,
                   "larger than the workers may hold: streamed from Zarr"),
}


# --------------------------------------------------------------------------- inputs


def input_paths(w: Workload, data_dir: Path) -> tuple[Path, Path]:
    """HDF5 file and Zarr store of a workload inside the cache directory."""
    stem = f"{w.name}_{w.mode}_{w.n_phi}phi_{w.n_frames}f_seed{w.seed}"
    return data_dir / f"{stem}.hdf", data_dir / f"{stem}.zarr"


def prepare_input(w: Workload, data_dir: Path) -> tuple[Path, dict]:
    """Simulate (and ingest) the workload's input unless it is cached.

    Returns the path to fit and the seconds spent: ``{"simulate_s", "ingest_s"}``
    (absent when cached). ``simulate`` and ``ingest`` write atomically, so a file or
    store that exists is complete.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    hdf, store = input_paths(w, data_dir)
    spent = {}
    need_hdf = not (hdf.exists() and truth_path(hdf).exists())
    if need_hdf and not (w.store and store.exists()):
        print(f"{w.name}: simulating {w.label} into {hdf} ...", flush=True)
        started = time.perf_counter()
        _xpcsfit_command("simulate", hdf, "--mode", w.mode, "--q", Q, "--n-phi", w.n_phi,
                         "--n-frames", w.n_frames, "--seed", w.seed)
        spent["simulate_s"] = time.perf_counter() - started
    if not w.store:
        return hdf, spent
    if not store.exists():
        print(f"{w.name}: ingesting into {store} (tile {STORE_TILE}) ...", flush=True)
        started = time.perf_counter()
        _xpcsfit_command("ingest", hdf, store, "--tile", STORE_TILE)
        spent["ingest_s"] = time.perf_counter() - started
    return store, spent


def _xpcsfit_command(*args) -> None:
    """Run the ``xpcsfit`` CLI in a separate process.

    Not in this one: the workers of a LocalCluster started later would inherit this
    process's peak resident memory (Linux keeps ru_maxrss across fork and exec), and
    generating B3 peaks at over 1 GB.
    """
    cmd = [sys.executable, "-m", "xpcsfit.cli", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_suite: {' '.join(cmd[1:])} failed: {done.stderr.strip()}")


# --------------------------------------------------------------------------- measuring


class CommMeter:
    """Bytes of the messages between this client and the scheduler (both directions).

    Counts the batched streams (graph submissions, key reports, releases); the
    scatter of x and the gather of the reduced sums travel on other connections and
    are counted by the engine itself (``bytes_to/from_workers_per_pass``).
    """

    def __init__(self, client, cluster):
        self.client, self.cluster = client, cluster

    def total(self) -> int:
        out = self.client.scheduler_comm.byte_count
        back = self.cluster.scheduler.client_comms.get(self.client.id)
        return int(out + (back.byte_count if back is not None else 0))


class ProgressTee(io.TextIOBase):
    """stdout during a fit: echoes xpcsfit's progress (optionally) and marks iterations.

    At the "xpcsfit: start" line and at every "iter" line it records the time and the
    :class:`CommMeter` total, so per-iteration differences exclude setup and teardown.
    """

    def __init__(self, meter: CommMeter, echo: bool):
        self.meter, self.echo, self.out = meter, echo, sys.stdout
        self.marks: list[tuple[float, int]] = []

    def write(self, s: str) -> int:
        if self.echo:
            self.out.write(s)
            self.out.flush()
        for line in s.splitlines():
            if line.startswith("xpcsfit: start") or line.lstrip().startswith("iter "):
                self.marks.append((time.perf_counter(), self.meter.total()))
        return len(s)

    def per_iteration_bytes(self) -> list[int]:
        return [b1 - b0 for (_, b0), (_, b1) in zip(self.marks, self.marks[1:])]


def compile_snapshot(client) -> dict:
    """Compilation counters of every worker (see :func:`_peers.read_compile_counter`)."""
    return client.run(_peers.read_compile_counter)


def fit_once(client, cluster, w: Workload, path: Path, echo: bool) -> dict:
    """One ``xpcsfit.fit`` on a started cluster, measured; returns a JSON-able record."""
    meter = CommMeter(client, cluster)
    tee = ProgressTee(meter, echo)
    before = compile_snapshot(client)
    started = time.perf_counter()
    with contextlib.redirect_stdout(tee):
        result = xpcsfit.fit(path, mode=w.mode, config={"memory": w.memory}, client=client, progress=True)
    wall = time.perf_counter() - started
    after = compile_snapshot(client)
    if not getattr(result, "engine", None) or getattr(result, "start", None) is None:
        raise RuntimeError("this xpcsfit reports no FitResult.engine / FitResult.start; "
                           "the benchmark needs the engine record of issue 3")
    e = result.engine
    return {
        "wall_s": wall,
        "n_points": int(result.n_points),
        "iterations": int(result.iterations),
        "normal_passes": int(e["normal_passes"]),
        "cost_passes": int(e["cost_passes"]),
        "pass_seconds": [float(v) for v in e["pass_seconds"]],
        "cost": float(result.chi2) / 2.0,
        "converged": bool(result.converged),
        "termination": str(result.termination),
        "tile": int(e["tile_size"]),
        "n_tiles": int(e["n_tiles"]),
        "storage": str(e["storage"]),
        "bytes_to_per_pass": float(e["bytes_to_workers_per_pass"]),
        "bytes_from_per_pass": float(e["bytes_from_workers_per_pass"]),
        "kernel_variants": {k: int(v) for k, v in e["compilations"].items()},
        "compiles": {k: _peers.compile_delta(before[k], after[k]) for k in after},
        "message_bytes_per_iteration": tee.per_iteration_bytes(),
        "x": np.asarray(result.x, float).tolist(),
        "start": np.asarray(result.start, float).tolist(),
        # The fit's per-bin noise level (its weights are 1/sigma²): the peers minimise the same cost.
        "sigma": np.asarray(result.noise["sigma"], float).tolist(),
        "lower": np.asarray(result.lower, float).tolist(),
        "upper": np.asarray(result.upper, float).tolist(),
    }


@contextlib.contextmanager
def fresh_cluster(n_workers: int):
    """A new LocalCluster and client (fresh worker processes: ru_maxrss is per workload)."""
    from distributed import Client

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        cluster = local_cluster(n_workers)
    with cluster, Client(cluster) as client:
        client.wait_for_workers(n_workers)
        client.run(_peers.install_compile_counter)
        yield cluster, client, time.perf_counter() - started


def measure_xpcsfit(w: Workload, path: Path, n_workers: int, echo: bool) -> dict:
    """Cluster start, a cold fit and (if ``w.repeat``) a warm fit, and peak memory."""
    with fresh_cluster(n_workers) as (cluster, client, cluster_s):
        if echo or not w.repeat:
            print(f"{w.name}: fitting on {n_workers} workers ...", flush=True)
        cold = fit_once(client, cluster, w, path, echo)
        warm = fit_once(client, cluster, w, path, echo) if w.repeat else None
        peaks = client.run(_peers.peak_rss_mib)
        limits = {a: i.get("memory_limit") for a, i in client.scheduler_info()["workers"].items()}
    return {"workers": n_workers, "cluster_s": cluster_s, "cold": cold, "warm": warm,
            "peak_mib": peaks, "memory_limit": limits, "driver_peak_mib": _peers.peak_rss_mib()}


# --------------------------------------------------------------------------- derived numbers


def max_compile_seconds(run: dict) -> float:
    """Seconds of tracing + compiling on the slowest-compiling worker during a fit."""
    return max((c["seconds"] for c in run["compiles"].values()), default=0.0)


def wall_incl(m: dict) -> float:
    """Cluster start + first fit (JAX compilation included)."""
    return m["cluster_s"] + m["cold"]["wall_s"]


def wall_excl(m: dict) -> tuple[float, bool]:
    """Fit wall time without compilation or cluster start, and whether it is estimated.

    The warm fit where there is one; else the cold fit less the compile seconds of the
    slowest worker.
    """
    if m["warm"] is not None:
        return m["warm"]["wall_s"], False
    return m["cold"]["wall_s"] - max_compile_seconds(m["cold"]), True


def mean_pass_s(m: dict) -> float:
    """Mean wall seconds of one data pass, compilation excluded (warm fit, else estimated)."""
    if m["warm"] is not None:
        return float(np.mean(m["warm"]["pass_seconds"]))
    cold = m["cold"]
    return max(0.0, sum(cold["pass_seconds"]) - max_compile_seconds(cold)) / len(cold["pass_seconds"])


def bytes_per_iteration(run: dict) -> dict:
    """Driver↔workers bytes per iteration: engine payload (x out, sums back) and messages."""
    passes = run["normal_passes"] + run["cost_passes"]
    per_pass = run["bytes_to_per_pass"] + run["bytes_from_per_pass"]
    payload = per_pass * passes / max(1, run["iterations"])
    msgs = run["message_bytes_per_iteration"]
    return {"payload": payload, "messages": float(np.median(msgs)) if msgs else float("nan")}


def compile_check(m: dict) -> tuple[bool, str]:
    """No JAX compilation after the first pass, per worker.

    With a warm fit: it compiled nothing at all on any worker. Without: no function was
    compiled twice on a worker during the cold fit (tiles have one padded shape, so a
    second compilation of a function would be a recompilation in a later pass).
    """
    if m["warm"] is not None:
        counts = {a: c["n"] for a, c in m["warm"]["compiles"].items()}
        return all(v == 0 for v in counts.values()), f"warm fit compiled {_per_worker(counts)}"
    repeated = {a: {k: v for k, v in c["by_name"].items() if v > 1} for a, c in m["cold"]["compiles"].items()}
    bad = {a: r for a, r in repeated.items() if r}
    counts = {a: c["n"] for a, c in m["cold"]["compiles"].items()}
    text = f"cold fit compiled {_per_worker(counts)}, no function twice" if not bad else \
        f"recompiled on workers: {bad}"
    return not bad, text


def _per_worker(values: dict) -> str:
    return "/".join(str(v) for _, v in sorted(values.items()))


# --------------------------------------------------------------------------- peers (B1)


def peer_problem(w: Workload, path: Path, run: dict, out: Path) -> int:
    """Write the B1 problem for the peers: xpcsfit's points, weights, start and bounds.

    Returns the number of residuals, which must equal xpcsfit's number of points.
    """
    ds = xpcsfit.open_dataset(path)  # the fit's default selection: every q, all phi, frames 1 … T-1
    c2 = np.asarray(ds["c2"].transpose("q", "phi", "t1", "t2").values, np.float32)
    t = np.asarray(ds["t1"].values, float)
    rows, cols = np.triu_indices(t.size, 1)
    points = c2[..., rows, cols]
    if not np.isfinite(points).all():
        raise RuntimeError(f"{path}: non-finite c2 above the diagonal")
    if points.size != run["n_points"]:
        raise RuntimeError(f"peers would fit {points.size:,} points, xpcsfit fitted {run['n_points']:,}")
    _peers.write_problem(out, mode=w.mode, q=ds["q"].values, phi=ds["phi"].values, t=t, c2_points=points,
                         L=DEFAULT_GAP, x0=run["start"], lower=run["lower"],
                         upper=run["upper"], sigma=run["sigma"], **SOLVER_TOLERANCES)
    return points.size


def run_peer(peer: str, problem: Path, workdir: Path) -> dict:
    """Run one peer in its own process (twice: cold, warm); its JSON record or an error."""
    out = workdir / f"{peer}.json"
    cmd = [sys.executable, str(HERE / "_peers.py"), str(problem), peer, str(out), "--repeats", "2"]
    print(f"B1: running {peer} in a separate process ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"peer": peer, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(out.read_text())


def measure_peers(w: Workload, path: Path, m: dict) -> list[dict]:
    """scipy and nlsq on the problem xpcsfit solved (skipping nlsq when not installed)."""
    with tempfile.TemporaryDirectory(prefix="xpcsfit-peers-") as tmp:
        workdir = Path(tmp)
        problem = workdir / "problem.npz"
        peer_problem(w, path, m["cold"], problem)
        records = []
        for peer in ("scipy", "nlsq"):
            if importlib.util.find_spec(peer) is None:
                records.append({"peer": peer, "error": "not installed (pip install -e '.[bench]')"})
                continue
            records.append(run_peer(peer, problem, workdir))
    return records


def peer_excl(rec: dict) -> float:
    """Warm (second) run of a peer, less what it still spent compiling in that run."""
    warm = rec["runs"][-1]
    return warm["wall_s"] - warm["compiles"]["seconds"]


# --------------------------------------------------------------------------- table


COLUMNS = [  # (header, width)
    ("run", 14), ("points", 12), ("iter", 5), ("passes n+c", 11), ("incl s", 8), ("excl s", 8),
    ("s/pass", 8), ("peak MiB/wkr", 13), ("B→/pass", 9), ("B←/pass", 9), ("msg B/iter", 11),
    ("compiles/wkr", 13), ("final cost", 17), ("conv", 5),
]


def _row(values) -> str:
    cells = []
    for (header, width), v in zip(COLUMNS, values):
        cells.append(f"{v:<{width}}" if header == "run" else f"{v:>{width}}")
    return " ".join(cells)


def xpcsfit_row(m: dict) -> str:
    cold, warm = m["cold"], m["warm"] or m["cold"]
    excl, estimated = wall_excl(m)
    b = bytes_per_iteration(warm)
    compiles = {a: c["n"] for a, c in cold["compiles"].items()}
    compiled = f"{max(compiles.values())}→{max(c['n'] for c in warm['compiles'].values())}" \
        if m["warm"] else f"{max(compiles.values())}"
    return _row([
        f"xpcsfit {xpcsfit.__version__}", f"{warm['n_points']:,}", warm["iterations"],
        f"{warm['normal_passes']}+{warm['cost_passes']}", f"{wall_incl(m):.2f}",
        f"{'≈' if estimated else ''}{excl:.2f}", f"{mean_pass_s(m):.3f}", f"{max(m['peak_mib'].values()):.0f}",
        f"{warm['bytes_to_per_pass']:.0f}", f"{warm['bytes_from_per_pass']:.0f}", f"{b['messages']:,.0f}",
        compiled, f"{warm['cost']:.10e}", str(warm["converged"]),
    ])


def peer_row(rec: dict) -> str:
    if "error" in rec:
        return f"{rec['peer']:<14} failed: {rec['error']}"
    cold, warm = rec["runs"][0], rec["runs"][-1]
    passes = warm["nfev"] + (warm["njev"] or 0)
    excl = peer_excl(rec)
    return _row([
        f"{rec['peer']} {rec['version']}", f"{rec['n_residuals']:,}", "-",
        f"{warm['njev'] if warm['njev'] is not None else '?'}+{warm['nfev']}", f"{cold['wall_s']:.2f}",
        f"{excl:.2f}", f"{excl / max(1, passes):.3f}", f"{rec['peak_rss_mib']:.0f}", "-", "-", "-",
        f"{cold['compiles']['n']}→{warm['compiles']['n']}", f"{warm['cost']:.10e}", str(warm["success"]),
    ])


def print_table(summary: dict) -> None:
    """The workload's table, details below it, and the peers' ratios."""
    m = summary["xpcsfit"]
    print()
    print(f"== {summary['label']} ({summary['what']}); {m['workers']} workers × 1 thread, "
          f"{os.cpu_count()} cores")
    gen = summary["generation"]
    print("   input: " + (", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in gen.items())
                          if gen else "cached") + f" — {summary['path']}")
    print(_row([h for h, _ in COLUMNS]))
    print(xpcsfit_row(m))
    for rec in summary.get("peers", []):
        print(peer_row(rec))
    print_details(m)
    if summary.get("peers"):
        print_ratios(m, summary["peers"])


def print_details(m: dict) -> None:
    cold, warm = m["cold"], m["warm"] or m["cold"]
    limit = min((v or 0) for v in m["memory_limit"].values()) / GIB
    print(f"   tiles: {warm['n_tiles']} of {warm['tile']} frames, {warm['storage']}; cluster start "
          f"{m['cluster_s']:.2f} s, first fit {cold['wall_s']:.2f} s"
          + (f", warm fit {m['warm']['wall_s']:.2f} s" if m["warm"] else " (no warm fit)")
          + f"; worker memory limit {limit:.1f} GiB; driver peak {m['driver_peak_mib']:.0f} MiB")
    print(f"   {'warm' if m['warm'] else 'first'} fit: data passes {sum(warm['pass_seconds']):.2f} s of "
          f"{warm['wall_s']:.2f} s (the rest: open, tiles to workers, start values)")
    for addr in sorted(m["peak_mib"]):
        c = cold["compiles"].get(addr, {"n": 0, "seconds": 0.0, "by_name": {}})
        kernels = ", ".join(f"{k} {v}" for k, v in sorted(c["by_name"].items()) if "_tile_" in k)
        print(f"   worker {addr}: peak {m['peak_mib'][addr]:.0f} MiB; first fit compiled {c['n']} "
              f"({c['seconds']:.2f} s; {kernels or 'no tile kernels'}); kernel variants held "
              f"{warm['kernel_variants'].get(addr, '?')}")
    b = bytes_per_iteration(warm)
    print(f"   driver↔workers per iteration: {b['payload']:,.0f} B payload (x out, reduced sums back) + "
          f"{b['messages']:,.0f} B scheduler messages (median of {len(warm['message_bytes_per_iteration'])} "
          f"iterations); termination: {warm['termination']}")


def print_ratios(m: dict, peers: list[dict]) -> None:
    x_time, _ = wall_excl(m)
    x_cost = (m["warm"] or m["cold"])["cost"]
    x_mem = sum(m["peak_mib"].values())
    for rec in peers:
        if "error" in rec:
            continue
        warm = rec["runs"][-1]
        rel = abs(warm["cost"] - x_cost) / x_cost
        note = ""
        if warm["compiles"]["n"]:
            note = (f"; its warm run still compiled {warm['compiles']['n']} functions "
                    f"({warm['compiles']['seconds']:.2f} s, subtracted)")
        print(f"   {rec['peer']:>5} / xpcsfit: time {peer_excl(rec) / x_time:.2f}× (excl. compilation), "
              f"|Δcost|/cost {rel:.1e}, peak memory {rec['peak_rss_mib'] / x_mem:.2f}× of Σ workers "
              f"({rec['peak_rss_mib']:.0f} vs {x_mem:.0f} MiB; its base after imports "
              f"{rec['rss_base_mib']:.0f} MiB){note}")


# --------------------------------------------------------------------------- targets


def check(ok: bool, text: str) -> None:
    print(f"   [{'PASS' if ok else 'FAIL'}] {text}")


def print_targets(summary: dict, others: dict) -> None:
    """The issue-3 targets of this workload (``others``: summaries of the other workloads)."""
    name, m = summary["workload"], summary["xpcsfit"]
    run = m["warm"] or m["cold"]
    peak_gib = max(m["peak_mib"].values()) / 1024
    print("   targets" + (" (sizes overridden with --frames: not the benchmark sizes)"
                         if summary["frames_overridden"] else "") + ":")
    if name == "B1":
        nlsq = next((r for r in summary["peers"] if r["peer"] == "nlsq" and "error" not in r), None)
        if nlsq is None:
            check(False, "B1 vs nlsq: nlsq did not run")
        else:
            speed = peer_excl(nlsq) / wall_excl(m)[0]
            rel = abs(nlsq["runs"][-1]["cost"] - run["cost"]) / run["cost"]
            check(speed >= 10, f"B1 ≥10× faster than nlsq warm: {peer_excl(nlsq):.2f} s / "
                               f"{wall_excl(m)[0]:.2f} s = {speed:.2f}×")
            check(rel <= 1e-6, f"B1 same final cost as nlsq within 1e-6 relative: {rel:.1e}")
    if name == "B2":
        incl = wall_incl(m)
        check(m["cold"]["converged"] and incl < 30,
              f"B2 converged under 30 s wall incl. cluster start and compilation: {incl:.1f} s, "
              f"converged {m['cold']['converged']}")
        check(peak_gib < 2, f"B2 peak memory < 2 GiB per worker: {peak_gib:.2f} GiB")
    if name == "B3":
        check(peak_gib < 2, f"B3 completed ({'converged' if run['converged'] else 'NOT converged'}: "
                            f"{run['termination']}) with peak < 2 GiB per worker: {peak_gib:.2f} GiB")
        b2 = others.get("B2")
        if b2 is None:
            print("   [ -- ] B3 per-pass time vs B2: no B2 result (run B2, or all)")
        else:
            scaled = mean_pass_s(b2["xpcsfit"]) * run["n_points"] / b2["xpcsfit"]["cold"]["n_points"]
            ratio = mean_pass_s(m) / scaled
            check(ratio <= 1.5, f"B3 time per pass within 1.5× of B2's scaled by points: "
                                f"{mean_pass_s(m):.2f} s vs {scaled:.2f} s = {ratio:.2f}× "
                                f"(B2 from {b2['source']})")
    ok, text = compile_check(m)
    check(ok, f"{name} JAX compilations after the first pass = 0 per worker: {text}")
    print_bytes_check(summary, others)


def print_bytes_check(summary: dict, others: dict) -> None:
    """Bytes driver↔workers per iteration, against the other workload with the same bins."""
    name, m = summary["workload"], summary["xpcsfit"]
    b = bytes_per_iteration(m["warm"] or m["cold"])
    peer = {"B2": "B3", "B3": "B2"}.get(name)
    other = others.get(peer) if peer else None
    text = f"payload {b['payload']:,.0f} B + messages {b['messages']:,.0f} B"
    if other is None:
        print(f"   [ -- ] {name} bytes driver↔workers per iteration: {text} "
              f"(independence of points is checked between B2 and B3, same bins)")
        return
    o = bytes_per_iteration(other["xpcsfit"]["warm"] or other["xpcsfit"]["cold"])
    n_self = summary["xpcsfit"]["cold"]["n_points"]
    n_other = other["xpcsfit"]["cold"]["n_points"]
    mine, theirs = b["payload"] + b["messages"], o["payload"] + o["messages"]
    ratio = max(mine, theirs) / min(mine, theirs)
    check(ratio <= 1.25, f"bytes driver↔workers per iteration independent of points: {name} {text}; "
                         f"{peer} payload {o['payload']:,.0f} B + messages {o['messages']:,.0f} B; "
                         f"ratio {ratio:.2f} for {max(n_self, n_other) / min(n_self, n_other):.0f}× the points")


# --------------------------------------------------------------------------- results cache


def result_path(data_dir: Path, w: Workload, n_workers: int) -> Path:
    return data_dir / "results" / f"{w.name}_{w.n_frames}f_{n_workers}w.json"


def save_summary(data_dir: Path, w: Workload, summary: dict) -> None:
    path = result_path(data_dir, w, summary["xpcsfit"]["workers"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))


def load_summary(data_dir: Path, w: Workload, n_workers: int) -> dict | None:
    """A summary saved by an earlier run, marked with where it came from."""
    path = result_path(data_dir, w, n_workers)
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    summary["source"] = f"an earlier run, {summary['date']}"
    return summary


# --------------------------------------------------------------------------- plot


def worker_sweep(w: Workload, path: Path, main: dict, counts=(1, 2)) -> dict[int, float]:
    """Warm time per data pass of ``w`` on 1 and 2 workers (reusing the main run's)."""
    times = {}
    for n in counts:
        if n == main["xpcsfit"]["workers"]:
            times[n] = mean_pass_s(main["xpcsfit"])
            continue
        m = measure_xpcsfit(replace(w, peers=False), path, n, echo=False)
        times[n] = mean_pass_s(m)
        print(f"{w.name}: {n} worker(s): {times[n]:.3f} s per data pass (warm), "
              f"{m['warm']['iterations'] if m['warm'] else m['cold']['iterations']} iterations")
    return times


def plot_scaling(path: Path, by_points: list[dict], sweep_name: str | None, sweep: dict[int, float]) -> None:
    """Two panels: s per data pass vs points (log-log) and vs workers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.FormatStrFormatter)

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for s in by_points:
        n, t = s["xpcsfit"]["cold"]["n_points"], mean_pass_s(s["xpcsfit"])
        cached = s["source"] != "this run"
        a.loglog([n], [t], "o", mfc="none" if cached else None, color="C0")
        a.annotate(f"{s['workload']} {s['mode']}\n{s['n_phi']}×{s['n_frames']}, {n:,} pts"
                   + (" (earlier run)" if cached else ""), (n, t), textcoords="offset points",
                   xytext=(6, -12), fontsize=8)
    flows = [s for s in by_points if s["mode"] == "laminar_flow"]
    if flows:
        ref = min(flows, key=lambda s: s["xpcsfit"]["cold"]["n_points"])
        n0, t0 = ref["xpcsfit"]["cold"]["n_points"], mean_pass_s(ref["xpcsfit"])
        xs = np.array([min(s["xpcsfit"]["cold"]["n_points"] for s in by_points) / 2,
                       max(s["xpcsfit"]["cold"]["n_points"] for s in by_points) * 2])
        a.loglog(xs, t0 * xs / n0, "--", color="0.6", lw=1, label=f"∝ points (through {ref['workload']})")
        a.legend(fontsize=8, loc="upper left")
    workers = by_points[0]["xpcsfit"]["workers"] if by_points else "?"
    if by_points:
        sizes = [s["xpcsfit"]["cold"]["n_points"] for s in by_points]
        a.set_xlim(min(sizes) / 3, max(sizes) * 20)  # room for the labels
    a.set(xlabel="points fitted", ylabel="s per data pass (compilation excluded)",
          title=f"time per pass vs points ({workers} workers)")
    a.grid(True, which="both", alpha=0.3)
    if sweep:
        ns = sorted(sweep)
        b.plot(ns, [sweep[n] for n in ns], "o-", color="C1", label=sweep_name)
        b.plot(ns, [sweep[ns[0]] * ns[0] / n for n in ns], "--", color="0.6", lw=1, label="ideal 1/workers")
        for n in ns:
            b.annotate(f"{sweep[n]:.3g} s", (n, sweep[n]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        b.set_xscale("log", base=2)
        b.set_yscale("log")
        b.set_xticks(ns, [str(n) for n in ns])
        b.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        b.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        b.set_xlim(ns[0] / 1.4, ns[-1] * 1.4)
        b.legend(fontsize=8)
    else:
        b.text(0.5, 0.5, "no worker sweep: run B1 or B2 with --plot", ha="center", transform=b.transAxes)
    b.set(xlabel="workers (1 thread each)", ylabel="s per data pass (warm)",
          title=f"time per pass vs workers ({sweep_name or '-'})")
    b.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"xpcsfit {xpcsfit.__version__} on {os.cpu_count()} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_plot(args, results: dict, inputs: dict) -> None:
    """Collect the per-points results (this run, else earlier ones) and the worker sweep."""
    by_points = []
    for name in WORKLOADS:
        s = results.get(name) or load_summary(args.data_dir, workload(name, args.frames), args.workers)
        if s is not None:
            by_points.append(s)
    sweep_name = next((n for n in ("B2", "B1") if n in results), None)
    sweep = {}
    if sweep_name:
        sweep = worker_sweep(workload(sweep_name, args.frames), inputs[sweep_name], results[sweep_name])
    plot_scaling(args.plot, by_points, sweep_name, sweep)
    print(f"\nwrote {args.plot}: time per data pass vs points "
          f"({', '.join(s['workload'] for s in by_points)}) and vs workers ({sweep_name or 'none'})")


# --------------------------------------------------------------------------- main


def workload(name: str, frames: int | None) -> Workload:
    """The named workload, with its frames overridden when ``frames`` is given."""
    w = WORKLOADS[name]
    return replace(w, n_frames=frames) if frames else w


def run_workload(w: Workload, args) -> tuple[dict, Path]:
    """Generate (or reuse) the input, measure xpcsfit (and peers), return the summary."""
    path, generation = prepare_input(w, args.data_dir)
    m = measure_xpcsfit(w, path, args.workers, args.verbose)
    summary = {
        "workload": w.name, "label": w.label, "what": w.what, "mode": w.mode, "n_phi": w.n_phi,
        "n_frames": w.n_frames, "frames_overridden": w.n_frames != WORKLOADS[w.name].n_frames,
        "path": str(path), "generation": generation, "xpcsfit": m,
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "cores": os.cpu_count(),
    }
    if w.peers:
        summary["peers"] = measure_peers(w, path, m)
    save_summary(args.data_dir, w, summary)
    summary["source"] = "this run"
    return summary, path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=[*WORKLOADS, "all"])
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers (1 thread each)")
    parser.add_argument("--plot", type=Path, help="write the 2-panel scaling PNG here")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help=f"cache of generated inputs and results (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--frames", type=int, help="override the frames of the workloads (smoke tests)")
    parser.add_argument("-v", "--verbose", action="store_true", help="echo xpcsfit's progress lines")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.simplefilter("ignore", xpcsfit.GapWarning)
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    print(f"xpcsfit {xpcsfit.__version__} benchmark suite: {', '.join(names)} on {args.workers} workers, "
          f"data in {args.data_dir}")
    results, inputs = {}, {}
    for name in names:
        w = workload(name, args.frames)
        summary, inputs[name] = run_workload(w, args)
        results[name] = summary
        others = {n: results.get(n) or load_summary(args.data_dir, workload(n, args.frames), args.workers)
                  for n in WORKLOADS if n != name}
        print_table(summary)
        print_targets(summary, {k: v for k, v in others.items() if v is not None})
    if args.plot:
        make_plot(args, results, inputs)


if __name__ == "__main__":
    main()
