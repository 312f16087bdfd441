"""The summary of `multilora sweep`, rebuilt from its folders alone: one row per run (sweep.csv), the
per-combination table (sweep.md, mean ± std over seeds), the paired differences vs the first combination
(item by item, seeds pooled; with a forest plot) and three plots.

`summarize(out)` reads OUT/sweep.json (what was swept), each run folder (config.yaml, metrics.jsonl,
finished.json, eval.json, adapter or weights) and OUT/analysis (the spectra, and the runs the analysis failed on).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .errors import MultiLoRAError
from .evaluate import EVAL_NAME
from .io import atomic_path, read_json_object, write_text_atomic
from .paired import compare_paired, forest_png, interval_text, p_text, row_notes
from .run import Run
from .sweep_grid import short_names, value_text
from .tasks import get_task
from .verdict import headline

MANIFEST = "sweep.json"  # what the sweep ran: base, grid, seeds, tasks, and each run's overrides
ANALYSIS_DIR = "analysis"
ANALYSIS_NOTES = "sweep_analysis.json"  # which finished runs the analysis covers, and runs it failed on
PAIRED_PNG = "sweep-paired.png"  # the forest plot of the paired differences vs the first combination
FIGURES = (("sweep-scores.png", "Final score per task vs each swept key (mean ± std over seeds)"),
           ("sweep-heldout.png", "Held-out loss during training (mean over seeds, ± std shaded)"),
           ("sweep-spectrum.png", "Spectrum of the update dW: effective rank and top-1 energy share"))


def cached_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} if it is unreadable (a cache miss, not an error)."""
    try:
        return read_json_object(path)
    except MultiLoRAError:
        return {}


def trainable_parameters(folder: Path) -> float:
    """Trainable parameters of a finished run: the tensors of adapter.safetensors (or, full, of the model)."""
    files = [folder / "adapter.safetensors"] if (folder / "adapter.safetensors").is_file() else \
        sorted(folder.glob("model*.safetensors"))
    if not files:
        return math.nan
    total = 0
    for f in files:
        with safe_open(f, framework="pt") as h:
            total += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())  # noqa: SIM118 - safe_open has no __iter__
    return total


def _mean_last(values: list[float], share: float = 0.1) -> float:
    """Mean of the last `share` of `values` (at least one); NaN if empty."""
    if not values:
        return math.nan
    return statistics.fmean(values[-max(1, int(len(values) * share)):])


def read_run(out: Path, run: dict[str, Any], keys: list[str], tasks: list[str], spectra: dict[str, dict],
             notes: dict[str, str]) -> dict[str, Any]:
    """One sweep.csv row, from the run folder alone (plus its held-out curve under 'curve')."""
    folder = out / "runs" / run["name"]
    config = Run(folder).saved_config()
    metrics = Run(folder).metrics()
    steps = sorted((r["step"], r["loss"]) for r in metrics if "loss" in r)
    curve = dict(sorted((r["step"], r["eval"]["loss"]) for r in metrics if "loss" in r.get("eval", {})))
    result = cached_json(folder / EVAL_NAME) if (folder / EVAL_NAME).is_file() else {"tasks": {}}
    scores = {t: headline(result, t) if t in result.get("tasks", {}) else None for t in tasks}
    accs = [h[0] for h in scores.values() if h is not None and h[1]]
    spec = spectra.get(run["name"], {})
    done = Run(folder).finished() or {}
    note = notes.get(run["name"], "") or ("" if done else "not finished")
    return {
        "run": run["name"], "combination": run["combination"],
        **{k: "n/a" if k.startswith("adapter.") and config.get("method") == "full"  # full FT has no adapter
           else value_text(config.get(k, run["overrides"].get(k))) for k in keys},
        "seed": run["seed"], "steps": steps[-1][0] if steps else 0,
        "train_loss": _mean_last([loss for _, loss in steps]),
        "heldout_loss": curve[max(curve)] if curve else math.nan,
        **{t: math.nan if h is None else h[0] for t, h in scores.items()},
        "mean_acc": statistics.fmean(accs) if accs else math.nan,
        "effective_rank": _num(spec.get("effective_rank")), "top1_share": _num(spec.get("energy_top1")),
        "trainable_params": trainable_parameters(folder) if done else math.nan,
        "train_seconds": _num(done.get("seconds")), "note": note, "curve": curve,
    }


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """sweep.csv: one row per run (floats at full precision, 'nan' where a number is missing)."""
    cols = [c for c in rows[0] if c != "curve"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in rows:
        w.writerow([repr(row[c]) if isinstance(row[c], float) else row[c] for c in cols])
    return buf.getvalue()


def _stats(values: list[float]) -> tuple[float, float]:
    """(mean, std) of the finite values; std 0 for one value; NaNs if none."""
    good = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not good:
        return math.nan, math.nan
    return statistics.fmean(good), statistics.stdev(good) if len(good) > 1 else 0.0


def _cell(values: list[float], fmt: str, scale: float = 1.0) -> str:
    mean, std = _stats(values)
    if not math.isfinite(mean):
        return "n/a"
    n = sum(1 for v in values if math.isfinite(v))
    return format(mean * scale, fmt) + (f" ± {format(std * scale, fmt)}" if n > 1 else "")


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by combination, in grid order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["combination"], []).append(row)
    return out


