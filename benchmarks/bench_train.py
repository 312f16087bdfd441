"""End-to-end training throughput: tokens/s of full fine-tuning, LoRA and MultiLoRA, printed as ratios to full.

    python benchmarks/bench_train.py [--model smollm2-135m] [--steps 3] [--batch-size 4] [--max-len 128]

Each method trains on the same fixed batch (demo mixture, response-only loss) with the loop's own
loss function and AdamW: forward, backward and optimizer step. After one warm-up step each, the
methods take turns for `--steps` rounds and each keeps its fastest step (robust to other load).
LoRA has the same total rank as MultiLoRA (r = n x r). All numbers come from this one run.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch


def setup(method: str, args: argparse.Namespace, rows: list[dict], tasks: list[str]) -> tuple[Callable[[], None], int]:
    """(one optimizer step of `method` on the fixed batch, tokens in the batch)."""
    from multilora.data import collate
    from multilora.inject import MultiLoRAConfig, inject
    from multilora.models import load_model
    from multilora.loss import token_losses
    from multilora.plan import param_groups

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "lora":
        inject(model, MultiLoRAConfig.lora(r=args.n * args.r, targets=targets))
    else:
        inject(model, MultiLoRAConfig(n=args.n, r=args.r, targets=targets))
    model.train()
    opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                             for g in param_groups(model, 0.0)], lr=1e-5)
    batch = collate(rows, tok.pad_token_id, tasks)

    def step() -> None:
        sums, counts = token_losses(model, batch, len(tasks))
        (sums.sum() / counts.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, optimizer state)
    return step, int(batch["attention_mask"].sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (embedded) or a local model folder")
    p.add_argument("--steps", type=int, default=3, help="timed rounds (one step per method each)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--n", type=int, default=3, help="MultiLoRA modules")
    p.add_argument("--r", type=int, default=8, help="rank per module (LoRA gets n x r)")
    p.add_argument("--methods", default="full,lora,multilora")
    args = p.parse_args()

    from multilora.data import MixtureSampler, tokenize_example
    from multilora.models import DEFAULT_MODEL, embedded_tokenizer, load_model
    from multilora.tasks import PAPER_MIXTURE, load_examples

    tasks = list(PAPER_MIXTURE)
    examples = {t: load_examples(t) for t in tasks}
    sampler = MixtureSampler({t: len(v) for t, v in examples.items()}, "uniform", seed=0)
    tok = embedded_tokenizer() if args.model == DEFAULT_MODEL else load_model(args.model)[1]
    rows = []
    while len(rows) < args.batch_size:
        task, i = next(sampler)
        try:
            rows.append(tokenize_example(examples[task][i], tok, args.max_len))
        except Exception:  # a response longer than max_len: take another example
            continue
    n_tokens = sum(len(r["input_ids"]) for r in rows)
    print(f"model {args.model}, batch {args.batch_size} examples / {n_tokens} tokens, {args.steps} timed steps, "
          f"{torch.get_num_threads()} threads; adapters on q/k/v/o, MultiLoRA n={args.n} r={args.r}, "
          f"LoRA r={args.n * args.r}")
    methods = args.methods.split(",")
    steps = {m: setup(m, args, rows, tasks) for m in methods}
    best = {m: float("inf") for m in methods}
    for _ in range(args.steps):  # round-robin, best time per method: robust to load from other processes
        for m in methods:
            t0 = time.perf_counter()
            steps[m][0]()
            best[m] = min(best[m], time.perf_counter() - t0)
    results = {m: steps[m][1] / best[m] for m in methods}
    base = results.get("full")
    print(f"{'method':<10} {'tokens/s':>10} {'vs full':>8}")
    for m, tps in results.items():
        ratio = f"{tps / base:.2f}x" if base else "-"
        print(f"{m:<10} {tps:>10.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
