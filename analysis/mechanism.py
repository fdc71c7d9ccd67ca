"""The Gaussian mechanism's noise, drawn from a cryptographically seeded generator.

A site adds this noise to its vector before it leaves; the coordinator redraws it (from a
fixed seed) only to measure how much noise moves an answer, never to protect anything.
"""

from __future__ import annotations

import secrets

import numpy as np

from medfed.analysis.errors import AnalysisError


def gaussian_noise(
    shape: int | tuple[int, ...], std: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Independent N(0, std**2) noise of the given shape.

    Parameters
    ----------
    shape
        Shape of the noise array.
    std
        Standard deviation of each coordinate (``z * sensitivity``); 0 gives zeros.
    rng
        Source of randomness; None draws a fresh generator seeded from `secrets`
        (128 bits), which is what a site releasing data must use.

    Returns
    -------
    np.ndarray
        Float64 noise of `shape`.
    """
    if not np.isfinite(std) or std < 0:
        raise AnalysisError(f"noise std must be finite and >= 0, got {std}")
    if std == 0:
        return np.zeros(shape, dtype=np.float64)
    generator = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    return generator.normal(0.0, std, size=shape)