def summary_markdown(manifest: dict[str, Any], rows: list[dict[str, Any]], figures: list[tuple[str, str]],
                     notes: list[str], paired: list[str] | None = None) -> str:
    """sweep.md: the per-combination table (mean ± std over seeds), the paired differences (`paired`: markdown
    lines), what was run, the figures and notes."""
    keys, tasks = manifest["keys"], manifest["eval"]["tasks"]
    mc = {t: is_multiple_choice(t) for t in tasks}
    cols = [("train_loss", "train loss", ".4f", 1), ("heldout_loss", "held-out loss", ".4f", 1)]
    cols += [(t, f"{t} {'acc %' if mc[t] else 'ppl ↓'}", ".1f" if mc[t] else ".2f", 100 if mc[t] else 1)
             for t in tasks]
    cols += [("mean_acc", "mean acc %", ".1f", 100)] if any(mc.values()) else []
    cols += [("effective_rank", "effective rank", ".2f", 1), ("top1_share", "top-1 share", ".3f", 1),
             ("trainable_params", "trainable", ",.0f", 1), ("train_seconds", "train s", ".0f", 1)]
    head = (keys or ["combination"]) + ["seeds"] + [c[1] for c in cols]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, group in _groups(rows).items():
        ids = [group[0][k] for k in keys] if keys else [label]
        table.append("| " + " | ".join(ids + [str(len(group))] + [_cell([r[c] for r in group], f, s)
                                                                   for c, _, f, s in cols]) + " |")
    ev = manifest["eval"]
    evaluation = (f"{', '.join(tasks)} on their held-out splits, at most {ev['limit']} items per task"
                  + (f" ({ev['mmlu_per_subject']} per MMLU subject)" if "mmlu" in tasks else "")
                  + "; multiple choice by log-likelihood (accuracy), instruction following by response perplexity"
                  if tasks else "none (--limit 0): held-out loss and spectra only")
    seeds = sorted({r["seed"] for r in rows})
    md = [f"# Sweep over {', '.join(f'`{k}`' for k in keys) or 'seeds'} on `{manifest['base']}`", "",
          (f"{len(_groups(rows))} combination(s) x {manifest['seeds']} seed(s) ({', '.join(map(str, seeds))}) = "
           f"{len(rows)} runs. Mean ± standard deviation over seeds; train loss = mean of the last 10% of logged "
           "steps; held-out loss = the last periodic evaluation on the held-out examples; effective rank and "
           "top-1 energy share of dW are means over the adapted layers."), "",
          *table, "",
          *(paired or []),
          "## What was run", "",
          "Grid (the tokens of one `--grid` form a product, several `--grid` are unioned):", "",
          *([f"- `--grid {' '.join(g)}`" for g in manifest["grid"]] or ["- (none: the base config only)"]), "",
          f"Evaluation: {evaluation}.", "",
          f"Base config `{manifest['base']}`:", "", "```yaml", manifest["base_yaml"].rstrip("\n"), "```", ""]
    if figures:
        md += ["## Figures", ""]
        md += [line for file, caption in figures for line in (f"### {caption}", "", f"![{caption}]({file})", "")]
    if notes:
        md += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    md += [("Files: `sweep.csv` (one row per run), `runs/<run>/` (config.yaml, metrics.jsonl, eval.json, adapter "
            f"or weights), `{ANALYSIS_DIR}/summary.md` (spectra per run, with its own plots)."), ""]
    return "\n".join(md)


def is_multiple_choice(task: str) -> bool:
    """True for a task scored by accuracy, False for one scored by response perplexity (as evaluate() does)."""
    return get_task(task).items is not None


