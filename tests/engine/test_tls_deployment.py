"""TLS deployments as on a cluster, on 127.0.0.1.

- `dask scheduler` and two `dask worker` processes (the distributed CLI) with TLS and
  xpcsfit's preload, from a spec file's settings; `xpcsfit fit --scheduler tls://…`
  against them; clients without the certificate refused within seconds.
- A Slurm spec run end to end through a stand-in `sbatch`/`scancel` that runs the job
  script dask-jobqueue renders on this machine.
- The LocalCluster listens on 127.0.0.1 only; a local spec with tls: runs over tls://.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import warnings
from urllib.parse import urlparse

import psutil
import pytest
from distributed import Client

import xpcsfit
from xpcsfit.cli import main
from xpcsfit.engine.cluster import local_cluster
from xpcsfit.engine.launch import cluster_client
from xpcsfit.engine.security import dask_tls_environment
from xpcsfit.engine.specs import load_cluster_spec

from dask_processes import dask_processes

pytestmark = pytest.mark.slow

REFUSED_WITHIN_S = 5.0


def cli(*args) -> int:
    """``xpcsfit …`` in this process, keeping pytest's warning format."""
    formatwarning = warnings.formatwarning
    try:
        return main([str(a) for a in args])
    finally:
        warnings.formatwarning = formatwarning


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Certificates, a spec naming them, and scheduler + 2 workers started from its settings."""
    d = tmp_path_factory.mktemp("tls")
    assert cli("certs", d / "certs") == 0
    spec_file = d / "deployment.yaml"
    spec_file.write_text("kind: local\nhost: 127.0.0.1\n"
                         "tls: {ca: certs/ca.pem, cert: certs/cert.pem, key: certs/key.pem}\n")
    spec = load_cluster_spec(spec_file)  # the source of every path below
    with dask_processes(d, 2, host=spec.host, tls=spec.tls) as client:
        yield spec, client


def test_fit_with_scheduler_tls_against_the_dask_cli_processes(deployment, small_flow_file, tmp_path):
    spec, client = deployment
    address = client.scheduler.address
    assert address.startswith("tls://127.0.0.1:")
    workers = client.scheduler_info()["workers"]
    assert len(workers) == 2 and all(w.startswith("tls://127.0.0.1:") for w in workers)
    assert {w["nthreads"] for w in workers.values()} == {1}
    # The preload ran in both: JAX in float64 before any task.
    assert set(client.run(lambda: __import__("jax").config.jax_enable_x64).values()) == {True}

    env = dict(os.environ, **dask_tls_environment(spec.tls.ca, spec.tls.cert, spec.tls.key))
    out = tmp_path / "fit"
    done = subprocess.run([sys.executable, "-m", "xpcsfit.cli", "fit", str(small_flow_file), "--scheduler", address,
                           "--out", str(out), "--tile", "64", "--gap", "2e6"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "fit.json").read_text())
    assert record["converged"]
    assert record["provenance"]["cluster"] == f"{address} (2 workers)"


# Connects a Client (argv: address, JSON {ca, cert, key} or null) and prints whether and
# how it was refused, and how long the attempt took.
REFUSAL_PROBE = """
import json, sys, time
from distributed import Client
from xpcsfit.engine.security import security
address, certs = sys.argv[1], json.loads(sys.argv[2])
kwargs = {"security": security(certs["ca"], certs["cert"], certs["key"])} if certs else {}
started = time.monotonic()
try:
    Client(address, timeout=5, **kwargs).close()
    outcome = {"refused": False, "message": "connected"}
except (OSError, TypeError) as exc:
    outcome = {"refused": True, "oserror": isinstance(exc, OSError), "message": str(exc)}
