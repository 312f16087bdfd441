"""Multiple-choice scoring speed on the embedded model, in two modes.

    python benchmarks/bench_eval.py [--questions 16] [--batch-size 8] [--threads 2]
    python benchmarks/bench_eval.py --vs-lm-eval [--subjects high_school_geography,...] [--limit N]
                                    [--batch-size 8] [--threads 2]

Default mode: MMLU 5-shot questions per second, our batched scorer vs one forward per choice. The
slow path, measured in the same run, runs the model once per (prompt + choice) and sums the
log-probabilities of the choice tokens. Prints both rates, the speedup (goal: >= 3x) and the
largest difference between the two paths' log-likelihoods.

--vs-lm-eval: the same items scored by `multilora.scoring.score_choices` and by EleutherAI
lm-evaluation-harness 0.4 (`HFLM` wrapped around the SAME loaded model object and tokenizer, both
with batch size `--batch-size` and `--threads` torch threads), for MMLU 5-shot (one row per
subject of `--subjects`, plus their total) and RTE 0-shot. lm-eval reads a local task YAML over a
local JSONL holding our fully rendered prompt per item (subject header and the 5 shots included),
offline; every request's context and continuation are checked to be byte-identical to our prompt
and choice. Per task it prints: items, requests (lm-eval's loglikelihood requests = the sum of
the items' choices), each side's requests/s, the ratio multilora / lm-eval, the target (MMLU
5-shot >= 2.5x, RTE 0-shot >= 1.3x) and PASS/MISS, and whether the answers (argmax of the summed
log-likelihood) agree item by item, with the largest |delta log-likelihood|.

What is timed: the model is loaded once, outside both timings, and both sides are warmed up on
the first items before any timing. Ours: `score_choices(model, tokenizer, items, batch_size)`
(tokenization + forwards; the items are built beforehand). lm-eval: the `loglikelihood` call(s)
of `lm_eval.evaluator.evaluate` (tokenization + forwards), timed by wrapping `HFLM.loglikelihood`;
lm-eval's task building (YAML, dataset, requests) and its metric aggregation are separated out
and not timed (the whole `evaluate` call's time is printed below the table for reference). The
tasks run one after the other, lm-eval first, then ours.
"""

from __future__ import annotations

import os

# nothing may reach the hub: set before transformers / datasets / lm_eval read these at import
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from multilora.data import MCItem, encode_prompt  # noqa: E402
from multilora.evaluate import score_choices  # noqa: E402
from multilora.models import load_model  # noqa: E402
from multilora.tasks import eval_items, load_items  # noqa: E402

SUBJECTS = ("anatomy", "astronomy", "marketing", "philosophy")  # default mode
LM_EVAL_SUBJECTS = ("high_school_geography", "marketing", "high_school_biology")  # --vs-lm-eval
MMLU_SHOTS = 5
TARGETS = {"mmlu": 2.5, "rte": 1.3}  # multilora / lm-eval requests per second, at least

