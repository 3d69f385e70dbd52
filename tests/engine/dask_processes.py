"""Real ``dask scheduler`` / ``dask worker`` processes for tests, as on a cluster.

Used by the fault tests (workers killed and restarted) and by the TLS deployment test.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

from xpcsfit.engine.cluster import PRELOAD, WORKER_ENV, workers_info


@contextlib.contextmanager
def dask_processes(tmp_dir, n_workers: int, memory_limit: str = "auto", allowed_failures: int = 3,
                   host: str = "127.0.0.1", tls=None):
    """``dask scheduler`` and ``dask worker`` processes (each worker under a nanny, one
    thread, xpcsfit's worker environment and preload) as on a cluster; yields a Client.

    Processes rather than a LocalCluster: killed workers come back with new addresses
    faster than a LocalCluster's bookkeeping follows (its status watcher stops at the
    first unknown address). The workers share a JAX compilation cache in ``tmp_dir``, so
    a restarted worker loads the compiled tile kernels instead of compiling them again
    (about 10 s on this machine).

    Parameters
    ----------
    host : str
        Where scheduler and workers listen (their dashboards too).
    tls : TLSFiles, optional
        (ca, cert, key): every process runs ``tls://`` with ``--tls-ca-file``,
        ``--tls-cert``, ``--tls-key``, the client with the same files; else tcp://.
    """
    from distributed import Client

    from xpcsfit.engine.security import security

    env = dict(os.environ, **WORKER_ENV,
               DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=str(allowed_failures),
               JAX_COMPILATION_CACHE_DIR=os.path.join(tmp_dir, "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    scheduler_file = os.path.join(tmp_dir, "scheduler.json")
    tls_args = [] if tls is None else ["--tls-ca-file", str(tls.ca), "--tls-cert", str(tls.cert),
                                       "--tls-key", str(tls.key)]

    def start(name, *args):
        with open(os.path.join(tmp_dir, f"{name}.log"), "wb") as log:
            return subprocess.Popen([sys.executable, "-m", *args, "--host", host, *tls_args,
                                     "--dashboard-address", f"{host}:0", "--scheduler-file", scheduler_file],
                                    env=env, stdout=log, stderr=log)

    # All at once: the workers wait for the scheduler's file.
    protocol = [] if tls is None else ["--protocol", "tls"]
    procs = [start("scheduler", "distributed.cli.dask_scheduler", "--port", "0", *protocol)]
    try:
        procs += [start(f"worker-{i}", "distributed.cli.dask_worker", "--nthreads", "1", "--name", str(i),
                        "--memory-limit", memory_limit, "--preload", PRELOAD)
                  for i in range(n_workers)]
        assert wait_until(lambda: os.path.exists(scheduler_file), timeout=60), "scheduler did not start"
        sec = None if tls is None else security(tls.ca, tls.cert, tls.key)
        with Client(scheduler_file=scheduler_file, timeout=60, security=sec) as client:
            wait_for_workers(client, n_workers)
            yield client
    finally:
        # Killed, not closed (a nanny takes seconds to close): a worker process exits as
        # soon as its nanny's process is gone.
        for p in procs:
            p.kill()
            p.wait()


def wait_for_workers(client, n: int, timeout: float = 120.0) -> None:
    """Until the scheduler has ``n`` running workers (its own count, asked afresh)."""
    def running():
        return sum(w["status"] == "running" for w in workers_info(client).values())

    assert wait_until(lambda: running() >= n, timeout=timeout, step=0.1), f"fewer than {n} workers"


def wait_until(condition, timeout=60.0, step=0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def remove_worker_plugin(client, name: str, n_workers: int) -> None:
    """Unregister a worker plugin from a cluster whose workers the test has been killing.

    The scheduler forgets the plugin first, then tells each worker; a worker that dies
    (or is still being restarted by its nanny) during that broadcast makes the scheduler
    close the client's comm (CommClosedError), leaving the plugin on the live workers.
    So: wait until the workers are back, and if the broadcast still met a dying worker,
    drop the plugin on every worker directly (a restarted worker gets only the
    scheduler's plugins, which no longer include it).
    """
    from distributed.comm.core import CommClosedError

    wait_for_workers(client, n_workers)
    try:
        client.unregister_worker_plugin(name)
    except (CommClosedError, OSError):
        wait_for_workers(client, n_workers)
        client.run(_drop_plugin, name)


def _drop_plugin(name, dask_worker=None):
    dask_worker.plugins.pop(name, None)
