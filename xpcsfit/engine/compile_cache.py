"""JAX's persistent compilation cache, for the programs xpcsfit compiles.

A process's first fit spends most of its time compiling: on a 1 q × 8 phi × 500-frame
file the first in-process fit took 9.4 s and the next 1.0 s; with the cache filled by an
earlier process the first took 2.6 s. Every ``xpcsfit fit`` command, every Dask worker
of a batch night and every CMC shard task would otherwise compile the same tile kernels
and NUTS programs again. JAX stores compiled XLA executables on disk keyed by the
program, its compile options, the backend and the jaxlib version (JAX documentation,
"Persistent compilation cache"); XLA's loader rejects an entry compiled for another
machine (a different CPU on a shared home), which is then compiled afresh.

The directory: ``$XPCSFIT_JAX_CACHE`` if set ("off" or empty: no cache), else
``$XDG_CACHE_HOME/xpcsfit/jax`` (``~/.cache/xpcsfit/jax``). A cache directory the process
already has (``JAX_COMPILATION_CACHE_DIR``, or set by the caller) is kept, with its
settings. In xpcsfit's directory JAX evicts the least recently used entries beyond
:data:`MAX_BYTES`.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "XPCSFIT_JAX_CACHE"
# Compilations shorter than this are not worth a file (JAX's default is 1 s, which
# would leave out most of the tile kernels: 0.2–1 s each here).
MIN_COMPILE_SECONDS = 0.2
# A size limit makes JAX evict the least recently used entries beyond it, and lock the
# directory (filelock) around every read and write: without the lock, workers compiling
# the same kernel at once could leave a torn entry that every later process would warn
# about. An entry is ~0.1 MB; a year of fits of every shape stays far below.
MAX_BYTES = 2 * 2**30


def cache_directory() -> Path | None:
    """Where xpcsfit keeps JAX's compiled programs, or None when switched off (see module)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "no", "false") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xpcsfit" / "jax"


def enable_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at :func:`cache_directory` in this process.

    Takes effect for compilations after the process's first one only if called before
    it (JAX decides once whether a process uses the cache), so xpcsfit calls it where it
    configures JAX: the worker preload and ``xpcsfit.fit`` (which ``xpcsfit.cmc`` runs
    first unless given ``from_fit``). Cheap when called again.

    Returns
    -------
    Path or None
        The cache directory in use; None when switched off or the directory cannot be
        created (a read-only home: the fit compiles as it would without a cache).
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = cache_directory()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
