"""Cluster specs (cluster/*.yaml and the built-in names), TLS certificates, and what the
specs start: Slurm/PBS job scripts rendered by dask-jobqueue, the Kubernetes DaskCluster
resource. No batch system or Kubernetes cluster is needed.
"""

from __future__ import annotations

import shlex
import socket
import stat
import sys
import warnings
from pathlib import Path

import pytest
from cryptography import x509

import xpcsfit.engine.cluster as cluster_module
from xpcsfit.cli import main
from xpcsfit.engine.cluster import PRELOAD, WORKER_ENV, worker_environment
from xpcsfit.engine.launch import TLS_MOUNT, jobqueue_options, kubernetes_manifest, make_cluster
from xpcsfit.engine.specs import NAMES, load_cluster_spec
from xpcsfit.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "cluster"


@pytest.fixture(autouse=True)
def keep_warning_format(monkeypatch):
    """cli.main installs the CLI's warning format; restored after each test."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)


@pytest.fixture
def certs(tmp_path, monkeypatch, capsys) -> Path:
    """`xpcsfit certs` into the default directory, here a fresh $XDG_CONFIG_HOME."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert main(["certs"]) == 0
    capsys.readouterr()
    return tmp_path / "config" / "xpcsfit" / "certs"


@pytest.fixture
def two_gpus(monkeypatch):
    """This machine shows two CUDA GPUs (``nvidia-smi -L``)."""
    monkeypatch.setattr(cluster_module, "visible_gpus", lambda: ["0", "1"])


def one_line_error(source) -> str:
    with pytest.raises(ConfigError) as info:
        load_cluster_spec(source)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ loading


def test_every_example_and_every_name_loads(certs, two_gpus):
    examples = sorted(EXAMPLES.glob("*.yaml"))
    assert [p.stem for p in examples] == sorted(NAMES)
    for path in examples:
        spec = load_cluster_spec(path)
        assert spec.kind == path.stem and spec.source == str(path)
        if spec.kind not in ("local", "gpu"):  # TLS everywhere beyond this machine
            assert spec.tls.ca == certs / "ca.pem" and spec.tls.key == certs / "key.pem"
    for name in NAMES:
        assert load_cluster_spec(name).kind == name


def test_tls_paths_are_relative_to_the_spec_file(certs, tmp_path):
    (tmp_path / "specs").mkdir()
    spec_file = tmp_path / "specs" / "mine.yaml"
    spec_file.write_text(f"kind: slurm\ntls: {{ca: ../c/ca.pem, cert: ../c/cert.pem, key: {certs}/key.pem}}\n")
    (tmp_path / "c").symlink_to(certs)
    spec = load_cluster_spec(spec_file)
    assert spec.tls.ca == tmp_path / "specs" / ".." / "c" / "ca.pem"
    assert spec.tls.key == certs / "key.pem"


