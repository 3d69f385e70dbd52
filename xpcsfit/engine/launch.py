"""Start the cluster a spec describes (:mod:`xpcsfit.engine.specs`) and connect a client.

Every worker, wherever it runs, is an xpcsfit worker: one thread per worker process, the
worker preload ``xpcsfit.engine.cluster`` and xpcsfit's worker environment
(:func:`xpcsfit.engine.cluster.worker_environment`). local and gpu use
:func:`~xpcsfit.engine.cluster.local_cluster` / :func:`~xpcsfit.engine.cluster.gpu_cluster`;
slurm and pbs are dask-jobqueue clusters whose scheduler runs in this process; kubernetes
is a DaskCluster resource for the dask-kubernetes operator.

Kubernetes is created through the operator's resource and joined with a plain
``Client(tls://…)``, not through ``dask_kubernetes.KubeCluster``: KubeCluster connects to
the scheduler with a hard-coded ``tcp://`` address and no Security, so it cannot reach
a scheduler that requires TLS. The client must resolve the in-cluster service name
(``NAME-scheduler.NAMESPACE``): run xpcsfit in a pod of the cluster, e.g. a DaskJob.
"""

from __future__ import annotations

import contextlib
import shlex
import time

from xpcsfit.engine.cluster import (
    PRELOAD,
    dashboard_port_may_move,
    gpu_cluster,
    local_cluster,
    worker_environment,
)
from xpcsfit.engine.security import CA, CERT, KEY, security
from xpcsfit.engine.specs import KubernetesSpec, PBSSpec, SlurmSpec
from xpcsfit.errors import ConfigError

TLS_MOUNT = "/etc/xpcsfit/tls"  # where pods see the Secret named by tls_secret
KUBERNETES_READY_S = 600  # pulling an image onto a fresh node can take minutes


def spec_security(spec):
    """The spec's ``distributed.security.Security`` (None for a local spec without TLS)."""
    return None if spec.tls is None else security(spec.tls.ca, spec.tls.cert, spec.tls.key)


@contextlib.contextmanager
def cluster_client(spec, on_start=None):
    """Start the spec's cluster and yield a Client of it; close both on exit.

    Parameters
    ----------
    spec : LocalSpec, GPUSpec, SlurmSpec, PBSSpec or KubernetesSpec
        As returned by :func:`~xpcsfit.engine.specs.load_cluster_spec` (checked).
    on_start : callable(client, what), optional
        Called once the scheduler is up, before waiting for the first batch job's
        workers; ``what`` says which cluster was started ("a SLURMCluster (cluster/slurm.yaml: 2 jobs …)").

    Raises
    ------
    ConfigError
        The Kubernetes API cannot be reached, or the DaskCluster does not start.
    """
    from distributed import Client

    if isinstance(spec, KubernetesSpec):
        with _kubernetes_client(spec, on_start) as client:
            yield client
        return
    with make_cluster(spec) as cluster:
        what = f"a {type(cluster).__name__} ({spec.source})"
        if isinstance(spec, (SlurmSpec, PBSSpec)):
            if spec.adapt is not None:
                cluster.adapt(minimum_jobs=spec.adapt.minimum, maximum_jobs=spec.adapt.maximum)
                jobs = f"adapting between {spec.adapt.minimum} and {spec.adapt.maximum} jobs"
            else:
                cluster.scale(jobs=spec.jobs)
                jobs = f"{spec.jobs} job{'s' * (spec.jobs > 1)}"
            lister = "squeue --me" if isinstance(spec, SlurmSpec) else "qstat -u $USER"
            what = (f"a {type(cluster).__name__} ({spec.source}: {jobs} of {spec.cores} workers; "
                    f"`{lister}` lists them), scheduler {cluster.scheduler_address}")
        with Client(cluster) as client:  # the cluster's Security
            if on_start is not None:
                on_start(client, what)
            if isinstance(spec, (SlurmSpec, PBSSpec)) and (spec.jobs or spec.adapt.minimum):
                # The first job's workers, which start together: the fit spreads its
                # tiles over the workers it finds. A queued job may take long: no limit.
                # (adapt from 0: the fit's first tasks make the cluster submit jobs.)
                client.wait_for_workers(spec.cores)
            yield client


def make_cluster(spec):
    """The spec's Dask cluster object, scheduler started; batch jobs not yet submitted.

    Returns
    -------
    LocalCluster, SpecCluster (gpu), SLURMCluster or PBSCluster
        ``job_script()`` of the jobqueue ones shows what ``scale`` would submit.
    """
    sec = spec_security(spec)
    if spec.kind == "local":
        return local_cluster(spec.n_workers, spec.memory_limit, host=spec.host,
                             dashboard_address=spec.dashboard_address, security=sec)
    if spec.kind == "gpu":
        from xpcsfit.engine.cluster import visible_gpus

        gpus = [str(g) for g in spec.gpus] if spec.gpus else visible_gpus()
        return gpu_cluster(gpus, spec.memory_limit, host=spec.host,
                           dashboard_address=spec.dashboard_address, security=sec)
    import dask_jobqueue

    cls = dask_jobqueue.SLURMCluster if isinstance(spec, SlurmSpec) else dask_jobqueue.PBSCluster
    with dashboard_port_may_move():
        return cls(**jobqueue_options(spec))


