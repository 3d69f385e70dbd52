"""xpcsfit simulate writes its own files only."""

import json

import h5py
import numpy as np

from xpcsfit import cli


def test_simulate_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    data = tmp_path / "run42.hdf"
    with h5py.File(data, "w") as f:
        f["measured"] = np.arange(3)
    before = data.read_bytes()
    code = cli.main(["simulate", str(data), "--n-frames", "20", "--n-phi", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1, err
    assert err.startswith(f"xpcsfit: error: {data}") and "not written by xpcsfit simulate" in err, err
    assert data.read_bytes() == before and not (tmp_path / "run42.truth.json").exists()
    ours = tmp_path / "sim.hdf"
    for seed in ("1", "2"):  # its own file is replaced
        code = cli.main(["simulate", str(ours), "--n-frames", "20", "--n-phi", "1", "--seed", seed])
        assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "sim.truth.json").read_text())["seed"] == 2
