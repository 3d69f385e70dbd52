"""Faults shown by the suite: a worker SIGKILLed mid-fit, the CLI SIGKILLed at random
moments, workers whose memory_limit is too small for a tile.

The tests start their own clusters: they kill worker processes and the CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import psutil
import pytest

import xpcsfit
from xpcsfit.engine.evaluator import DaskEvaluator
from xpcsfit.engine.spans import task_kind
from xpcsfit.engine.tiles import plan_tiles
from xpcsfit.parameters import MODES, ParameterLayout
from xpcsfit.simulate import simulate

from dask_processes import dask_processes, remove_worker_plugin, wait_for_workers, wait_until

pytestmark = pytest.mark.slow

# Far from the truth (D0 2e4, alpha 0, gamma_dot_t0 2e-4, phi0 6): about 30 iterations.
FAR_START = {"D0": 3000.0, "alpha": -0.5, "gamma_dot_t0": 2.0e-3, "phi0": -5.0}
TILE = 64
N_PHI = 4
HANG = 180  # s: a fit here that has not ended by then hangs (they take 3–30 s)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two workers of this module's own (they get killed; their nannies restart them).

    A task whose workers die twice fails with KilledWorker (allowed-failures 1 instead
    of Dask's 3), so the KilledWorker test needs two worker deaths, not four.
    """
    with dask_processes(tmp_path_factory.mktemp("cluster"), 2, allowed_failures=1) as client:
        yield client


@pytest.fixture(scope="module")
def flow_file(tmp_path_factory):
    """1 q × 4 phi × 160 frames: 6 tiles of 64 frames, so 6 parts over the 2 workers."""
    path = tmp_path_factory.mktemp("faults") / "flow.hdf"
    return simulate(path, q=(0.0055,), n_phi=N_PHI, n_frames=160, noise=0.01, seed=5)


@pytest.fixture(scope="module")
def reference(cluster, flow_file):
    """The fit from FAR_START with tiles held or streamed, as no fault disturbed it."""
    fits = {}

    def get(memory):
        if memory not in fits:
            wait_for_workers(cluster, 2)
            fits[memory] = fit_quiet(flow_file, client=cluster, tile=TILE, gap=2.0e6,
                                     config={"memory": memory, "initial": FAR_START})
        return fits[memory]

    return get


def assert_same_fit(result, reference):
    """Bit for bit: the sums per part and their tree do not depend on which worker ran them."""
    assert np.array_equal(result.x, reference.x)
    assert result.chi2 == reference.chi2
    assert (result.termination, result.iterations, result.data_passes) == \
        (reference.termination, reference.iterations, reference.data_passes)


def fit_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xpcsfit.GapWarning)
        return xpcsfit.fit(*args, progress=False, **kwargs)


def within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, failing the test if it has not returned after ``seconds``
    (a hung fit would otherwise hang the suite)."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{fn.__name__} had not returned after {seconds} s: hung")
    if "error" in box:
        raise box["error"]
    return box["value"]


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def solver_pass(key) -> int | None:
    """The pass number of a solver pass's task (normal equations or costs; key
    ``("xpcsfit-<kind>-<token>-pass-<n>", part)``), else None."""
    if task_kind(key) not in ("normal-equations", "costs"):
        return None
    return int(key[0].rsplit("-pass-", 1)[1])


class KillDuringPass(threading.Thread):
    """SIGKILL the worker process that runs a solver pass's task of pass number ``after``
    or later (the fit's passes of every kind counted, the start values' lag sums first).

    Watches the scheduler's processing lists; records (address, pid, key) in ``killed``.
    """

    def __init__(self, client, after: int):
        super().__init__(daemon=True)
        self.client, self.after = client, after
        self.pids = client.run(os.getpid)
        self.killed: tuple[str, int, str] | None = None
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for address, keys in self.client.processing().items():
                for key in keys:
                    n = solver_pass(key)
                    if n is not None and n >= self.after and address in self.pids:
                        os.kill(self.pids[address], signal.SIGKILL)
                        self.killed = (address, self.pids[address], key)
                        return
            time.sleep(0.005)


