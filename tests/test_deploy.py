"""deploy/ agrees with pyproject.toml, with xpcsfit's worker settings and with itself.

The Dockerfile is read as text, the Kubernetes manifests with pyyaml; nothing is built or
applied. What must agree: the Python version and the extras the image installs (with
pyproject.toml), the worker command (preload, one thread; with xpcsfit.engine.cluster),
the image, the scheduler's Service name and port, the TLS files and the data volume
(between the DaskCluster and the CronJob). The CronJob's `xpcsfit batch` command is parsed
with xpcsfit's own parser and run for real, with its settings file, on local directories.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Extras for developing xpcsfit, not for running it: never in the image.
DEVELOPMENT_EXTRAS = {"test", "bench", "notebooks"}
PRELOAD = "xpcsfit.engine.cluster"


# ---------------------------------------------------------------- reading the files


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines()]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines if ln and not ln.startswith("#")]


def instructions(name: str) -> list[str]:
    return [args for ins, args in dockerfile() if ins == name]


def manifest(name: str) -> dict[str, dict]:
    """{kind: document} of deploy/kubernetes/NAME."""
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()))
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), f"{name}: one document per kind"
    return dict(zip(kinds, docs))


def cluster() -> dict:
    return manifest("daskcluster.yaml")["DaskCluster"]


def pods() -> dict[str, dict]:
    """{role: pod spec} for the scheduler, the workers and the reprocessing job."""
    spec = cluster()["spec"]
    job = manifest("reprocess-cronjob.yaml")["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return {"scheduler": spec["scheduler"]["spec"], "worker": spec["worker"]["spec"], "cronjob": job}


def container(role: str) -> dict:
    (c,) = pods()[role]["containers"]
    return c


def options(args: list[str]) -> dict[str, str]:
    """{--option: value} of a command line whose options all take one value."""
    out, i = {}, 0
    while i < len(args):
        if args[i].startswith("--"):
            out[args[i]] = args[i + 1]
            i += 2
        else:
            i += 1
    return out


def positional(args: list[str]) -> list[str]:
    """The arguments that are neither an option nor an option's value."""
    out, i = [], 0
    while i < len(args):
        if args[i].startswith("--"):
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def k8s_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (4Gi, 512Mi, 4G) in bytes."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    scale = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    return int(float(number) * scale[unit])


def mounts(role: str) -> dict[str, dict]:
    """{volume name: (mount, volume)} of one container."""
    volumes = {v["name"]: v for v in pods()[role]["volumes"]}
    return {m["name"]: (m, volumes[m["name"]]) for m in container(role)["volumeMounts"]}