def summarize(out_dir: str | Path) -> Path:
    """Rebuild sweep.csv, sweep.md and the plots of the sweep in `out_dir` from its folders; returns sweep.md's path."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        raise MultiLoRAError(f"{out} holds no {MANIFEST}; pass the --out folder of a `multilora sweep`")
    manifest = read_json_object(out / MANIFEST, fix="rerun `multilora sweep` with the same --out to rewrite it")
    analysis = cached_json(out / ANALYSIS_DIR / "analysis.json")
    spectra = {r["name"]: r.get("overall", {}) for r in analysis.get("runs", [])}
    run_notes = cached_json(out / ANALYSIS_DIR / ANALYSIS_NOTES).get("notes", {})
    rows = [read_run(out, run, manifest["keys"], manifest["eval"]["tasks"], spectra, run_notes)
            for run in manifest["runs"]]
    write_text_atomic(out / "sweep.csv", csv_text(rows))
    notes = [f"{name}: {note}" for name, note in run_notes.items()]
    notes += [f"{r['run']}: not finished (rerun the same `multilora sweep` to complete it)"
              for r in rows if r["note"] == "not finished"]
    if not any(r["curve"] for r in rows):
        notes.append("no held-out loss curves: the runs logged no held-out evaluation; set data.eval_examples > 0 "
                     "and train.eval_every > 0 in the base config to get them")
    figures = write_plots([r for r in rows if r["note"] != "not finished"], manifest, out)
    paired, paired_notes = paired_section(out, manifest)
    path = out / "sweep.md"
    write_text_atomic(path, summary_markdown(manifest, rows, figures, notes + paired_notes, paired))
    return path


def paired_section(out: Path, manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(sweep.md lines, notes): every combination's paired differences vs the first one per task (seeds
    pooled: the seeds every combination has), as a table and the forest plot OUT/sweep-paired.png.

    Nothing with fewer than two evaluated combinations; a note instead of the table when an eval.json lacks
    per-item scores (one written before the sweep saved them) or the results cannot be paired.
    """
    (out / PAIRED_PNG).unlink(missing_ok=True)  # rewritten below when there is something to plot
    found: dict[str, dict[int, dict]] = {}
    for run in manifest["runs"]:
        file = out / "runs" / run["name"] / EVAL_NAME
        result = cached_json(file) if file.is_file() and Run(file.parent).finished() else {}
        if result.get("tasks"):
            found.setdefault(run["combination"], {})[run["seed"]] = result
    if len(found) < 2 or not manifest["eval"]["tasks"]:
        return [], []
    if any("items" not in t for by_seed in found.values() for r in by_seed.values() for t in r["tasks"].values()):
        return [], ["no paired differences: an eval.json lacks per-item scores (written by an older version); "
                    "rerun the same `multilora sweep` to re-evaluate with them"]
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in found.values())))
    if not seeds:
        return [], ["no paired differences: no seed was evaluated in every combination"]
    groups = {combo: [by_seed[sd] for sd in seeds] for combo, by_seed in found.items()}
    try:
        rows = compare_paired(groups)
    except MultiLoRAError as e:
        return [], [f"no paired differences: {e}"]
    base = next(iter(groups))
    dropped = sorted({sd for by_seed in found.values() for sd in by_seed} - set(seeds))
    notes = [f"paired differences use seed(s) {', '.join(map(str, seeds))}, the ones every combination has"
             + (f" (seed(s) {', '.join(map(str, dropped))} left out)" if dropped else "")]
    title = f"Paired differences vs {base}"
    forest_png(rows, out / PAIRED_PNG, title)
    lines = [f"## {title}", "",
             f"Each combination minus `{base}` on the same evaluation items (and seeds, paired: "
             f"{', '.join(map(str, seeds))}): the difference with its 95% paired-bootstrap interval over items"
             + (" and seeds" if len(seeds) > 1 else "") + ", the exact McNemar p for accuracy (with several seeds "
             "the largest per-seed p), and a verdict from the interval (better / worse when it excludes 0, else "
             "can't tell). Accuracy in percentage points; nll/token lower is better.", "",
             "| task | metric | combination | diff [95% CI] | McNemar p | verdict | items x seeds |",
             "|---|---|---|---:|---:|---|---:|"]
    lines += [f"| {r['task']} | {r['metric']} | {r['run']} | {interval_text(r)} | {p_text(r['p_mcnemar'])} | "
              f"{r['verdict']} | {r['n_items']} x {r['n_seeds']} |" for r in rows]
    lines += ["", *[f"- {n}" for n in row_notes(rows)], "", f"![{title}]({PAIRED_PNG})", ""]
    return lines, notes


# ----------------------------------------------------------------------------- plots