@pytest.mark.parametrize("memory", ["hold", "stream"])
def test_worker_killed_mid_fit_gives_identical_parameters(memory, cluster, flow_file, reference):
    from distributed import get_task_stream

    ref = reference(memory)
    assert ref.engine["storage"] == memory
    assert ref.data_passes >= 30, "the kill after pass 8 must land mid-fit"
    wait_for_workers(cluster, 2)  # a worker killed by an earlier test is back
    killer = KillDuringPass(cluster, after=8)
    started = time.monotonic()
    with get_task_stream(cluster) as stream:
        killer.start()
        try:
            result = within(HANG, fit_quiet, flow_file, client=cluster, tile=TILE, gap=2.0e6,
                            config={"memory": memory, "initial": FAR_START})
        finally:
            killer.stop.set()
            killer.join()
    assert killer.killed is not None, "no pass task of pass >= 8 was seen running"
    address, pid, key = killer.killed
    print(f"\nfit with the worker running {key} killed: {time.monotonic() - started:.1f} s "
          f"({ref.iterations} iterations, {ref.data_passes} passes)")
    assert_same_fit(result, ref)

    # The worker really died; the task it was running and the parts it had were computed
    # again elsewhere; its nanny started a new worker process.
    assert wait_until(lambda: pid_gone(pid), timeout=10)
    ran = [(t["key"], t["worker"]) for t in stream.data]
    if (key, address) not in ran:  # it had not just finished there as the kill came
        assert any(k == key and w != address for k, w in ran), f"{key} was not recomputed"
    part_runs = [k for k, _ in ran if task_kind(k) == "load"]
    assert len(part_runs) > result.engine["n_parts"], "no lost part was recomputed"
    wait_for_workers(cluster, 2)
    now = cluster.run(os.getpid)
    assert address not in now and pid not in now.values()


def test_every_worker_killed_while_loading_the_fit_recovers(cluster, flow_file, reference, tmp_path):
    """All workers gone at once: the parts wait for new workers (not for the dead ones'
    addresses, which never come back) and the fit ends as undisturbed."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class DieOnceOnLoad(WorkerPlugin):
        """The first process of each worker (by name) is SIGKILLed as it starts to load
        a part of tiles; the one its nanny starts next is left alone."""

        name = "xpcsfit-test-die-once-on-load"

        def __init__(self, marks):
            self.marks = marks

        def setup(self, worker):
            self.mark = os.path.join(self.marks, f"died-{worker.name}")

        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and task_kind(key) == "load" and not os.path.exists(self.mark):
                open(self.mark, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

    def set_allowed_failures(n, dask_scheduler=None):
        dask_scheduler.allowed_failures = n

    ref = reference("hold")
    wait_for_workers(cluster, 2)
    pids = cluster.run(os.getpid)
    # Dask's default (3), not this module's 1: a part whose worker dies is queued on the
    # other worker, which may then die too, so a part can see two deaths here.
    cluster.run_on_scheduler(set_allowed_failures, 3)
    cluster.register_plugin(DieOnceOnLoad(str(tmp_path)))
    try:
        result = within(HANG, fit_quiet, flow_file, client=cluster, tile=TILE, gap=2.0e6,
                        config={"memory": "hold", "initial": FAR_START})
    finally:
        remove_worker_plugin(cluster, DieOnceOnLoad.name, 2)
        cluster.run_on_scheduler(set_allowed_failures, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["died-0", "died-1"]
    assert wait_until(lambda: all(map(pid_gone, pids.values())), timeout=10)
    assert_same_fit(result, ref)


# -- the CLI killed at random moments ------------------------------------------------


class CliRun:
    """``xpcsfit fit`` as a subprocess, with two moments of its run (s from its start):
    ``write_started``, when anything beside or in the result directory changed (the
    output is being written), and ``replaced``, when the result's fit.json changed."""

    def __init__(self, cmd, out):
        self.out = out
        self.before = self._entries()
        self.fit_json = self._fit_json_id()
        self.stderr = tempfile.TemporaryFile()  # not beside the result: that is checked
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     env=dict(os.environ))
        self.write_started: float | None = None
        self.replaced: float | None = None

    def _entries(self) -> set:
        """(path, mtime) of the entries beside the result directory and in it."""
        paths = list(self.out.parent.iterdir())
        if self.out.is_dir():
            paths += list(self.out.iterdir())
        entries = set()
        for p in paths:
            with contextlib.suppress(FileNotFoundError):  # renamed meanwhile
                entries.add((p, p.stat().st_mtime_ns))
        return entries

    def _fit_json_id(self):
        try:
            st = (self.out / "fit.json").stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _poll(self) -> float:
        now = time.monotonic() - self.started
        if self.write_started is None and self._entries() != self.before:
            self.write_started = now
        if self.replaced is None and self._fit_json_id() != self.fit_json:
            self.replaced = now
        return now

    def _check_deadline(self, now: float) -> None:
        if now > HANG:
            self.proc.kill()
            pytest.fail(f"xpcsfit fit had not ended after {HANG} s: hung")

    def until_replaced(self) -> None:
        """Wait until the result is in place, then SIGKILL the run (what is left is its
        report on the console and the exit); it must not have failed before."""
        while self.replaced is None and self.proc.poll() is None:
            self._check_deadline(self._poll())
            time.sleep(0.005)
        self.proc.kill()
        self.proc.wait()
        self.stderr.seek(0)
        assert self.replaced is not None and self.proc.returncode in (0, 4, -signal.SIGKILL), \
            self.stderr.read().decode()
        self.stderr.close()

    def kill_at(self, when: float, after_write_start: bool) -> bool:
        """SIGKILL ``when`` s after the start (or after the writing began); True if it
        was still running then."""
        while self.proc.poll() is None:
            now = self._poll()
            self._check_deadline(now)
            origin = self.write_started if after_write_start else 0.0
            if origin is not None and now >= origin + when:
                self.proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        self.proc.wait()
        self.stderr.close()
        return self.proc.returncode == -signal.SIGKILL