def flatten(config: dict, prefix: str = "") -> dict:
    """{"a.b.c": leaf} of a nested Dask configuration (for dask.config.set)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def tls_config() -> dict:
    """The Dask configuration in the ConfigMap that the pods mount."""
    (text,) = manifest("daskcluster.yaml")["ConfigMap"]["data"].values()
    return yaml.safe_load(text)


# ---------------------------------------------------------------- the image and pyproject.toml


def test_image_runs_the_python_that_pyproject_requires():
    from packaging.specifiers import SpecifierSet

    (base,) = instructions("FROM")
    image, tag = base.split(":")
    assert image == "python" and tag.endswith("-slim"), base
    version = tag.removesuffix("-slim")
    assert version == "3.12"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(version + ".0")
    assert (ROOT / ".python-version").read_text().strip() == version  # the version developers run


def test_image_installs_the_package_with_extras_that_pyproject_declares():
    installs = [shlex.split(r) for r in instructions("RUN") if r.startswith("pip install")]
    (command,) = installs
    (target,) = command[2:]
    package, extras = re.fullmatch(r"(\.)\[([a-z0-9_,-]+)\]", target).groups()
    extras = set(extras.split(","))
    declared = set(PYPROJECT["project"]["optional-dependencies"])
    assert extras <= declared, f"extras not in pyproject.toml: {sorted(extras - declared)}"
    assert not extras & DEVELOPMENT_EXTRAS
    assert {"kubernetes", "dashboard"} <= extras  # the operator's specs; the scheduler's health probe
    # "." is the checkout: the image copies what pip needs to build it (pyproject names
    # the readme), and every file it copies exists.
    copied = [shlex.split(c) for c in instructions("COPY")]
    sources = {s for c in copied for s in c[:-1]}
    assert {"pyproject.toml", PYPROJECT["project"]["readme"], PYPROJECT["project"]["name"]} <= sources
    assert all((ROOT / s).exists() for s in sources), sources


def test_image_default_command_is_a_worker_with_the_preload_and_one_thread():
    (cmd,) = instructions("CMD")
    cmd = json.loads(cmd)
    assert cmd[:2] == ["dask", "worker"]
    assert options(cmd) == {"--nthreads": "1", "--preload": PRELOAD}


def test_image_dask_config_is_xpcsfits_worker_config():
    from xpcsfit.engine.cluster import WORKER_DASK_CONFIG

    copies = {shlex.split(c)[-1]: shlex.split(c)[0] for c in instructions("COPY")}
    (source,) = [s for d, s in copies.items() if d.startswith("/etc/dask/")]
    assert flatten(yaml.safe_load((ROOT / source).read_text())) == WORKER_DASK_CONFIG


# ---------------------------------------------------------------- the manifests


def test_one_image_everywhere_tagged_with_the_package_version():
    images = {role: container(role)["image"] for role in pods()}
    assert len(set(images.values())) == 1, images
    image = images["scheduler"]
    assert image.rsplit(":", 1)[1] == PYPROJECT["project"]["version"]
    # deploy/README.md builds and pushes that very image.
    readme = (DEPLOY / "README.md").read_text()
    assert f"docker build -f deploy/Dockerfile -t {image} ." in readme
    assert f"docker push {image}" in readme


def test_workers_run_xpcsfits_worker_command_and_settings():
    from dask.utils import parse_bytes

    from xpcsfit.engine.cluster import WORKER_ENV

    c = container("worker")
    (cmd,) = instructions("CMD")
    default = json.loads(cmd)
    assert c["args"][:2] == default[:2]
    opts = options(c["args"])
    assert {k: opts.get(k) for k in options(default)} == options(default)  # --nthreads 1, the preload
    assert env(c) == WORKER_ENV
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert limits == requests  # guaranteed QoS: the memory Dask plans with is there
    assert parse_bytes(opts["--memory-limit"]) == k8s_bytes(limits["memory"])
    assert int(limits["cpu"]) == int(opts["--nthreads"])


def test_scheduler_service_is_where_the_workers_and_the_cronjob_connect():
    dc = cluster()
    scheduler, service = container("scheduler"), dc["spec"]["scheduler"]["service"]
    opts = options(scheduler["args"])
    assert opts["--protocol"] == "tls"
    ports = {p["name"]: p for p in service["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in scheduler["ports"]}
    comm = ports["tcp-comm"]
    assert container_ports[comm["targetPort"]] == int(opts["--port"]) == comm["port"]
    assert service["selector"] == {"dask.org/cluster-name": dc["metadata"]["name"], "dask.org/component": "scheduler"}
    # The operator names the Service <DaskCluster name>-scheduler.
    address = f"tls://{dc['metadata']['name']}-scheduler:{comm['port']}"
    assert positional(container("worker")["args"])[2:] == [address]
    job = container("cronjob")
    assert env(job)["XPCSFIT_SCHEDULER"] == address
    assert "$(XPCSFIT_SCHEDULER)" in job["args"]
    probe = scheduler["readinessProbe"]["httpGet"]
    assert probe["port"] == "http-dashboard" and container_ports["http-dashboard"] == int(
        opts["--dashboard-address"].rsplit(":", 1)[1])


def test_every_pod_mounts_the_tls_files_that_the_dask_config_names():
    import dask
    from distributed.security import Security

    with dask.config.set(flatten(tls_config())):  # as when Dask reads the mounted file
        security = Security()
    assert security.require_encryption
    files = {security.tls_ca_file, security.tls_client_cert, security.tls_client_key, security.tls_scheduler_cert,
             security.tls_scheduler_key, security.tls_worker_cert, security.tls_worker_key}
    assert None not in files  # every key spelt as Dask reads it
    (tls_dir,) = {str(PurePosixPath(f).parent) for f in files}
    configmap = manifest("daskcluster.yaml")["ConfigMap"]["metadata"]["name"]
    secrets = set()
    for role in pods():
        by_volume = mounts(role)
        tls = [(m, v) for m, v in by_volume.values() if "secret" in v]
        (m, v), = tls
        assert m["mountPath"] == tls_dir and m.get("readOnly"), role
        secrets.add(v["secret"]["secretName"])
        (cm,) = [(m, v) for m, v in by_volume.values() if v.get("configMap", {}).get("name") == configmap]
        assert cm[0]["mountPath"].startswith("/etc/dask/") and cm[0]["mountPath"].endswith(cm[0]["subPath"]), role
    assert len(secrets) == 1
    # The files the Secret must hold (deploy/README.md creates it with these names).
    names = sorted({PurePosixPath(f).name for f in files})
    readme = (DEPLOY / "README.md").read_text()
    assert all(f"--from-file={n}=" in readme for n in names), names
    assert f"kubectl create secret generic {secrets.pop()}" in readme


def test_workers_and_the_cronjob_see_the_same_data():
    worker = {m["mountPath"]: v["persistentVolumeClaim"]["claimName"]
              for m, v in mounts("worker").values() if "persistentVolumeClaim" in v}
    job = {m["mountPath"]: v["persistentVolumeClaim"]["claimName"]
           for m, v in mounts("cronjob").values() if "persistentVolumeClaim" in v}
    assert worker == job and len(job) == 1
    (data,) = job
    args = cronjob_batch_args()
    paths = [*args.roots, args.out_root]
    assert all(PurePosixPath(p).is_relative_to(data) for p in paths), paths


def cronjob_batch_args():
    """The CronJob's command, parsed by xpcsfit's own parser (``xpcsfit`` is the console
    script the image's pip install puts on PATH)."""
    from xpcsfit.cli import build_parser

    argv = container("cronjob")["args"]
    assert argv[0] == "xpcsfit"
    return build_parser().parse_args(argv[1:])


def batch_settings() -> tuple[str, str]:
    """(mount path, text) of the settings file the CronJob's --config names."""
    (mount, volume), = [(m, v) for m, v in mounts("cronjob").values()
                        if v.get("configMap", {}).get("name") == "xpcsfit-batch-settings"]
    configmap = manifest("reprocess-cronjob.yaml")["ConfigMap"]
    assert configmap["metadata"]["name"] == volume["configMap"]["name"]
    return mount["mountPath"], configmap["data"][mount["subPath"]]


def test_cronjob_runs_nightly_one_at_a_time():
    cj = manifest("reprocess-cronjob.yaml")["CronJob"]["spec"]
    minute, hour, *rest = cj["schedule"].split()
    assert rest == ["*", "*", "*"] and 0 <= int(minute) < 60 and 0 <= int(hour) < 24
    assert cj["concurrencyPolicy"] == "Forbid"
    assert cj["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_cronjob_runs_xpcsfit_batch_with_the_mounted_settings():
    from xpcsfit.batch.settings import BatchSettings

    args = cronjob_batch_args()
    assert args.command == "batch" and args.out_root and not (args.dry_run or args.watch or args.force)
    assert args.scheduler == "$(XPCSFIT_SCHEDULER)"  # Kubernetes expands it from env
    path, text = batch_settings()
    assert args.config == path
    assert BatchSettings.model_validate(yaml.safe_load(text)).gap > 0  # settings a batch takes
    # nothing in the image stands between the job and xpcsfit
    assert not any("/usr/local/bin/" in c for c in instructions("COPY"))


@pytest.mark.parametrize("role,command", [("scheduler", "scheduler"), ("worker", "worker")])
def test_manifest_options_exist_in_the_dask_command_line(role, command):
    args = container(role)["args"]
    assert args[:2] == ["dask", command]
    cli = {"scheduler": "distributed.cli.dask_scheduler", "worker": "distributed.cli.dask_worker"}[command]
    help_text = subprocess.run([sys.executable, "-m", cli, "--help"], capture_output=True, text=True,
                               timeout=120, check=True).stdout
    for option in options(args):
        assert re.search(rf"(^|[\s,/]){re.escape(option)}\b", help_text, re.M), f"dask {command} has no {option}"


# ---------------------------------------------------------------- the CronJob's command, run


@pytest.mark.slow
def test_cronjob_command_fits_new_files_and_goes_past_a_bad_one(tmp_path, small_flow_file, client):
    """The CronJob's args as they stand, with /data mapped to a local directory, its
    settings file written where --config points, against a running scheduler."""
    import h5py

    from xpcsfit.cli import main
    from xpcsfit.errors import EXIT_INCOMPLETE

    data = tmp_path / "data"
    (data / "incoming" / "run1").mkdir(parents=True)
    shutil.copy(small_flow_file, data / "incoming" / "run1" / "a.hdf")
    shutil.copy(small_flow_file, data / "incoming" / "b_broken.hdf")
    with h5py.File(data / "incoming" / "b_broken.hdf", "a") as f:
        del f["/xpcs/twotime/processed_bins"]  # a damaged result: reported, not fitted
    (data / "incoming" / "notes.hdf").write_text("not a result file")  # skipped, does not count
    mount, text = batch_settings()
    settings = tmp_path / PurePosixPath(mount).name
    settings.write_text(text + "frames: [1, 60]\n")  # the site's settings, fewer frames for speed

    def local(arg: str) -> str:
        if arg == mount:
            return str(settings)
        if arg == "$(XPCSFIT_SCHEDULER)":
            return client.scheduler.address
        return str(data / PurePosixPath(arg).relative_to("/data")) if arg.startswith("/data") else arg

    argv = [local(a) for a in container("cronjob")["args"][1:]]
    assert main(argv) == EXIT_INCOMPLETE  # the damaged file kept one file from being fitted
    results = data / "results"
    (fit_json,) = results.rglob("fit.json")  # one unit: the file's one q
    assert fit_json.is_relative_to(results / "run1")  # the input tree, mirrored
    fit = json.loads(fit_json.read_text())
    assert fit["converged"] and fit["input"]["frames"] == [1, 60]
    assert (results / "xpcsfit.sqlite").is_file() and (results / "index.html").is_file()
    assert not any("b_broken" in str(p) or "notes" in str(p) for p in results.rglob("*"))
    # the next night: nothing new, nothing refitted
    before = {p: p.stat().st_mtime_ns for p in results.rglob("fit.json")}
    assert main(argv) == EXIT_INCOMPLETE  # the damaged file is still there
    assert {p: p.stat().st_mtime_ns for p in results.rglob("fit.json")} == before


# ---------------------------------------------------------------- the cluster specs (cluster/)


def test_kubernetes_spec_agrees_with_the_manifests(tmp_path, monkeypatch):
    """cluster/kubernetes.yaml (``--cluster``: xpcsfit makes its own DaskCluster per run)
    and deploy/kubernetes/ (the standing DaskCluster of the CronJob) describe one kind of
    cluster: the same image, worker pods (cpu, memory, count), worker command (preload,
    one thread), TLS Secret, mount path and certificate file names."""
    from xpcsfit.engine.launch import TLS_MOUNT, kubernetes_manifest
    from xpcsfit.engine.security import CA, CERT, KEY, make_certificates
    from xpcsfit.engine.specs import load_cluster_spec

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # the spec's default TLS files
    make_certificates(tmp_path / "config" / "xpcsfit" / "certs")
    spec = load_cluster_spec(ROOT / "cluster" / "kubernetes.yaml")
    made = kubernetes_manifest(spec)["spec"]["worker"]

    worker = container("worker")
    assert spec.image == worker["image"] == made["spec"]["containers"][0]["image"]
    assert spec.n_workers == cluster()["spec"]["worker"]["replicas"]
    assert made["spec"]["containers"][0]["resources"]["limits"] == {"cpu": spec.cpu, "memory": spec.memory}
    assert spec.cpu == worker["resources"]["limits"]["cpu"]
    assert k8s_bytes(spec.memory) == k8s_bytes(worker["resources"]["limits"]["memory"])
    for args in (made["spec"]["containers"][0]["args"], worker["args"]):
        assert options(args)["--preload"] == PRELOAD and options(args)["--nthreads"] == "1"
    (tls_mount, tls_volume), = [mv for mv in mounts("worker").values() if "secret" in mv[1]]
    assert tls_volume["secret"]["secretName"] == spec.tls_secret
    assert tls_mount["mountPath"] == TLS_MOUNT
    comm = tls_config()["distributed"]["comm"]["tls"]
    named = {PurePosixPath(comm["ca-file"]).name} | {PurePosixPath(v).name for v in comm["client"].values()}
    assert named == {CA, CERT, KEY}
