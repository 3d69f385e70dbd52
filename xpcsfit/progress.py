"""Progress lines: what ``xpcsfit.fit`` and ``xpcsfit.cmc`` print as they go."""

from __future__ import annotations


def say(progress: bool, message: str) -> None:
    """Print ``message`` when ``progress`` is true, flushed (it shows at once in a pipe
    or a notebook)."""
    if progress:
        print(message, flush=True)
