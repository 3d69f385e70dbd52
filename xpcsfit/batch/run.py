"""The batch runner: every unit of a plan fitted on one shared Dask cluster.

:func:`batch` (``xpcsfit batch``) opens the catalogue as its one writer, makes the plan
(:func:`xpcsfit.batch.plan.make_plan`), gets ONE client — the given one; inside a Dask
task the worker's; ``scheduler``; a ``cluster`` spec; else a LocalCluster started once —
and keeps as many fits running as the cluster has worker threads, submitting the next
queued unit as one ends. Where a unit runs is chosen by its size
(:attr:`~xpcsfit.batch.units.Unit.n_points` against the ``in_process_max_points``
setting): a small unit is one task, ``fit(..., in_process=True)``, the whole fit inside
the worker with the in-process evaluator (no scheduler round trip per data pass); a
large one is a task running ``fit(..., in_process=False)``, which fans its tile tasks out
from the worker over the cluster. Each writes its fit directory exactly as ``xpcsfit
fit`` does (``plan.result_dir``: written aside, swapped in when complete).

The catalogue records each attempt: begun when submitted, then finished (the result's
row), failed (its one-line error; the others go on) or interrupted. SIGINT/SIGTERM set a
stop flag: queued units are not started, running futures are cancelled and their
attempts marked interrupted (a fit already running on a worker of an external scheduler
ends there unobserved: Dask does not stop a running task; its directory is replaced when
the unit is next fitted). A SIGKILL loses nothing either: a fit directory appears only
complete, every catalogue change is one transaction, and the next run marks the attempts
left running as interrupted and redoes only what has no complete result (a fit killed
midway resumes from its checkpoint). The report is rewritten at the end of every run.

Where the catalogue lives: ``<out-root>/xpcsfit.sqlite`` with ``--out-root``; otherwise
``<first ROOT>/xpcsfit.sqlite`` (a ROOT given as a file: its directory), since the
results then lie beside the inputs under the ROOTs. ``index.html`` is written beside it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from xpcsfit.batch.catalogue import Catalogue
from xpcsfit.batch.discover import INVALID
from xpcsfit.batch.display import Display
from xpcsfit.batch.plan import ERROR, FIT, SKIP, Plan, Step, make_plan
from xpcsfit.batch.report import write_report
from xpcsfit.errors import EXIT_INCOMPLETE, ConfigError, XpcsfitError
from xpcsfit.parameters import GapWarning, default_gap_message

CATALOGUE_FILE = "xpcsfit.sqlite"
REPORT_FILE = "index.html"

CONVERGED, NOT_CONVERGED, FAILED, INTERRUPTED = "converged", "not converged", "failed", "interrupted"
DONE_ALREADY, NOT_FITTED, NOT_A_RESULT = "done already", "not fitted", "not a result"


@dataclass(frozen=True)
class UnitStatus:
    """What became of one unit (or of one file that has none) in a run.

    Attributes
    ----------
    label : str
        ``<path> q_index=K`` (:attr:`Unit.label`), or the path of a file without units.
    input : Path
    status : str
        "converged", "not converged", "failed", "interrupted", "done already" (skipped:
        same fingerprint), "not fitted" (a damaged result file, or one with a bad
        setting), "not a result" (not a two-time result file), or, in a dry run, the
        plan's action ("fit", "skip", "error").
    why : str
        The one-line error or reason ("" for a fit that ended).
    result_dir : Path or None
    attempt : int or None
        The catalogue's attempt id.
    """

    label: str
    input: Path
    status: str
    why: str = ""
    result_dir: Path | None = None
    attempt: int | None = None


@dataclass
class BatchSummary:
    """The summary of a batch run (:func:`batch`).

    Attributes
    ----------
    units : list of UnitStatus
        Every unit of the plan and every file found but not fitted, in plan order; a
        ``--watch`` run accumulates its passes.
    catalogue, report : Path
        The catalogue and the index.html (the report is None in a dry run).
    exit_code : int
        0: every fit of the run converged (or nothing was to do); :data:`EXIT_INCOMPLETE`
        (6): some fit failed or did not converge, or a damaged result file or a bad
        setting kept a file from being fitted; 128 + the signal's number when SIGINT or
        SIGTERM stopped a run that was not watching.
    wall_time_s : float
    """

    units: list[UnitStatus] = field(default_factory=list)
    catalogue: Path | None = None
    report: Path | None = None
    exit_code: int = 0
    wall_time_s: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        """{status: number of units}."""
        out: dict[str, int] = {}
        for u in self.units:
            out[u.status] = out.get(u.status, 0) + 1
        return out

    def line(self) -> str:
        """The run's last line: the counts, the report and the catalogue."""
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items())) or "nothing to do"
        return f"xpcsfit batch: {counts}; {self.wall_time_s:.0f} s; report {self.report}, catalogue {self.catalogue}"


