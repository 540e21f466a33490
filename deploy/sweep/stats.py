"""Aggregate statistics of ``softflow report``, after rliable (Agarwal et al., 2021, "Deep RL at the Edge of the
Statistical Precipice"): the interquartile mean (IQM, the mean of the middle 50 % of runs: scipy's 25 % trimmed
mean, as rliable's ``aggregate_iqm``), percentile confidence intervals from a stratified bootstrap (runs resampled
with replacement within each task, never across tasks), and performance profiles of min-max normalised scores.

Written with numpy rather than rliable itself: rliable installs here but brings arch, statsmodels, seaborn, patsy,
formulaic and narwhals, and its bootstrap wants the same number of runs in every task. The draws are reproducible:
rep r draws, task by task in the given order, ``rng.integers(0, n_task, n_task)`` from one
``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import trim_mean

CONFIDENCE = 0.95


def iqm(scores: Sequence[float] | np.ndarray) -> float:
    """The interquartile mean: the mean of the scores left after cutting 25 % from each end."""
    return float(trim_mean(np.asarray(scores, dtype=float).ravel(), 0.25))


def stratified_bootstrap(strata: Sequence[Sequence[float]], statistic: Callable[[np.ndarray], float | np.ndarray],
                         reps: int = 2000, seed: int = 0) -> np.ndarray:
    """``statistic`` of ``reps`` stratified resamples (module docstring): each resample joins, per stratum, as many
    runs drawn with replacement as the stratum has."""
    arrays = [np.asarray(s, dtype=float) for s in strata]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        sample = np.concatenate([a[rng.integers(0, len(a), len(a))] for a in arrays])
        values.append(statistic(sample))
    return np.asarray(values)


def interval(strata: Sequence[Sequence[float]], statistic: Callable[[np.ndarray], float] = iqm, reps: int = 2000,
             seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(point estimate, low, high): the statistic of all runs and the percentile interval of its bootstrap."""
    point = statistic(np.concatenate([np.asarray(s, dtype=float) for s in strata]))
    draws = stratified_bootstrap(strata, statistic, reps, seed)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(point), float(low), float(high)


def normalise(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per task, ``(x - min) / (max - min)`` over the scores given for it (all runs of all algorithms on that task);
    a task where every run scored the same gets 1."""
    out = {}
    for task, values in scores.items():
        values = np.asarray(values, dtype=float)
        low, high = values.min(), values.max()
        out[task] = np.ones_like(values) if high == low else (values - low) / (high - low)
    return out


def profile(strata: Sequence[Sequence[float]], taus: np.ndarray, reps: int = 500, seed: int = 0,
            confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The performance profile (the fraction of runs with a normalised score above each tau, each task weighted by
    its runs) and its stratified-bootstrap band: (profile, low, high)."""
    def fractions(sample: np.ndarray) -> np.ndarray:
        return (sample[:, None] > taus[None, :]).mean(axis=0)

    point = fractions(np.concatenate([np.asarray(s, dtype=float) for s in strata]))
    draws = stratified_bootstrap(strata, fractions, reps, seed)
    tail = (1 - confidence) / 2 * 100
    return point, np.percentile(draws, tail, axis=0), np.percentile(draws, 100 - tail, axis=0)
