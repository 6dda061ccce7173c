"""Confidence intervals, as the LLark paper reports them (Table 2): 95% Clopper-Pearson intervals
for accuracies, 95% bootstrap intervals for F1 (and here for every other mean of non-binary
per-item scores, such as the MIREX weighted key score, for which a binomial interval is not
defined).

- Clopper & Pearson, "The use of confidence or fiducial limits illustrated in the case of the
  binomial", Biometrika 26(4), 1934: the exact interval ``[B(α/2; k, n-k+1), B(1-α/2; k+1, n-k)]``
  with ``B`` the beta quantile (0 when k = 0, 1 when k = n).
- Efron & Tibshirani, "An Introduction to the Bootstrap", 1993: percentile intervals of the
  statistic over resamples of the items with replacement. The generator is seeded, so a report
  is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A score with its interval: ``value`` in ``[low, high]`` at ``confidence``, from ``n`` items."""

    value: float
    low: float
    high: float
    n: int
    method: str
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "method": self.method,
                "confidence": self.confidence}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def clopper_pearson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact two-sided binomial interval for ``successes`` out of ``n``."""
    from scipy.stats import beta

    if n < 1 or not 0 <= successes <= n or int(successes) != successes:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return low, high


def accuracy(correct: Sequence[bool], confidence: float = CONFIDENCE) -> Estimate:
    """The fraction of correct items with its Clopper-Pearson interval."""
    correct = [bool(c) for c in correct]
    if not correct:
        raise ValueError("accuracy of no items")
    k, n = sum(correct), len(correct)
    low, high = clopper_pearson(k, n, confidence)
    return Estimate(k / n, low, high, n, "clopper-pearson", confidence)


def resampled_sums(columns: Sequence[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                   chunk: int = 1000) -> list[np.ndarray]:
    """For each column of per-item values, its sum over each of ``resamples`` draws of the items
    with replacement (the same draws for every column); drawn in chunks to bound memory."""
    n = len(columns[0])
    if n < 1 or any(len(c) != n for c in columns):
        raise ValueError("bootstrap over no items, or columns of different lengths")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    rng = np.random.default_rng(seed)
    sums: list[list[np.ndarray]] = [[] for _ in columns]
    for start in range(0, resamples, chunk):
        draws = rng.integers(0, n, (min(chunk, resamples - start), n))
        for k, column in enumerate(columns):
            sums[k].append(np.asarray(column)[draws].sum(axis=1))
    return [np.concatenate(s) for s in sums]


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1 - confidence
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def mean(scores: Sequence[float], confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
         seed: int = BOOTSTRAP_SEED) -> Estimate:
    """The mean of per-item scores with a bootstrap percentile interval."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("mean of no items")
    (sums,) = resampled_sums([values], resamples, seed)
    low, high = _percentiles(sums / values.size, confidence)
    return Estimate(float(values.mean()), low, high, int(values.size), "bootstrap", confidence)


def micro_f1_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    """F1 from summed counts; 1.0 when there is nothing to find and nothing was found."""
    t, p, n = float(np.sum(tp)), float(np.sum(fp)), float(np.sum(fn))
    if t + p + n == 0:
        return 1.0
    return 2 * t / (2 * t + p + n)


def f1(tp: Sequence[int], fp: Sequence[int], fn: Sequence[int], confidence: float = CONFIDENCE,
       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """Micro-averaged F1 over items (counts summed, then F1) with a bootstrap interval over items."""
    tp, fp, fn = (np.asarray(x, dtype=np.int64) for x in (tp, fp, fn))
    if not (tp.shape == fp.shape == fn.shape) or tp.ndim != 1 or tp.size == 0:
        raise ValueError("tp, fp and fn must be equal-length, non-empty 1-d sequences")
    t, p, n = resampled_sums([tp, fp, fn], resamples, seed)
    denominator = 2 * t + p + n
    scores = np.where(denominator > 0, 2 * t / np.maximum(denominator, 1), 1.0)
    low, high = _percentiles(scores, confidence)
    return Estimate(micro_f1_counts(tp, fp, fn), low, high, int(tp.size), "bootstrap", confidence)