def catalogue_path(roots, out_root=None) -> Path:
    """``<out_root>/xpcsfit.sqlite``, else ``<first ROOT>/xpcsfit.sqlite`` (the directory of a ROOT file)."""
    if out_root is not None:
        return Path(out_root).resolve() / CATALOGUE_FILE
    first = Path(os.path.abspath(_as_list(roots)[0]))
    return (first if first.is_dir() else first.parent) / CATALOGUE_FILE


def batch(roots, *, pattern=None, config=None, out_root=None, scheduler=None, cluster=None, client=None,
          dry_run=False, force=False, watch=False, settle=10.0, poll=False, progress=True) -> BatchSummary:
    """Fit every two-time result file under ``roots`` that has no current result.

    The same run as ``xpcsfit batch`` (see :mod:`xpcsfit.batch.run`). Usable as a task:
    ``client.submit(xpcsfit.batch, "/data/exp42", progress=False)`` runs it on a worker,
    where it submits its fits through that worker's client.

    Parameters
    ----------
    roots : str, Path or sequence of them
        Directories searched recursively, or single files.
    pattern : str, optional
        ``--glob``: fnmatch pattern on names, or with ``/`` on relative paths
        (:func:`xpcsfit.batch.discover.discover`). Default ``*.hdf, *.h5, *.hdf5, *.nxs``.
    config : str, Path or dict, optional
        ``--config``: the settings under every ``xpcsfit.yaml`` (:mod:`xpcsfit.batch.settings`).
    out_root : str or Path, optional
        Result directories under it, mirroring each ROOT's tree; default beside the inputs.
    scheduler : str, optional
        Address of a running Dask scheduler.
    cluster : str or Path, optional
        Cluster spec to start once for the run (local, slurm, a YAML file, ...).
    client : distributed.Client, optional
        Run on this client (the default: see :func:`xpcsfit.engine.cluster.dask_client`).
    dry_run : bool
        Print the plan and fit nothing (the catalogue is only read, if it exists).
    force : bool
        Fit every unit again.
    watch : bool
        After the run, keep watching ``roots`` and fit each new or changed file once it
        is complete (:mod:`xpcsfit.batch.watch`) until SIGINT/SIGTERM.
    settle : float
        Seconds a file's size and mtime must stay unchanged before it is opened (watch).
    poll : bool
        Watch by polling (network filesystems, where change events do not arrive).
    progress : bool
        Live display / progress lines and the plan's skip lines.

    Returns
    -------
    BatchSummary

    Raises
    ------
    InputError
        A ROOT does not exist, or the catalogue is not one.
    ConfigError
        Bad option, --config, scheduler address or cluster spec (before any fit).
    XpcsfitError
        Another batch run is writing the same catalogue.
    """
    started = time.monotonic()
    roots = _as_list(roots)
    if not roots:
        raise ConfigError("batch: give at least one ROOT")
    if scheduler and cluster is not None:
        raise ConfigError(f"scheduler {scheduler} and cluster {cluster}: give one, not both")
    if not watch and (poll or settle != 10.0):
        raise ConfigError("--settle and --poll go with --watch")
    if not settle >= 0:
        raise ConfigError(f"--settle {settle}: expected seconds >= 0")
    from xpcsfit.engine.specs import load_cluster_spec

    spec = None if cluster is None else load_cluster_spec(cluster)
    where = catalogue_path(roots, out_root)
    display = Display(progress)
    if dry_run:
        with (Catalogue(where) if where.is_file() else contextlib.nullcontext()) as cat:
            plan = make_plan(roots, pattern=pattern, config=config, out_root=out_root, catalogue=cat, force=force)
        for line in plan.lines():
            display.say(line)
        units = [UnitStatus(s.unit.label if s.unit else str(s.path), s.path, s.action, s.why, s.result_dir)
                 for s in plan.steps]
        units += [_skipped(s) for s in plan.skipped]
        return BatchSummary(units, where, None, 0, time.monotonic() - started)

    from xpcsfit.engine.cluster import dask_client

    summary = BatchSummary(catalogue=where, report=where.parent / REPORT_FILE)
    with Catalogue(where, write=True) as cat, _stop_on_signals() as stop, contextlib.ExitStack() as stack:
        plan = make_plan(roots, pattern=pattern, config=config, out_root=out_root, catalogue=cat, force=force)

        def connect():  # the one client of the run, got when a first unit is to fit
            def announce(c, what):
                display.say(f"xpcsfit batch: started {what}, dashboard {c.dashboard_link}")

            return stack.enter_context(dask_client(client, scheduler, on_start=announce, cluster=spec))

        runner = _Runner(cat, connect, display, stop)
        summary.units += runner.run(plan)
        write_report(where, summary.report, not_fitted=_not_fitted(summary.units))
        if watch and not stop.is_set():
            from xpcsfit.batch.watch import watch_roots

            display.say(f"xpcsfit batch: watching {', '.join(map(str, roots))} (settle {settle:g} s"
                        f"{', polling' if poll else ''}); SIGTERM or Ctrl-C stops")

            def on_ready(paths):
                more = make_plan(roots, pattern=pattern, config=config, out_root=out_root,
                                 catalogue=cat, force=force, only=paths)
                summary.units.extend(runner.run(more))
                write_report(where, summary.report, not_fitted=_not_fitted(summary.units))

            watch_roots(roots, pattern, settle=settle, poll=poll, stop=stop, on_ready=on_ready)
    summary.wall_time_s = time.monotonic() - started
    summary.exit_code = _exit_code(summary.units, None if watch else stop.signal)
    display.say(summary.line())
    return summary