LM_EVAL_TASK_YAML = """\
task: {task}
dataset_path: json                       # datasets' JSON builder: a local file, no hub
dataset_kwargs:
  data_files:
    test: {jsonl}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: prompt                      # a field name: our rendered prompt verbatim (ends in "Answer:")
doc_to_choice: choices                   # our choices without their leading space
doc_to_target: gold                      # index of the right choice
target_delimiter: " "                    # continuation = " " + choice = our choice exactly
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


# ----------------------------------------------------------------------------- default mode


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


def vs_one_forward(args: argparse.Namespace, model, tok) -> None:
    """The default mode: our scorer vs one forward per choice on MMLU 5-shot questions."""
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


# ----------------------------------------------------------------------------- --vs-lm-eval


def write_lm_eval_task(folder: Path, name: str, items: Sequence[MCItem], cache: Path) -> Path:
    """`folder`/`name`.jsonl (prompt, choices without their leading space, gold) and `folder`/`name`.yaml.

    lm-eval scores context = prompt, continuation = target_delimiter " " + choice: our prompt and
    our choice exactly, which is why every choice must start with one space.
    """
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / f"{name}.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for it in items:
            if not all(c.startswith(" ") for c in it.choices):
                raise SystemExit(f"{it.task}: a choice does not start with a space ({it.choices}); "
                                 "lm-eval's target_delimiter ' ' could not reproduce it")
            f.write(json.dumps({"prompt": it.prompt, "choices": [c[1:] for c in it.choices], "gold": it.gold}) + "\n")
    (folder / f"{name}.yaml").write_text(LM_EVAL_TASK_YAML.format(task=name, jsonl=json.dumps(str(jsonl)),
                                                                  cache=json.dumps(str(cache))))
    return folder


class TimedLoglikelihood:
    """Wraps an lm-eval LM's `loglikelihood` (instance attribute): adds each call's seconds and requests."""

    def __init__(self, lm: Any) -> None:
        self.inner, self.seconds, self.requests = lm.loglikelihood, 0.0, 0
        lm.loglikelihood = self

    def __call__(self, requests: list, *args: Any, **kwargs: Any) -> list:
        t0 = time.perf_counter()
        out = self.inner(requests, *args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.requests += len(requests)
        return out


def lm_eval_scores(lm: Any, items: Sequence[MCItem], workdir: Path, name: str, limit: int | None = None) -> dict:
    """lm-eval's per-item log-likelihoods of `items` (in order), its loglikelihood seconds and requests.

    The task is built outside the timing; `limit` (warm-up) scores only the first items.
    """
    from lm_eval.evaluator import evaluate as lm_eval_evaluate  # deferred: only --vs-lm-eval needs lm-eval
    from lm_eval.tasks import TaskManager, get_task_dict

    folder = write_lm_eval_task(workdir / name, name, items, workdir / "datasets_cache")
    task_dict = get_task_dict([name], TaskManager(include_path=str(folder), include_defaults=False))
    timer = TimedLoglikelihood(lm)
    try:
        t0 = time.perf_counter()
        out = lm_eval_evaluate(lm, task_dict, limit=limit, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
        total = time.perf_counter() - t0
    finally:
        lm.loglikelihood = timer.inner
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    for it, s in zip(items, samples):  # the comparison is only meaningful on identical text
        if [tuple(a) for a in s["arguments"]] != [(it.prompt, c) for c in it.choices]:
            raise SystemExit(f"{name} item {s['doc_id']}: lm-eval's requests differ from our prompt + choices")
    return {"ll": [[float(r[0]) for r in s["filtered_resps"]] for s in samples], "seconds": timer.seconds,
            "requests": timer.requests, "evaluate_seconds": total}


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value (the first on a tie, as numpy's argmax)."""
    return max(range(len(values)), key=lambda j: (values[j], -j))


def compare_task(lm: Any, model, tok, name: str, items: list[MCItem], batch_size: int, workdir: Path) -> dict:
    """Score `items` with lm-eval, then with ours; speeds, answer agreement and the largest |delta ll|."""
    theirs = lm_eval_scores(lm, items, workdir, name)
    t0 = time.perf_counter()
    ours = score_choices(model, tok, items, batch_size=batch_size)
    t_ours = time.perf_counter() - t0
    requests = sum(len(it.choices) for it in items)
    if theirs["requests"] != requests:
        raise SystemExit(f"{name}: lm-eval ran {theirs['requests']} requests, expected {requests}")
    disagree = sum(o["pred"] != argmax(t) for o, t in zip(ours, theirs["ll"]))
    dll = max(abs(a - b) for o, t in zip(ours, theirs["ll"]) for a, b in zip(o["ll"], t))
    return {"task": name, "items": len(items), "requests": requests, "t_lm_eval": theirs["seconds"],
            "t_ours": t_ours, "t_lm_eval_total": theirs["evaluate_seconds"], "disagree": disagree, "max_dll": dll,
            "acc_ours": sum(o["pred"] == o["gold"] for o in ours) / len(items),
            "acc_lm_eval": sum(argmax(t) == it.gold for t, it in zip(theirs["ll"], items)) / len(items)}


def total_row(name: str, rows: list[dict]) -> dict:
    """The sum of `rows` (requests, seconds, disagreements) as one row; the largest |delta ll|."""
    row = {"task": name, "max_dll": max(r["max_dll"] for r in rows)}
    for key in ("items", "requests", "t_lm_eval", "t_ours", "t_lm_eval_total", "disagree"):
        row[key] = sum(r[key] for r in rows)
    for key in ("acc_ours", "acc_lm_eval"):
        row[key] = sum(r[key] * r["items"] for r in rows) / row["items"]
    return row


