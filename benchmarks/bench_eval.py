"""MMLU 5-shot questions per second on the embedded model: our batched scorer vs one forward per choice.

    python benchmarks/bench_eval.py [--questions 16] [--batch-size 8] [--threads 2]

The slow path, measured in the same run, runs the model once per (prompt + choice) and sums the
log-probabilities of the choice tokens. Prints both rates, the speedup (goal: >= 3x) and the
largest difference between the two paths' log-likelihoods.
"""

from __future__ import annotations

import argparse
import time

import torch

from multilora.data import encode_prompt
from multilora.evaluate import score_choices
from multilora.models import load_model
from multilora.tasks import load_items

SUBJECTS = ("anatomy", "astronomy", "marketing", "philosophy")


@torch.inference_mode()
def slow_scores(model, tokenizer, items) -> list[list[float]]:
    """Log-likelihood of each choice by one unpadded forward per prompt + choice."""
    out = []
    for item in items:
        prompt = encode_prompt(item.prompt, tokenizer)
        lls = []
        for choice in item.choices:
            ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            logp = model(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)  # (T, V)
            lls.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)))
        out.append(lls)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    per = max(1, args.questions // len(SUBJECTS))
    items = [it for s in SUBJECTS for it in load_items(f"mmlu_{s}", k=5)[:per]]
    score_choices(model, tok, items[:1])  # warm-up
    t0 = time.perf_counter()
    fast = score_choices(model, tok, items, batch_size=args.batch_size)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = slow_scores(model, tok, items)
    t_slow = time.perf_counter() - t0
    diff = max(abs(a - b) for f, s in zip(fast, slow) for a, b in zip(f["ll"], s))
    print(f"MMLU 5-shot, {len(items)} questions, {args.model}, {args.threads} thread(s)")
    print(f"ours (batch {args.batch_size})       {len(items) / t_fast:6.2f} questions/s")
    print(f"one forward per choice {len(items) / t_slow:6.2f} questions/s")
    print(f"speedup                {t_slow / t_fast:6.1f}x   target >= 3x {'PASS' if t_slow / t_fast >= 3 else 'MISS'}")
    print(f"max |ll ours - ll slow| {diff:.1e}")


if __name__ == "__main__":
    main()
