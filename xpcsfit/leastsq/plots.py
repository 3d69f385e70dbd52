"""PNG figures of a fit: data | fit | residual per bin, and J(t) / gamma_dot(t) bands."""

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
            im.axes.set_xlim(extent[0], extent[1])
            im.axes.set_ylim(extent[2], extent[3])
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
