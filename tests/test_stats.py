"""stats: the paired bootstrap against scipy, a loop over resamples and the normal approximation; McNemar against
scipy's binomial test and a hand-computed case; verdicts; seeds; bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sp

from multilora.errors import MultiLoRAError
from multilora.stats import Interval, mcnemar_p, mean_paired_bootstrap, paired_bootstrap, verdict


def correct(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_bootstrap_equals_scipys_paired_percentile_bootstrap():
    """Same statistic and method, independent resamples: the bounds agree within one item's step (1/N)
    plus the Monte-Carlo error of a 2.5% quantile over 50,000 resamples (~6e-4 here)."""
    n = 200
    a, b = correct(n, 0.5, 1), correct(n, 0.6, 2)
    ours = paired_bootstrap(a, b, n_boot=50_000, seed=3)
    ref = sp.bootstrap((a, b), lambda x, y, axis: np.mean(y - x, axis=axis), paired=True, vectorized=True,
                       method="percentile", n_resamples=50_000, rng=4).confidence_interval
    assert ours.diff == pytest.approx(np.mean(b - a), abs=1e-15)
    assert ours.low == pytest.approx(ref.low, abs=1 / n + 1e-3)
    assert ours.high == pytest.approx(ref.high, abs=1 / n + 1e-3)
    assert ours.low < ours.diff < ours.high and ours.level == 0.95


def test_weighted_bootstrap_equals_scipy_with_the_ratio_statistic():
    """Perplexity: values = each example's nll per token, weights = its tokens; the weighted mean is then
    the summed nll over the summed tokens, and the statistic the nll-per-token difference."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, 40, size=150).astype(float)
    nll_a = tokens * rng.normal(2.0, 0.3, size=150)  # summed nll per example
    nll_b = nll_a + tokens * rng.normal(-0.05, 0.2, size=150)
    ours = paired_bootstrap(nll_a / tokens, nll_b / tokens, weights=tokens, n_boot=40_000, seed=0)
    assert ours.diff == pytest.approx(np.sum(nll_b) / np.sum(tokens) - np.sum(nll_a) / np.sum(tokens), rel=1e-12)

    def ratio(x, y, w, axis):
        return np.sum(y - x, axis=axis) / np.sum(w, axis=axis)

    ref = sp.bootstrap((nll_a, nll_b, tokens), ratio, paired=True, vectorized=True, method="percentile",
                       n_resamples=40_000, rng=1).confidence_interval
    half = (ref.high - ref.low) / 2
    assert ours.low == pytest.approx(ref.low, abs=0.03 * half)  # Monte-Carlo error of the quantiles
    assert ours.high == pytest.approx(ref.high, abs=0.03 * half)


def test_bootstrap_matches_the_normal_approximation_at_large_n():
    rng = np.random.default_rng(7)
    n = 5000
    a = rng.normal(0.0, 1.0, n)
    b = a + rng.normal(0.1, 1.0, n)
    iv = paired_bootstrap(a, b, n_boot=20_000)
    d = b - a
    half = 1.959964 * d.std(ddof=1) / np.sqrt(n)
    assert iv.low == pytest.approx(d.mean() - half, abs=0.05 * half)
    assert iv.high == pytest.approx(d.mean() + half, abs=0.05 * half)


