"""What the Dask dashboard shows of xpcsfit's work: span names and task names.

Spans (:func:`distributed.span`) group tasks into a tree of named phases that the
dashboard's span views (Fine Performance Metrics, "Filter by span tag") and the
scheduler's ``extensions["spans"]`` show. A fit's tree::

    ("xpcsfit fit", "run42.hdf q=0.005555")      one per fit: its input and q
        ├─ "load tiles"                           the parts of tiles put on the workers
        ├─ "start values"                         lag sums; normal equations at the start
        ├─ "iteration 1", "iteration 2", …        one per solver step (its cost and
        │                                         normal-equation passes)
        └─ "write outputs"                        fitted.zarr and the heatmap points

A span opened around a fit (a cmc run, a notebook's ``with distributed.span(...)``, the
task that runs ``client.submit(xpcsfit.fit, …)`` inside its span) is its parent.

Task keys are ``(name, part)`` with ``name = "xpcsfit-<kind>-<token>[-pass-<n>]"``:
``key_split`` (the task stream's colour and label, the prefix of the scheduler's
statistics) gives ``xpcsfit-<kind>``, e.g. ``xpcsfit-normal-equations``, the same for
every fit; the tuple's first element is the scheduler's task group, one per fit (token)
and pass, so that every pass's tasks belong to the span they were submitted in (the
scheduler attaches a whole task group to one span) even when several fits share a
cluster.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import numpy as np

PREFIX = "xpcsfit"


def span_label(input, q) -> str:
    """The span tag naming one fit: its input's file name and q (1/Å), e.g.
    ``"run42.hdf q=0.005555"`` or ``"run42.hdf q=0.0054…0.0081 (5 q)"``."""
    name = Path(str(input).rstrip("/")).name
    q = np.atleast_1d(np.asarray(q, float))
    if q.size == 1:
        return f"{name} q={q[0]:.4g}"
    return f"{name} q={q.min():.4g}…{q.max():.4g} ({q.size} q)"


def new_token() -> str:
    """8 hex digits that make one fit's (or cmc run's) task names unique.

    ``key_split`` never reads them as part of the prefix: it stops at a word with a
    digit, and at an 8-letter word that looks hexadecimal.
    """
    return uuid.uuid4().hex[:8]


def task_name(kind: str, token: str, pass_number: int | None = None) -> str:
    """``xpcsfit-<kind>-<token>[-pass-<n>]``: the name of one pass's tasks (their task
    group); part ``i`` of it has the key ``(name, i)``.

    Parameters
    ----------
    kind : str
        Lower-case words joined by "-" ("load", "normal-equations", "cmc-shard", …).
    token : str
        From :func:`new_token`.
    pass_number : int, optional
        The pass's number in its evaluator (1, 2, …), for kinds that repeat.
    """
    if not all(w.isalpha() and w.islower() for w in kind.split("-")):
        raise ValueError(f"internal: task kind {kind!r} is not lower-case words joined by '-'")
    name = f"{PREFIX}-{kind}-{token}"
    return name if pass_number is None else f"{name}-pass-{pass_number}"


def task_kind(key) -> str | None:
    """The kind of an xpcsfit task key ("normal-equations" …), None for other keys.

    It is what the dashboard groups the task stream by (``dask.utils.key_split``),
    without the "xpcsfit-".
    """
    from dask.utils import key_split

    prefix = key_split(key)
    return prefix[len(PREFIX) + 1:] if prefix.startswith(PREFIX + "-") else None


def span_annotation(*tags: str) -> dict:
    """The annotation of a new span ``tags`` below the current one, to enter later
    (with :func:`inside`) as often as needed: ``{"name": (...), "ids": (...)}``.

    The scheduler learns of a span with its first task; making the annotation costs
    nothing.
    """
    import dask
    from distributed import span

    with span(*tags):
        return dask.get_annotations()["span"]


def current_span() -> dict | None:
    """The annotation of the span this code runs in (also inside a task), or None."""
    import dask

    return dask.get_annotations().get("span")


def inside(annotation: dict | None):
    """Context: tasks submitted in it belong to the span ``annotation`` (None: as they
    would without it)."""
    import dask

    return dask.annotate(span=annotation) if annotation else contextlib.nullcontext()
