"""PNG figures of a fit: data | fit | residual per bin, J(t) / gamma_dot(t) bands, and
g2(τ) cuts at a few sample ages with the residual by lag."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure  # not pyplot: no backend to select, no figure registry to leak into
from matplotlib.image import imsave

MAX_PIXELS = 250  # a panel is 233 px across at 90 dpi: a finer grid only feeds the resampling


def stride_for(n: int) -> int:
    """Sampling stride that keeps a heatmap of an n-frame map at most :data:`MAX_PIXELS`
    across (the panel's own size: the picture cannot show more): the picture shows map
    rows and columns 0, s, 2s, … (ceil(n / s) of each)."""
    return max(1, -(-n // MAX_PIXELS))


def heatmap_pngs(paths: list[Path], t: np.ndarray, data: np.ndarray, fitted: np.ndarray,
                 titles: list[str]) -> None:
    """The phi bins of one q, a picture each: measured c2, model c2 and residual over (t1, t2).

    All pictures of a q share one colour scale, so the same colour is the same c2 (and the
    same residual) from one angle to the next: data and fit span the 1–99 % range of the
    data of every bin, the residual is symmetric at the 99 % point of its |value|. With
    the scale shared, axes, ticks and colorbars are drawn once per q and only the images
    and the title per picture (:class:`_HeatmapFigure`).

    Parameters
    ----------
    paths : list of Path, n_phi
        PNGs to write.
    t : ndarray (m,)
        Times of rows and columns, s.
    data, fitted : ndarray (n_phi, m, m)
        Upper triangle meaningful (t2 > t1); NaN elsewhere is drawn blank. Each map is
        mirrored so the picture is the full symmetric two-time map.
    titles : list of str, n_phi
    """
    upper = np.triu(np.ones(data.shape[1:], bool), 1)
    off_diagonal = ~np.eye(data.shape[1], dtype=bool)

    def full(a):
        return np.where(off_diagonal, np.where(upper, a, np.swapaxes(a, 1, 2)), np.nan)

    d = full(np.asarray(data))
    f = full(np.asarray(fitted))
    r = d - f
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a map with no point at all
        lo, hi = np.nanpercentile(d, [1, 99])
        rl = np.nanpercentile(np.abs(r), 99)
    figure = getattr(_THREAD, "heatmap", None)
    if figure is None:
        figure = _THREAD.heatmap = _HeatmapFigure()
    figure.draw(paths, [t[0], t[-1], t[-1], t[0]], [(lo, hi), (lo, hi), (-rl, rl)],
                list(zip(d, f, r)), titles)


_THREAD = threading.local()  # one heatmap figure per thread: fits may run in several threads


class _HeatmapFigure:
    """The data | fit | residual figure, built once and redrawn for every picture.

    Building a figure (three axes, three colorbars, their ticks and texts) and laying out
    its texts took most of the time of a picture. Within a q the extent and the colour
    limits are fixed, so the figure is drawn once without its images, spines and title
    (Agg blitting: the background) and each picture is that background with its images,
    spines and title drawn over it, in the order a full draw uses, so the pixels are
    those of a figure drawn afresh for the picture.
    """

    PANELS = (("data", "viridis"), ("fit", "viridis"), ("residual", "RdBu_r"))
    DPI = 90

    def __init__(self):
        self.fig = Figure(figsize=(13, 4.2), dpi=self.DPI)
        self.canvas = FigureCanvasAgg(self.fig)
        # fixed margins: a layout engine doubles the drawing time of this figure
        self.fig.subplots_adjust(left=0.05, right=0.97, bottom=0.12, top=0.86, wspace=0.35)
        self.axes = list(self.fig.subplots(1, 3))
        self.images = []
        for ax, (name, cmap) in zip(self.axes, self.PANELS):
            im = ax.imshow(np.zeros((2, 2)), interpolation="nearest", cmap=cmap)
            ax.set_title(name)
            ax.set_xlabel("t2 (s)")
            ax.set_ylabel("t1 (s)")
            self.fig.colorbar(im, ax=ax, shrink=0.85)
            self.images.append(im)
        self.title = self.fig.suptitle("")
        for artist in self._per_picture():
            artist.set_animated(True)  # left out of the background's draw

    def _per_picture(self):
        """The artists drawn per picture, in a full draw's order: each panel's image, its spines; the title."""
        for ax, im in zip(self.axes, self.images):
            yield im
            yield from ax.spines.values()
        yield self.title

    def draw(self, paths: list[Path], extent: list, limits: list, pictures: list, titles: list[str]) -> None:
        """Write one picture per path: ``limits`` (vmin, vmax) of data, fit, residual;
        ``pictures`` a (data, fit, residual) image triple per path."""
        for im, (lo, hi) in zip(self.images, limits):
            im.set_extent(extent)
            im.set_clim(lo, hi)  # the colorbar follows its image's norm
        self.canvas.draw()
        background = self.canvas.copy_from_bbox(self.fig.bbox)
        for path, images, title in zip(paths, pictures, titles, strict=True):
            self.canvas.restore_region(background)
            for im, img in zip(self.images, images):
                im.set_data(img)
            self.title.set_text(title)
            for artist in self._per_picture():
                (artist.axes or self.fig).draw_artist(artist)
            # zlib level 1: two thirds of the default level 6's encoding time, files 5 % larger
            imsave(path, np.asarray(self.canvas.buffer_rgba()), format="png", dpi=self.DPI,
                   pil_kwargs={"compress_level": 1})


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
    width = 5.5 * len(panels)
    fig = Figure(figsize=(width, 4), dpi=90)
    # margins fixed in inches (room for 7-character tick labels): a layout engine would
    # double the drawing time of a figure every fit writes
    fig.subplots_adjust(left=0.95 / width, right=1 - 0.2 / width, bottom=0.55 / 4, top=1 - 0.2 / 4,
                        wspace=0.35)
    for ax, (key, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        v = np.asarray(transport[key])
        se = np.asarray(transport[key + "_stderr"])
        ax.plot(t, v, color="C0", label="fit")
        ax.fill_between(t, v - se, v + se, color="C0", alpha=0.3, label="±1σ")
        if truth and key in truth:
            ax.plot(t, truth[key](t), "k--", label="truth")
        ax.set_xlabel("t (s)")
        ax.set_ylabel(label)
        ax.legend()
    fig.savefig(path)


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
    fig = Figure(figsize=(11, 3.2 * n_q), dpi=80)
    axes = fig.subplots(n_q, 2, squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1 / n_q, top=1 - 0.08 / n_q, wspace=0.25, hspace=0.4)
    show = lags > 0
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
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
    fig.savefig(path)