def reference_bootstrap(a: np.ndarray, b: np.ndarray, w: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """The obvious loop, drawing from the generator in the documented order (seeds (B, S), then items (B, N))."""
    rng = np.random.default_rng(seed)
    s, n = a.shape
    seeds = rng.integers(0, s, size=(n_boot, s)) if s > 1 else np.zeros((n_boot, 1), dtype=int)
    items = rng.integers(0, n, size=(n_boot, n))
    out = []
    for r in range(n_boot):
        per_seed = [np.sum(w[items[r]] * (b[k, items[r]] - a[k, items[r]])) / np.sum(w[items[r]]) for k in seeds[r]]
        out.append(np.mean(per_seed))
    return np.array(out)


def test_vectorised_bootstrap_equals_a_loop_over_resamples_with_seeds_and_weights():
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(3, 40)), rng.normal(size=(3, 40))
    w = rng.integers(1, 9, size=40).astype(float)
    reps = reference_bootstrap(a, b, w, 300, seed=2)
    iv = paired_bootstrap(a, b, w, n_boot=300, seed=2)
    low, high = np.quantile(reps, [0.025, 0.975])
    assert (iv.low, iv.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert iv.diff == pytest.approx(np.mean([(w * (b[k] - a[k])).sum() / w.sum() for k in range(3)]), abs=1e-12)


def test_identical_runs_give_zero_and_cant_tell():
    a = np.stack([correct(100, 0.6, s) for s in range(3)])
    iv = paired_bootstrap(a, a.copy())
    assert iv == Interval(0.0, 0.0, 0.0)
    assert verdict(iv, True) == verdict(iv, False) == "can't tell"
    assert mcnemar_p(a[0], a[0]) == 1.0


def test_a_clear_win_is_better_a_clear_loss_worse_and_a_small_gap_cant_tell():
    a, b = correct(300, 0.3, 1), correct(300, 0.7, 2)
    win = paired_bootstrap(a, b)
    assert win.low > 0 and verdict(win, higher_is_better=True) == "better"
    loss = paired_bootstrap(b, a)
    assert loss.high < 0 and verdict(loss, higher_is_better=True) == "worse"
    # lower is better (nll): a negative difference is a win
    assert verdict(loss, higher_is_better=False) == "better" and verdict(win, higher_is_better=False) == "worse"
    flip = a.copy()
    flip[:3] = 1 - flip[:3]  # 3 items of 300 differ: nothing to conclude
    assert verdict(paired_bootstrap(a, flip), True) == "can't tell"


def test_disagreeing_seeds_widen_the_interval():
    base = np.stack([correct(400, 0.5, s) for s in range(3)])
    gain = np.stack([correct(400, 0.1, 10)] * 3)  # the same items improve in every seed
    agree = np.clip(base + gain, 0, 1)
    spread = agree.copy()
    spread[0] = np.clip(base[0] + np.stack([correct(400, 0.3, 20)]), 0, 1)  # seed 0 gains much more
    spread[2] = base[2]  # seed 2 gains nothing
    narrow, wide = paired_bootstrap(base, agree), paired_bootstrap(base, spread)
    assert wide.high - wide.low > 1.5 * (narrow.high - narrow.low)
    # one seed alone ignores the seed variance: narrower than the three disagreeing seeds together
    single = paired_bootstrap(base[1], spread[1])
    assert wide.high - wide.low > single.high - single.low


def test_the_bootstrap_is_reproducible_for_a_seed():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 80)), rng.normal(0.2, 1.0, size=(2, 80))  # continuous: the bounds move with the draws
    assert paired_bootstrap(a, b, seed=4) == paired_bootstrap(a, b, seed=4)
    assert paired_bootstrap(a, b, seed=4) != paired_bootstrap(a, b, seed=5)


def test_mean_over_tasks_resamples_each_task_and_averages():
    a1, b1 = correct(100, 0.4, 1), correct(100, 0.6, 2)
    a2, b2 = correct(50, 0.5, 3), correct(50, 0.5, 4)
    iv = mean_paired_bootstrap([(a1, b1, None), (a2, b2, None)], n_boot=2000)
    assert iv.diff == pytest.approx(((b1 - a1).mean() + (b2 - a2).mean()) / 2, abs=1e-15)
    one = mean_paired_bootstrap([(a1, b1, None)], n_boot=2000, seed=9)
    assert one == paired_bootstrap(a1, b1, n_boot=2000, seed=9)  # one part: the same draws, the same interval
    assert iv.low < iv.diff < iv.high


@pytest.mark.parametrize("only_a,only_b,both", [(1, 5, 10), (0, 7, 3), (12, 30, 40), (20, 20, 5), (150, 190, 700)])
def test_mcnemar_equals_scipys_exact_binomial_test(only_a, only_b, both):
    a = np.array([1] * only_a + [0] * only_b + [1] * both + [0] * 9)
    b = np.array([0] * only_a + [1] * only_b + [1] * both + [0] * 9)
    expected = sp.binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue
    assert mcnemar_p(a, b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_small_case_by_hand_and_no_discordant_pairs():
    # 1 item only A got right, 5 only B: p = 2 * P(X <= 1 | n=6) = 2 * (1 + 6) / 64
    a = np.array([1, 0, 0, 0, 0, 0, 1, 0], dtype=bool)
    b = np.array([0, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    assert mcnemar_p(a, b) == 14 / 64
    assert mcnemar_p(a, a) == 1.0
    assert mcnemar_p(np.ones(5000, bool), np.zeros(5000, bool)) == 0.0  # 2^-4999 underflows, no error


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(MultiLoRAError, match="same shape"):
        paired_bootstrap(np.zeros(5), np.zeros(6))
    with pytest.raises(MultiLoRAError, match="NaN"):
        paired_bootstrap([0.0, np.nan], [1.0, 1.0])
    with pytest.raises(MultiLoRAError, match="weights must be 2"):
        paired_bootstrap([0.0, 1.0], [1.0, 1.0], weights=[1.0])
    with pytest.raises(MultiLoRAError, match="n_boot"):
        paired_bootstrap([0.0], [1.0], n_boot=0)
    with pytest.raises(MultiLoRAError, match="same length"):
        mcnemar_p([1, 0], [1])