class _Runner:
    """Runs the FIT steps of plans on one client (``connect()``: called once, when a
    first unit is to fit), recording each attempt."""

    def __init__(self, cat: Catalogue, connect, display: Display, stop):
        self.cat, self.connect, self.display, self.stop = cat, connect, display, stop
        self._client = None
        self._slots, self._slots_at = 1, -1e9
        self._gap_said = False

    @property
    def client(self):
        if self._client is None:
            self._client = self.connect()
        return self._client

    def run(self, plan: Plan) -> list[UnitStatus]:
        """Every step of ``plan``: fits run, skips and errors reported; in plan order."""
        statuses: dict[int, UnitStatus] = {}
        for i, s in enumerate(plan.steps):
            if s.action == SKIP:
                statuses[i] = UnitStatus(s.unit.label, s.path, DONE_ALREADY, s.why, s.result_dir)
            elif s.action == ERROR:
                statuses[i] = UnitStatus(str(s.path), s.path, NOT_FITTED, s.why)
                self.display.say(f"xpcsfit batch: not fitted: {s.why}")
        skipped = [_skipped(s) for s in plan.skipped]
        for u in skipped:
            self.display.say(f"xpcsfit batch: {u.status}: {u.input}: {u.why}")
        queue = [(i, s) for i, s in enumerate(plan.steps) if s.action == FIT]
        if queue and not self.stop.is_set():
            self.client  # noqa: B018 - start or reach the cluster before the display starts
        self.display.start(len(queue))
        running: dict = {}  # future -> (index, step, attempt, monotonic start)
        try:
            while (queue or running) and not self.stop.is_set():
                while queue and len(running) < self.slots():
                    i, step = queue.pop(0)
                    fut, attempt = self._submit(step)
                    running[fut] = (i, step, attempt, time.monotonic())
                    self.display.started()
                ended = [f for f in running if f.done()]
                if not ended:
                    self.stop.wait(0.1)
                for fut in ended:
                    i, step, attempt, t0 = running.pop(fut)
                    statuses[i] = self._record(fut, step, attempt, time.monotonic() - t0)
        finally:
            # stopped (flag or exception): nothing further starts, the running are abandoned
            if running:
                self.client.cancel(list(running))
            for fut, (i, step, attempt, _) in running.items():
                self.cat.interrupt(attempt)
                statuses[i] = UnitStatus(step.unit.label, step.path, INTERRUPTED, "stopped by a signal",
                                         step.result_dir, attempt)
            self.display.close()
        for i, step in queue:
            statuses[i] = UnitStatus(step.unit.label, step.path, INTERRUPTED, "not started: stopped by a signal",
                                     step.result_dir)
        return [statuses[i] for i in sorted(statuses)] + skipped

    def slots(self) -> int:
        """Worker threads of the cluster (asked again every 5 s: it may scale), at least 1."""
        if time.monotonic() - self._slots_at > 5:
            from xpcsfit.engine.cluster import workers_info

            self._slots = max(1, sum(w.get("nthreads", 1) for w in workers_info(self.client).values()))
            self._slots_at = time.monotonic()
        return self._slots

    def _submit(self, step: Step):
        u = step.unit
        attempt = self.cat.begin(input=u.path, sha256=step.sha256, q_index=u.q_index, q=u.q,
                                       mode=u.settings.mode, fingerprint=step.fingerprint)
        whole = u.n_points <= u.settings.in_process_max_points
        key = f"xpcsfit-batch-{u.path.stem}-q{'-'.join(map(str, u.q_index))}-{uuid.uuid4().hex[:8]}"
        return self.client.submit(
            fit_unit, str(u.path), q_index=list(u.q_index), frames=u.frames, config=u.settings.fit_config(),
            out=str(step.result_dir), progress=False, in_process=whole, key=key, pure=False), attempt

    def _record(self, fut, step: Step, attempt: int, seconds: float) -> UnitStatus:
        label = step.unit.label
        try:
            result = fut.result()
        except Exception as exc:  # noqa: BLE001 - any error of one fit is that fit's, recorded; the run goes on
            error = one_line(exc)
            self.cat.fail(attempt, error)
            self.display.finished(label, FAILED, seconds, error)
            return UnitStatus(label, step.path, FAILED, error, step.result_dir, attempt)
        self.cat.finish(attempt, result, step.result_dir)
        if result.provenance.get("gap_defaulted") and not self._gap_said:
            self._gap_said = True
            self.display.say(f"xpcsfit batch: warning: {step.path}: {default_gap_message()}; "
                             "set gap: in an xpcsfit.yaml beside the data (said once a run; "
                             "fit.json's provenance.gap_defaulted marks each such fit)")
        status = CONVERGED if result.converged else NOT_CONVERGED
        self.display.finished(label, status, seconds, None if result.converged else result.termination)
        return UnitStatus(label, step.path, status, "" if result.converged else str(result.termination),
                          step.result_dir, attempt)


