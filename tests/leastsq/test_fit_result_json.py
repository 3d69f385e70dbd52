"""FitResult.from_json: fit.json read back into the FitResult that wrote it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xpcsfit.errors import InputError
from xpcsfit.leastsq.results import FitResult


def small_result() -> FitResult:
    """A static FitResult of 2 q × 3 phi, with a NaN where fits can have one."""
    rng = np.random.default_rng(0)
    shape = (2, 3)
    names = ["D0", "alpha", "D_offset"]
    cov_names = names + [f"contrast[{i}]" for i in range(6)] + [f"offset[{i}]" for i in range(6)]
    a = rng.normal(size=(15, 15))
    values = np.array([2.0e4, -0.3, 1.0e3])
    contrast, offset = rng.uniform(0.1, 0.3, shape), rng.uniform(0.9, 1.1, shape)
    return FitResult(
        mode="static", names=names, values=values, stderr=np.array([10.0, 0.01, np.nan]),
        q=np.array([0.004, 0.0055]), phi=np.array([10.0, 60.0, 120.0]), contrast=contrast, offset=offset,
        contrast_stderr=rng.uniform(size=shape), offset_stderr=rng.uniform(size=shape),
        residual_rms=rng.uniform(size=shape), covariance=a @ a.T, covariance_names=cov_names,
        chi2=12.5, reduced_chi2=1.01, dof=1000, n_points=1015, converged=True, termination="gtol",
        iterations=7, data_passes=15, wall_time_s=1.25,
        transport={"t": np.linspace(0.1, 1.0, 4), "J": np.full(4, 2.0e4), "J_stderr": np.full(4, 5.0)},
        warnings=["a warning"], input={"path": "x.hdf", "frames": [1, 70], "dt": 0.1, "q_index": []},
        provenance={"config": {"gap": 2.0e6, "bounds": {}}, "versions": {"xpcsfit": "0.1.0"}},
        x=np.concatenate([values, contrast.ravel(), offset.ravel()]), engine={"n_tiles": 4},
        resumed_from=None,
    )


def test_from_json_round_trips_fit_json(tmp_path):
    r = small_result()
    back = FitResult.from_json(r.to_json())
    assert back.to_json() == r.to_json()  # text: NaN compares equal
    np.testing.assert_array_equal(back.x, r.x)
    assert back.n_points == r.n_points
    path = tmp_path / "fit.json"
    path.write_text(r.to_json())
    assert FitResult.from_json(path).to_json() == r.to_json()
    assert FitResult.from_json(str(path)).to_json() == r.to_json()


def test_from_json_refuses_what_is_not_a_fit(tmp_path):
    with pytest.raises(InputError, match="no such fit file"):
        FitResult.from_json(tmp_path / "nope.json")
    with pytest.raises(InputError, match="not a readable fit.json"):
        FitResult.from_json("{not json")
    d = small_result().to_dict()
    del d["per_angle"]["offset"]
    with pytest.raises(InputError, match=r"fit.json text: malformed fit.json \(missing key 'offset'\)"):
        FitResult.from_json(json.dumps(d))
    d = small_result().to_dict() | {"mode": "sheared"}
    with pytest.raises(InputError, match="mode 'sheared' unknown"):
        FitResult.from_json(json.dumps(d))
