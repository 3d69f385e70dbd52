"""The persistent compilation cache: where it is, that it can be switched off, and that a
second process loads the first one's compiled kernels instead of compiling them again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xpcsfit.engine.compile_cache import CACHE_ENV, cache_directory

ROOT = Path(__file__).resolve().parents[2]

# One in-process fit in a fresh process; prints the cache directory JAX used and how many
# compiled programs came from it (JAX's own monitoring event).
FIT = r"""
import json, sys, warnings
import jax.monitoring
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
import jax, xpcsfit
warnings.simplefilter("ignore")
xpcsfit.fit(sys.argv[1], mode="static", gap=2e6, progress=False, in_process=True)
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "hits": len(hits)}))
"""


def test_directory_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_directory() == tmp_path / "c"
    for off in ("off", "", "0"):
        monkeypatch.setenv(CACHE_ENV, off)
        assert cache_directory() is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_directory() == tmp_path / "xdg" / "xpcsfit" / "jax"


def _fit_in_fresh_process(path, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in (CACHE_ENV, "JAX_COMPILATION_CACHE_DIR")}
    environ.update(env, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", FIT, str(path)], capture_output=True, text=True, env=environ,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_kernels(tmp_path, static_file):
    cache = tmp_path / "cache"
    first = _fit_in_fresh_process(static_file, **{CACHE_ENV: str(cache)})
    assert first["dir"] == str(cache) and any(cache.iterdir())
    second = _fit_in_fresh_process(static_file, **{CACHE_ENV: str(cache)})
    assert second["hits"] > 0  # the tile kernels came from the first process's cache
    off = _fit_in_fresh_process(static_file, **{CACHE_ENV: "off"})
    assert off["dir"] is None and off["hits"] == 0
    # a cache the process was given is kept
    own = tmp_path / "own"
    kept = _fit_in_fresh_process(static_file, JAX_COMPILATION_CACHE_DIR=str(own), **{CACHE_ENV: str(cache)})
    assert kept["dir"] == str(own)
