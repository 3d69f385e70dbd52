"""Fixtures of the batch tests: real results of two small fits, made once per session."""

from __future__ import annotations

import pytest

from xpcsfit.leastsq.driver import fit
from xpcsfit.simulate import simulate


@pytest.fixture(scope="session")
def fitted(client, small_flow_file, tmp_path_factory):
    """{"laminar_flow": dir, "static": dir}: the directory ``xpcsfit fit`` writes (fit.json,
    transport.png, …) for small_flow_file, and one holding only the fit.json of a small
    static simulation (its PNGs and fitted.zarr are not needed and cost seconds)."""
    base = tmp_path_factory.mktemp("fitted")
    static = simulate(base / "static.hdf", mode="static", n_phi=2, n_frames=80, noise=0.01, seed=5)
    out = {}
    for mode, path in (("laminar_flow", small_flow_file), ("static", static)):
        out[mode] = base / f"{mode}_fit"
        if mode == "static":
            out[mode].mkdir()
            result = fit(path, mode=mode, client=client, progress=False)
            (out[mode] / "fit.json").write_text(result.to_json())
        else:
            fit(path, mode=mode, gap=2e6, out=out[mode], client=client, progress=False)
    return out
