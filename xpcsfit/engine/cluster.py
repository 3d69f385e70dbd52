"""Which Dask client a fit runs on, and the LocalCluster xpcsfit starts by default.

Clusters described by a spec (``--cluster``) are started by :mod:`xpcsfit.engine.launch`
from :mod:`xpcsfit.engine.specs`; their workers get the same settings as these.

Worker settings: one thread per worker process, XLA's Eigen thread pool off, and the
JAX backend started with a one-CPU thread pool (:func:`dask_setup`), so that
n_workers × threads does not exceed the cores (JAX on CPU otherwise runs its kernels
on a pool as wide as the machine in every process and oversubscribes it). Dask's default MALLOC_TRIM_THRESHOLD_ for worker processes is removed: it pins
glibc's mmap threshold at 128 KiB, so every kernel intermediate is a fresh mmap with
page faults, and the tile kernels ran 2.5× slower.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

from xpcsfit.errors import ConfigError, InputError, XpcsfitError

# exception_text of a failed task starts with the exception's repr, "InputError('…')"
_USER_ERRORS = tuple(f"{cls.__name__}(" for cls in (XpcsfitError, InputError, ConfigError))

WORKER_ENV = {
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    # One worker per GPU where CUDA is present; never grab the whole card up front.
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
}

# Dask configuration while xpcsfit starts worker processes (see the module docstring).
_PRE_SPAWN = "distributed.nanny.pre-spawn-environ"
WORKER_DASK_CONFIG = {f"{_PRE_SPAWN}.MALLOC_TRIM_THRESHOLD_": None}

PRELOAD = "xpcsfit.engine.cluster"  # this module, run by every worker (dask_setup)


def worker_environment() -> dict[str, str]:
    """Environment of workers that xpcsfit does not spawn itself (batch jobs, pods):
    :data:`WORKER_ENV` plus :data:`WORKER_DASK_CONFIG` as Dask's environment variable
    (the nanny merges it into its pre-spawn environment)."""
    # A Python literal, as Dask reads it: {"MALLOC_TRIM_THRESHOLD_": None}
    spawn = ", ".join(f'"{k.removeprefix(_PRE_SPAWN + ".")}": {v!r}' for k, v in WORKER_DASK_CONFIG.items())
    return dict(WORKER_ENV, DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=f"{{{spawn}}}")


def dask_setup(worker) -> None:
    """Worker preload (``--preload xpcsfit.engine.cluster``): one XLA compute thread per worker.

    JAX sizes its CPU thread pool from the CPUs the process may run on when the backend
    starts, and no flag limits it. So the backend is started while the worker may run
    on one CPU only (worker i on CPU i mod n); its pool threads keep that CPU, the rest
    of the worker gets all CPUs back. Without this, each worker ran XLA on every core:
    one worker was almost as fast as two, and two oversubscribed the machine. (A
    backend started earlier in the process keeps its pool; this then changes nothing.)

    It also keeps the worker from logging a task's xpcsfit error (a bad value in the
    input), which the driver reports as one line (:func:`_drop_user_error_reports`),
    and switches JAX to float64 (:func:`xpcsfit.enable_float64`) and to xpcsfit's
    persistent compilation cache (:mod:`xpcsfit.engine.compile_cache`) before any task runs.
    """
    logging.getLogger("distributed.worker").addFilter(_drop_user_error_reports)
    cpus = sorted(os.sched_getaffinity(0))
    name = str(worker.name)
    index = int(name) if name.isdigit() else os.getpid()
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[index % len(cpus)]})
    try:
        import jax

        from xpcsfit.engine.compile_cache import enable_compilation_cache
        from xpcsfit.model import enable_float64

        enable_float64()
        enable_compilation_cache()
        jax.devices("cpu")
    finally:
        os.sched_setaffinity(0, set(cpus))


def _drop_user_error_reports(record: logging.LogRecord) -> bool:
    """Logging filter: drop the worker's "Compute Failed" report of an xpcsfit error.

    A task that raises InputError or ConfigError (a bad value in the user's file) is
    re-raised in the driver, which prints it as one line; the worker's copy with its
    traceback would only bury that line. Every other failure is still logged.
    """
    if not str(record.msg).startswith("Compute Failed") or not record.args:
        return True
    text = str(record.args[3]) if len(record.args) > 3 else ""
    return not text.startswith(_USER_ERRORS)


def local_cluster(n_workers: int | None = None, memory_limit="auto", *, host: str = "127.0.0.1",
                  dashboard_address: str = "127.0.0.1:8787", security=None):
    """Start a local cluster of worker processes with :data:`WORKER_ENV`.

    With CUDA GPUs visible (``nvidia-smi -L`` lists them) the cluster gets one worker
    per GPU (see :func:`gpu_cluster`); otherwise a LocalCluster of CPU workers.

    Parameters
    ----------
    n_workers : int, optional
        Default: the number of cores (at most 8), or of GPUs.
    memory_limit : str or int
        Per worker, as for ``distributed.LocalCluster``.
    host, dashboard_address : str
        Where the scheduler and the workers (``host``) and the dashboard listen: this
        machine only, by default.
    security : distributed.security.Security, optional
        TLS: scheduler and workers then listen on ``tls://``.
    """
    import dask
    from distributed import LocalCluster

    gpus = visible_gpus()
    if gpus:
        return gpu_cluster(gpus[: n_workers or len(gpus)], memory_limit, host=host,
                           dashboard_address=dashboard_address, security=security)
    n = n_workers or max(1, min(8, os.cpu_count() or 1))
    tls = {} if security is None else {"security": security, "protocol": "tls://"}
    with dask.config.set(WORKER_DASK_CONFIG), dashboard_port_may_move():
        return LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, host=host,
            dashboard_address=dashboard_address, memory_limit=memory_limit, env=dict(WORKER_ENV),
            silence_logs=40, preload=[PRELOAD], **tls,
        )


@contextlib.contextmanager
def dashboard_port_may_move():
    """Silence Dask's warning that the dashboard port is taken: that is not the user's
    concern, the dashboard moves to a free port and the fit prints its link."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        yield


def visible_gpus() -> list[str]:
    """Indices of the CUDA GPUs this machine shows (``nvidia-smi -L``), else []."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def gpu_cluster(gpus: list[str], memory_limit="auto", *, host: str = "127.0.0.1",
                dashboard_address: str = "127.0.0.1:8787", security=None):
    """One worker process per GPU, each seeing only its own card (CUDA_VISIBLE_DEVICES).

    The workers run the same JAX kernels, which then execute on the GPU; XLA does not
    preallocate the card (:data:`WORKER_ENV`).

    Parameters
    ----------
    gpus : list of str
        CUDA device indices, one worker each.
    memory_limit, host, dashboard_address, security
        As for :func:`local_cluster`.
    """
    import dask
    from distributed import Nanny, Scheduler, SpecCluster

    tls = {} if security is None else {"security": security, "protocol": "tls://"}
    scheduler = {"cls": Scheduler, "options": {"host": host, "dashboard_address": dashboard_address, **tls}}
    workers = {
        f"gpu-{g}": {
            "cls": Nanny,
            "options": {"host": host, "nthreads": 1, "memory_limit": memory_limit,
                        "env": dict(WORKER_ENV, CUDA_VISIBLE_DEVICES=g), "preload": [PRELOAD], **tls},
        }
        for g in gpus
    }
    with dask.config.set(WORKER_DASK_CONFIG), dashboard_port_may_move():
        return SpecCluster(scheduler=scheduler, workers=workers, silence_logs=40, security=security)


def workers_info(client) -> dict:
    """{address: info} of the scheduler's workers (memory_limit, nthreads, status, …),
    asked afresh.

    Not ``client.scheduler_info()["workers"]``: that returns the client's cached identity,
    which the client also refreshes without the workers, and which every thread using the
    client shares; a fit running as a task next to others on a worker (all on the
    worker's one client) got ``{}`` from it.
    """
    return client.sync(client.scheduler.identity, n_workers=-1)["workers"]


@contextlib.contextmanager
def dask_client(client=None, scheduler: str | None = None, on_start=None, cluster=None):
    """Yield the client a fit should use.

    Order: an explicit ``client``; inside a Dask task, a ``worker_client`` (the fit
    fans out its tile tasks from the worker); a ``scheduler`` address; a ``cluster``
    spec, started here and closed on exit; the current default client of this process;
    else a new LocalCluster, closed on exit.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler. A ``tls://`` address takes its certificates
        from Dask's configuration (``distributed.comm.tls.*``: see
        :func:`xpcsfit.engine.security.dask_tls_environment`), as every Dask client does.
    on_start : callable(client, what), optional
        Called when a cluster was started here (to print ``what`` and the dashboard link).
    cluster : str, Path or spec, optional
        A cluster spec (:func:`xpcsfit.engine.specs.load_cluster_spec`); not with ``scheduler``.

    Raises
    ------
    ConfigError
        If the scheduler address cannot be reached or has no certificates for tls://,
        both ``scheduler`` and ``cluster`` are given, or the spec is bad.
    """
    from distributed import Client, default_client, get_worker, worker_client

    if scheduler and cluster is not None:
        raise ConfigError(f"scheduler {scheduler} and cluster {cluster}: give one, not both")
    if client is not None:
        yield client
        return
    try:
        get_worker()
        in_task = True
    except ValueError:
        in_task = False
    if in_task:
        with worker_client() as wc:
            yield wc
        return
    if scheduler:
        with _scheduler_client(scheduler) as c:
            yield c
        return
    if cluster is not None:
        from xpcsfit.engine.launch import cluster_client
        from xpcsfit.engine.specs import load_cluster_spec

        with cluster_client(load_cluster_spec(cluster), on_start) as c:
            yield c
        return
    try:
        existing = default_client()
    except ValueError:
        existing = None
    if existing is not None:
        yield existing
        return
    with local_cluster() as local, Client(local) as c:
        if on_start is not None:
            on_start(c, f"a {type(local).__name__}")
        yield c


def _scheduler_client(address: str):
    """Client of a running scheduler; ConfigError (one line) when it cannot connect.

    Security: Dask's configuration, as for any ``Client(address)``; a ``tls://`` address
    without a CA configured there is refused before trying.
    """
    from distributed import Client
    from distributed.security import Security

    if address.startswith("tls://") and Security().tls_ca_file is None:
        raise ConfigError(
            f"scheduler {address}: no TLS certificates in Dask's configuration; set "
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ..._TLS__CLIENT__CERT and ..._TLS__CLIENT__KEY "
            "(`xpcsfit certs` prints them)")
    try:
        return Client(address, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"scheduler {address}: cannot connect ({' '.join(str(exc).split())})") from None
