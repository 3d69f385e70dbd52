"""Load: 20 fits submitted at once to one 2-worker cluster, each fanning out its tile
tasks from the worker it runs on (``worker_client``), against the same fits one at a time."""

from __future__ import annotations

import os
import resource
import threading
import time

import numpy as np
import psutil
import pytest

import xpcsfit
from xpcsfit.engine.cluster import workers_info
from xpcsfit.simulate import phi_grid, simulate

pytestmark = pytest.mark.slow

N_FILES = 5
TILE = 64
PHI = phi_grid(5).tolist()
# q, phi and frame selections, each of 4 of the 5 angles: with the 5 files, 20 different
# fits of one tile shape (4 phi × 64 frames, as in test_fit), so the kernels compile once
# per worker at most.
SELECTIONS = [
    {"phi": PHI[:4]},
    {"phi": PHI[1:], "q_index": 1},
    {"phi": PHI[:2] + PHI[3:], "frames": (8, 120)},
    {"phi": PHI[:3] + PHI[4:], "q": 0.004, "frames": (1, 80)},
]


@pytest.fixture(scope="module")
def load_files(tmp_path_factory):
    """Five 2 q × 5 phi × 128 frame laminar_flow files of different D0, gamma_dot_t0, seed."""
    d = tmp_path_factory.mktemp("load")
    return [simulate(d / f"load{i}.hdf", q=(0.004, 0.0055), n_phi=5, n_frames=128, noise=0.01, seed=i,
                     params={"D0": 1.5e4 + 2.0e3 * i, "gamma_dot_t0": 1.5e-4 + 3.0e-5 * i})
            for i in range(N_FILES)]


class Sampler(threading.Thread):
    """Every 20 ms: the resident memory of each worker process, and how many fit tasks
    the scheduler has running at once."""

    def __init__(self, client):
        super().__init__(daemon=True)
        self.client = client
        self.procs = {a: psutil.Process(pid) for a, pid in client.run(os.getpid).items()}
        self.start_rss = {a: p.memory_info().rss for a, p in self.procs.items()}
        self.peak_rss = dict(self.start_rss)
        self.most_fits = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for a, p in self.procs.items():
                self.peak_rss[a] = max(self.peak_rss[a], p.memory_info().rss)
            running = [k for keys in self.client.processing().values() for k in map(str, keys)
                       if k.startswith("fit-")]
            self.most_fits = max(self.most_fits, len(running))
            time.sleep(0.02)


def submit_fit(client, path, selection):
    # pure=False: the same fit submitted twice is two tasks (keys "fit-<uuid>").
    return client.submit(xpcsfit.fit, str(path), gap=2.0e6, tile=TILE, progress=False, pure=False,
                         **selection)


def test_twenty_fits_at_once_complete_and_match_one_at_a_time(client, load_files):
    from distributed import wait

    jobs = [(path, sel) for path in load_files for sel in SELECTIONS]
    threads = sum(w["nthreads"] for w in workers_info(client).values())
    pids = client.run(os.getpid)
    sampler = Sampler(client)
    sampler.start()
    started = time.monotonic()
    try:
        futures = [submit_fit(client, path, sel) for path, sel in jobs]
        _, pending = wait(futures, timeout=300)
        if pending:
            stacks = client.call_stack()
            client.cancel(futures)
            pytest.fail(f"{len(pending)} of {len(jobs)} fits still running after 300 s "
                        f"(deadlock?); worker call stacks: {stacks}")
        at_once = client.gather(futures)
    finally:
        sampler.stop.set()
        sampler.join()
    at_once_s = time.monotonic() - started
    maxrss = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    started = time.monotonic()
    one_by_one = [submit_fit(client, path, sel).result(timeout=120) for path, sel in jobs]
    one_by_one_s = time.monotonic() - started

    limits = {a: w["memory_limit"] for a, w in workers_info(client).items()}
    print(f"\n20 fits at once: {at_once_s:.1f} s, at most {sampler.most_fits} running together on "
          f"{threads} worker threads; one at a time: {one_by_one_s:.1f} s")
    for a in sorted(sampler.peak_rss):
        print(f"  worker {a}: RSS {sampler.start_rss[a] / 2**20:.0f} MiB before, peak "
              f"{sampler.peak_rss[a] / 2**20:.0f} MiB during the 20 fits (ru_maxrss "
              f"{maxrss[a] / 2**20:.0f} MiB), memory_limit {limits[a] / 2**20:.0f} MiB")

    # More fits ran at once than the workers have threads: each fit's task seceded from
    # its worker's thread pool while it waited on its tile tasks (else: a deadlock).
    assert sampler.most_fits > threads
    assert client.run(os.getpid) == pids  # no worker died or was restarted
    assert all(sampler.peak_rss[a] < limits[a] for a in limits)
    for (path, sel), a, b in zip(jobs, at_once, one_by_one):
        assert a.engine["n_parts"] == b.engine["n_parts"]
        assert np.array_equal(a.x, b.x), (path.name, sel)
        assert a.chi2 == b.chi2 and a.termination == b.termination and a.iterations == b.iterations
        assert a.converged, (path.name, sel, a.termination)
    # The fits are of different data: they did not all return one result.
    assert len({r.chi2 for r in at_once}) == len(jobs)
