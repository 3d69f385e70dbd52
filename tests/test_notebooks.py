"""The notebooks in notebooks/ run top to bottom from a clean kernel and show what they say.

Each notebook is executed with nbclient in a fresh ipykernel of this very interpreter (so
the kernel imports the xpcsfit under test, and inherits PYTHONPATH), in a temporary
working directory. One extra cell, added to the in-memory copy only, reports the
notebook's own variables as JSON so that the test checks values, not printed text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("quickstart", "batch")
PROBE_MARK = "XPCSFIT-PROBE "


def _kernel_manager(tmp_path: Path):
    """A KernelManager whose one kernelspec, "python3", runs sys.executable.

    A "python3" found on the machine's Jupyter paths may be another Python (a user's
    ~/.local/share/jupyter/kernels); this one is the interpreter running the tests.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "xpcsfit tests", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def _run(name: str, probe: str, tmp_path: Path):
    """Execute notebooks/NAME.ipynb with ``probe`` inserted before its closing cell.

    Returns the executed notebook and the probe's JSON. Raises nbclient's
    CellExecutionError (naming the cell) if any cell fails.
    """
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    closing = nb.cells[-1].source
    assert "cluster.close()" in closing and "rmtree(workdir)" in closing, "the last cell closes and cleans up"
    nb.cells.insert(len(nb.cells) - 1, nbformat.v4.new_code_cell(
        f"import json as _json\nprint({PROBE_MARK!r} + _json.dumps({probe}))"))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    text = "".join(o.get("text", "") for o in nb.cells[-2].outputs if o.output_type == "stream")
    (line,) = [s for s in text.splitlines() if s.startswith(PROBE_MARK)]
    return nb, json.loads(line[len(PROBE_MARK):])


def _outputs(nb, mime: str) -> int:
    return sum(mime in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebooks_have_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_quickstart_runs_a_fit_as_a_task_and_shows_it(tmp_path):
    probe = ('{"type": type(result).__name__, "converged": bool(result.converged), '
             '"pngs": sorted(p.name for p in out.glob("*.png")), "params": params.index.tolist(), '
             '"rel_err": ((params.value - params.truth) / params.stderr).abs().max(), '
             '"workdir": str(workdir), "dashboard": client.dashboard_link}')
    nb, seen = _run("quickstart", probe, tmp_path)
    assert seen["type"] == "FitResult" and seen["converged"]
    assert seen["pngs"] == ["c2_q0_phi0.png", "c2_q0_phi1.png", "c2_q0_phi2.png", "c2_q0_phi3.png",
                            "g2_cuts.png", "transport.png"]
    assert seen["params"] == ["D0", "alpha", "D_offset", "gamma_dot_t0", "beta", "gamma_dot_t_offset", "phi0"]
    assert seen["rel_err"] < 5  # every parameter within 5 stderr of the simulation's truth
    assert "127.0.0.1" in seen["dashboard"]
    assert _outputs(nb, "image/png") == 3  # transport.png and two c2 heatmaps, displayed
    assert not Path(seen["workdir"]).exists()  # the closing cell removed what it made


@pytest.mark.slow
def test_batch_runs_fits_and_a_cmc_and_tabulates_them(tmp_path):
    probe = ('{"rows": table.index.tolist(), "converged": table.converged.tolist(), '
             '"J_ratio": (table["J(1 s)"] / table["J(1 s)"].iloc[2]).tolist(), '
             '"J_stderr": table["J(1 s)_stderr"].tolist(), '
             '"cmc": type(cmc_result).__name__, "shards": cmc_result.shard_names, '
             '"cmc_D0_mean": cmc_result.summary["parameters"]["D0"]["mean"], '
             '"workdir": str(workdir)}')
    nb, seen = _run("batch", probe, tmp_path)
    assert seen["rows"] == ["T20C.hdf", "T30C.hdf", "T40C.hdf", "T50C.hdf"]  # one row per file
    assert all(seen["converged"])
    # J scales with temperature as simulated (0.6, 0.8, 1, 1.25 of T40C), within 5 %
    assert seen["J_ratio"] == pytest.approx([0.6, 0.8, 1.0, 1.25], rel=0.05)
    assert all(s > 0 for s in seen["J_stderr"])
    assert seen["cmc"] == "CMCResult" and seen["shards"] == ["shard-00", "shard-01"]
    assert seen["cmc_D0_mean"] == pytest.approx(0.6e4, rel=0.3)  # first file's D0, loosely (200 draws)
    assert _outputs(nb, "image/png") == 1  # the J(t) plot
    assert _outputs(nb, "text/html") >= 2  # the results table and the CMC comparison
    assert not Path(seen["workdir"]).exists()
