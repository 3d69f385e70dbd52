"""``xpcsfit batch --watch``: fit each new or changed file once it is complete.

Change events come from watchfiles (inotify and its kin; ``poll=True``: watchfiles'
polling, for network filesystems whose changes raise no events here). A file that
discovery would examine (:func:`~xpcsfit.batch.discover.is_candidate`) and that was
created or modified is *pending* until its size and mtime have stayed the same for
``settle`` seconds; then it is handed to ``on_ready``, which plans it (discovery opens
it: a file that does not open as a valid result is reported and not fitted, and comes
back at its next change) and fits what the catalogue does not hold yet. A correlator
writing a file in pieces therefore has it fitted once, after its last piece.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from xpcsfit.batch.discover import is_candidate

# How often (ms) the watcher wakes without events, to check the pending files' settle
# time and the stop flag.
TICK_MS = 250


def watch_roots(roots, pattern, *, settle: float, poll: bool, stop, on_ready) -> None:
    """Watch ``roots`` until ``stop`` is set, calling ``on_ready(paths)`` with settled files.

    Parameters
    ----------
    roots : list of str or Path
        Directories (watched recursively) or files (their directory is watched, only
        they are taken).
    pattern : str or None
        As for :func:`xpcsfit.batch.discover.discover`.
    settle : float
        Seconds of unchanged size and mtime (ns) before a file is ready.
    poll : bool
        Poll instead of waiting for events (watchfiles' ``force_polling``).
    stop : threading.Event
        Set (by SIGINT/SIGTERM) to end the watch; checked every :data:`TICK_MS`.
    on_ready : callable(list of Path)
        Called in this thread; new events meanwhile are kept by the watcher.
    """
    import watchfiles

    bases = []  # (watched directory, root for patterns, the one file or None)
    for r in roots:
        p = Path(os.path.abspath(r))
        bases.append((p.parent, p.parent, p) if p.is_file() else (p, p, None))
    pending: dict[Path, tuple[tuple[int, int], float]] = {}
    for changes in watchfiles.watch(*{b[0] for b in bases}, force_polling=poll, poll_delay_ms=TICK_MS,
                                    rust_timeout=TICK_MS, yield_on_timeout=True, stop_event=stop,
                                    raise_interrupt=False, debounce=TICK_MS, step=50, recursive=True):
        now = time.monotonic()
        for change, name in changes:
            path = Path(name)
            if change != watchfiles.Change.deleted and _wanted(path, bases, pattern):
                pending[path] = ((-1, -1), now)  # its steady time starts at the next look
        ready = []
        for path, (seen, since) in list(pending.items()):
            try:
                st = path.stat()
            except OSError:  # gone (renamed away, deleted)
                del pending[path]
                continue
            state = (st.st_size, st.st_mtime_ns)
            if state != seen:
                pending[path] = (state, now)
            elif now - since >= settle:
                ready.append(path)
                del pending[path]
        if ready and not stop.is_set():
            on_ready(sorted(ready))


def _wanted(path: Path, bases, pattern) -> bool:
    for watched, root, only in bases:
        if only is not None:
            if path == only:
                return True
        elif (path == root or root in path.parents) and path.is_file() and is_candidate(path, root, pattern):
            return True
    return False