@pytest.mark.parametrize("text, words", [
    ("kind: slurm\nwalltme: '01:00:00'\n", ["walltme", "unknown key", "walltime"]),
    ("kind: slurm\ntls: {ca: a.pem, cert: b.pem, kex: c.pem}\n", ["tls.kex", "unknown key", "key"]),
    ("kind: pbs\ncores: 0\n", ["cores", "greater than 0", "got 0"]),
    ("kind: slurm\nmemory: 32XB\n", ["memory", "not a size", "32XB"]),
    ("kind: slurm\nwalltime: one hour\n", ["walltime", "one hour"]),
    ("kind: slurm\nscale: 2\nadapt: {maximum: 4}\n", ["scale", "adapt", "not both"]),
    ("kind: slurm\nadapt: {minimum: 5, maximum: 4}\n", ["adapt", "minimum 5 exceeds maximum 4"]),
    ("kind: kubernetes\nname: My_Cluster\n", ["name", "My_Cluster"]),
    ("kind: kubernetes\nmemory: lots\n", ["memory", "lots"]),
    ("kind: local\nhost: 0.0.0.0\n", ["host 0.0.0.0", "tls"]),
    ("kind: slurmm\n", ["kind", "slurmm", "slurm, pbs"]),
    ("cores: 4\n", ["kind: missing"]),
    ("kind: slurm\ncores: [4\n", ["line", "not valid YAML"]),
    ("- kind: slurm\n", ["mapping"]),
])
def test_bad_spec_is_one_line_naming_file_and_key(text, words, certs, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    message = one_line_error(path)
    for word in [str(path), *words]:
        assert word in message


def test_unknown_name_or_missing_file(certs):
    assert one_line_error("nonsense") == \
        "cluster spec nonsense: no such file, and not one of local, gpu, slurm, pbs, kubernetes"
    assert "cluster/slurmm.yaml: no such file" in one_line_error("cluster/slurmm.yaml")


def test_missing_tls_files_are_named_up_front(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    message = one_line_error("slurm")
    assert message.startswith(f"cluster spec slurm: tls ca {tmp_path}/empty/xpcsfit/certs/ca.pem: no such file")
    assert "xpcsfit certs" in message
    path = tmp_path / "k8s.yaml"
    path.write_text(f"kind: kubernetes\ntls: {{ca: {tmp_path}/ca.pem, cert: c.pem, key: k.pem}}\n")
    assert f"cluster spec {path}: tls ca {tmp_path}/ca.pem: no such file" in one_line_error(path)


def test_tls_files_that_do_not_load_are_refused(certs, tmp_path, capsys):
    assert main(["certs", str(tmp_path / "other")]) == 0
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(f"kind: pbs\ntls: {{ca: {certs}/ca.pem, cert: {certs}/cert.pem, key: other/key.pem}}\n")
    assert "not a matching PEM certificate and key" in one_line_error(mixed)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    junk = tmp_path / "junk.yaml"
    junk.write_text(f"kind: pbs\ntls: {{ca: junk.pem, cert: {certs}/cert.pem, key: {certs}/key.pem}}\n")
    assert "tls ca" in one_line_error(junk) and "not a PEM certificate" in one_line_error(junk)


@pytest.mark.parametrize("name, module, message", [
    ("slurm", "dask_jobqueue", 'cluster spec slurm needs dask-jobqueue: pip install "xpcsfit[jobqueue]"'),
    ("pbs", "dask_jobqueue", 'cluster spec pbs needs dask-jobqueue: pip install "xpcsfit[jobqueue]"'),
    ("kubernetes", "dask_kubernetes.operator",
     'cluster spec kubernetes needs dask-kubernetes: pip install "xpcsfit[kubernetes]"'),
])
def test_missing_extra_is_one_line_naming_the_extra(name, module, message, certs, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    assert one_line_error(name) == message


def test_gpu_spec_needs_the_gpus(monkeypatch, tmp_path):
    monkeypatch.setattr(cluster_module, "visible_gpus", lambda: [])
    assert one_line_error("gpu") == "cluster spec gpu: nvidia-smi -L lists no CUDA GPUs on this machine"
    monkeypatch.setattr(cluster_module, "visible_gpus", lambda: ["0"])
    path = tmp_path / "gpus.yaml"
    path.write_text("kind: gpu\ngpus: [0, 3]\n")
    assert one_line_error(path) == f"cluster spec {path}: gpus [3]: not on this machine (it has 0)"


def test_cli_refuses_a_bad_cluster_before_any_work(tmp_path, capsys):
    """Exit 3, one line: the spec is checked before the input (which does not exist)."""
    for command in ("fit", "cmc"):
        rc = main([command, str(tmp_path / "no-such-input.hdf"), "--cluster", "nonsense", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 3
        assert err == "xpcsfit: error: cluster spec nonsense: no such file, and not one of " \
                      "local, gpu, slurm, pbs, kubernetes\n"
        assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as info:  # argparse: one of them
        main(["fit", "x.hdf", "--cluster", "local", "--scheduler", "tcp://127.0.0.1:8786"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# ------------------------------------------------------------------ certificates


def test_certs_writes_a_ca_and_a_certificate_it_signed(certs, tmp_path, capsys):
    files = {p.name: p for p in certs.iterdir()}
    assert set(files) == {"ca.pem", "ca-key.pem", "cert.pem", "key.pem", "xpcsfit-certs.json"}
    for name in ("ca-key.pem", "key.pem"):
        assert stat.S_IMODE(files[name].stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    ca = x509.load_pem_x509_certificate(files["ca.pem"].read_bytes())
    cert = x509.load_pem_x509_certificate(files["cert.pem"].read_bytes())
    cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", socket.gethostname()} <= set(names.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}

    # Its own files may be replaced (a new CA); anything else in their place is not.
    before = files["ca.pem"].read_bytes()
    assert main(["certs"]) == 0
    assert files["ca.pem"].read_bytes() != before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "key.pem").write_text("a key of someone else\n")
    capsys.readouterr()
    assert main(["certs", str(mine)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{mine}/key.pem exists and was not written by xpcsfit certs" in err
    assert (mine / "key.pem").read_text() == "a key of someone else\n"
    assert not (mine / "ca.pem").exists()


# ------------------------------------------------------------------ point 7: job scripts


def worker_command(script: str) -> list[str]:
    """The `dask worker` command line of a job script, split as the shell would."""
    (line,) = [ln for ln in script.splitlines() if "distributed.cli.dask_worker" in ln]
    return shlex.split(line)


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


@pytest.mark.parametrize("kind, directives", [
    ("slurm", ["#SBATCH --cpus-per-task=8", "#SBATCH --mem=30G", "#SBATCH -t 01:00:00",
               "#SBATCH -p compute", "#SBATCH -A myproject", "#SBATCH --constraint=cpu",
               "#SBATCH -J xpcsfit-worker", "#SBATCH -e xpcsfit-logs/", "#SBATCH -o xpcsfit-logs/"]),
    ("pbs", ["#PBS -l select=1:ncpus=8:mem=32GB", "#PBS -l walltime=01:00:00", "#PBS -q workq",
             "#PBS -A myproject", "#PBS -l filesystems=home", "#PBS -N xpcsfit-worker",
             "#PBS -e xpcsfit-logs/", "#PBS -o xpcsfit-logs/"]),
])
def test_job_script_from_the_example_spec(kind, directives, certs):
    spec = load_cluster_spec(EXAMPLES / f"{kind}.yaml")
    with make_cluster(spec) as cluster:
        script = cluster.job_script()
        scheduler = cluster.scheduler_address
        assert cluster.security.require_encryption
    lines = script.splitlines()
    for directive in directives:  # resources, queue, account, extra directives
        assert any(ln.startswith(directive) for ln in lines), (directive, script)
    # xpcsfit's worker environment, then the spec's own prologue, before the workers start
    exports = [f"export {k}={shlex.quote(v)}" for k, v in worker_environment().items()]
    start = lines.index(exports[0])
    assert lines[start:start + len(exports) + 1] == exports + ["source ~/xpcsfit-venv/bin/activate"]
    assert set(WORKER_ENV) < set(worker_environment())
    words = worker_command(script)
    assert words[1:3] == ["-m", "distributed.cli.dask_worker"] and words[0] == sys.executable
    assert scheduler.startswith("tls://") and words[3] == scheduler
    assert option(words, "--nthreads") == "1" and option(words, "--nworkers") == "8"  # one thread per process
    assert option(words, "--preload") == PRELOAD
    assert option(words, "--protocol") == "tls://"
    assert (option(words, "--tls-ca-file"), option(words, "--tls-cert"), option(words, "--tls-key")) == \
        (str(certs / "ca.pem"), str(certs / "cert.pem"), str(certs / "key.pem"))
    assert option(words, "--lifetime") == "55m" and option(words, "--local-directory") == "/tmp"
    assert option(words, "--memory-limit") == "3.73GiB"  # 32 GB over 8 workers
    assert "--nanny" in words


def test_jobqueue_options_follow_the_spec(certs, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("kind: slurm\ncores: 4\nmemory: 16GiB\nadapt: {minimum: 1, maximum: 6}\n"
                    "python: /opt/venv/bin/python\ninterface: ib0\n")
    spec = load_cluster_spec(path)
    options = jobqueue_options(spec)
    assert (options["cores"], options["processes"], options["memory"]) == (4, 4, "16GiB")
    assert (options["python"], options["interface"], options["protocol"]) == ("/opt/venv/bin/python", "ib0", "tls://")
    assert options["scheduler_options"] == {"dashboard_address": "127.0.0.1:8787"}
    assert spec.jobs is None and (spec.adapt.minimum, spec.adapt.maximum) == (1, 6)
    assert load_cluster_spec("slurm").jobs == 1


# ------------------------------------------------------------------ kubernetes


def test_kubernetes_resource_from_the_example_spec(certs):
    spec = load_cluster_spec(EXAMPLES / "kubernetes.yaml")
    manifest = kubernetes_manifest(spec)
    assert (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]) == \
        ("kubernetes.dask.org/v1", "DaskCluster", "xpcsfit")
    worker_group, scheduler = manifest["spec"]["worker"], manifest["spec"]["scheduler"]
    assert worker_group["replicas"] == 4
    tls_args = ["--tls-ca-file", f"{TLS_MOUNT}/ca.pem", "--tls-cert", f"{TLS_MOUNT}/cert.pem",
                "--tls-key", f"{TLS_MOUNT}/key.pem"]
    for pod, args in ((worker_group["spec"], ["dask-worker", "--nthreads", "1", "--preload", PRELOAD, *tls_args]),
                      (scheduler["spec"], ["dask-scheduler", "--host", "0.0.0.0", "--protocol", "tls", *tls_args])):
        (container,) = pod["containers"]
        assert container["image"] == "registry.example.org/xpcsfit/xpcsfit:0.1.0"
        assert container["args"][:len(args)] == args
        assert pod["volumes"] == [{"name": "xpcsfit-tls", "secret": {"secretName": "xpcsfit-tls"}}]
        assert container["volumeMounts"] == [{"name": "xpcsfit-tls", "mountPath": TLS_MOUNT, "readOnly": True}]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert worker_environment().items() <= env.items()
        assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    (worker,) = worker_group["spec"]["containers"]
    assert worker["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "1", "memory": "4Gi"}}
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["DASK_SCHEDULER_ADDRESS"] == "tls://xpcsfit-scheduler.default.svc.cluster.local:8786"


def test_kubernetes_adapt_starts_at_its_minimum(certs, tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("kind: kubernetes\nname: beamtime\nnamespace: xpcs\nadapt: {minimum: 1, maximum: 9}\n")
    manifest = kubernetes_manifest(load_cluster_spec(path))
    assert manifest["spec"]["worker"]["replicas"] == 1
    env = {e["name"]: e["value"] for e in manifest["spec"]["worker"]["spec"]["containers"][0]["env"]}
    assert env["DASK_SCHEDULER_ADDRESS"] == "tls://beamtime-scheduler.xpcs.svc.cluster.local:8786"


def test_kubernetes_without_credentials_is_one_line(certs, tmp_path, monkeypatch):
    """Starting needs the Kubernetes API; without credentials: a one-line ConfigError."""
    from xpcsfit.engine.launch import cluster_client

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    with pytest.raises(ConfigError) as info, cluster_client(load_cluster_spec("kubernetes")):
        pass
    assert str(info.value).startswith("cluster spec kubernetes: Kubernetes API: ")
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_gpu_spec_starts_one_pinned_worker_per_device(two_gpus):
    """Two GPUs shown (on a CPU machine JAX then runs on the CPU): two one-thread
    workers, each seeing only its own device."""
    from xpcsfit.engine.launch import cluster_client

    with cluster_client(load_cluster_spec("gpu")) as client:
        client.wait_for_workers(2)
        seen = client.run(lambda: __import__("os").environ["CUDA_VISIBLE_DEVICES"])
        assert sorted(seen.values()) == ["0", "1"]
        assert {w["nthreads"] for w in client.scheduler_info()["workers"].values()} == {1}
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
