"""PNG figures of a CMC run: corner plot, trace plots, J(t) / gamma_dot(t) bands."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MAX_SCATTER = 2000


def corner_png(path: Path, names, draws, truth: dict | None = None) -> None:
    """Pairwise scatter (lower triangle) and histograms (diagonal) of the combined draws.

    Parameters
    ----------
    path : Path
    names : list of str
    draws : ndarray (S, p)
    truth : dict, optional
        name -> value, drawn as lines.
    """
    draws = np.asarray(draws, float)
    p = len(names)
    step = max(1, draws.shape[0] // MAX_SCATTER)
    thin = draws[::step]
    fig, axes = plt.subplots(p, p, figsize=(1.9 * p + 1, 1.9 * p + 1), squeeze=False)
    for i in range(p):
        for j in range(p):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            if i == j:
                ax.hist(draws[:, i], bins=40, color="C0", histtype="stepfilled", alpha=0.7)
                ax.set_yticks([])
            else:
                ax.plot(thin[:, j], thin[:, i], ".", ms=1.5, alpha=0.4, color="C0")
            if truth:
                if names[j] in truth:
                    ax.axvline(truth[names[j]], color="k", lw=0.8, ls="--")
                if i != j and names[i] in truth:
                    ax.axhline(truth[names[i]], color="k", lw=0.8, ls="--")
            if i == p - 1:
                ax.set_xlabel(names[j], fontsize=8)
            else:
                ax.set_xticklabels([])
            if j == 0 and i > 0:
                ax.set_ylabel(names[i], fontsize=8)
            elif j > 0:
                ax.set_yticklabels([])
            ax.tick_params(labelsize=6)
    fig.suptitle("combined posterior")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def trace_png(path: Path, names, combined, shard_draws, shard_names) -> None:
    """Per parameter: traces of the combined chains, and each shard's marginal.

    Parameters
    ----------
    combined : ndarray (chains, draws, p)
    shard_draws : ndarray (K, chains, draws, p)
    shard_names : list of str
    """
    p = len(names)
    fig, axes = plt.subplots(p, 2, figsize=(11, 1.7 * p + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1]})
    for i, name in enumerate(names):
        ax = axes[i, 0]
        for c in range(combined.shape[0]):
            ax.plot(combined[c, :, i], lw=0.5, alpha=0.8, label=f"chain {c}")
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=6)
        ax = axes[i, 1]
        for k in range(shard_draws.shape[0]):
            ax.hist(shard_draws[k, ..., i].ravel(), bins=40, histtype="step", lw=0.7,
                    density=True, label=shard_names[k])
        ax.hist(combined[..., i].ravel(), bins=40, histtype="stepfilled", alpha=0.35,
                density=True, color="k", label="combined")
        ax.set_yticks([])
        ax.tick_params(labelsize=6)
    axes[0, 0].set_title("combined draws by chain", fontsize=9)
    axes[0, 1].set_title("shard sub-posteriors and combined", fontsize=9)
    if shard_draws.shape[0] <= 12:
        axes[0, 1].legend(fontsize=5, ncol=2)
    axes[-1, 0].set_xlabel("draw")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def bands_png(path: Path, t, transport: dict, truth: dict | None = None) -> None:
    """J(t) (and gamma_dot(t)) posterior mean with the 3 %–97 % band.

    Parameters
    ----------
    t : ndarray (n,) s
    transport : dict
        "J" (and "gamma_dot") -> dict of lists from :func:`xpcsfit.cmc.combine.bands`.
    truth : dict, optional
        key -> callable(t), drawn dashed.
    """
    keys = [k for k in ("J", "gamma_dot") if k in transport]
    labels = {"J": "J(t) (Å²/s)", "gamma_dot": "gamma_dot(t) (1/s)"}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False,
                             constrained_layout=True)
    for ax, key in zip(axes[0], keys):
        b = transport[key]
        ax.plot(t, b["mean"], color="C0", label="posterior mean")
        ax.fill_between(t, b["q03"], b["q97"], color="C0", alpha=0.3, label="3 %–97 %")
        if truth and key in truth:
            ax.plot(t, truth[key](np.asarray(t)), "k--", label="truth")
        ax.set_xlabel("t (s)")
        ax.set_ylabel(labels[key])
        ax.legend()
    fig.savefig(path, dpi=90)
    plt.close(fig)
