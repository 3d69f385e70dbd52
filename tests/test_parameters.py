"""Parameter layout and the gap L: one resolution for fit and cmc."""

import warnings

import numpy as np
import pytest

from xpcsfit.config import load_config
from xpcsfit.parameters import (
    DEFAULT_GAP,
    MODES,
    GapWarning,
    ParameterLayout,
    resolve_gap,
)


class _Dataset:
    def __init__(self, **attrs):
        self.attrs = attrs


def test_layout_splits_and_joins_and_names_x():
    layout = ParameterLayout(MODES["static"], n_q=2, n_phi=3)
    assert (layout.p, layout.n_bins, layout.size) == (3, 6, 15)
    x = layout.join([1.0, 2.0, 3.0], np.arange(6).reshape(2, 3), 10 + np.arange(6))
    theta, contrast, offset = layout.split(x)
    assert theta.tolist() == [1.0, 2.0, 3.0] and contrast.tolist() == list(range(6))
    assert offset.tolist() == list(range(10, 16))
    names = layout.names()
    assert names[:4] == ["D0", "alpha", "D_offset", "contrast[0]"] and names[-1] == "offset[5]"


@pytest.mark.parametrize("gap, stored, expected, defaulted", [
    (1.5e6, 1.9e6, 1.5e6, False),   # the config (or keyword) first
    (None, 1.9e6, 1.9e6, False),    # then what a store recorded at ingest
    (None, None, DEFAULT_GAP, True),
])
def test_resolve_gap(gap, stored, expected, defaulted):
    cfg = load_config(None, mode="laminar_flow", gap=gap)
    ds = _Dataset() if stored is None else _Dataset(L=stored)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning unless defaulted
        if defaulted:
            with pytest.warns(GapWarning, match="gap L not given") as record:
                assert resolve_gap(cfg, ds, stacklevel=1) == (expected, True)
            assert record[0].filename == __file__  # stacklevel 1: the line that called it
        else:
            assert resolve_gap(cfg, ds) == (expected, False)


def test_default_gap_warns_only_when_asked_and_only_for_flow():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_gap(load_config(None, mode="laminar_flow"), _Dataset(), warn=False) == (DEFAULT_GAP, True)
        assert resolve_gap(load_config(None, mode="static"), _Dataset()) == (DEFAULT_GAP, True)
