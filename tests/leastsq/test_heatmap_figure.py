"""The heatmaps of a q: each picture is pixel for pixel the figure drawn afresh for it,
on the colour scale the q's bins share."""

import matplotlib.image as mpimg
import numpy as np

from xpcsfit.leastsq import plots


def maps(n_phi, n, seed, scale):
    rng = np.random.default_rng(seed)
    data = (1 + scale * rng.random((n_phi, n, n))).astype(np.float32)
    data[:, *np.tril_indices(n)] = np.nan
    data[1] *= 1.5  # bins of one q with different ranges: the shared scale must span them
    return data, data + np.float32(0.01 * scale) * rng.standard_normal(data.shape).astype(np.float32)


def full(a):
    out = np.where(np.triu(np.ones(a.shape, bool), 1), a, a.T)
    np.fill_diagonal(out, np.nan)
    return out


def shared_limits(data, fitted):
    every_d = np.stack([full(x) for x in data])
    every_r = every_d - np.stack([full(x) for x in fitted])
    lo, hi = np.nanpercentile(every_d, [1, 99])
    rl = np.nanpercentile(np.abs(every_r), 99)
    return [(lo, hi), (lo, hi), (-rl, rl)]


def fresh_picture(path, t, data, fitted, limits, title):
    """The picture drawn the plain way: a new figure, every artist in one full draw."""
    figure = plots._HeatmapFigure()
    for artist in figure._per_picture():
        artist.set_animated(False)
    d, f = full(data), full(fitted)
    for im, img, (lo, hi) in zip(figure.images, (d, f, d - f), limits):
        im.set_data(img)
        im.set_extent([t[0], t[-1], t[-1], t[0]])
        im.set_clim(lo, hi)
    figure.title.set_text(title)
    figure.fig.savefig(path, dpi=figure.DPI)


def test_each_picture_is_the_figure_drawn_afresh_for_it(tmp_path):
    # Two q with other sizes, time ranges and colour scales: the second q's pictures are
    # drawn over the first's background and must keep nothing of it.
    t1, t2 = np.arange(40) * 0.1, np.arange(120) * 2.5 + 7
    (d1, f1), (d2, f2) = maps(3, 40, 1, 0.2), maps(2, 120, 2, 3.0)
    plots.heatmap_pngs([tmp_path / f"a{k}.png" for k in range(3)], t1, d1, f1, [f"q = 1, phi = {k}" for k in range(3)])
    plots.heatmap_pngs([tmp_path / f"b{k}.png" for k in range(2)], t2, d2, f2, [f"q = 2, phi = {k}" for k in range(2)])

    # the documented shared scale: data and fit at the 1–99 % range of all bins' data,
    # the residual symmetric at the 99 % point of |data - fit| over all bins
    drawn = [(im.norm.vmin, im.norm.vmax) for im in plots._THREAD.heatmap.images]
    np.testing.assert_allclose(drawn, shared_limits(d2, f2), rtol=1e-6)

    for name, t, d, f, q in (("a", t1, d1, f1, 1), ("b", t2, d2, f2, 2)):
        for k in range(len(d)):
            fresh_picture(tmp_path / "fresh.png", t, d[k], f[k], shared_limits(d, f), f"q = {q}, phi = {k}")
            assert np.array_equal(mpimg.imread(tmp_path / f"{name}{k}.png"), mpimg.imread(tmp_path / "fresh.png"))
    assert not np.array_equal(mpimg.imread(tmp_path / "b0.png"), mpimg.imread(tmp_path / "b1.png"))
