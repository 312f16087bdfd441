"""Evaluation: the `evaluate()` API, eval.json, the trainer's periodic evaluation and `multilora eval`.

    model, tokenizer, identity = resolve_target("runs/demo")       # run/adapter/PEFT/model folder
    result = evaluate(model, tokenizer, ["mmlu", "boolq", "rte"], shots=5, limit=20, identity=identity)
    write_json_atomic("runs/demo/eval.json", result);  rich.print(result_table(result))
    compare(["runs/a", "runs/b"])                                   # eval.json files side by side

Multiple-choice tasks are scored by log-likelihood (`scoring.score_choices`), `alpaca` by the
perplexity of its held-out responses (`scoring.response_nll`); own tasks (YAML specs, `tasks.spec`)
the same way by format, and `metric: exact_match` adds greedy outputs against the responses. Each
task owns its rules in the registry (`tasks.TASKS`): its metrics (accuracy with chance for all; MultiRC adds F1a and exact
match, MMLU subjects, categories and the macro average), what `limit` counts and whether `shots`
applies. Loading what to evaluate lives in `targets`, tables and --compare in `tables`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from rich.console import Console
from torch import nn

from ._version import __version__
from .data import render
from .errors import MultiLoRAError
from .io import check_writable_dir, write_json_atomic
from .paired import check_paired_args, print_paired
from .scoring import generate_samples, max_length, response_nll, score_choices
from .tables import (EVAL_NAME, column_labels, compare, flat_metrics, generations_table, read_result, result_table,
                     summary_rows)
from .targets import model_identity, resolve_target
from .tasks import DEFAULT_EVAL_TASKS, eval_items, eval_task_names, get_task, load_examples
from .tasks.metrics import accuracy, exact_match, mmlu_metrics, multirc_metrics
from .tasks.mmlu import CATEGORY as MMLU_CATEGORY
from .tasks.mmlu import MAX_SHOTS

__all__ = ["EVAL_NAME", "EVAL_PRECISIONS", "MMLU_CATEGORY", "accuracy", "add_eval_arguments", "autocast", "compare",
           "evaluate", "flat_metrics", "generate_samples", "generations_table", "make_eval_fn", "max_length",
           "mmlu_metrics", "model_identity", "multirc_metrics", "read_result", "resolve_target", "response_nll",
           "result_table", "run_eval_cli", "score_choices", "summary_rows"]


EVAL_PRECISIONS = ("no", "bf16")


def _evaluate_task(model: nn.Module, tokenizer: Any, task: str, shots: int, limit: int | None, batch_size: int,
                   chat: bool, root: Any, progress: bool, save_items: bool) -> dict:
    """One task's result: perplexity for a task without items, else its multiple-choice metrics."""
    info = get_task(task)
    if info.items is None:  # evaluated by response perplexity
        examples = load_examples(task, split=info.eval_split, root=root)[:limit]
        res = {"kind": "perplexity", "split": info.eval_split, "n": len(examples),
               **response_nll(model, tokenizer, examples, batch_size, chat, progress, label=task, per_item=save_items),
               "chance": float(len(tokenizer)),  # a uniform guess over the vocabulary
               "prompt_example": render(examples[0].prompt, tokenizer, chat)}
        if save_items:  # an id per example: --compare pairs the same examples across results
            for record, ex in zip(res["items"], examples):
                record["id"] = item_id(ex.prompt, [ex.response])
        if info.generation:  # an own short-answer task: greedy outputs against the responses
            res |= _exact_match(model, tokenizer, examples, chat, save_items)
        return res
    items = eval_items(task, shots, limit, root)
    scores = score_choices(model, tokenizer, items, batch_size, chat, progress, label=task)
    res = {"kind": "multiple_choice", "split": info.eval_split, "shots": shots if info.few_shot else 0,
           **info.metrics(scores), "prompt_example": render(items[0].prompt, tokenizer, chat),
           "choices": items[0].choices}
    if save_items:
        res["items"] = [{"id": item_id(it.prompt, it.choices), **score} for it, score in zip(items, scores)]
    return res


def item_id(prompt: str, answers: Sequence[str]) -> str:
    """A short stable id of an item (its prompt and choices, or prompt and response): pairs items across results."""
    return hashlib.sha1(json.dumps([prompt, list(answers)]).encode("utf-8")).hexdigest()[:16]


def _exact_match(model: nn.Module, tokenizer: Any, examples: list, chat: bool, save_items: bool) -> dict:
    """exact_match of greedy outputs (as long as the longest answer, + 2 tokens) against the responses."""
    longest = max(len(tokenizer(ex.response, add_special_tokens=False)["input_ids"]) for ex in examples)
    by_chat: dict[bool, list[int]] = {}  # a chat: true task's prompts go through the chat template
    for i, ex in enumerate(examples):
        by_chat.setdefault(chat or ex.messages is not None, []).append(i)
    outputs = [""] * len(examples)
    for use_chat, idx in by_chat.items():
        samples = generate_samples(model, tokenizer, [examples[i].prompt for i in idx], longest + 2, use_chat)
        for i, sample in zip(idx, samples):
            outputs[i] = sample["output"]
    res = {"exact_match": exact_match(outputs, [ex.response for ex in examples]), "exact_match_chance": 0.0}
    if save_items:
        res["outputs"] = [{"output": out, "answer": ex.response} for out, ex in zip(outputs, examples)]
    return res


