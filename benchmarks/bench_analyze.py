"""Exact spectra of dW: the QR route (docs/method.md §5) vs a dense SVD of each dW, in one run.

    python benchmarks/bench_analyze.py [--threads 1] [--layers 30]

All adapted layers of a model with SmolLM2-135M's shapes (n = 3, r = 8, all seven projections),
random factors. Prints both times, the ratio (goal: >= 20x) and the largest relative difference
of the singular values (goal: <= 1e-4).
"""

from __future__ import annotations

import argparse
import time

import torch

from multilora.spectra import lowrank_svdvals
from multilora.layers import fuse

SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
          "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}  # (d_out, d_in)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--r", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    factors = []
    for _ in range(args.layers):
        for d_out, d_in in SHAPES.values():
            a = torch.randn(args.n, args.r, d_in, generator=g)
            b = torch.randn(args.n, d_out, args.r, generator=g)
            s = torch.randn(args.n, d_out, generator=g)
            factors.append(fuse(a, b, s, 2.0))  # (A_cat (n r, d_in), B_s (d_out, n r))
    t0 = time.perf_counter()
    fast = [lowrank_svdvals(b_s, a_cat) for a_cat, b_s in factors]
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = [torch.linalg.svdvals(b_s @ a_cat) for a_cat, b_s in factors]
    t_dense = time.perf_counter() - t0
    k = args.n * args.r
    err = max(float((f[:k] - d[:k].double()).abs().max() / d[0]) for f, d in zip(fast, dense))
    ratio = t_dense / t_fast
    print(f"{len(factors)} layers (n={args.n}, r={args.r}, SmolLM2-135M shapes), {args.threads} thread(s)")
    print(f"QR route      {t_fast:8.3f} s")
    print(f"dense svdvals {t_dense:8.3f} s")
    print(f"dense / QR    {ratio:8.1f}x   target >= 20x  {'PASS' if ratio >= 20 else 'MISS'}")
    print(f"max rel diff  {err:8.1e}    target <= 1e-4 {'PASS' if err <= 1e-4 else 'MISS'}")


if __name__ == "__main__":
    main()