def print_table(rows: list[dict]) -> None:
    """The side-by-side table: speeds, ratio against its target, answer agreement."""
    print("| task | items | requests | lm-eval req/s | multilora req/s | ratio | target | result | answers agree "
          "| max \\|Δll\\| |")
    print("|---|--:|--:|--:|--:|--:|--:|---|--:|--:|")
    for r in rows:
        ratio = r["t_lm_eval"] / r["t_ours"]
        target = TARGETS["rte" if r["task"].startswith("rte") else "mmlu"]
        print(f"| {r['task']} | {r['items']} | {r['requests']} | {r['requests'] / r['t_lm_eval']:.2f} "
              f"| {r['requests'] / r['t_ours']:.2f} | {ratio:.2f}x | >= {target:.1f}x | {'PASS' if ratio >= target else 'MISS'} "
              f"| {r['items'] - r['disagree']}/{r['items']} | {r['max_dll']:.1e} |")


def vs_lm_eval(args: argparse.Namespace, model, tok) -> None:
    """Ours vs lm-eval on the same MMLU 5-shot and RTE 0-shot items: speeds, agreement, a table."""
    import lm_eval  # deferred: only this mode needs lm-eval (the test extra)
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    subjects = [s.strip().removeprefix("mmlu_") for s in args.subjects.split(",") if s.strip()]
    tasks = {f"mmlu_{s}_{MMLU_SHOTS}shot": eval_items(f"mmlu_{s}", MMLU_SHOTS, args.limit) for s in subjects}
    tasks["rte_0shot"] = eval_items("rte", 0, args.limit)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device=str(model.device))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        workdir = Path(tmp)
        warm = next(iter(tasks.values()))[:2]
        lm_eval_scores(lm, warm, workdir, "warmup")  # warm-up, both sides, untimed
        score_choices(model, tok, warm, batch_size=args.batch_size)
        for name, items in tasks.items():
            rows.append(compare_task(lm, model, tok, name, items, args.batch_size, workdir))
            print(f"  {name}: {rows[-1]['items']} items done", flush=True)
    task_rows = list(rows)
    mmlu = [r for r in rows if r["task"].startswith("mmlu_")]
    if len(mmlu) > 1:
        rows.insert(len(mmlu), total_row(f"mmlu {MMLU_SHOTS}-shot, {len(mmlu)} subjects", mmlu))
    print()
    print(f"multilora score_choices vs lm-eval {lm_eval.__version__} HFLM on the same loaded model ({args.model}, "
          f"{str(next(model.parameters()).dtype).removeprefix('torch.')}, {model.device}); batch size "
          f"{args.batch_size}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
          + (f", limit {args.limit} items per task" if args.limit else ""))
    print_table(rows)
    print()
    print("requests = lm-eval loglikelihood requests (one per choice); req/s = requests / scoring seconds;")
    print("ratio = multilora req/s / lm-eval req/s; answers = argmax of the summed choice log-likelihood.")
    for r in rows:
        print(f"  {r['task']}: scoring s lm-eval {r['t_lm_eval']:.2f} (whole evaluate() {r['t_lm_eval_total']:.2f}), "
              f"multilora {r['t_ours']:.2f}; acc lm-eval {r['acc_lm_eval']:.4f}, multilora {r['acc_ours']:.4f}")
    disagree = sum(r["disagree"] for r in task_rows)
    worst = max(r["max_dll"] for r in task_rows)
    print(f"answers: {'all agree' if not disagree else f'{disagree} item(s) disagree'}; "
          f"max |ll multilora - ll lm-eval| {worst:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=16, help="default mode: MMLU questions to score")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--vs-lm-eval", action="store_true",
                   help="compare with lm-evaluation-harness on MMLU 5-shot and RTE 0-shot (see above)")
    p.add_argument("--subjects", default=",".join(LM_EVAL_SUBJECTS),
                   help="--vs-lm-eval: comma-separated MMLU subjects (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="--vs-lm-eval: at most this many items per task")
    args = p.parse_args()
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be a positive integer, got {args.limit}")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    if args.vs_lm_eval:
        vs_lm_eval(args, model, tok)
    else:
        vs_one_forward(args, model, tok)


if __name__ == "__main__":
    main()
