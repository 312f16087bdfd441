"""Paired statistics for two runs scored on the same items: a bootstrap interval, McNemar's test, a verdict.

    iv = paired_bootstrap(a, b)                  # a, b: (S, N) per-item values of runs A and B, S seeds
    iv.diff, iv.low, iv.high                     # mean over seeds of the (weighted) mean of b - a, 95% interval
    mcnemar_p(a_correct, b_correct)              # exact two-sided McNemar p-value (accuracy)
    verdict(iv, higher_is_better=True)           # "better" | "worse" | "can't tell"

Both runs answer the very same items, so the per-item differences d_i = b_i - a_i vary far less than two
independent accuracies would: an item both get right (or wrong) contributes nothing. The bootstrap
resamples items with replacement (the same items for every seed: row s of `a` and `b` share seed s and
the items are the same across seeds) and, with several seeds, the seeds too, so the interval covers both
"would it hold on other items" and "would it hold with another training seed". Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np

from .errors import MultiLoRAError

CHUNK_CELLS = 4_000_000  # resamples per chunk x items: the (chunk, N) count matrix stays ~32 MB


@dataclass(frozen=True)
class Interval:
    """A paired difference b - a (`diff`, on the original items) and its percentile interval [low, high]."""

    diff: float
    low: float
    high: float
    level: float = 0.95


def _values(x, name: str) -> np.ndarray:
    """`x` as a float (S, N) array (a 1-D array is one seed), refused if empty or not finite."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MultiLoRAError(f"{name} must be a non-empty (seeds, items) or (items,) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise MultiLoRAError(f"{name} holds NaN or infinite values; pass finite per-item scores")
    return arr


def _pair(a, b, weights) -> tuple[np.ndarray, np.ndarray]:
    """(d = b - a as (S, N), weights (N,)), with the shapes and weights checked."""
    a, b = _values(a, "a"), _values(b, "b")
    if a.shape != b.shape:
        raise MultiLoRAError(f"a and b must have the same shape (seeds, items), got {a.shape} and {b.shape}")
    w = np.ones(a.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (a.shape[1],) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise MultiLoRAError(f"weights must be {a.shape[1]} finite non-negative numbers with a positive sum, "
                             f"got shape {w.shape}")
    return b - a, w


def _statistic(d: np.ndarray, w: np.ndarray) -> float:
    """Mean over seeds of the weighted mean over items of d (S, N)."""
    return float(np.mean(d @ w / w.sum()))


def _resampled(parts: Sequence[tuple[np.ndarray, np.ndarray]], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) bootstrap replicates of mean over parts of _statistic(d, w), each part = (d (S, N_p), w (N_p,)).

    Each replicate draws the S seeds with replacement (once, shared by all parts) when S > 1, and each
    part's items with replacement (as counts c (N_p,), the same for every seed). Vectorised over chunks
    of replicates: the weighted mean of a resample is c @ (w * d_s) / (c @ w).
    """
    seeds = parts[0][0].shape[0]
    out = np.empty(n_boot)
    widest = max(d.shape[1] for d, _ in parts)
    chunk = max(1, min(n_boot, CHUNK_CELLS // widest))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        if seeds > 1:  # seed counts (m, S): how often each seed is drawn in each replicate
            pick = rng.integers(0, seeds, size=(m, seeds))  # (m, S)
            seed_counts = np.zeros((m, seeds))
            np.add.at(seed_counts, (np.arange(m)[:, None], pick), 1.0)
        else:
            seed_counts = np.ones((m, 1))
        total = np.zeros(m)
        for d, w in parts:
            n = d.shape[1]
            idx = rng.integers(0, n, size=(m, n))  # (m, N): resampled item indices
            counts = np.bincount((idx + n * np.arange(m)[:, None]).ravel(), minlength=m * n).reshape(m, n)
            sums = counts.astype(np.float64) @ np.vstack([d * w, w]).T  # (m, S + 1): sum c w d_s, then sum c w
            per_seed = sums[:, :-1] / sums[:, -1:]  # (m, S): weighted mean difference per seed
            total += (per_seed * seed_counts).sum(axis=1) / seeds
        out[start:start + m] = total / len(parts)
    return out


def _interval(stat: float, reps: np.ndarray, level: float) -> Interval:
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Interval(stat, float(low), float(high), level)


def _check_boot(n_boot: int, level: float) -> None:
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise MultiLoRAError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < level < 1:
        raise MultiLoRAError(f"level must be between 0 and 1 (e.g. 0.95), got {level!r}")


def paired_bootstrap(a, b, weights=None, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> Interval:
    """The paired difference mean_s sum_i w_i (b_si - a_si) / sum_i w_i and its percentile bootstrap interval.

    `a`, `b`: (S, N) per-item values of runs A and B for S seeds on the same N items (or (N,), one seed);
    `weights` (N,) per item (None: all 1). Accuracy: values 0/1, no weights; perplexity: each example's
    nll per token, weighted by its tokens (the weighted mean is then summed nll / summed tokens, and the
    statistic the difference in nll per token). Items are resampled with
    replacement (the same items for every seed), and seeds too when S > 1; `seed` makes it reproducible.
    """
    _check_boot(n_boot, level)
    d, w = _pair(a, b, weights)
    reps = _resampled([(d, w)], n_boot, np.random.default_rng(seed))
    return _interval(_statistic(d, w), reps, level)


def mean_paired_bootstrap(pairs: Sequence[tuple], n_boot: int = 10_000, seed: int = 0,
                          level: float = 0.95) -> Interval:
    """The mean over parts (tasks) of paired_bootstrap's statistic, with its bootstrap interval.

    `pairs`: (a, b, weights) per part, each as paired_bootstrap takes them, all with the same number of
    seeds S. Items are resampled within each part; the seeds (when S > 1) once per replicate for all parts.
    """
    _check_boot(n_boot, level)
    if not pairs:
        raise MultiLoRAError("mean_paired_bootstrap needs at least one (a, b, weights) part")
    parts = [_pair(a, b, w) for a, b, w in pairs]
    if len({d.shape[0] for d, _ in parts}) > 1:
        raise MultiLoRAError(f"every part needs the same number of seeds, got {[d.shape[0] for d, _ in parts]}")
    reps = _resampled(parts, n_boot, np.random.default_rng(seed))
    return _interval(float(np.mean([_statistic(d, w) for d, w in parts])), reps, level)


def mcnemar_p(a_correct, b_correct) -> float:
    """Exact two-sided McNemar p-value: a binomial(n, 1/2) test on the n items exactly one run got right.

    1.0 when no item is discordant.
    """
    a = np.asarray(a_correct).astype(bool).ravel()
    b = np.asarray(b_correct).astype(bool).ravel()
    if a.shape != b.shape:
        raise MultiLoRAError(f"a_correct and b_correct must have the same length, got {a.size} and {b.size}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    # 2 * P(X <= k), X ~ Binomial(n, 1/2), in exact integers: sum_{i<=k} C(n, i) / 2^(n-1)
    term, tail = 1, 1
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, float(Fraction(2 * tail, 2**n)))  # exact, rounded once (no overflow for large n)


def verdict(interval: Interval, higher_is_better: bool) -> str:
    """"better" / "worse" when the interval lies entirely above / below zero (in the direction that is
    better: higher accuracy, lower nll), else "can't tell"."""
    if interval.low > 0 or interval.high < 0:
        up = interval.low > 0
        return "better" if up == higher_is_better else "worse"
    return "can't tell"
