"""Speckle-realistic two-time maps: moving particles, far-field speckle, a correlator's c2.

What :func:`speckle_intensities` and :func:`correlate` do, per (q, phi) bin:

1. **Particles.** N point scatterers, positions uniform in a square box of side
   ``Lbox`` (in the detector plane; u along the bin's q direction, v across it) and at
   depth z uniform in [0, L] along the beam (L the gap). Between frames k and k+1 each
   particle moves by a Brownian step of variance ∫J dt per in-plane axis (J = 2·D,
   DESIGN.md §2) plus the laminar shear displacement z·ΔΓ along the flow direction, at
   angle phi0 − phi from u, with ΔΓ = ∫gamma_dot dt over the frame step. The integrals
   are the model's closed forms (:func:`xpcsfit.model.power_integral`), so the
   particles follow the model's J(t) and gamma_dot(t) exactly.
2. **Far-field speckle.** The field at scattering vector (q_u, q_v) is
   E = Σ_j exp(i (q_u u_j + q_v v_j)); because the phase separates in u and v, the
   fields of a rectangle of q samples are one matrix product per frame,
   exp(i q_u u)ᵀ · exp(i q_v v). The samples sit on the box's reciprocal lattice
   (spacing δq = 2π/Lbox), so distinct samples are uncorrelated speckles; a pixel sums
   2 × 2 of them, which gives a speckle contrast of 1/4 · (1 − 1/N). Then Poisson photon
   counts with ``counts`` photons per pixel per frame on average.
   For N independent particles, ⟨I(t1) I(t2)⟩/⟨I⟩² = 1 + (1 − 1/N)|g1|² exactly (Siegert),
   with g1 = ⟨exp(i q·Δr)⟩ = exp(−q²/2 ∫J dt) · sinc(q L cos(phi0 − phi) Γ / 2)
   (the average of exp(i q cos(phi0 − phi) Γ z) over z uniform in [0, L]): the model's
   g1 at the bin's centre. The bin spans ``width`` of q radially and the same
   arc across; the fitted (centre) model is then off by O(width²/12) relative, 0.1 %
   at the default 0.1.
3. **Correlator.** As boost_corr's two-time correlator: per bin,
   c2(t1, t2) = ⟨n_p(t1) n_p(t2)⟩_p / (⟨n_p(t1)⟩_p ⟨n_p(t2)⟩_p), the pixel average of
   per-pixel products of counts over the product of pixel-mean counts (the diagonal
   then carries the shot-noise spike 1/⟨n⟩).

The noise of such maps is what real correlator output has: c2 of points that share a
frame share that frame's speckle fluctuations, so it is correlated over about a
decorrelation time along rows, columns and diagonals, and a bin with fewer pixels is
noisier.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from xpcsfit.model import power_integral

# Speckle samples per pixel side: 2 × 2 independent speckles per pixel (contrast ≈ 1/4).
SAMPLES_PER_PIXEL_SIDE = 2


def frame_steps(theta: np.ndarray, mode: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """∫J dt (Å²) and ΔΓ (strain) over each frame step [t_k, t_{k+1}], (T−1,) each.

    theta in MODES order (DESIGN.md §2); t (T,) s, all > 0.
    """
    lt = np.log(t)
    a, b = lt[:-1], lt[1:]
    dJ = theta[0] * np.asarray(power_integral(theta[1], a, b)) + theta[2] * np.diff(t)
    if mode == "static":
        return dJ, np.zeros_like(dJ)
    dG = theta[3] * np.asarray(power_integral(theta[4], a, b)) + theta[5] * np.diff(t)
    return dJ, dG


def speckle_intensities(rng: np.random.Generator, q: float, phi: float, theta: np.ndarray, mode: str,
                        t: np.ndarray, gap: float, *, pixels: int, particles: int, counts: float,
                        width: float = 0.1, frame_chunk: int = 64) -> np.ndarray:
    """Photon counts of one (q, phi) bin's pixels in every frame, (T, n_pixels) float32.

    Parameters
    ----------
    rng : numpy Generator
    q : float
        Bin centre, 1/Å.
    phi : float
        Bin centre, degrees (flow direction at phi0 = theta[6]).
    theta : ndarray (p,)
        Physics parameters (MODES order).
    mode : {"static", "laminar_flow"}
    t : ndarray (T,)
        Frame times, s, > 0.
    gap : float
        L, Å: the depth range of the particles along the beam.
    pixels : int
        Pixels in the bin (rounded to a square of side ⌈√pixels⌉).
    particles : int
        N scatterers.
    counts : float
        Mean photons per pixel per frame.
    width : float
        Radial (and tangential) extent of the bin relative to q.
    frame_chunk : int
        Frames whose fields are formed at once (bounds the memory).
    """
    side = int(np.ceil(np.sqrt(pixels))) * SAMPLES_PER_PIXEL_SIDE
    dq = width * q / side
    box = 2.0 * np.pi / dq
    k0 = int(round(q / dq))
    qu = dq * (k0 + np.arange(side) - side // 2)  # on the box's reciprocal lattice
    qv = dq * (np.arange(side) - side // 2)
    n = int(particles)
    u0 = rng.uniform(0.0, box, n)
    v0 = rng.uniform(0.0, box, n)
    z = rng.uniform(0.0, gap, n)
    dJ, dG = frame_steps(theta, mode, t)
    psi = np.deg2rad(theta[6] - phi) if mode == "laminar_flow" else 0.0
    steps = rng.standard_normal((2, t.size - 1, n)) * np.sqrt(dJ)[None, :, None]
    shear = dG[:, None] * z[None, :]
    du = np.concatenate([np.zeros((1, n)), steps[0] + shear * np.cos(psi)])
    dv = np.concatenate([np.zeros((1, n)), steps[1] + shear * np.sin(psi)])
    u = u0 + np.cumsum(du, axis=0)  # (T, N), Å
    v = v0 + np.cumsum(dv, axis=0)
    s = SAMPLES_PER_PIXEL_SIDE
    m = side // s
    out = np.empty((t.size, m * m), np.float32)
    with threadpool_limits(1, user_api="blas"):  # small products: threads only contend
        _fields(out, u, v, qu, qv, n, s, m, counts, rng, frame_chunk)
    return out


def _fields(out, u, v, qu, qv, n, s, m, counts, rng, frame_chunk):
    """Fill ``out`` (T, m²) with the Poisson counts of the pixels, frame chunk by chunk."""
    for a in range(0, out.shape[0], frame_chunk):
        b = min(out.shape[0], a + frame_chunk)
        X = np.exp(1j * (u[a:b, None, :] * qu[None, :, None])).astype(np.complex64)  # (f, side, N)
        Y = np.exp(1j * (v[a:b, :, None] * qv[None, None, :])).astype(np.complex64)  # (f, N, side)
        E = X @ Y
        intensity = (E.real**2 + E.imag**2) / n  # mean 1 per speckle
        pix = intensity.reshape(b - a, m, s, m, s).mean(axis=(2, 4)).reshape(b - a, -1)
        out[a:b] = rng.poisson(counts * pix)


def correlate(frames: np.ndarray, a: int = 0, b: int | None = None) -> np.ndarray:
    """Rows a..b−1 of the two-time map of one bin, (b − a, T) float64.

    c2(t1, t2) = ⟨n_p(t1) n_p(t2)⟩_p / (⟨n_p(t1)⟩_p ⟨n_p(t2)⟩_p) over the bin's pixels p;
    ``frames`` (T, n_pixels) counts (from :func:`speckle_intensities`).
    """
    n = np.asarray(frames, np.float64)
    b = n.shape[0] if b is None else b
    mean = n.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (n[a:b] @ n.T) / n.shape[1] / np.outer(mean[a:b], mean)
