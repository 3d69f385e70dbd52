"""PNG figures of a fit: data | fit | residual per bin, J(t) / gamma_dot(t) bands, and
g2(τ) cuts at a few sample ages with the residual by lag."""

from __future__ import annotations

import threading
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MAX_PIXELS = 500


def stride_for(n: int) -> int:
    """Sampling stride that keeps a heatmap of an n-frame map at most :data:`MAX_PIXELS`
    across: the picture shows map rows and columns 0, s, 2s, … (ceil(n / s) of each)."""
    return max(1, -(-n // MAX_PIXELS))


def heatmap_png(path: Path, t: np.ndarray, data: np.ndarray, fitted: np.ndarray, title: str) -> None:
    """Three panels: measured c2, model c2, residual, over (t1, t2).

    Drawn on this thread's one reused figure (:class:`_HeatmapFigure`): the pixels are
    those of a figure made afresh for each picture, at a fraction of the time.

    Parameters
    ----------
    path : Path
        PNG to write.
    t : ndarray (n,)
        Times of rows and columns, s.
    data, fitted : ndarray (n, n)
        Upper triangle meaningful (t2 > t1); NaN elsewhere is drawn blank. The map is
        mirrored so the picture is the full symmetric two-time map.
    title : str
    """
    def full(a):
        out = np.where(np.triu(np.ones(a.shape, bool), 1), a, a.T)
        np.fill_diagonal(out, np.nan)
        return out

    d, f = full(data), full(fitted)
    r = d - f
    lo, hi = np.nanpercentile(d, [1, 99])
    rl = np.nanpercentile(np.abs(r), 99)
    figure = getattr(_THREAD, "heatmap", None)
    if figure is None:
        figure = _THREAD.heatmap = _HeatmapFigure()
    figure.draw(path, [t[0], t[-1], t[-1], t[0]], [(d, lo, hi), (f, lo, hi), (r, -rl, rl)], title)


_THREAD = threading.local()  # one heatmap figure per thread: fits may run in several threads


class _HeatmapFigure:
    """The data | fit | residual figure, built once and redrawn for every picture.

    Building a figure (three axes, three colorbars, their ticks and texts) took most of
    the time of one picture; only the images, their colour limits and the title change
    from one picture to the next. Not pyplot: no global figure registry to leak into.
    """

    PANELS = (("data", "viridis"), ("fit", "viridis"), ("residual", "RdBu_r"))

    def __init__(self):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(13, 4.2))
        FigureCanvasAgg(self.fig)
        # fixed margins: a layout engine doubles the drawing time of this figure
        self.fig.subplots_adjust(left=0.05, right=0.97, bottom=0.12, top=0.86, wspace=0.35)
        self.images = []
        for ax, (name, cmap) in zip(self.fig.subplots(1, 3), self.PANELS):
            im = ax.imshow(np.zeros((2, 2)), interpolation="nearest", cmap=cmap)
            ax.set_title(name)
            ax.set_xlabel("t2 (s)")
            ax.set_ylabel("t1 (s)")
            self.fig.colorbar(im, ax=ax, shrink=0.85)
            self.images.append(im)
        self.title = self.fig.suptitle("")

    def draw(self, path: Path, extent: list, panels: list, title: str) -> None:
        """Write one picture: ``panels`` are (image, vmin, vmax) for data, fit, residual."""
        for im, (img, lo, hi) in zip(self.images, panels):
            im.set_data(img)
            im.set_extent(extent)
            im.set_clim(lo, hi)  # the colorbar follows its image's norm
        self.title.set_text(title)
        self.fig.savefig(path, dpi=90)


def transport_png(path: Path, transport: dict, mode: str, truth: dict | None = None) -> None:
    """J(t) (and gamma_dot(t) in laminar_flow) with 1-sigma bands.

    Parameters
    ----------
    path : Path
    transport : dict
        From :func:`xpcsfit.leastsq.results.transport_bands`.
    mode : str
    truth : dict, optional
        ``{"J": callable(t), "gamma_dot": callable(t)}`` drawn dashed when given.
    """
    t = np.asarray(transport["t"])
    panels = [("J", "J(t) (Å²/s)")]
    if mode == "laminar_flow":
        panels.append(("gamma_dot", "gamma_dot(t) (1/s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), constrained_layout=True)
    axes = np.atleast_1d(axes)
    for ax, (key, label) in zip(axes, panels):
        v = np.asarray(transport[key])
        se = np.asarray(transport[key + "_stderr"])
        ax.plot(t, v, color="C0", label="fit")
        ax.fill_between(t, v - se, v + se, color="C0", alpha=0.3, label="±1σ")
        if truth and key in truth:
            ax.plot(t, truth[key](t), "k--", label="truth")
        ax.set_xlabel("t (s)")
        ax.set_ylabel(label)
        ax.legend()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def g2_cuts_png(path: Path, lags: np.ndarray, ages: np.ndarray, data: np.ndarray, fit: np.ndarray,
                residual_by_lag: np.ndarray, q: np.ndarray) -> None:
    """One figure, a row per q: left, g2(τ) cut at each sample age (data as dots, fit as
    lines; averaged over the phi bins); right, the mean residual by lag of every phi bin.

    Parameters
    ----------
    lags : ndarray (n_lags,), s;  ages : ndarray (n_cuts,), s
    data, fit : ndarray (n_q, n_phi, n_cuts, n_lags)
        c2(t_age, t_age + τ), NaN where there is no point.
    residual_by_lag : ndarray (n_q, n_phi, n_lags)
    q : ndarray (n_q,), 1/Å
    """
    n_q = data.shape[0]
    fig, axes = plt.subplots(n_q, 2, figsize=(11, 3.2 * n_q), squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1 / n_q, top=1 - 0.08 / n_q, wspace=0.25, hspace=0.4)
    show = lags > 0
    with np.errstate(invalid="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        for iq in range(n_q):
            left, right = axes[iq]
            for k, age in enumerate(ages):
                d = np.nanmean(data[iq, :, k], axis=0)
                f = np.nanmean(fit[iq, :, k], axis=0)
                left.plot(lags[show], d[show], ".", color=f"C{k}", ms=2, alpha=0.6)
                left.plot(lags[show], f[show], "-", color=f"C{k}", label=f"age {age:.3g} s")
            left.set_xscale("log")
            left.set_xlabel("τ (s)")
            left.set_ylabel("g2(τ), mean over phi")
            left.set_title(f"q = {q[iq]:.5g} 1/Å")
            left.legend(fontsize=7)
            for ip in range(residual_by_lag.shape[1]):
                right.plot(lags[show], residual_by_lag[iq, ip, show], lw=0.8)
            right.axhline(0.0, color="k", lw=0.5)
            right.set_xscale("log")
            right.set_xlabel("τ (s)")
            right.set_ylabel("mean residual by lag (per phi bin)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
