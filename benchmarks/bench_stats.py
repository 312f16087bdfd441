"""The paired bootstrap's speed: stats.paired_bootstrap (chunks of resamples as count-matrix products) vs the
obvious loop over resamples, on S seeds x N items of 0/1 scores.

    python benchmarks/bench_stats.py              # 3 seeds x 3,000 items, 10,000 resamples (goal: < 1 s)
    python benchmarks/bench_stats.py --small      # proves it runs

The loop is timed on `--loop-resamples` resamples and scaled to the same count; both in this run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from multilora.stats import paired_bootstrap


def loop_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """One Python iteration per resample: draw seeds and items, average the per-seed mean differences."""
    rng = np.random.default_rng(seed)
    s, n = a.shape
    out = np.empty(n_boot)
    for r in range(n_boot):
        seeds = rng.integers(0, s, size=s)
        items = rng.integers(0, n, size=n)
        out[r] = np.mean([np.mean(b[k, items] - a[k, items]) for k in seeds])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--resamples", type=int, default=10_000)
    p.add_argument("--loop-resamples", type=int, default=500)
    p.add_argument("--small", action="store_true", help="300 items, 1,000 resamples, loop 50")
    args = p.parse_args()
    if args.small:
        args.items, args.resamples, args.loop_resamples = 300, 1000, 50
    rng = np.random.default_rng(0)
    a = (rng.random((args.seeds, args.items)) < 0.5).astype(float)
    b = (rng.random((args.seeds, args.items)) < 0.55).astype(float)
    paired_bootstrap(a, b, n_boot=100)  # warm-up (imports, BLAS threads)
    t0 = time.perf_counter()
    iv = paired_bootstrap(a, b, n_boot=args.resamples)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop_bootstrap(a, b, args.loop_resamples)
    loop = (time.perf_counter() - t0) * args.resamples / args.loop_resamples
    print(f"{args.seeds} seeds x {args.items} items, {args.resamples} resamples: diff {iv.diff:+.4f} "
          f"[{iv.low:+.4f}, {iv.high:+.4f}]")
    print(f"paired_bootstrap {ours:.3f} s (goal < 1 s: {'met' if ours < 1 else 'missed'}); "
          f"loop {loop:.2f} s (scaled from {args.loop_resamples}); speed-up {loop / ours:.0f}x")


if __name__ == "__main__":
    main()
