"""Cluster specifications: where a fit's workers run (``--cluster SPEC``, ``cluster=``).

A spec is a YAML file (examples, with what to edit, in the repository's ``cluster/``) or
one of the names ``local``, ``gpu``, ``slurm``, ``pbs``, ``kubernetes``: the built-in
defaults of that kind (the values below). Every file names its ``kind``; unknown keys
are errors. :func:`load_cluster_spec` validates a spec and checks, before any work, that
what it needs is there (the optional extra, the TLS files, the GPUs);
:mod:`xpcsfit.engine.launch` starts the cluster it describes.

Kinds:

- ``local``: a LocalCluster on this machine (xpcsfit's default), on 127.0.0.1.
- ``gpu``: one worker per CUDA device of this machine (``nvidia-smi -L``), each pinned
  to its device with CUDA_VISIBLE_DEVICES.
- ``slurm``, ``pbs``: dask-jobqueue's SLURMCluster / PBSCluster: the scheduler runs in
  the xpcsfit process, every batch job runs ``cores`` worker processes of one thread
  each. Extra ``jobqueue``.
- ``kubernetes``: a DaskCluster resource of the dask-kubernetes operator (scheduler and
  worker pods from one image, TLS files from a Kubernetes Secret). Extra ``kubernetes``.

TLS: every spec whose processes listen beyond this machine (slurm, pbs, kubernetes, a
local or gpu spec with a non-loopback ``host``) talks ``tls://`` with mutual
authentication, and there is no switch to turn it off. Its ``tls:`` section names the
CA, certificate and key (paths relative to the spec file); without the section, those in
the directory ``xpcsfit certs`` writes by default (:func:`default_certificate_directory`).
"""

from __future__ import annotations

import importlib
import ipaddress
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from xpcsfit.config import read_yaml_mapping, short_repr
from xpcsfit.engine.security import (
    CA,
    CERT,
    KEY,
    check_tls_files,
    default_certificate_directory,
)
from xpcsfit.errors import ConfigError

NAMES = ("local", "gpu", "slurm", "pbs", "kubernetes")

