"""Paired comparison of eval results item by item: rows of differences with intervals, a table, a forest plot.

    groups = {"lora": [eval_seed0, eval_seed1], "multilora": [eval_seed0, eval_seed1]}   # eval.json dicts
    rows = compare_paired(groups)                  # every group vs the first, per task (+ "overall")
    rich.print(paired_table(rows, "paired differences vs lora"));  forest_png(rows, "forest.png", "...")

The results must have been saved with per-item scores (`multilora eval --save-items`, the sweep and the
demo do it). Items are matched by their id (a hash of prompt and choices), so two results scored on
different subsets are compared on the items they share; seeds are paired by position (seed k of one
group with seed k of the other). The numbers come from `stats`: a paired bootstrap over items (and seeds),
an exact McNemar test per seed for accuracy, and a verdict from the interval.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from .errors import MultiLoRAError
from .io import atomic_path, check_writable_dir
from .stats import Interval, mcnemar_p, mean_paired_bootstrap, paired_bootstrap, verdict
from .tables import column_labels, read_result

OVERALL = "overall"  # the task name of the row averaging the multiple-choice tasks
_SEED = re.compile(r"^(?P<name>.*?)(?:-seed|__seed=|(?<![^_])seed=)(?P<seed>\d+)$")
COLOURS = {"better": "tab:green", "worse": "tab:red", "can't tell": "tab:gray"}


def item_values(task_result: dict) -> tuple[list[str], np.ndarray, np.ndarray | None, str, bool]:
    """(item ids, values (N,), weights (N,) or None, metric, higher_is_better) of one task's result.

    Multiple choice: values = correct (1.0 / 0.0), metric "acc"; perplexity: values = each example's nll
    per token, weights = its tokens (so the weighted mean is summed nll / summed tokens, the task's
    nll/token), metric "nll/token" (lower is better). An item saved before items
    had ids gets the id "" (such results pair by position only). No items: a MultiLoRAError.
    """
    items = task_result.get("items")
    if not isinstance(items, list) or not items:
        raise MultiLoRAError("this result has no per-item scores; re-run `multilora eval ... --save-items` "
                             "(paired statistics compare runs item by item)")
    ids = [str(it.get("id", "")) for it in items]
    try:
        if task_result.get("kind") == "perplexity":
            nll = np.array([float(it["nll"]) for it in items])  # summed over the example's response tokens
            tokens = np.array([float(it["tokens"]) for it in items])
            per_token = np.divide(nll, tokens, out=np.zeros_like(nll), where=tokens > 0)  # 0 tokens: weight 0
            return ids, per_token, tokens, "nll/token", False
        return ids, np.array([float(it["pred"] == it["gold"]) for it in items]), None, "acc", True
    except (KeyError, TypeError) as e:
        raise MultiLoRAError(f"an item lacks {e}: not a multilora eval result's items; re-run "
                             "`multilora eval ... --save-items`") from None


def _check_values(task_result: dict) -> list:
    """What must agree between two results for the same item: the gold answer, or the scored tokens."""
    key = "tokens" if task_result.get("kind") == "perplexity" else "gold"
    return [it.get(key) for it in task_result["items"]]


def _keyed(ids: list[str]) -> list[tuple[str, int]]:
    """(id, occurrence) per item: an item that appears twice (a duplicate in the data) pairs with its twin."""
    seen: Counter = Counter()
    out = []
    for i in ids:
        out.append((i, seen[i]))
        seen[i] += 1
    return out


def _task_pairs(task: str, base: str, run: str, base_results: list[dict], run_results: list[dict]) -> dict[str, Any]:
    """The aligned (S, n) values of one task in both groups: {"a", "b", "weights", "metric", "higher", "note"}."""
    results = base_results + run_results
    for label, group in ((base, base_results), (run, run_results)):
        if any(task not in r["tasks"] for r in group):
            raise MultiLoRAError(f"task {task!r} is in {run if label == base else base} but not in {label}; "
                                 f"compare results evaluated on the same tasks (or re-run `multilora eval` on {label})")
    task_results = [r["tasks"][task] for r in results]
    try:
        parsed = [item_values(t) for t in task_results]
    except MultiLoRAError as e:
        raise MultiLoRAError(f"{task} ({base} vs {run}): {e}") from None
    kinds = {p[3] for p in parsed}
    if len(kinds) > 1:
        raise MultiLoRAError(f"task {task!r} is scored as {' and '.join(sorted(kinds))} in {base} and {run}; "
                             "compare results of the same task definition")
    metric, higher = parsed[0][3], parsed[0][4]
    checks = [_check_values(t) for t in task_results]
    mismatch = (f"{task}: {base} and {run} were scored on different items; evaluate both on the same tasks, "
                "--shots and --limit (with `--save-items`)")
    if any("" in p[0] for p in parsed):  # items saved without ids: pair by position only when all agree
        if len({len(p[0]) for p in parsed}) > 1 or any(c != checks[0] for c in checks):
            raise MultiLoRAError(mismatch + " (older results without item ids pair by position only when their "
                                 "items and answers agree)")
        index = [list(range(len(parsed[0][0])))] * len(parsed)
        note = "paired by position (results without item ids)"
    else:
        keys = [_keyed(p[0]) for p in parsed]
        shared = set(keys[0]).intersection(*keys[1:])
        if not shared:
            raise MultiLoRAError(mismatch + " (no item in common)")
        order = [k for k in keys[0] if k in shared]
        positions = [{key: i for i, key in enumerate(k)} for k in keys]
        index = [[pos[key] for key in order] for pos in positions]
        s = len(base_results)
        sizes = [" / ".join(map(str, sorted({len(k) for k in part}))) for part in (keys[:s], keys[s:])]
        note = "" if {len(k) for k in keys} == {len(order)} else (
            f"{len(order)} shared items compared ({base} has {sizes[0]}, {run} {sizes[1]})")
        for c, idx in zip(checks, index):
            if any(c[i] != checks[0][j] for i, j in zip(idx, index[0])):
                what = "token counts (different tokenizers?)" if metric == "nll/token" else "gold answers"
                raise MultiLoRAError(f"{task}: {base} and {run} give the same items different {what}; "
                                     "paired statistics need the same items scored the same way")
    values = np.stack([p[1][idx] for p, idx in zip(parsed, index)])  # (2S, n)
    s = len(base_results)
    weights = None if parsed[0][2] is None else parsed[0][2][index[0]]
    return {"a": values[:s], "b": values[s:], "weights": weights, "metric": metric, "higher": higher, "note": note}


def _row(task: str, metric: str, run: str, base: str, iv: Interval, p: float | None, n_items: int, n_seeds: int,
         higher: bool, notes: list[str]) -> dict[str, Any]:
    return {"task": task, "metric": metric, "run": run, "baseline": base, "diff": iv.diff, "low": iv.low,
            "high": iv.high, "p_mcnemar": p, "n_items": n_items, "n_seeds": n_seeds, "higher_is_better": higher,
            "verdict": verdict(iv, higher), "note": "; ".join(n for n in notes if n)}


def _pair_seeds(base: str, base_results: list[dict], run: str, run_results: list[dict]) -> tuple[list, list, str]:
    """(baseline results, run results, note), paired by position: a single result (a base model, which has
    no training seed) is paired with every seed of the other side; else the seeds both have."""
    nb, nr = len(base_results), len(run_results)
    if nb == nr:
        return base_results, run_results, ""
    if min(nb, nr) == 1:
        one, many = (base, run) if nb == 1 else (run, base)
        return (base_results * nr if nb == 1 else base_results, run_results * nb if nr == 1 else run_results,
                f"the one result of {one} is paired with each of the {max(nb, nr)} seeds of {many}")
    s = min(nb, nr)
    return base_results[:s], run_results[:s], f"{base} has {nb} seeds, {run} {nr}: the first {s} of each paired"


def compare_paired(groups: dict[str, list[dict]], baseline: str | None = None, n_boot: int = 10_000,
                   seed: int = 0) -> list[dict]:
    """Every group of eval results (label -> one result per seed, in seed order) against `baseline`
    (default: the first group), per task: one row each (see `_row` for the keys) with the difference
    run - baseline, its 95% paired-bootstrap interval, the exact McNemar p (accuracy; with several
    seeds the largest per-seed p), n_items, n_seeds, the verdict and a note. With two or more
    multiple-choice tasks, an "overall" row per run: the mean of their accuracy differences.
    Seeds pair by position: groups with different seed counts use the first ones both have, except a
    group of one result (a base model), which is paired with every seed of the other (said in "note").

    Results scored on partly different items are compared on the shared ones (said in "note"); no shared
    item, or a task missing from one side, is a MultiLoRAError naming the task and both runs.
    """
    if not groups or any(not results for results in groups.values()):
        raise MultiLoRAError("compare_paired needs at least one result in every group")
    base = next(iter(groups)) if baseline is None else baseline
    if base not in groups:
        raise MultiLoRAError(f"baseline {base!r} is not one of the compared runs: {', '.join(groups)}")
    if len(groups) < 2:
        raise MultiLoRAError("paired statistics need at least two runs (or seed groups) to compare")
    rows = []
    for run, run_results in groups.items():
        if run == base:
            continue
        base_results, results, seed_note = _pair_seeds(base, groups[base], run, run_results)
        s = len(base_results)
        tasks = list(dict.fromkeys([*base_results[0]["tasks"], *results[0]["tasks"]]))
        accuracy_parts = []
        for k, task in enumerate(tasks):
            pair = _task_pairs(task, base, run, base_results, results)
            iv = paired_bootstrap(pair["a"], pair["b"], pair["weights"], n_boot=n_boot, seed=seed + k)
            p = None
            if pair["metric"] == "acc":
                p = max(mcnemar_p(a, b) for a, b in zip(pair["a"], pair["b"]))
                accuracy_parts.append((pair["a"], pair["b"], None))
            p_note = "McNemar p: the largest of the per-seed tests" if p is not None and s > 1 else ""
            rows.append(_row(task, pair["metric"], run, base, iv, p, pair["a"].shape[1], s, pair["higher"],
                             [pair["note"], seed_note, p_note]))
        if len(accuracy_parts) >= 2:
            iv = mean_paired_bootstrap(accuracy_parts, n_boot=n_boot, seed=seed + len(tasks))
            rows.append(_row(OVERALL, "acc (mean)", run, base, iv, None,
                             sum(a.shape[1] for a, _, _ in accuracy_parts), s, True,
                             [f"the mean over {len(accuracy_parts)} multiple-choice tasks", seed_note]))
    return rows


def seed_groups(labels: Sequence[str]) -> dict[str, list[int]]:
    """{group name: indices into `labels`, ordered by seed}: "lora-seed0"/"lora-seed1" (demo) or sweep folders
    "n=1__init=multilora__seed=0" group by the name without the seed part; other labels are their own group
    (as is every label of a group where a seed appears twice)."""
    found: dict[str, list[tuple[int, int]]] = {}
    for i, label in enumerate(labels):
        m = _SEED.match(label)
        name, sd = (m["name"] or "seeds", int(m["seed"])) if m else (label, -1)
        found.setdefault(name, []).append((sd, i))
    out: dict[str, list[int]] = {}
    for name, members in found.items():
        seeds = [sd for sd, _ in members]
        if len(members) == 1 or -1 in seeds or len(set(seeds)) < len(seeds):
            for _, i in members:
                out[labels[i]] = [i]
        else:
            out[name] = [i for _, i in sorted(members)]
    return out


# ----------------------------------------------------------------------------- showing the rows


def interval_text(row: dict[str, Any]) -> str:
    """The difference and its interval: accuracy in percentage points ("+3.1 pp [-0.8, +7.0]"), nll/token as is."""
    if row["metric"].startswith("acc"):
        return f"{100 * row['diff']:+.1f} pp [{100 * row['low']:+.1f}, {100 * row['high']:+.1f}]"
    return f"{row['diff']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}]"


def p_text(p: float | None) -> str:
    """McNemar's p for a table: '-' when there is none, '<0.001' when tiny."""
    return "-" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def paired_table(rows: list[dict[str, Any]], title: str) -> Table:
    """A rich Table of compare_paired rows: task, metric, run, diff [95% CI], McNemar p, verdict, n
    (items, x seeds); the rows' notes are `row_notes`."""
    table = Table(title=title)
    for name, justify in (("task", "left"), ("metric", "left"), ("run", "left"), ("diff [95% CI]", "right"),
                          ("McNemar p", "right"), ("verdict", "left"), ("n", "right")):
        table.add_column(name, justify=justify, no_wrap=name in ("task", "diff [95% CI]", "verdict"))
    style = {"better": "green", "worse": "red", "can't tell": "dim"}
    for r in rows:
        n = f"{r['n_items']}" + (f" x {r['n_seeds']}" if r["n_seeds"] > 1 else "")
        table.add_row(r["task"], r["metric"], r["run"], interval_text(r), p_text(r["p_mcnemar"]),
                      f"[{style[r['verdict']]}]{r['verdict']}[/]", n)
    return table


