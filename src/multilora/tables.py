"""Reading and showing evaluation results: the summary rows, terminal tables, eval.json side by side.

    rows = summary_rows(result)            # (task, metric, value, chance, n), as the table shows them
    rich.print(result_table(result))       # one result
    rich.print(compare(["runs/a", "runs/b/eval.json"]))   # eval.json files (or folders holding one)

The rows follow what a task's result holds: accuracy for every multiple-choice task, plus MMLU's
macro average and categories, plus MultiRC's F1a and exact match; perplexity for `alpaca`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from rich.table import Table

from .errors import MultiLoRAError
from .io import read_json_object
from .tasks import TASKS

EVAL_NAME = "eval.json"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return "" if value is None else str(value)


def summary_rows(result: dict) -> list[tuple[str, str, Any, Any, Any]]:
    """(task, metric, value, chance, n) rows of an evaluate() result, as shown in the terminal table."""
    rows = []
    for task, r in result["tasks"].items():
        if r["kind"] == "perplexity":
            rows.append((task, "perplexity", r["perplexity"], r["chance"], r["n"]))
            rows.append((task, "nll/token", r["nll_per_token"], math.log(r["chance"]), r["tokens"]))
            if "exact_match" in r:  # an own short-answer task (metric: exact_match)
                rows.append((task, "exact_match", r["exact_match"], r["exact_match_chance"], r["n"]))
            continue
        if "categories" in r:  # MMLU: micro and macro over subjects, each category
            rows.append((task, "acc (micro)", r["acc"], r["chance"], r["n"]))
            rows.append((task, "acc (macro)", r["acc_macro"], r["chance"], len(r["subjects"])))
            rows.append((task, "acc_norm", r["acc_norm"], r["chance"], r["n"]))
            for cat, c in r["categories"].items():
                rows.append((f"mmlu/{cat}", "acc", c["acc"], c["chance"], c["n"]))
            continue
        rows.append((task, "acc", r["acc"], r["chance"], r["n"]))
        rows.append((task, "acc_norm", r["acc_norm"], r["chance"], r["n"]))
        if "f1a" in r:  # MultiRC: F1 over answers, exact match per question
            rows.append((task, "f1a", r["f1a"], r["f1a_chance"], r["n"]))
            rows.append((task, "em", r["em"], r["em_chance"], r["questions"]))
    return rows


def result_table(result: dict, title: str | None = None) -> Table:
    """A rich Table of one result: task, metric, value, chance, n."""
    ident = result.get("identity", {})
    name = ident.get("target") or ident.get("base_model") or ident.get("model_class", "model")
    few_shot = [r.get("shots", 0) for task, r in result["tasks"].items() if task in TASKS and TASKS[task].few_shot]
    shots = f" ({few_shot[0]}-shot MMLU)" if few_shot else ""
    table = Table(title=title or f"eval: {name}{shots}")
    for name, justify in (("task", "left"), ("metric", "left"), ("value", "right"), ("chance", "right"),
                          ("n", "right")):
        table.add_column(name, justify=justify)
    for task, metric, value, chance, n in summary_rows(result):
        table.add_row(task, metric, _fmt(value), _fmt(chance), _fmt(n))
    return table


def read_result(path: str | Path) -> dict:
    """An eval.json (or a folder holding one), checked to be an evaluate() result.

    Only `tasks` is required: the demo wrote {"tasks", "identity", "limit"} before it wrote whole
    evaluate() results, and those files must still compare.
    """
    path = Path(path)
    file = path / EVAL_NAME if path.is_dir() else path
    if not file.is_file():
        raise MultiLoRAError(f"{file} not found; run `multilora eval {path}` first, or pass an eval.json file")
    data = read_json_object(file)
    if not isinstance(data.get("tasks"), dict):
        raise MultiLoRAError(f"{file} is not a multilora eval result (no 'tasks'); pass an eval.json")
    bad = [task for task, r in data["tasks"].items() if not (isinstance(r, dict) and isinstance(r.get("kind"), str))]
    if bad:
        raise MultiLoRAError(f"{file}: tasks {', '.join(map(repr, bad[:5]))} are not results with a 'kind'; "
                             "re-run multilora eval")
    try:
        summary_rows(data)
    except (KeyError, TypeError) as e:
        raise MultiLoRAError(f"{file} is not a complete multilora eval result ({e!r}); re-run multilora eval") from None
    return data


def compare(paths: Sequence[str | Path]) -> Table:
    """A rich Table with one column per eval.json (or folder holding one), rows (task, metric), plus chance."""
    if not paths:
        raise MultiLoRAError("--compare needs at least one run folder or eval.json")
    results = [read_result(p) for p in paths]
    table = Table(title="eval comparison")
    table.add_column("task")
    table.add_column("metric")
    for label in column_labels(paths):
        table.add_column(label, justify="right")
    table.add_column("chance", justify="right")
    cells: dict[tuple[str, str], list[Any]] = {}
    chance: dict[tuple[str, str], Any] = {}
    for k, res in enumerate(results):
        for task, metric, value, ch, _ in summary_rows(res):
            cells.setdefault((task, metric), [None] * len(results))[k] = value
            chance.setdefault((task, metric), ch)
    for (task, metric), values in cells.items():
        table.add_row(task, metric, *["-" if v is None else _fmt(v) for v in values], _fmt(chance[(task, metric)]))
    return table


def generations_table(results: Sequence[dict], labels: Sequence[str]) -> Table | None:
    """A rich Table of greedy outputs side by side (one column per result) for the prompts all share; None if none."""
    outputs = [{g["prompt"]: g["output"] for g in r.get("generations", [])} for r in results]
    prompts = [g["prompt"] for g in results[0].get("generations", []) if all(g["prompt"] in o for o in outputs)]
    if not prompts:
        return None
    table = Table(title="greedy generations (held-out Alpaca prompts)", show_lines=True)
    table.add_column("prompt", ratio=1)
    for label in labels:
        table.add_column(label, ratio=1)
    for prompt in prompts:
        table.add_row(prompt.strip(), *[o[prompt].strip() for o in outputs])
    return table


def column_labels(paths: Sequence[str | Path]) -> list[str]:
    """Column labels for eval results: the run folder's name, or the file's."""
    return [Path(p).parent.name if Path(p).name == EVAL_NAME else Path(p).name for p in paths]


def flat_metrics(result: dict) -> dict[str, float]:
    """The headline numbers of an evaluate() result as {"task/metric": value} (for logging)."""
    return {f"{task}/{metric}".replace(" ", "_"): float(value)
            for task, metric, value, _, _ in summary_rows(result)}