def fit_unit(input, **kwargs):
    """Worker task: one unit's :func:`~xpcsfit.leastsq.driver.fit`, its GapWarning not shown.

    A worker prints a warning into its log with a Dask source line, once per unit; the
    batch driver says it once a run instead, from the result's provenance. Other warnings
    pass as they are.
    """
    from xpcsfit.leastsq.driver import fit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GapWarning)
        return fit(input, **kwargs)


def one_line(exc: BaseException) -> str:
    """An error as one line: an xpcsfit error's message, else ``Type: message``."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, XpcsfitError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def _exit_code(units: list[UnitStatus], signum: int | None) -> int:
    if signum is not None:
        return 128 + signum
    # A bad setting or a damaged result file is the operator's to fix; a file that is no
    # two-time result at all (notes.hdf, another instrument's HDF5) is not.
    if any(u.status in (NOT_CONVERGED, FAILED, NOT_FITTED) for u in units):
        return EXIT_INCOMPLETE
    return 0


def _skipped(s) -> UnitStatus:
    """A file discovery passed over: damaged (INVALID) or not a two-time result."""
    return UnitStatus(str(s.path), s.path, NOT_FITTED if s.kind == INVALID else NOT_A_RESULT, s.reason)


def _not_fitted(units: list[UnitStatus]) -> list[tuple[Path, str]]:
    seen, out = set(), []
    for u in units:
        if u.status in (NOT_FITTED, NOT_A_RESULT) and u.input not in seen:
            seen.add(u.input)
            out.append((u.input, u.why))
    return out


def _as_list(roots) -> list:
    return [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)


class _Stop(threading.Event):
    """Set by SIGINT/SIGTERM; ``signal`` is the number of the first."""

    signal: int | None = None


@contextlib.contextmanager
def _stop_on_signals():
    """A :class:`_Stop` set by SIGINT and SIGTERM while the run lasts (handlers only in
    the main thread: a run inside a Dask task or a thread is stopped by its caller)."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.signal is None:
            stop.signal = signum
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