outcome["seconds"] = time.monotonic() - started
print(json.dumps(outcome))
"""


def test_a_client_without_the_certificate_is_refused(deployment, small_flow_file, tmp_path, capsys):
    spec, client = deployment
    address = client.scheduler.address
    plain = address.replace("tls://", "tcp://")

    def refused(address, certs=None) -> dict:
        """A client in a fresh process, as a user's would be (a failed Client can leave
        this process's event-loop machinery busy for the next one)."""
        done = subprocess.run([sys.executable, "-c", REFUSAL_PROBE, address, json.dumps(certs)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        outcome = json.loads(done.stdout.strip().splitlines()[-1])
        assert outcome["refused"], outcome
        assert outcome["seconds"] < REFUSED_WITHIN_S, outcome
        return outcome

    # No Security at all: Dask refuses to open tls:// without a certificate.
    assert "TLS expects a `ssl_context`" in refused(address)["message"]
    # tcp:// to the TLS listener: the scheduler drops the connection.
    assert refused(plain)["oserror"]
    # A certificate of another CA.
    assert cli("certs", tmp_path / "other") == 0
    other = {name: str(tmp_path / "other" / f"{name}.pem") for name in ("ca", "cert", "key")}
    assert "TLS certificate does not match" in refused(address, other)["message"]
    # The right CA but no client certificate: the scheduler demands one (mutual TLS).
    context = ssl.create_default_context(cafile=str(spec.tls.ca))
    context.check_hostname = False
    host, port = urlparse(address).hostname, urlparse(address).port
    with socket.create_connection((host, port), timeout=5) as raw, context.wrap_socket(raw) as tls_socket:
        try:
            data = tls_socket.recv(1024)  # TLS 1.3: the refusal arrives after the handshake
        except (ssl.SSLError, ConnectionResetError) as exc:
            assert "certificate" in str(exc).lower() or isinstance(exc, ConnectionResetError)
        else:
            assert data == b""

    # xpcsfit itself: one line, exit 3, without TLS in Dask's configuration, or over tcp://.
    capsys.readouterr()
    assert cli("fit", small_flow_file, "--scheduler", address, "--out", tmp_path / "a") == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no TLS certificates in Dask's configuration" in err
    started = time.monotonic()
    assert cli("fit", small_flow_file, "--scheduler", plain, "--out", tmp_path / "b") == 3
    assert time.monotonic() - started < 30  # dask's connect gives up once the peer drops it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"scheduler {plain}: cannot connect" in err
    # Still serving its own clients.
    assert client.submit(sum, [1, 2]).result() == 3


def listening(pid: int) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet")
            if c.status == psutil.CONN_LISTEN}


def test_local_cluster_listens_on_loopback_only():
    before = listening(os.getpid())
    others = set(psutil.Process().children(recursive=True))  # another test's processes
    with local_cluster(2) as cluster, Client(cluster) as client:
        ours = listening(os.getpid()) - before  # scheduler, dashboard, nannies
        workers = [p.pid for p in set(psutil.Process().children(recursive=True)) - others if listening(p.pid)]
        assert len(workers) == 2
        sockets = ours.union(*map(listening, workers))  # worker servers and dashboards
        assert len(sockets) >= 8
        assert {ip for ip, _ in sockets} == {"127.0.0.1"}
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"


def test_local_spec_with_tls(deployment, tmp_path):
    spec, _ = deployment
    with cluster_client(spec.model_copy(update={"n_workers": 1})) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert client.submit(sum, [2, 3]).result() == 5
        with pytest.raises(TypeError):
            Client(address, timeout=5)


SBATCH = """\
#!/bin/bash
# Stand-in for sbatch: runs the job script on this machine, in its own process group.
set -e
id=$(( $(ls {jobs} | wc -l) + 1000 ))
cp "$1" {jobs}/$id.sh
setsid bash {jobs}/$id.sh > {jobs}/$id.log 2>&1 < /dev/null &
echo $! > {jobs}/$id.pid
echo "Submitted batch job $id"
"""
SCANCEL = """\
#!/bin/bash
for id in "$@"; do touch {jobs}/$id.cancelled; kill -TERM -- -$(cat {jobs}/$id.pid) 2>/dev/null || true; done
"""


def test_slurm_spec_fit_through_a_stand_in_batch_system(tmp_path, small_flow_file, monkeypatch, capsys):
    """`--cluster slurm.yaml` end to end: the job script dask-jobqueue renders from the
    spec starts TLS workers with the preload; the fit runs on them; scancel at the end."""
    bin_dir, jobs = tmp_path / "bin", tmp_path / "jobs"
    bin_dir.mkdir()
    jobs.mkdir()
    for name, text in (("sbatch", SBATCH), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(text.format(jobs=jobs))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert cli("certs", tmp_path / "certs") == 0
    spec_file = tmp_path / "slurm.yaml"
    spec_file.write_text(textwrap.dedent(f"""\
        kind: slurm
        cores: 2
        memory: 4GB
        walltime: "00:10:00"
        scale: 1
        interface: lo
        local_directory: {tmp_path}/scratch
        tls: {{ca: certs/ca.pem, cert: certs/cert.pem, key: certs/key.pem}}
    """))
    capsys.readouterr()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", xpcsfit.GapWarning)
            result = xpcsfit.fit(small_flow_file, cluster=spec_file, tile=64, out=tmp_path / "fit")
    finally:
        pids = [int(p.read_text()) for p in jobs.glob("*.pid")]
        for pid in pids:  # scancel has run; in case it did not, end the job
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, 9)
    printed = capsys.readouterr().out
    assert f"xpcsfit: started a SLURMCluster ({spec_file}: 1 job of 2 workers; `squeue --me` lists them), " \
           "scheduler tls://127.0.0.1:" in printed
    assert result.converged and (tmp_path / "fit" / "fit.json").exists()
    assert result.provenance["cluster"].startswith("tls://127.0.0.1:")
    assert result.provenance["cluster"].endswith("(2 workers)")
    assert len(pids) == 1 and (jobs / "1000.cancelled").exists()  # xpcsfit ended its job
    script = (jobs / "1000.sh").read_text()
    assert "--preload xpcsfit.engine.cluster" in script and "--nthreads 1 " in script
