"""Small linear-algebra helpers shared by the analyses: packed symmetric matrices, input
checks for scaled covariates, and the eigenvalue clamp that keeps a noisy matrix usable.
"""

from __future__ import annotations

import math

import numpy as np

from medfed.analysis.errors import AnalysisError

SCALE_TOLERANCE = 1e-9
"""Covariates may exceed [-1, 1] by this much (rounding) before they are refused."""


def upper_of(matrix: np.ndarray) -> np.ndarray:
    """The upper triangle (diagonal included) of the last two axes, row by row, as a vector
    (one per leading index): ``dim * (dim + 1) / 2`` entries, each off-diagonal entry once."""
    dim = matrix.shape[-1]
    rows, cols = np.triu_indices(dim)
    return matrix[..., rows, cols]


def symmetric_from_upper(packed: np.ndarray, dim: int) -> np.ndarray:
    """The symmetric matrices (last two axes) whose upper triangles `upper_of` packed."""
    size = dim * (dim + 1) // 2
    if packed.shape[-1] != size:
        raise AnalysisError(f"a packed {dim}x{dim} matrix has {size} entries, got {packed.shape}")
    rows, cols = np.triu_indices(dim)
    out = np.zeros((*packed.shape[:-1], dim, dim))
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out


def scaled_covariates(x: np.ndarray | list[list[float]], n: int | None = None) -> np.ndarray:
    """`x` as a float matrix (patients x covariates), checked to lie in [-1, 1] (the
    sensitivities assume it) and, when `n` is given, to have `n` rows."""
    matrix = np.asarray(x, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2:
        raise AnalysisError(f"covariates must be a matrix, got shape {matrix.shape}")
    if n is not None and matrix.shape[0] != n:
        raise AnalysisError(f"covariates have {matrix.shape[0]} rows, expected {n}")
    if not np.all(np.isfinite(matrix)):
        raise AnalysisError("covariates contain NaN or infinity")
    if np.any(np.abs(matrix) > 1 + SCALE_TOLERANCE):
        raise AnalysisError("covariates must be scaled to [-1, 1] by their public bounds")
    return np.clip(matrix, -1.0, 1.0)


def noise_eigenvalue_floor(noise_var: float, dim: int) -> float:
    """About the spectral norm of a symmetric `dim` x `dim` matrix of independent
    N(0, noise_var) entries (``2 sqrt(noise_var * dim)``): eigenvalues below it are noise."""
    return 2.0 * math.sqrt(max(noise_var, 0.0) * dim)


def clamp_eigenvalues(matrix: np.ndarray, floor: float) -> np.ndarray:
    """The symmetric part of `matrix` with every eigenvalue raised to at least `floor` (> 0),
    so that it is positive definite and its inverse is bounded by ``1 / floor``."""
    if not floor > 0:
        raise AnalysisError(f"the eigenvalue floor must be positive, got {floor}")
    symmetric = (matrix + matrix.T) / 2
    values, vectors = np.linalg.eigh(symmetric)
    result: np.ndarray = (vectors * np.maximum(values, floor)) @ vectors.T
    return result