def jobqueue_options(spec: SlurmSpec | PBSSpec) -> dict:
    """Keyword arguments of SLURMCluster / PBSCluster for the spec.

    ``processes = cores``: every core is a worker process of one thread. Each job exports
    xpcsfit's worker environment before the spec's own prologue lines (which may
    override it), and its workers run the preload and TLS (``tls://``, the spec's files,
    which the nodes must see at the same paths: a shared file system).
    """
    prologue = [f"export {k}={shlex.quote(v)}" for k, v in worker_environment().items()]
    options = dict(
        cores=spec.cores, processes=spec.cores, memory=spec.memory, walltime=spec.walltime,
        queue=spec.queue, account=spec.account, job_extra_directives=list(spec.job_extra_directives),
        job_script_prologue=prologue + list(spec.job_script_prologue),
        worker_extra_args=["--preload", PRELOAD, *spec.worker_extra_args],
        interface=spec.interface, local_directory=spec.local_directory, log_directory=spec.log_directory,
        scheduler_options={"dashboard_address": spec.dashboard_address}, protocol="tls://",
        security=spec_security(spec),
        name=f"xpcsfit-{spec.kind}", job_name="xpcsfit-worker",
    )
    if spec.python is not None:
        options["python"] = spec.python
    if isinstance(spec, PBSSpec) and spec.resource_spec is not None:
        options["resource_spec"] = spec.resource_spec
    return options


def kubernetes_manifest(spec: KubernetesSpec) -> dict:
    """The DaskCluster resource (``kubernetes.dask.org/v1``) for the spec.

    From dask-kubernetes' ``make_cluster_spec``, then TLS added: the Secret
    ``spec.tls_secret`` mounted at :data:`TLS_MOUNT` in scheduler and worker pods, both
    started with ``--tls-ca-file/--tls-cert/--tls-key``, the scheduler with
    ``--protocol tls``, the workers pointed at ``tls://NAME-scheduler.NAMESPACE…:8786``.
    Workers: one thread, the preload, xpcsfit's worker environment, ``cpu`` and
    ``memory`` as request and limit.
    """
    from dask_kubernetes.operator import make_cluster_spec

    tls_args = ["--tls-ca-file", f"{TLS_MOUNT}/{CA}", "--tls-cert", f"{TLS_MOUNT}/{CERT}",
                "--tls-key", f"{TLS_MOUNT}/{KEY}"]
    worker = ["dask-worker", "--nthreads", "1", "--preload", PRELOAD, *tls_args]
    limits = {"cpu": spec.cpu, "memory": spec.memory}
    env = dict(worker_environment(), DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION="True")
    manifest = make_cluster_spec(name=spec.name, image=spec.image, n_workers=spec.n_workers,
                                 resources={"requests": dict(limits), "limits": limits}, env=env,
                                 worker_command=worker)
    pods = manifest["spec"]["scheduler"]["spec"], manifest["spec"]["worker"]["spec"]
    pods[0]["containers"][0]["args"] = ["dask-scheduler", "--host", "0.0.0.0", "--protocol", "tls", *tls_args]
    # The operator sets tcp:// for workers unless the container names the address itself.
    pods[1]["containers"][0]["env"].append({"name": "DASK_SCHEDULER_ADDRESS", "value": _kubernetes_address(spec)})
    for pod in pods:
        pod["volumes"] = [{"name": "xpcsfit-tls", "secret": {"secretName": spec.tls_secret}}]
        pod["containers"][0]["volumeMounts"] = [{"name": "xpcsfit-tls", "mountPath": TLS_MOUNT, "readOnly": True}]
    return manifest


def _kubernetes_address(spec: KubernetesSpec) -> str:
    return f"tls://{spec.name}-scheduler.{spec.namespace}.svc.cluster.local:8786"


@contextlib.contextmanager
def _kubernetes_client(spec: KubernetesSpec, on_start):
    """Create the DaskCluster (and its DaskAutoscaler), yield a TLS Client, delete them."""
    import kr8s
    from distributed import Client
    from kr8s.objects import new_class

    where = f"cluster spec {spec.source}"
    api_errors = (ValueError, OSError, kr8s.ServerError, kr8s.APITimeoutError)
    resources = []
    try:
        try:
            cluster = new_class("DaskCluster", "kubernetes.dask.org/v1")(kubernetes_manifest(spec),
                                                                         namespace=spec.namespace)
            cluster.create()
            resources.append(cluster)
            if spec.adapt is not None:
                autoscaler = new_class("DaskAutoscaler", "kubernetes.dask.org/v1")(
                    {"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskAutoscaler",
                     "metadata": {"name": spec.name},
                     "spec": {"cluster": spec.name, "minimum": spec.adapt.minimum, "maximum": spec.adapt.maximum}},
                    namespace=spec.namespace)
                autoscaler.create()
                resources.append(autoscaler)
            deadline = time.monotonic() + KUBERNETES_READY_S
            while cluster.raw.get("status", {}).get("phase") != "Running":
                if time.monotonic() > deadline:
                    raise ConfigError(f"{where}: DaskCluster {spec.name} not running after {KUBERNETES_READY_S} s "
                                      f"(kubectl describe daskcluster {spec.name} -n {spec.namespace})")
                time.sleep(2)
                cluster.refresh()
        except api_errors as exc:
            raise ConfigError(f"{where}: Kubernetes API: {' '.join(str(exc).split())}") from None
        address = _kubernetes_address(spec)
        try:
            client = Client(address, security=spec_security(spec), timeout="120s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"{where}: scheduler {address}: cannot connect ({exc}); xpcsfit must run "
                              "inside the Kubernetes cluster to reach it") from None
        with client:
            if on_start is not None:
                on_start(client, f"a DaskCluster {spec.name} in namespace {spec.namespace} ({spec.source})")
            yield client
    finally:
        for resource in reversed(resources):
            with contextlib.suppress(*api_errors):
                resource.delete()