def row_notes(rows: list[dict[str, Any]]) -> list[str]:
    """"task, run: note" for each row with a note (notes shared by several rows once)."""
    seen: dict[str, list[str]] = {}
    for r in rows:
        for note in filter(None, r["note"].split("; ")):
            seen.setdefault(note, []).append(r["task"] if r["task"] != OVERALL else "overall")
    return [f"{', '.join(dict.fromkeys(where))}: {note}" for note, where in seen.items()]


def forest_png(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """A forest plot of compare_paired rows: one line per (task, run), the difference with its interval,
    a zero line, coloured by verdict; one panel per metric (accuracy, nll/token). Written atomically."""
    # deferred on purpose: matplotlib is slow to import and only this plot needs it; the Figure API draws
    # headless without touching pyplot's backend
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    path = Path(path)
    if not rows:
        raise MultiLoRAError("no paired differences to plot")
    panels: dict[str, list[dict]] = {}
    for r in rows:
        panels.setdefault("accuracy" if r["metric"].startswith("acc") else r["metric"], []).append(r)
    heights = [len(p) + 1.5 for p in panels.values()]
    fig = Figure(figsize=(7.5, 0.9 + 0.32 * sum(heights)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (metric, group) in zip(axes, panels.items()):
        scale = 100.0 if metric == "accuracy" else 1.0
        ys = np.arange(len(group))[::-1]  # first row on top
        for y, r in zip(ys, group):
            left, right = scale * (r["diff"] - r["low"]), scale * (r["high"] - r["diff"])
            ax.errorbar([scale * r["diff"]], [y], xerr=[[left], [right]], fmt="o", color=COLOURS[r["verdict"]],
                        capsize=3)
        ax.axvline(0.0, color="black", linewidth=1)
        ax.set_yticks(ys, [f"{r['task']} · {r['run']}" for r in group], fontsize=8)
        better = "higher" if group[0]["higher_is_better"] else "lower"
        unit = "percentage points" if metric == "accuracy" else "nats per token"
        ax.set_xlabel(f"{metric} difference vs {group[0]['baseline']} ({unit}; {better} is better), 95% interval")
        ax.set_ylim(-0.75, len(group) - 0.25)
        ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=v) for v, c in COLOURS.items()]
    axes[0].legend(handles=handles, fontsize=7, loc="best")
    axes[0].set_title(title)
    with atomic_path(path) as tmp:  # a killed or failed write leaves the previous plot
        fig.savefig(tmp, dpi=120, format="png")
    return path


# ----------------------------------------------------------------------------- multilora eval --compare


def unique_labels(paths: Sequence[str | Path]) -> list[str]:
    """Column labels (tables.column_labels), with the path itself where two results would share a label."""
    labels = column_labels(paths)
    return [str(p) if labels.count(label) > 1 else label for p, label in zip(paths, labels)]


def check_paired_args(paths: Sequence[str | Path], baseline: str | None, forest: str | Path | None) -> None:
    """Refuse a --baseline that names none of the compared runs and a --forest path that cannot be written,
    before any table is printed."""
    if baseline is not None:
        labels = unique_labels(paths)
        resolve_baseline(labels, seed_groups(labels), baseline)
    if forest is not None:
        forest = Path(forest)
        if forest.is_dir():
            raise MultiLoRAError(f"--forest {forest} is a folder; name a file such as {forest / 'forest.png'}")
        if forest.suffix.lower() != ".png":
            raise MultiLoRAError(f"--forest {forest}: the plot is a PNG; name a file ending in .png")
        check_writable_dir(forest.parent, "folder of --forest")


def print_paired(console: Console, paths: Sequence[str | Path], baseline: str | None = None,
                 forest: str | Path | None = None, n_boot: int = 10_000) -> list[dict] | None:
    """`multilora eval --compare`'s second table: paired differences vs the baseline (seed groups pooled),
    and the forest plot when `forest` is given; one line instead when a result lacks per-item scores.
    Returns the rows (None when not computed)."""
    results = [read_result(p) for p in paths]
    labels = unique_labels(paths)
    groups_idx = seed_groups(labels)
    base = resolve_baseline(labels, groups_idx, baseline)
    missing = [label for label, r in zip(labels, results) if any("items" not in t for t in r["tasks"].values())]
    if missing:
        console.print(f"paired statistics need per-item scores: re-run `multilora eval TARGET --save-items` for "
                      f"{', '.join(missing)}")
        return None
    if len(groups_idx) < 2:
        console.print("paired statistics need at least two runs (or seed groups) to compare")
        return None
    groups = {name: [results[i] for i in idx] for name, idx in groups_idx.items()}
    rows = compare_paired(groups, base, n_boot=n_boot)
    pooled = [f"{name} = {', '.join(labels[i] for i in idx)}" for name, idx in groups_idx.items() if len(idx) > 1]
    title = f"paired differences vs {base}" + (" (seed groups pooled)" if pooled else "")
    if pooled:
        console.print(f"seed groups: {'; '.join(pooled)}")
    console.print(paired_table(rows, title))
    console.print("diff = run - baseline, 95% paired-bootstrap interval over items"
                  + (" and seeds" if pooled else "") + "; verdict: better/worse when the interval excludes 0; "
                  "n = items" + (" x seeds" if pooled else ""))
    for note in row_notes(rows):
        console.print(f"note: {note}")
    if forest is not None:
        console.print(f"wrote {forest_png(rows, forest, title)}")
    return rows


def resolve_baseline(labels: Sequence[str], groups: dict[str, list[int]], baseline: str | None) -> str:
    """The baseline group's name: `baseline` as a group name, or the group of the column label it names;
    default the first group. An unknown name is a MultiLoRAError listing the choices."""
    if baseline is None:
        return next(iter(groups))
    if baseline in groups:
        return baseline
    for name, idx in groups.items():
        if baseline in (labels[i] for i in idx):
            return name
    raise MultiLoRAError(f"--baseline {baseline!r} is not one of the compared runs; choose one of "
                         f"{', '.join(dict.fromkeys([*groups, *labels]))}")