def evaluate(model: nn.Module, tokenizer: Any, tasks: Sequence[str], shots: int = 0, limit: int | None = None,
             batch_size: int = 8, chat: bool = False, identity: dict | None = None, root: Any = None,
             progress: bool = False, generate: int = 0, max_new_tokens: int = 64,
             save_items: bool = False, precision: str = "no") -> dict:
    """Evaluate `tasks` (multiple choice, or `alpaca` perplexity); a JSON-ready dict, no printing.

    `shots` applies to MMLU (dev examples); `limit` caps items (per MMLU subject, per MultiRC question);
    `generate` > 0 adds greedy outputs for that many held-out Alpaca prompts (compare them across runs);
    `save_items` keeps every item's scores (id, ll, ll_norm, pred, pred_norm, gold, task, group; for a
    perplexity task id, nll, tokens), so results can be compared item by item later (`tables.compare`);
    `progress` shows each task's progress on stderr (a bar on a terminal, else a line every ~10 s);
    `precision` 'bf16' scores under bfloat16 autocast with the logits in float32 (EVAL_PRECISIONS; 'no': the
    model's own dtype, float32 for the embedded model, which is what matches lm-eval item by item).
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise MultiLoRAError(f"no tasks to evaluate; name at least one, e.g. --tasks {','.join(DEFAULT_EVAL_TASKS)}")
    for task in tasks:
        get_task(task)  # unknown names fail before any work, listing the known tasks
    if limit is not None and not (isinstance(limit, int) and limit >= 1):
        raise MultiLoRAError(f"limit must be a positive integer, got {limit!r}")
    started = time.time()
    results: dict[str, dict] = {}
    generations = []
    with autocast(model, precision):
        for task in tasks:
            t0 = time.time()
            results[task] = _evaluate_task(model, tokenizer, task, shots, limit, batch_size, chat, root, progress,
                                           save_items)
            results[task]["seconds"] = round(time.time() - t0, 3)
        if generate:
            prompts = [ex.prompt for ex in load_examples("alpaca", split=get_task("alpaca").eval_split, root=root)]
            generations = generate_samples(model, tokenizer, prompts[:generate], max_new_tokens, chat)
    return {
        "multilora_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "identity": identity if identity is not None else model_identity(model),
        "settings": {"tasks": list(tasks), "shots": shots, "limit": limit, "batch_size": batch_size, "chat": chat,
                     "generate": generate, "max_new_tokens": max_new_tokens,
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     **({"precision": precision} if precision != "no" else {})},
        "seconds": round(time.time() - started, 3),
        "tasks": results,
        **({"generations": generations} if generations else {}),
    }


@contextlib.contextmanager
def autocast(model: nn.Module, precision: str) -> Iterator[None]:
    """bfloat16 autocast on the model's device for precision 'bf16', with the output head (the logits) in
    float32; nothing for 'no'.

    The head stays float32 because a choice's score is a difference of large logits: in bf16 they carry
    an absolute error of a few hundredths, the size of a near tie (on RTE, bf16 logits changed 20 of 277
    answers of a fine-tuned model against float32, a float32 head 5).
    """
    if precision not in EVAL_PRECISIONS:
        raise MultiLoRAError(f"evaluation precision must be one of {', '.join(EVAL_PRECISIONS)}, got {precision!r}")
    if precision == "no":
        yield
        return
    device_type = next(model.parameters()).device.type
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    plain_head = type(head) is nn.Linear and "forward" not in vars(head)  # an adapted or quantized head keeps bf16

    def float32_head(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device_type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return nn.functional.linear(x.float(), head.weight.float(), bias)

    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        if plain_head:
            head.forward = float32_head  # this instance only, for the evaluation
        try:
            yield
        finally:
            if plain_head:
                del head.forward


def make_eval_fn(tokenizer: Any, tasks: Sequence[str], shots: int = 0, limit: int | None = 50,
                 batch_size: int = 8, chat: bool = False) -> Callable[[nn.Module], dict[str, float]]:
    """An `eval_fn(model) -> {"task/metric": value}` for the trainer's periodic evaluation."""
    for task in tasks:
        get_task(task)  # fail at start-up, not at the first evaluation

    def eval_fn(model: nn.Module) -> dict[str, float]:
        return flat_metrics(evaluate(model, tokenizer, tasks, shots, limit, batch_size, chat))

    return eval_fn