def write_plots(rows: list[dict[str, Any]], manifest: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Write the sweep's PNGs that have data (headless Figure API); returns (file, caption) pairs."""
    try:  # matplotlib is imported by the plotting functions only (deliberately: slow to import, unused elsewhere)
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise MultiLoRAError("the sweep plots need matplotlib: pip install matplotlib") from None
    all_keys = manifest["keys"] or ["combination"]
    tasks = manifest["eval"]["tasks"]
    scores = [(t, f"{t} {'accuracy' if is_multiple_choice(t) else 'perplexity ↓'}") for t in tasks]
    scores = [m for m in scores + [("heldout_loss", "held-out loss ↓")] if _has(rows, m[0])]
    spectrum = [m for m in (("effective_rank", "effective rank"), ("top1_share", "top-1 energy share"))
                if _has(rows, m[0])]
    keys = independent_keys(rows, all_keys)
    by_n = ["adapter.n"] if "adapter.n" in keys else keys
    made = {}
    if scores:
        made[FIGURES[0]] = _panels(rows, scores, keys, keys)
    if any(r["curve"] for r in rows):
        made[FIGURES[1]] = _plot_heldout(rows)
    if spectrum:
        made[FIGURES[2]] = _panels(rows, spectrum, by_n, keys)
    for file, caption in FIGURES:
        if (file, caption) not in made:
            (out / file).unlink(missing_ok=True)  # no data now: drop a stale plot of an earlier summary
    for (file, _), fig in made.items():
        with atomic_path(out / file) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return list(made)


def independent_keys(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The swept keys worth a panel: a key whose values pair one-to-one with an earlier key's values
    (adapter.r and adapter.alpha set together with method=lora, say) is left out."""
    kept: list[str] = []
    for key in keys:
        if not any(_one_to_one(rows, earlier, key) for earlier in kept):
            kept.append(key)
    return kept


def _one_to_one(rows: list[dict[str, Any]], a: str, b: str) -> bool:
    pairs = {(r[a], r[b]) for r in rows}
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})


def _has(rows: list[dict[str, Any]], metric: str) -> bool:
    return any(math.isfinite(r[metric]) for r in rows)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _positions(values: list[str]) -> tuple[dict[str, float], bool]:
    """x positions of the values: the numbers themselves if all are numeric, else 0, 1, ... with the
    numeric values first (ascending), then the others ('lora', 'n/a') in first-seen order."""
    distinct = list(dict.fromkeys(values))
    nums = {v: _number(v) for v in distinct}
    if all(x is not None for x in nums.values()):
        return {v: x for v, x in nums.items()}, True
    order = sorted((v for v in distinct if nums[v] is not None), key=nums.get)
    order += [v for v in distinct if nums[v] is None]
    return {v: float(i) for i, v in enumerate(order)}, False


def _panels(rows: list[dict[str, Any]], metrics: list[tuple[str, str]], plot_keys: list[str],
            all_keys: list[str]) -> Any:
    """One panel per metric x key: the metric vs the key's value, one line per value of the other swept keys,
    mean ± std over seeds as error bars."""
    from matplotlib.figure import Figure

    names = short_names(all_keys)
    fig = Figure(figsize=(4.2 * len(plot_keys), 3.2 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), len(plot_keys), squeeze=False)
    for i, (metric, title) in enumerate(metrics):
        for j, key in enumerate(plot_keys):
            ax = axes[i][j]
            pos, numeric = _positions([r[key] for r in rows])
            lines: dict[str, dict[str, list[float]]] = {}
            for r in rows:
                other = ", ".join(f"{names[k]}={r[k]}" for k in all_keys if k != key) or title
                lines.setdefault(other, {}).setdefault(r[key], []).append(r[metric])
            for label, points in lines.items():
                xs = sorted(points, key=pos.get)
                stats = [_stats(points[x]) for x in xs]
                ax.errorbar([pos[x] for x in xs], [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                            capsize=3, label=label)
            ticks = sorted(pos.items(), key=lambda kv: kv[1])
            if numeric and ticks[0][1] > 0 and ticks[-1][1] >= 10 * ticks[0][1]:  # e.g. lr multipliers 1..100
                ax.set_xscale("log")
                ax.minorticks_off()
            ax.set_xticks([x for _, x in ticks], [v for v, _ in ticks], rotation=0 if numeric else 20)
            ax.set_xlabel(key)
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            if len(lines) > 1:
                ax.legend(fontsize=7)
    return fig


def _plot_heldout(rows: list[dict[str, Any]]) -> Any:
    """Held-out loss vs step, one line per combination (mean over seeds, ± std shaded)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for label, group in _groups(rows).items():
        curves = [r["curve"] for r in group if r["curve"]]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [_stats([c[s] for c in curves]) for s in steps]
        mean, std = [m for m, _ in stats], [s for _, s in stats]
        line, = ax.plot(steps, mean, marker=".", label=label)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss (nats per response token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig
