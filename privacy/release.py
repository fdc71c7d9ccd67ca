"""Metrics that leave a site, released under the Gaussian mechanism and charged to the ledger.

A site never sends an exact loss, count or metric. Each patient contributes one row of
*sufficient statistics* (every coordinate in [0, 1]; at most `TOUCHED` non-zero, so the
row's L2 norm is at most `SENSITIVITY` = sqrt(3)); the site sums the rows of its
training and held-out patients into one vector and adds Gaussian noise of standard
deviation `noise_multiplier * SENSITIVITY` to every coordinate. Adding or removing one
patient moves the sum by at most `SENSITIVITY` in L2, so one release is the Gaussian
mechanism with that noise multiplier: exactly a Poisson-sampled Gaussian step at
sampling rate 1 (`release_event`), which the accountant composes with the DP-SGD steps.

The vector (`LAYOUT`):

- training patients: [count, clipped loss / loss_clip]
- held-out patients: [count, clipped loss / loss_clip, correct (multiclass accuracy),
  clipped squared error / loss_clip (regression), positives' score histogram
  (`BINS` bins over [0, 1]), negatives' score histogram]

Everything derived from the noisy vector (mean losses, AUROC, accuracy, RMSE, and the
coordinator's pooled AUROC over sites) is post-processing and costs nothing more.
Pure numpy: no torch, no training state.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medfed.privacy.errors import DpConfigError
from medfed.privacy.events import DpSgdEvent

BINS = 10
"""Score histogram bins over [0, 1] per class: the AUROC's resolution."""
TOUCHED = 3
"""The most coordinates one patient's row sets (count, loss, and one task statistic)."""
SENSITIVITY = math.sqrt(TOUCHED)
"""The L2 norm bound of one patient's row: the release's sensitivity under add/remove."""
LOSS_CLIP = 4.0
"""Each patient's loss (and squared error) is clipped to this before it is summed: the
same at every site, so the coordinator can pool the sums."""

TRAIN_COUNT, TRAIN_LOSS = 0, 1
HELD_COUNT, HELD_LOSS, HELD_CORRECT, HELD_SQUARED = 2, 3, 4, 5
POSITIVES = slice(6, 6 + BINS)
NEGATIVES = slice(6 + BINS, 6 + 2 * BINS)
WIDTH = 6 + 2 * BINS
LAYOUT = (
    "train_count",
    "train_loss",
    "held_out_count",
    "held_out_loss",
    "held_out_correct",
    "held_out_squared_error",
    *(f"positives_bin_{i}" for i in range(BINS)),
    *(f"negatives_bin_{i}" for i in range(BINS)),
)


@dataclass(frozen=True)
class PatientStats:
    """One population's per-patient values for the reported task (NaN where undefined).

    `loss`: each patient's loss; `score`: the predicted probability of the positive
    class (binary tasks), `truth`: the binary label, `correct`: 1/0 (multiclass),
    `squared_error` (regression). Arrays of one length, or empty where not applicable.
    """

    loss: np.ndarray
    score: np.ndarray | None = None
    truth: np.ndarray | None = None
    correct: np.ndarray | None = None
    squared_error: np.ndarray | None = None

    @property
    def patients(self) -> int:
        return int(self.loss.shape[0])


def release_event(noise_multiplier: float, releases: int = 1) -> DpSgdEvent:
    """The privacy event of `releases` Gaussian releases of sensitivity-normalised noise
    `noise_multiplier`: a Poisson-sampled Gaussian at rate 1 is the Gaussian mechanism."""
    return DpSgdEvent(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=releases)


def _clip01(values: np.ndarray, scale: float) -> np.ndarray:
    finite = np.where(np.isfinite(values), values, scale)
    return np.clip(finite / scale, 0.0, 1.0)


def statistics_rows(
    train: PatientStats, held_out: PatientStats, *, loss_clip: float = LOSS_CLIP
) -> np.ndarray:
    """One row per patient (training rows first), each coordinate in [0, 1] and each
    row's L2 norm at most `SENSITIVITY`."""
    if not (math.isfinite(loss_clip) and loss_clip > 0):
        raise DpConfigError(f"loss_clip must be positive, got {loss_clip}")
    rows_train = np.zeros((train.patients, WIDTH))
    rows_train[:, TRAIN_COUNT] = 1.0
    rows_train[:, TRAIN_LOSS] = _clip01(train.loss, loss_clip)
    rows_held = np.zeros((held_out.patients, WIDTH))
    rows_held[:, HELD_COUNT] = 1.0
    rows_held[:, HELD_LOSS] = _clip01(held_out.loss, loss_clip)
    if held_out.correct is not None:
        rows_held[:, HELD_CORRECT] = np.clip(held_out.correct, 0.0, 1.0)
    elif held_out.squared_error is not None:
        rows_held[:, HELD_SQUARED] = _clip01(held_out.squared_error, loss_clip)
    elif held_out.score is not None and held_out.truth is not None:
        bins = np.clip((np.nan_to_num(held_out.score) * BINS).astype(int), 0, BINS - 1)
        positive = held_out.truth > 0.5
        rows = np.arange(held_out.patients)
        rows_held[rows[positive], POSITIVES.start + bins[positive]] = 1.0
        rows_held[rows[~positive], NEGATIVES.start + bins[~positive]] = 1.0
    rows = np.vstack([rows_train, rows_held])
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    clipped: np.ndarray = rows * np.minimum(1.0, SENSITIVITY / np.maximum(norms, 1e-12))
    return clipped


def gaussian_noise(shape: int, std: float) -> np.ndarray:
    """Gaussian noise from a generator seeded by the operating system's random source."""
    generator = np.random.default_rng(secrets.randbits(128))
    noise: np.ndarray = generator.normal(0.0, std, size=shape)
    return noise


def release(rows: np.ndarray, *, noise_multiplier: float) -> np.ndarray:
    """The rows' sum plus Gaussian noise of `noise_multiplier * SENSITIVITY` per coordinate."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise DpConfigError(
            f"the metrics' noise multiplier must be positive, got {noise_multiplier}"
        )
    total: np.ndarray = rows.sum(axis=0) if rows.size else np.zeros(WIDTH)
    noised: np.ndarray = total + gaussian_noise(WIDTH, noise_multiplier * SENSITIVITY)
    return noised


@dataclass(frozen=True)
class NoisyMetrics:
    """What a site reports from one release: every figure is post-processing of it."""

    train_count: float
    train_loss: float
    held_out_count: float
    held_out_loss: float
    auroc: float
    accuracy: float
    rmse: float


def _ratio(total: float, count: float, scale: float) -> float:
    if count < 1:
        return math.nan
    return float(min(max(total * scale / count, 0.0), scale))


def auroc_from_histograms(positives: np.ndarray, negatives: np.ndarray) -> float:
    """AUROC of binned scores (ties within a bin count half), from (noisy) histograms:
    negative counts are taken as 0; NaN when either class is empty."""
    pos = np.clip(positives, 0.0, None)
    neg = np.clip(negatives, 0.0, None)
    total = float(pos.sum() * neg.sum())
    if total <= 0:
        return math.nan
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float(min(max(float(np.sum(pos * (below + neg / 2))) / total, 0.0), 1.0))


Z_95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""


def auroc_interval(
    positives: np.ndarray, negatives: np.ndarray, *, z: float = Z_95
) -> tuple[float, float] | None:
    """A 95% confidence interval for the AUROC of (noisy) binned score histograms, by
    Hanley and McNeil's (1982) standard error with the class counts the histograms hold,
    clamped to [0, 1]: post-processing of released figures, so it costs no privacy. It
    covers the sampling of patients, not the DP noise (which widens it further at a
    small site). None when either class has fewer than 2 patients."""
    area = auroc_from_histograms(positives, negatives)
    n_pos = float(np.clip(positives, 0.0, None).sum())
    n_neg = float(np.clip(negatives, 0.0, None).sum())
    if not math.isfinite(area) or n_pos < 2 or n_neg < 2:
        return None
    q1, q2 = area / (2 - area), 2 * area**2 / (1 + area)
    variance = (area * (1 - area) + (n_pos - 1) * (q1 - area**2) + (n_neg - 1) * (q2 - area**2)) / (
        n_pos * n_neg
    )
    half = z * math.sqrt(max(variance, 0.0))
    return max(area - half, 0.0), min(area + half, 1.0)


def vector_auroc_interval(vector: Sequence[float] | np.ndarray) -> tuple[float, float] | None:
    """`auroc_interval` of one released statistics vector (or several, summed)."""
    v = np.asarray(vector, dtype=np.float64)
    if v.shape != (WIDTH,):
        return None
    return auroc_interval(v[POSITIVES], v[NEGATIVES])


def metrics_of(
    vector: Sequence[float] | np.ndarray, *, loss_clip: float = LOSS_CLIP
) -> NoisyMetrics:
    """The figures a released vector gives (clamped into their ranges)."""
    v = np.asarray(vector, dtype=np.float64)
    if v.shape != (WIDTH,):
        raise DpConfigError(f"a released statistics vector has {WIDTH} values, got {v.shape}")
    pos, neg = v[POSITIVES], v[NEGATIVES]
    held = float(v[HELD_COUNT])
    binary = float(np.clip(pos, 0, None).sum() + np.clip(neg, 0, None).sum())
    right = float(
        np.clip(pos[BINS // 2 :], 0, None).sum() + np.clip(neg[: BINS // 2], 0, None).sum()
    )
    accuracy = (
        min(max(right / binary, 0.0), 1.0)
        if binary >= 1
        else _ratio(float(v[HELD_CORRECT]), held, 1.0)
    )
    squared = _ratio(float(v[HELD_SQUARED]), held, loss_clip)
    return NoisyMetrics(
        train_count=max(0.0, float(v[TRAIN_COUNT])),
        train_loss=_ratio(float(v[TRAIN_LOSS]), float(v[TRAIN_COUNT]), loss_clip),
        held_out_count=max(0.0, held),
        held_out_loss=_ratio(float(v[HELD_LOSS]), held, loss_clip),
        auroc=auroc_from_histograms(pos, neg),
        accuracy=accuracy,
        rmse=math.sqrt(squared) if math.isfinite(squared) else math.nan,
    )


def pooled(vectors: Sequence[Sequence[float]]) -> NoisyMetrics | None:
    """Every figure over all sites' patients at once, from their released vectors
    summed (sufficient statistics: the same as one site holding them all, up to the
    bins and the noise); None without a vector."""
    arrays = [np.asarray(v, dtype=np.float64) for v in vectors if len(v) == WIDTH]
    if not arrays:
        return None
    return metrics_of(np.sum(arrays, axis=0))


def pooled_auroc(vectors: Sequence[Sequence[float]]) -> float:
    """The consortium's held-out AUROC from every site's released histograms, summed
    (the same as pooling the patients, up to the bins and the noise)."""
    arrays = [np.asarray(v, dtype=np.float64) for v in vectors if len(v) == WIDTH]
    if not arrays:
        return math.nan
    total = np.sum(arrays, axis=0)
    return auroc_from_histograms(total[POSITIVES], total[NEGATIVES])


def pooled_loss(vectors: Sequence[Sequence[float]], *, loss_clip: float = LOSS_CLIP) -> float:
    """The consortium's held-out mean loss: summed clipped losses over summed counts."""
    arrays = [np.asarray(v, dtype=np.float64) for v in vectors if len(v) == WIDTH]
    if not arrays:
        return math.nan
    total = np.sum(arrays, axis=0)
    return _ratio(float(total[HELD_LOSS]), float(total[HELD_COUNT]), loss_clip)
