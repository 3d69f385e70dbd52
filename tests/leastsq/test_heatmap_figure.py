"""The reused heatmap figure draws each picture as a figure made afresh for it would."""

import matplotlib.image as mpimg
import numpy as np

from xpcsfit.leastsq import plots


def maps(n, seed, scale):
    rng = np.random.default_rng(seed)
    data = (1 + scale * rng.random((n, n))).astype(np.float32)
    data[np.tril_indices(n)] = np.nan
    return data, data + np.float32(0.01 * scale)


def test_reused_figure_gives_the_pixels_of_a_fresh_one(tmp_path):
    # Pictures of other sizes, time ranges and colour limits drawn in between must
    # leave nothing behind: the third picture is pixel for pixel the one a new figure
    # draws (the axes limits, colour limits, colorbar ticks and title all follow).
    pictures = [(np.arange(40) * 0.1, *maps(40, 1, 0.2), "q = 1"),
                (np.arange(120) * 2.5 + 7, *maps(120, 2, 3.0), "q = 2, phi = 30°"),
                (np.arange(40) * 0.1, *maps(40, 1, 0.2), "q = 1")]
    for k, (t, data, fitted, title) in enumerate(pictures):
        plots.heatmap_png(tmp_path / f"reused{k}.png", t, data, fitted, title)
    plots._THREAD.heatmap = None  # the next picture gets a new figure
    t, data, fitted, title = pictures[2]
    plots.heatmap_png(tmp_path / "fresh.png", t, data, fitted, title)
    fresh = mpimg.imread(tmp_path / "fresh.png")
    assert np.array_equal(mpimg.imread(tmp_path / "reused2.png"), fresh)
    assert np.array_equal(mpimg.imread(tmp_path / "reused0.png"), fresh)
    assert not np.array_equal(mpimg.imread(tmp_path / "reused1.png"), fresh)  # a different picture
    # The colour scales are the documented ones: data and fit share the 1–99 % range of
    # the data, the residual is symmetric at its 99 % |value|.
    full = np.where(np.triu(np.ones(data.shape, bool), 1), data, data.T)
    lo, hi = np.nanpercentile(full, [1, 99])
    resid = np.nanpercentile(np.abs(full - np.where(np.triu(np.ones(data.shape, bool), 1), fitted, fitted.T)), 99)
    limits = [(im.norm.vmin, im.norm.vmax) for im in plots._THREAD.heatmap.images]
    np.testing.assert_allclose(limits, [(lo, hi), (lo, hi), (-resid, resid)], rtol=1e-6)