# kind -> (module the kind imports, its distribution, the xpcsfit extra that installs it)
EXTRAS = {"slurm": ("dask_jobqueue", "dask-jobqueue", "jobqueue"),
          "pbs": ("dask_jobqueue", "dask-jobqueue", "jobqueue"),
          "kubernetes": ("dask_kubernetes.operator", "dask-kubernetes", "kubernetes")}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSFiles(_Strict):
    """PEM files: the CA that signs every certificate, and this side's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @field_validator("ca", "cert", "key")
    @classmethod
    def _expand(cls, path: Path) -> Path:
        return path.expanduser()


def default_tls() -> TLSFiles:
    """The files of ``xpcsfit certs`` in its default directory."""
    d = default_certificate_directory()
    return TLSFiles(ca=d / CA, cert=d / CERT, key=d / KEY)


class Adapt(_Strict):
    """Adaptive scaling between ``minimum`` and ``maximum`` (jobs, or Kubernetes workers)."""

    minimum: int = Field(0, ge=0)
    maximum: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.minimum > self.maximum:
            raise ValueError(f"minimum {self.minimum} exceeds maximum {self.maximum}")
        return self


def _size(value):
    """A byte size as Dask writes them ("32GB", "4GiB", 2e9) or "auto", unchanged; else ValueError."""
    from dask.utils import parse_bytes

    if value == "auto":
        return value
    try:
        if isinstance(value, bool) or parse_bytes(value) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise ValueError("not a size (e.g. 32GB, 4GiB)") from None
    return value


Size = Annotated[str | int, AfterValidator(_size)]


class _Spec(_Strict):
    _source: str = PrivateAttr("")

    @property
    def source(self) -> str:
        """Where the spec came from: its file, or the built-in name."""
        return self._source or self.kind


class _ThisMachine(_Spec):
    memory_limit: Size = "auto"  # per worker, as for distributed.LocalCluster
    host: str = "127.0.0.1"  # where scheduler and workers listen
    dashboard_address: str = "127.0.0.1:8787"
    tls: TLSFiles | None = None  # required when host is not a loopback address

    @model_validator(mode="after")
    def _tls_beyond_loopback(self):
        if self.tls is None and not _is_loopback(self.host):
            raise ValueError(f"host {self.host} listens beyond this machine: give a tls: section "
                             "(ca, cert, key; make them with `xpcsfit certs DIR`)")
        return self


class LocalSpec(_ThisMachine):
    """A LocalCluster of CPU worker processes, one thread each (or one per GPU where
    CUDA GPUs are visible, as xpcsfit's default cluster)."""

    kind: Literal["local"]
    n_workers: int | None = Field(None, gt=0)  # default: the cores, at most 8


class GPUSpec(_ThisMachine):
    """One worker per CUDA device of this machine, pinned with CUDA_VISIBLE_DEVICES."""

    kind: Literal["gpu"]
    gpus: list[Annotated[int, Field(ge=0)]] | None = None  # device indices; default: all


class _ScaledSpec(_Spec):
    """A spec that starts a fixed number of units (field ``_FIXED``) or adapts between
    ``adapt.minimum`` and ``adapt.maximum``; not both."""

    _FIXED: typing.ClassVar[tuple[str, str]]  # (field, what it counts)

    @model_validator(mode="after")
    def _one_scaling(self):
        field, what = self._FIXED
        if getattr(self, field) is not None and self.adapt is not None:
            raise ValueError(f"give {field} (a number of {what}) or adapt (minimum, maximum), not both")
        return self


class _JobQueueSpec(_ScaledSpec):
    _FIXED = ("scale", "jobs")
    cores: int = Field(8, gt=0)  # per job: this many worker processes, one thread each
    memory: Size = "32GB"  # per job, shared by its workers
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    job_extra_directives: list[str] = []  # e.g. "--constraint=cpu" (Slurm), "-l filesystems=home" (PBS)
    job_script_prologue: list[str] = []  # shell lines before the worker starts (module load, activate)
    worker_extra_args: list[str] = []  # more `dask worker` options, e.g. "--lifetime", "55m"
    python: str | None = None  # the interpreter on the nodes; default: this one (sys.executable)
    interface: str | None = None  # network interface of scheduler and workers, e.g. ib0
    local_directory: str | None = None  # worker scratch on the node, e.g. $TMPDIR
    log_directory: str | None = None  # where the batch system writes the jobs' output
    dashboard_address: str = "127.0.0.1:8787"  # on the node running xpcsfit; reach it by ssh -L
    scale: int | None = Field(None, gt=0)  # a fixed number of jobs (default 1)
    adapt: Adapt | None = None  # or: between minimum and maximum jobs, as work waits
    tls: TLSFiles = Field(default_factory=default_tls)

    @field_validator("memory")
    @classmethod
    def _job_memory(cls, value):
        if value == "auto":
            raise ValueError("a batch job needs a size, e.g. 32GB")
        return value

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", value):
            raise ValueError("expected [D-]HH:MM:SS, e.g. 01:30:00")
        return value

    @property
    def jobs(self) -> int | None:
        """Jobs to submit at the start: ``scale``, or 1 unless adapting."""
        return self.scale if self.scale is not None else (None if self.adapt else 1)


class SlurmSpec(_JobQueueSpec):
    """dask-jobqueue's SLURMCluster (account is ``--account``, queue ``--partition``)."""

    kind: Literal["slurm"]


class PBSSpec(_JobQueueSpec):
    """dask-jobqueue's PBSCluster (account is ``-A``, queue ``-q``)."""

    kind: Literal["pbs"]
    resource_spec: str | None = None  # -l value; default: select=1:ncpus=<cores>:mem=<memory>


class KubernetesSpec(_ScaledSpec):
    """A DaskCluster resource of the dask-kubernetes operator."""

    _FIXED = ("workers", "pods")
    kind: Literal["kubernetes"]
    name: str = "xpcsfit"  # of the DaskCluster; the scheduler service is NAME-scheduler
    namespace: str = "default"
    image: str = "xpcsfit:0.1.0"  # xpcsfit, its extras and the worker preload (deploy/)
    workers: int | None = Field(None, gt=0)  # a fixed number of worker pods (default 2)
    adapt: Adapt | None = None  # or: between minimum and maximum pods (DaskAutoscaler)
    cpu: str = "1"  # per worker pod (one thread), request and limit
    memory: str = "4Gi"  # per worker pod, request and limit
    tls_secret: str = "xpcsfit-tls"  # Secret with keys ca.pem, cert.pem, key.pem
    tls: TLSFiles = Field(default_factory=default_tls)  # the same files, for this client

    @field_validator("name", "namespace", "tls_secret")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,48}[a-z0-9])?", value):
            raise ValueError("expected a Kubernetes name: lower-case letters, digits and '-', at most 50")
        return value

    _QUANTITIES: typing.ClassVar[dict[str, tuple[str, str]]] = {
        "cpu": (r"\d+(\.\d+)?m?", "1 or 500m"), "memory": (r"\d+(\.\d+)?([KMGT]i?)?", "4Gi")}

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str, info) -> str:
        pattern, example = cls._QUANTITIES[info.field_name]
        if not re.fullmatch(pattern, str(value)):
            raise ValueError(f"expected a Kubernetes {info.field_name} quantity, e.g. {example}")
        return str(value)

    @property
    def n_workers(self) -> int:
        """Worker pods at the start: ``workers``, else adapt's minimum, else 2."""
        if self.workers is not None:
            return self.workers
        return self.adapt.minimum if self.adapt else 2


