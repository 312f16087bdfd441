"""The demo's training step, timed with and without the loop's speed-ups, printed as ratios.

    python benchmarks/bench_train.py [--model smollm2-135m] [--precision auto|bf16|no] [--steps 6]
                                     [--methods full,lora,multilora] [--rounds 2] [--no-allocator]

Each method is built exactly as `multilora demo` builds it (`demo.demo_config` + `plan.build_plan`,
all seven projections adapted, LoRA r = 24 vs MultiLoRA n = 3 r = 8) and takes the loop's step on
the demo's first batch: forward and response-token loss (under CPU bf16 autocast, as accelerate runs
it, unless --precision no), backward, gradient clipping at 1.0, AdamW, zero_grad. Two variants each:

- full fine-tuning: AdamW's foreach loop (torch's default) vs its fused kernel (`optim.fused`);
- LoRA and MultiLoRA under bf16: the frozen base in float32, cast by autocast at every call, vs stored
  in bf16 once (`models.store_frozen_in`, what `train` does under bf16). The same bits either way:
  the script checks that both variants give the same loss.

After one warm-up step each, the variants take turns for --steps rounds (so load from other programs
hits all alike) and the median step time is printed with the ratio to its baseline from this run.

A second table times each method as the demo trains it (fused AdamW; the frozen base stored in bf16
under bf16) with glibc malloc's defaults vs `allocator.keep_freed_memory` (what the `multilora`
command sets). That switch is process-wide and cannot be undone, so each side runs in a child process
of this script (MULTILORA_KEEP_FREED_MEMORY=0 / 1), the two taking turns for --rounds rounds of
--steps steps each; the median over all their steps is printed, with the ratio. `--no-allocator` skips it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

from multilora.allocator import ENV as KEEP_ENV
from multilora.allocator import keep_freed_memory
from multilora.data import collate
from multilora.demo import demo_config, train_precision
from multilora.loss import token_losses
from multilora.models import store_frozen_in
from multilora.plan import build_plan, make_optimizer, tokenize


def make_step(method: str, model: str, precision: str, fused: bool, stored: bool) -> tuple[Callable[[], float], int]:
    """(one training step of the demo's `method` returning its loss, tokens in the batch)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = demo_config(method, tmp, model=model, mixed_precision=precision)
    config.optim.fused = fused
    plan = build_plan(config)
    if stored:
        store_frozen_in(plan.model, torch.bfloat16)
    plan.model.train()
    optimizer = make_optimizer(plan)
    rows = []
    for _ in range(config.train.batch_size):
        task, i = next(plan.sampler)
        rows.append(tokenize(plan.train_examples[task][i], plan.tokenizer, config))
    batch = collate(rows, plan.tokenizer.pad_token_id, plan.tasks)
    params = [p for g in plan.param_groups for p in g["params"]]

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            sums, counts = token_losses(plan.model, batch, len(plan.tasks))
            loss = sums.sum() / counts.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, int(batch["attention_mask"].sum())


def child(method: str, model: str, precision: str, steps: int) -> None:
    """(in a child process) time `steps` steps of `method` as the demo trains it; print them as JSON."""
    applied = keep_freed_memory()  # a no-op under MULTILORA_KEEP_FREED_MEMORY=0
    step, _ = make_step(method, model, precision, True, method != "full" and precision == "bf16")
    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"applied": applied, "times": times}))


def allocator_table(methods: list[str], model: str, precision: str, steps: int, rounds: int) -> None:
    """Each method's step with glibc's defaults vs keep_freed_memory, in alternating child processes."""
    times: dict[tuple[str, str], list[float]] = {}
    for m in methods:
        for _ in range(rounds):
            for keep in ("0", "1"):
                out = subprocess.run([sys.executable, __file__, "--child", m, "--model", model, "--precision",
                                      precision, "--steps", str(steps)], capture_output=True, text=True, check=True,
                                     env={**os.environ, KEEP_ENV: keep})
                record = json.loads(out.stdout.strip().splitlines()[-1])
                label = "kept freed memory" if record["applied"] else "glibc defaults"
                times.setdefault((m, label), []).extend(record["times"])
    print(f"\nallocator: {rounds} child processes per side taking turns, {steps} steps each")
    print(f"{'method':<10} {'variant':<22} {'step s':>7} {'ratio':>6}")
    for m in methods:
        base = statistics.median(times.get((m, "glibc defaults"), [math.nan]))
        for label in ("glibc defaults", "kept freed memory"):
            t = statistics.median(times.get((m, label), [math.nan]))
            print(f"{m:<10} {label:<22} {t:>7.3f} {t / base:>5.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (embedded) or a local model folder")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "no"],
                   help="auto: bf16 autocast where this CPU computes bfloat16 natively (as the demo)")
    p.add_argument("--steps", type=int, default=6, help="timed rounds (one step per variant each)")
    p.add_argument("--methods", default="full,lora,multilora")
    p.add_argument("--rounds", type=int, default=2, help="child processes per side in the allocator table")
    p.add_argument("--no-allocator", action="store_true", help="skip the allocator table")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one side of the allocator table
    args = p.parse_args()
    precision = train_precision(args.precision)[0]
    if args.child:
        return child(args.child, args.model, precision, args.steps)

    # (method, label, fused AdamW, frozen base stored in bf16); the first of each method is its baseline
    variants = []
    for m in args.methods.split(","):
        if m != "full" and precision == "bf16":  # an adapter's frozen base: what store_frozen_in changes
            variants += [(m, "base cast every call", False, False), (m, "base stored in bf16", False, True)]
        else:
            variants += [(m, "foreach AdamW", False, False), (m, "fused AdamW", True, False)]
    steps, losses, times = {}, {}, {}
    for v in variants:
        steps[v], tokens = make_step(v[0], args.model, precision, v[2], v[3])
        losses[v] = [steps[v]()]  # warm-up: allocations, optimizer state
        times[v] = []
    print(f"model {args.model}, {'bf16 autocast' if precision == 'bf16' else 'float32'}, demo batch "
          f"(4 examples, {tokens} tokens), median of {args.steps} steps, {torch.get_num_threads()} threads")
    for _ in range(args.steps):
        for v in variants:
            t0 = time.perf_counter()
            losses[v].append(steps[v]())
            times[v].append(time.perf_counter() - t0)
    print(f"{'method':<10} {'variant':<22} {'step s':>7} {'ratio':>6}  first losses")
    for i, v in enumerate(variants):
        base = variants[i - 1] if i % 2 else v
        ratio = statistics.median(times[v]) / statistics.median(times[base])
        same = "" if v is base else ("  (same bits)" if losses[v] == losses[base] else
                                     f"  (max diff {max(abs(a - b) for a, b in zip(losses[v], losses[base])):.1e})")
        print(f"{v[0]:<10} {v[1]:<22} {statistics.median(times[v]):>7.3f} {ratio:>5.2f}x  "
              f"{', '.join(f'{x:.4f}' for x in losses[v][:3])}{same}")
    if not args.no_allocator:
        del steps  # free the in-process models before the children run
        allocator_table(args.methods.split(","), args.model, precision, args.steps, args.rounds)


if __name__ == "__main__":
    main()
