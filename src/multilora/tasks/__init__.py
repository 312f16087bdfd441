"""The task registry: every bundled task by name, with its splits, source and loaders.

    load_examples("rte")          # training examples of the task's train split
    load_items("mmlu", k=5)       # evaluation items of its eval split, 5-shot
    eval_items("mmlu", shots=5, limit=2)   # what `evaluate` scores: 2 per subject, 5-shot
    get_task("multirc").metrics(scores)    # the task's metrics of its item scores
    list_tasks()                  # name, rows per split, source (for `multilora tasks`)

Own tasks (YAML specs, `tasks.spec`) are registered by `resolve_tasks`/`use_tasks` (`tasks.entries`; loading a
config does it) and are then found by `get_task` like the bundled ones.
Loaders take the split and `root` (the data folder; default `multilora.data.data_root()`).
Each task also owns its evaluation rules: its metrics, what an evaluation `limit` counts (items,
MultiRC questions, items per MMLU subject) and whether it takes k-shot prompts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data import Example, MCItem, data_root
from ..errors import MultiLoRAError
from . import alpaca, mmlu, superglue
from .custom import load_custom, load_custom_items
from .metrics import accuracy, mmlu_metrics, multirc
from .entries import USER_TASKS, eval_task_names, mixture_weights, resolve_tasks, task_names, use_tasks

__all__ = ["TASKS", "TaskInfo", "PAPER_MIXTURE", "DEFAULT_EVAL_TASKS", "MMLU_SUBJECTS_SHARE", "get_task",
           "eval_limit", "eval_items", "list_tasks", "load_examples", "load_items", "load_custom", "load_custom_items",
           "USER_TASKS", "eval_task_names", "mixture_weights", "resolve_tasks", "task_names", "use_tasks"]

# The paper's mixture: instruction following, world knowledge (MMLU trains on val, evaluates on test), NLU
PAPER_MIXTURE = ("alpaca", "mmlu", "boolq", "rte", "wic")
DEFAULT_EVAL_TASKS = ("mmlu", "boolq", "rte", "wic")  # `multilora eval` without --tasks
MMLU_SUBJECTS_SHARE = 20  # MMLU's limit is per subject (57 of them): limit // 20 per subject gives ~limit items


def first_items(items: list[MCItem], limit: int) -> list[MCItem]:
    """`limit` counts items: the first `limit`."""
    return items[:limit]


def first_questions(items: list[MCItem], limit: int) -> list[MCItem]:
    """`limit` counts questions (item groups): every item of the first `limit`, so exact match stays meaningful."""
    keep = set(list(dict.fromkeys(it.group for it in items))[:limit])
    return [it for it in items if it.group in keep]


@dataclass(frozen=True)
class TaskInfo:
    """What the registry knows about a task: its splits, where it comes from, how to load and evaluate it."""

    name: str
    family: str  # "instruction", "knowledge" or "nlu" (the paper's three groups)
    splits: tuple[str, ...]
    train_split: str
    eval_split: str
    source: str  # relative to the data root
    examples: Callable[..., list[Example]] = field(repr=False)  # (split, root=None, **options)
    items: Callable[..., list[MCItem]] | None = field(repr=False)  # None: evaluated by perplexity
    note: str = ""
    metrics: Callable[[Sequence[dict]], dict] = field(default=accuracy, repr=False)  # item scores -> metrics
    limit_rule: Callable[[list[MCItem], int], list[MCItem]] = field(default=first_items, repr=False)
    limit_share: int = 1  # eval_limit: `limit // limit_share` (per part) gives about `limit` items in all
    few_shot: bool = False  # its items take k solved examples first (`shots`)
    parts: tuple[str, ...] = ()  # evaluated as these tasks, each limited on its own, scored together
    generation: bool = False  # also scored by exact match of greedy outputs (an own task's metric: exact_match)


def _registry() -> dict[str, TaskInfo]:
    tasks = {"alpaca": TaskInfo(
        "alpaca", "instruction", alpaca.SPLITS, "train", "val", alpaca.FILE, alpaca.examples, None,
        f"split by prompt hash: {alpaca.VAL_PERCENT}% val; evaluated by response perplexity")}
    mmlu_note = "train on val (0-shot), evaluate on test; k-shot prompts from dev"
    tasks["mmlu"] = TaskInfo("mmlu", "knowledge", mmlu.SPLITS, "val", "test", "mmlu/<split>/*.csv",
                             mmlu.examples, mmlu.items, mmlu_note, metrics=mmlu_metrics,
                             limit_share=MMLU_SUBJECTS_SHARE, few_shot=True,
                             parts=tuple(f"mmlu_{s}" for s in mmlu.SUBJECTS))  # `limit` counts per subject
    for subject in mmlu.SUBJECTS:
        name = f"mmlu_{subject}"
        tasks[name] = TaskInfo(name, "knowledge", mmlu.SPLITS, "val", "test",
                               f"mmlu/<split>/{subject}_<split>.csv", partial(mmlu.examples, subject=subject),
                               partial(mmlu.items, subject=subject), mmlu_note, few_shot=True)
    for name in superglue.TASKS:
        note = (f"split from val.jsonl by passage hash: {superglue.BOOLQ_VAL_PERCENT}% val"
                if name == "boolq" else "val is the SuperGLUE validation set")
        tasks[name] = TaskInfo(name, "nlu", superglue.SPLITS, "train", "val",
                               superglue.source(name, "<split>"), partial(superglue.examples, name),
                               partial(superglue.items, name), note)
    # MultiRC: one item per answer; `limit` counts whole questions, metrics add F1a and exact match
    tasks["multirc"] = replace(tasks["multirc"], metrics=multirc, limit_rule=first_questions)
    return tasks


TASKS: dict[str, TaskInfo] = _registry()


def get_task(name: str) -> TaskInfo:
    """The registry entry for `name`, or a MultiLoRAError listing the known tasks."""
    if not isinstance(name, str):
        raise MultiLoRAError(f"a task name must be a string such as 'rte', got {type(name).__name__} {name!r:.80}")
    if name in TASKS:
        return TASKS[name]
    if name in USER_TASKS:
        return USER_TASKS[name]
    close = difflib.get_close_matches(name, [*TASKS, *USER_TASKS], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    known = [n for n in TASKS if not n.startswith("mmlu_")] + ["mmlu_<subject>"]
    raise MultiLoRAError(f"unknown task {name!r}; {hint}known tasks: {', '.join(known)} "
                         "(`multilora tasks` lists the MMLU subjects)")


def eval_limit(task: str, limit: int) -> int:
    """The `evaluate` limit that gives `task` about `limit` items (MMLU's limit counts per subject)."""
    share = get_task(task).limit_share
    return max(1, limit // share) if share > 1 else limit


def eval_items(name: str, shots: int = 0, limit: int | None = None, root: str | Path | None = None) -> list[MCItem]:
    """The items `evaluate` scores: the eval split (k-shot for tasks that take it), cut by the task's limit rule."""
    info = get_task(name)
    if info.parts:
        return [it for part in info.parts for it in eval_items(part, shots, limit, root)]
    items = load_items(name, root=root, **({"k": shots} if info.few_shot else {}))
    return items if limit is None else info.limit_rule(items, limit)


def load_examples(name: str, split: str | None = None, root: str | Path | None = None,
                  **options: Any) -> list[Example]:
    """Training examples of a task (default split: its train split); never empty."""
    info = get_task(name)
    out = info.examples(split or info.train_split, root=root, **options)
    if not out:
        raise MultiLoRAError(f"task {name!r} split {split or info.train_split!r} has no examples; check its data "
                             f"({_source(info, split or info.train_split, root, options)})")
    return out


def load_items(name: str, split: str | None = None, root: str | Path | None = None,
               **options: Any) -> list[MCItem]:
    """Multiple-choice items of a task (default split: its eval split); never empty."""
    info = get_task(name)
    if info.items is None:
        raise MultiLoRAError(f"task {name!r} has no multiple-choice items; it is evaluated by response perplexity")
    out = info.items(split or info.eval_split, root=root, **options)
    if not out:
        raise MultiLoRAError(f"task {name!r} split {split or info.eval_split!r} has no items; check its data "
                             f"({_source(info, split or info.eval_split, root, options)})")
    return out


def _source(info: TaskInfo, split: str, root: str | Path | None, options: dict) -> Path:
    """The file (or pattern) a task's split was read from, for messages."""
    if options.get("path") is not None:
        return Path(options["path"])
    return Path(root if root is not None else data_root()) / info.source.replace("<split>", split)


def list_tasks(root: str | Path | None = None, subjects: bool = False) -> list[dict]:
    """One row per task: name, family, rows per split, source, note (MMLU subjects only if `subjects`)."""
    rows = []
    for info in TASKS.values():
        if info.name.startswith("mmlu_") and not subjects:
            continue
        counts = {split: len(info.examples(split, root=root)) for split in info.splits}
        rows.append({"name": info.name, "family": info.family, "rows": counts,
                     "source": info.source, "note": info.note})
    return rows
