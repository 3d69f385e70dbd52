"""Progress of a batch run: a live rich display on a terminal, plain lines otherwise.

Both show the same counts — queued, running, done (converged or not), failed — and an
estimate of the time left: the units still to finish times the mean wall time between
completions so far (completions, not fits, so that fits running side by side count once).
On a terminal a rich progress bar is redrawn in place, with a line per finished unit
above it; elsewhere (a pipe, a log file, a systemd journal) each finished unit is one
line with the counts: ``xpcsfit batch: [3/48] converged a.hdf q_index=0 in 4.1 s;
2 running, 43 queued, 0 failed; about 2 min left``.
"""

from __future__ import annotations

import sys
import time


class Display:
    """The progress of one pass of a batch run (one call of the runner).

    Parameters
    ----------
    enabled : bool
        False: print nothing.
    live : bool, optional
        Draw a live display; default: when stdout is a terminal.
    """

    def __init__(self, enabled: bool = True, live: bool | None = None):
        self.enabled = enabled
        self.live = enabled and (sys.stdout.isatty() if live is None else live)
        self.total = self.queued = self.running = self.done = self.failed = 0
        self._started = None
        self._progress = self._task = None

    def say(self, line: str) -> None:
        """One line, above the live display when there is one."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def start(self, total: int) -> None:
        """``total`` units are to fit."""
        self.total, self.queued, self._started = total, total, time.monotonic()
        self.running = self.done = self.failed = 0
        if self.live and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("xpcsfit batch"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.description}"), TimeRemainingColumn())
            self._progress.start()
            self._task = self._progress.add_task(self._counts(), total=total)

    def started(self) -> None:
        """A queued unit was submitted."""
        self.queued -= 1
        self.running += 1
        self._refresh()

    def finished(self, label: str, status: str, seconds: float, error: str | None = None) -> None:
        """A running unit ended with ``status`` ("converged", "not converged", "failed")."""
        self.running -= 1
        if status == "failed":
            self.failed += 1
        else:
            self.done += 1
        line = f"xpcsfit batch: [{self.done + self.failed}/{self.total}] {status} {label} in {seconds:.1f} s"
        if error:
            line += f": {error}"
        if self._progress is None:
            line += f"; {self._counts()}" + (f"; {self.eta()}" if self.eta() else "")
        self.say(line)
        self._refresh()

    def eta(self) -> str:
        """"about N s/min left", or "" before the first unit finished."""
        ended = self.done + self.failed
        left = self.total - ended
        if not ended or not left:
            return ""
        seconds = (time.monotonic() - self._started) / ended * left
        return f"about {seconds:.0f} s left" if seconds < 120 else f"about {seconds / 60:.0f} min left"

    def _counts(self) -> str:
        return (f"{self.running} running, {self.queued} queued, {self.done} done, {self.failed} failed")

    def _refresh(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done + self.failed, description=self._counts())

    def close(self) -> None:
        """Stop the live display (its last state stays on the terminal)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