def result_files(out) -> dict:
    """{relative path: sha256} of every file under the result directory ``out``."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def check_complete(out, frames) -> dict:
    """``out`` holds the whole result of the run that fitted ``frames``; returns its files.

    Every run below fits a different frame range, so a file from another run does not
    match: fit.json names the frames, fitted.zarr's time axis is as long as they are and
    each of its fitted tiles is written, and every PNG is there.
    """
    import zarr

    doc = json.loads((out / "fit.json").read_text())
    assert doc["input"]["frames"] == list(frames) and "parameters" in doc
    first, last = frames
    a = first % TILE  # fitted.zarr starts at the tile-aligned frame before the first one
    n = last - first + 1
    rows, cols = np.triu_indices(n, 1)
    root = zarr.open_group(str(out / "fitted.zarr"), mode="r")
    for name in ("c2_fit", "residual"):
        assert root[name].shape == (1, N_PHI, a + n, a + n), f"{name} is from another run"
        values = np.asarray(root[name][0, :, a:, a:])
        assert np.isfinite(values[:, rows, cols]).all(), f"{name}: a tile was not written"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted([f"c2_q0_phi{i}.png" for i in range(N_PHI)] + ["g2_cuts.png", "transport.png"])
    return result_files(out)


def test_cli_killed_at_random_moments_never_leaves_a_mixed_result(cluster, flow_file, tmp_path,
                                                                 tmp_path_factory):
    wait_for_workers(cluster, 2)
    # Compile every kernel the CLI's fit uses (the model, for fitted.zarr, too) first, so
    # that the runs below last as long as the measured one.
    fit_quiet(flow_file, client=cluster, tile=TILE, gap=2.0e6, out=tmp_path_factory.mktemp("warm") / "r")
    out = tmp_path / "result"

    def cli(run: int) -> tuple[list, tuple]:
        # Run k fits frames 1 … 159 − k: no two runs write the same files.
        frames = (1, 159 - run)
        return [sys.executable, "-m", "xpcsfit.cli", "fit", str(flow_file), "--out", str(out),
                "--scheduler", cluster.scheduler.address, "--gap", "2e6", "--tile", str(TILE),
                "--frames", *map(str, frames)], frames

    # One run to its result: when its writing began and when the result was in place,
    # and the result that the killed runs must leave alone or replace whole.
    cmd, frames = cli(0)
    run = CliRun(cmd, out)
    run.until_replaced()
    assert run.write_started is not None
    writing = run.replaced - run.write_started
    previous = check_complete(out, frames)
    print(f"\nCLI run: writing from {run.write_started:.1f} s, result in place at {run.replaced:.1f} s")

    rng = np.random.default_rng(20261201)
    # Two kills before the writing; four while writing, one in each quarter of the time
    # from its start to just past the measured moment the result was renamed into place.
    plan = [(float(t), False) for t in rng.uniform(0.1, 1.0, 2) * run.write_started]
    plan += [(float(t), True) for t in (np.arange(4) + rng.uniform(0, 1, 4)) / 4 * 1.1 * writing]
    outcomes = []
    for k, (when, in_writing) in enumerate(plan, start=1):
        cmd, frames = cli(k)
        hit = CliRun(cmd, out).kill_at(when, in_writing)
        if not out.exists():
            state = "absent"
        elif (out / "fit.json").exists() and result_files(out)["fit.json"] == previous["fit.json"]:
            state = "previous"
            assert result_files(out) == previous, "the previous result was partly overwritten"
        else:
            state = "new"
            previous = check_complete(out, frames)
        outcomes.append((round(when, 2), in_writing, hit, state))
        # Nothing but the result directory and hidden ".result.*" work directories.
        others = [p.name for p in tmp_path.iterdir() if p != out and not p.name.startswith(".result.")]
        assert not others, others
    print("kills (s, after the writing began, killed, result dir):", outcomes)
    interrupted = [o for o in outcomes if o[1] and o[2] and o[3] == "previous"]
    assert len(interrupted) >= 2, "too few kills landed while the output was being written"


# -- workers whose memory_limit is too small -----------------------------------------


def test_memory_limit_too_small_for_a_tile_is_a_config_error_up_front(flow_file, tmp_path):
    from distributed import get_task_stream

    # 1 GiB per worker: an idle worker uses ~0.3 GiB, compiling the kernels ~0.2 GiB more,
    # and a worker stops running tasks at 80%. A 4096-frame tile is 384 MiB padded; JAX's
    # copy of it alone does not fit. (Without the check: the worker paused at 963 MiB,
    # its nanny restarted it three times in 55 s, then Dask gave up.)
    with dask_processes(tmp_path, 1, memory_limit="1GiB") as c:
        pids = c.run(os.getpid)
        started = time.monotonic()
        with get_task_stream(c) as stream:
            p = subprocess.run([sys.executable, "-m", "xpcsfit.cli", "fit", str(flow_file),
                                "--out", str(tmp_path / "res"), "--scheduler", c.scheduler.address,
                                "--tile", "4096", "--gap", "2e6"],
                               capture_output=True, text=True, timeout=120, env=dict(os.environ))
        elapsed = time.monotonic() - started
        assert p.returncode == 3, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xpcsfit: error:"), p.stderr
        for word in ("need about", "memory_limit", "tile", "4096 frames", "1024 MiB"):
            assert word in lines[0]
        assert elapsed < 60  # the CLI's start and one check; not worker restarts
        assert not [t for t in stream.data if task_kind(t["key"])], "tiles were loaded"
        assert c.run(os.getpid) == pids  # no worker restarted
        assert not (tmp_path / "res").exists()
        print(f"\nup-front memory error after {elapsed:.1f} s: {lines[0]}")

        # The same worker takes tiles that fit (it has not compiled the kernels yet: that
        # allowance is in the rule too).
        ds = xpcsfit.open_dataset(flow_file, tile=TILE)
        layout = ParameterLayout(MODES["laminar_flow"], ds.sizes["q"], ds.sizes["phi"])
        evaluator = DaskEvaluator(c, plan_tiles(ds, TILE), layout, "laminar_flow", 2.0e6)
        assert evaluator.storage == "hold"
        evaluator.close()


def test_workers_dying_while_loading_is_a_config_error(cluster, flow_file):
    from distributed.diagnostics.plugin import WorkerPlugin

    class DieOnLoad(WorkerPlugin):
        """Stands in for the kernel's OOM killer: the worker process is SIGKILLed as it
        starts loading a part of tiles."""

        name = "xpcsfit-test-die-on-load"

        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and task_kind(key) == "load":
                os.kill(os.getpid(), signal.SIGKILL)

    wait_for_workers(cluster, 2)
    pids = cluster.run(os.getpid)
    cluster.register_plugin(DieOnLoad())
    started = time.monotonic()
    try:
        with pytest.raises(xpcsfit.ConfigError) as err:
            within(HANG, fit_quiet, flow_file, client=cluster, tile=TILE, gap=2.0e6, config={"memory": "hold"})
    finally:
        remove_worker_plugin(cluster, DieOnLoad.name, 2)
    message = str(err.value)
    print(f"\nafter {time.monotonic() - started:.1f} s: {message}")
    assert "\n" not in message
    for word in ("died 2 times", "loading the tiles", "memory_limit", "tile", f"{TILE} frames"):
        assert word in message
    assert wait_until(lambda: all(map(pid_gone, pids.values())), timeout=10)  # both were killed