ClusterSpec = Annotated[Union[LocalSpec, GPUSpec, SlurmSpec, PBSSpec, KubernetesSpec], Field(discriminator="kind")]
_ADAPTER = TypeAdapter(ClusterSpec)
_BY_KIND = {cls.model_fields["kind"].annotation.__args__[0]: cls
            for cls in (LocalSpec, GPUSpec, SlurmSpec, PBSSpec, KubernetesSpec)}


def load_cluster_spec(source) -> LocalSpec | GPUSpec | SlurmSpec | PBSSpec | KubernetesSpec:
    """Read, validate and check a cluster specification.

    Parameters
    ----------
    source : str, Path or a spec
        One of :data:`NAMES` (that kind's defaults), or a YAML file with a ``kind`` key.
        A spec object is returned as it is.

    Returns
    -------
    LocalSpec, GPUSpec, SlurmSpec, PBSSpec or KubernetesSpec

    Raises
    ------
    ConfigError
        One line naming the spec (file or name) and the key: an unknown name or missing
        file, bad YAML, an unknown key or bad value; the kind's optional extra not
        installed (naming the extra); a TLS file missing or unreadable; a gpu spec on a
        machine without (those) CUDA GPUs.
    """
    if isinstance(source, _Spec):
        return source
    if isinstance(source, str) and source in NAMES:
        where, data = source, {"kind": source}
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        where = str(source)
        if not path.exists():
            raise ConfigError(f"cluster spec {where}: no such file, and not one of {', '.join(NAMES)}")
        data = read_yaml_mapping(path)
        _relative_to(data, path.parent)
    else:
        raise ConfigError(f"cluster = {short_repr(source)}: expected a spec name, a YAML file or a spec")
    try:
        spec = _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(f"cluster spec {where}: {_message(exc, data)}") from None
    spec._source = where
    _check(spec)
    return spec


def _relative_to(data: dict, base: Path) -> None:
    """TLS paths of a spec file are relative to the file's directory."""
    tls = data.get("tls")
    if isinstance(tls, dict):
        for k, v in tls.items():
            if isinstance(v, str) and not Path(v).expanduser().is_absolute():
                tls[k] = str(base / v)


def _message(exc: ValidationError, data: dict) -> str:
    """'key: what is wrong (got value)' for pydantic's first error."""
    errors = exc.errors()
    # A misspelt key is also a missing one: name the misspelling.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(p) for p in err["loc"]]
    kind = data.get("kind")
    if err["type"] == "union_tag_not_found":
        return f"kind: missing (one of {', '.join(NAMES)})"
    if err["type"] == "union_tag_invalid":
        return f"kind: {short_repr(kind)} is not one of {', '.join(NAMES)}"
    loc = loc[1:]  # the first is the kind (the union's tag)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        known = _fields_at(_BY_KIND[kind], loc[:-1])
        return f"{'.'.join(loc)}: unknown key (known: {', '.join(known)})"
    if not loc:  # a check of the whole spec: its message names the keys
        return msg
    if err["type"] == "missing":
        return f"{'.'.join(loc)}: missing"
    return f"{'.'.join(loc)}: {msg} (got {short_repr(err['input'])})"


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The keys allowed at ``loc`` inside ``model`` (nested sections such as tls, adapt)."""
    for key in loc:
        annotation = model.model_fields[key].annotation
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is Union:
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        model = annotation
    return [k for k in model.model_fields if k != "kind"]


def _check(spec) -> None:
    """What the spec needs on this machine, before any work: extra, TLS files, GPUs."""
    where = f"cluster spec {spec.source}"
    if spec.kind in EXTRAS:
        module, dist, extra = EXTRAS[spec.kind]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f'{where} needs {dist}: pip install "xpcsfit[{extra}]"') from None
    if spec.tls is not None:
        check_tls_files(spec.tls.ca, spec.tls.cert, spec.tls.key, where)
    if spec.kind == "gpu":
        from xpcsfit.engine.cluster import visible_gpus

        visible = visible_gpus()
        if not visible:
            raise ConfigError(f"{where}: nvidia-smi -L lists no CUDA GPUs on this machine")
        missing = [g for g in spec.gpus or () if str(g) not in visible]
        if missing:
            raise ConfigError(f"{where}: gpus {missing}: not on this machine (it has {', '.join(visible)})")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