# ----------------------------------------------------------------------------- CLI


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `multilora eval` (TARGET or --compare)."""
    p.add_argument("target", nargs="?", default=None,
                   help="run or adapter folder, PEFT adapter folder, model folder, or 'smollm2-135m'")
    p.add_argument("--tasks", default=",".join(DEFAULT_EVAL_TASKS),
                   help=f"comma-separated tasks and YAML task files (default: {','.join(DEFAULT_EVAL_TASKS)}); "
                   "`multilora tasks` lists the bundled ones; a run's own tasks are known by name")
    p.add_argument("--shots", type=int, default=0, help="MMLU k-shot from the dev split, 0..5 (default: 0)")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N items per task (per MMLU subject, per MultiRC question)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (default: 8)")
    p.add_argument("--model", default=None, help="base model for an adapter (default: the one it records)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--precision", choices=list(EVAL_PRECISIONS), default="no",
                   help="'bf16': score under bfloat16 autocast, logits in float32 (about 2.5x faster on a CPU with "
                   "native bf16 or a GPU; a near-tied answer can flip); 'no' (default): the model's dtype, what "
                   "matches lm-eval")
    p.add_argument("--out", default=None, help="where to write eval.json (default: TARGET/eval.json, "
                   "or ./eval.json for a model name)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also record greedy outputs for N held-out Alpaca prompts (shown by --compare side by side)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generated output (default: 64)")
    p.add_argument("--save-items", action="store_true",
                   help="keep every item's scores in eval.json (what --compare's paired statistics need)")
    p.add_argument("--compare", nargs="+", metavar="RUN", default=None,
                   help="print eval.json files (or folders holding one) side by side instead of evaluating; "
                   "results saved with --save-items also get paired differences vs the baseline with 95%% "
                   "intervals, McNemar p and a verdict (folders named <x>-seed<k> pool into seed groups)")
    p.add_argument("--baseline", default=None, metavar="LABEL",
                   help="with --compare: the run (column label) or seed group the others are compared with "
                   "(default: the first)")
    p.add_argument("--forest", default=None, metavar="PNG",
                   help="with --compare: also write the paired differences as a forest plot to PNG")


def _check_out(out: Path) -> None:
    """Refuse an eval.json path that cannot be written (a folder, below a file, no permission)."""
    if out.is_dir():
        raise MultiLoRAError(f"--out {out} is a folder; name a file such as {out / EVAL_NAME}")
    if out.parent.exists() and not out.parent.is_dir():
        raise MultiLoRAError(f"cannot write {out}: {out.parent} is a file, not a folder; choose another path")
    check_writable_dir(out.parent, "folder of --out")


def run_eval_cli(args: argparse.Namespace) -> None:
    """`multilora eval`: evaluate TARGET, print the table, write eval.json; or --compare results."""
    console = Console()
    if not args.compare and (args.forest is not None or args.baseline is not None):
        raise MultiLoRAError("--forest and --baseline go with --compare RUN...; add --compare")
    if args.compare:
        if args.target is not None:
            raise MultiLoRAError("give either TARGET or --compare RUN..., not both")
        check_paired_args(args.compare, args.baseline, args.forest)  # before any table is printed
        console.print(compare(args.compare))
        gens = generations_table([read_result(p) for p in args.compare], column_labels(args.compare))
        if gens is not None:
            console.print(gens)
        print_paired(console, args.compare, args.baseline, args.forest)
        return
    if args.target is None:
        raise MultiLoRAError("name what to evaluate: multilora eval TARGET --tasks ... (or --compare RUN...)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise MultiLoRAError(f"--tasks {args.tasks!r} names no task; e.g. --tasks {','.join(DEFAULT_EVAL_TASKS)}")
    tasks = eval_task_names(args.tasks, args.target)  # task files read, own tasks (also the run's) registered
    for task in tasks:
        get_task(task)  # fail on a typo before loading a model
    for name, value, low in (("--generate", args.generate, 0), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--shots", args.shots, 0),
                             ("--limit", 1 if args.limit is None else args.limit, 1)):
        if value < low:
            raise MultiLoRAError(f"{name} must be at least {low}, got {value}")
    if args.shots > MAX_SHOTS:
        raise MultiLoRAError(f"--shots must be 0..{MAX_SHOTS} (MMLU's dev split has {MAX_SHOTS} questions per "
                             f"subject), got {args.shots}")
    out = Path(args.out) if args.out else (Path(args.target) / EVAL_NAME if Path(args.target).is_dir()
                                           else Path(EVAL_NAME))
    _check_out(out)  # now, not after the whole evaluation
    model, tokenizer, identity = resolve_target(args.target, args.model)
    result = evaluate(model, tokenizer, tasks, shots=args.shots, limit=args.limit, batch_size=args.batch_size,
                      chat=args.chat, identity=identity, progress=True, generate=args.generate,
                      max_new_tokens=args.max_new_tokens, save_items=args.save_items, precision=args.precision)
    write_json_atomic(out, result)
    console.print(result_table(result))
    gens = generations_table([result], [identity.get("target", "output")])
    if gens is not None:
        console.print(gens)
    console.print(f"wrote {out} ({result['seconds']:.1f} s)")
