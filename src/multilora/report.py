"""The study report: `report.md` (+ PNGs) comparing the base model, LoRA, MultiLoRA and full fine-tuning.

Input is the `study` dict `multilora demo` writes to `study.json`:

    model, tasks, steps, seeds, batch_size, max_len, data_sizes {task: {train, eval}},
    methods {name: {trainable, share, seconds [per seed], runs [per seed], lr}},
    evals {model name: [evaluate() result per seed]}, analysis (analyze() report), timings,
    smoke_test (a --quick run on the tiny random model: the report judges no claim)

Every sentence that judges the paper's claims is computed from those numbers here.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .io import atomic_path, write_text_atomic

ADAPTED = ("lora", "multilora", "full")


def headline(result: dict, task: str) -> tuple[float, bool] | None:
    """(value, higher_is_better) of a task's headline metric in an evaluate() result, or None."""
    r = result["tasks"].get(task)
    if r is None:
        return None
    if r["kind"] == "perplexity":
        return r["perplexity"], False
    return r["acc"], True


def _cell(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def task_scores(study: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """{task: {model: (mean, std over seeds)}} of each task's headline metric."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for task in study["eval_tasks"]:
        for name, results in study["evals"].items():
            values = [h[0] for h in (headline(r, task) for r in results) if h is not None]
            if values:
                out.setdefault(task, {})[name] = _cell(values)
    return out


def _chance(study: dict, task: str) -> float | None:
    first = next(iter(study["evals"].values()))[0]["tasks"].get(task, {})
    return first.get("chance")


def _higher_better(study: dict, task: str) -> bool:
    first = next(iter(study["evals"].values()))[0]
    h = headline(first, task)
    return True if h is None else h[1]


def _fmt(mean: float, std: float, seeds: int, pct: bool) -> str:
    if pct:
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if seeds > 1 else "")
    return f"{mean:.2f}" + (f" ± {std:.2f}" if seeds > 1 else "")


def task_table(study: dict) -> str:
    """Markdown table: one row per task, chance, then one column per model; the best per task in bold."""
    scores, seeds = task_scores(study), len(study["seeds"])
    names = list(study["evals"])
    lines = ["| task | metric | chance | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for task, by_model in scores.items():
        higher = _higher_better(study, task)
        pct = higher
        best = (max if higher else min)(by_model.values(), key=lambda c: c[0])[0]
        if all(c[0] == best for c in by_model.values()):
            best = None  # a tie across all models: nothing to mark
        cells = []
        for name in names:
            if name not in by_model:
                cells.append("–")
                continue
            text = _fmt(*by_model[name], seeds, pct)
            cells.append(f"**{text}**" if by_model[name][0] == best else text)
        chance = _chance(study, task)
        metric = "accuracy %" if higher else "perplexity ↓"
        chance_text = "–" if chance is None else (f"{100 * chance:.1f}" if pct else f"{chance:,.0f}")
        lines.append(f"| {task} | {metric} | {chance_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_accuracy(study: dict, name: str) -> list[float]:
    """Per seed: the unweighted mean accuracy over the multiple-choice tasks."""
    out = []
    for r in study["evals"][name]:
        accs = [h[0] for h in (headline(r, t) for t in study["eval_tasks"]) if h is not None and h[1]]
        out.append(statistics.fmean(accs) if accs else math.nan)
    return out


def _items(study: dict) -> int:
    first = next(iter(study["evals"].values()))[0]["tasks"]
    return sum(r["n"] for r in first.values() if r["kind"] != "perplexity")


def spectrum_rows(analysis: dict) -> dict[str, dict[str, float]]:
    """{run name: overall effective rank, top-1/top-k energy share, stable rank, rank bound}."""
    k = analysis["top_k"][-1] if len(analysis["top_k"]) > 1 else analysis["top_k"][0]
    rows = {}
    for run in analysis["runs"]:
        o = run["overall"]
        rows[run["name"]] = {"effective_rank": o["effective_rank"], "energy_top1": o["energy_top1"],
                             f"energy_top{k}": o.get(f"energy_top{k}"), "stable_rank": o["stable_rank"],
                             "rank_bound": o.get("rank_bound")}
    return rows


def spectrum_table(analysis: dict) -> str:
    """Markdown table of the spectrum metrics per run (means over adapted layers)."""
    rows = spectrum_rows(analysis)
    keys = [k for k in next(iter(rows.values())) if k.startswith("energy_top") and k != "energy_top1"]
    lines = ["| run | effective rank | top-1 energy share | " + "".join(f"top-{k[10:]} energy share | " for k in keys)
             + "stable rank |", "|---" * (4 + len(keys)) + "|"]
    for name, r in rows.items():
        extra = "".join(f"{r[k]:.3f} | " for k in keys)
        lines.append(f"| {name} | {r['effective_rank']:.1f} | {r['energy_top1']:.3f} | {extra}{r['stable_rank']:.1f} |")
    return "\n".join(lines)


SMOKE_TEST = ("**Smoke test: no verdict on Claim 1 (a flatter spectrum) or Claim 2 (better multi-task scores).** "
              "This run (`--quick`, or the tiny random model) checks that training, evaluation, analysis and this "
              "report work end to end; a model that learns nothing cannot test the paper's claims, so none is "
              "judged here. Run `multilora demo` without `--quick` for a verdict.")


def verdict(study: dict) -> str:
    """A plain-language paragraph on the paper's two claims, computed from the numbers (none for a smoke test)."""
    if study.get("smoke_test"):
        return SMOKE_TEST
    parts = []
    spec = spectrum_rows(study["analysis"]) if study.get("analysis") else {}
    if "lora" in spec and "multilora" in spec:
        lo, ml = spec["lora"], spec["multilora"]
        flatter = ml["effective_rank"] > lo["effective_rank"] and ml["energy_top1"] < lo["energy_top1"]
        text = (f"**Claim 1, a flatter spectrum: {'supported' if flatter else 'not supported'} here.** "
                f"MultiLoRA's update has mean effective rank {ml['effective_rank']:.1f} and top-1 energy share "
                f"{ml['energy_top1']:.2f}; LoRA's (same total rank) {lo['effective_rank']:.1f} and {lo['energy_top1']:.2f}.")
        if "full" in spec:
            fu = spec["full"]
            closer = abs(ml["energy_top1"] - fu["energy_top1"]) < abs(lo["energy_top1"] - fu["energy_top1"])
            text += (f" Full fine-tuning's top-1 share is {fu['energy_top1']:.2f}, so MultiLoRA is "
                     f"{'closer to' if closer else 'further from'} full fine-tuning than LoRA on this measure.")
        text += (" Part of MultiLoRA's flatness is present from the first step: B_i A_i start random and the "
                 "learned scales pick them up, so a short run shows the init as much as the training.")
        parts.append(text)
    accs = {m: mean_accuracy(study, m) for m in study["evals"] if m in ADAPTED}
    if "multilora" in accs and len(accs) > 1:
        means = {m: statistics.fmean(v) for m, v in accs.items()}
        ml = means["multilora"]
        rivals = {m: v for m, v in means.items() if m != "multilora"}
        wins = all(ml > v for v in rivals.values())
        n_items = max(_items(study), 1)
        se = math.sqrt(max(ml * (1 - ml), 1e-9) / n_items)  # binomial standard error of a mean accuracy
        gaps = ", ".join(f"{m} {100 * v:.1f}%" for m, v in rivals.items())
        close = all(abs(ml - v) < 2 * se for v in rivals.values())
        text = (f"**Claim 2, better multi-task scores: {'supported' if wins and not close else 'not supported'} here.** "
                f"Mean accuracy over the multiple-choice tasks: MultiLoRA {100 * ml:.1f}%, {gaps}.")
        if close:
            text += (f" The differences are within two standard errors (about ±{200 * se:.1f} points for "
                     f"{n_items} scored items), so this run cannot separate the methods")
            text += "; more steps, items and seeds (`--steps`, `--seeds`) would." if len(study["seeds"]) < 3 else "."
        if "base" in study["evals"]:
            base = statistics.fmean(mean_accuracy(study, "base"))
            best = max(means, key=means.get)
            text += (f" The untuned base model scores {100 * base:.1f}%; the best fine-tuned model ({best}) "
                     f"{'gains' if means[best] > base else 'does not gain'} over it"
                     f" ({100 * (means[best] - base):+.1f} points).")
        parts.append(text)
    dynamics = loss_trends(study)
    if dynamics:
        rising = [m for m, (a, b) in dynamics.items() if b > a]
        parts.append("**Training loss**, mean of the first vs the last quarter of the steps: "
                     + ", ".join(f"{m} {a:.2f} → {b:.2f}" for m, (a, b) in dynamics.items()) + "."
                     + (f" It rose for {', '.join(rising)}: with these settings that method did not learn "
                        "from the mixture in this budget." if rising else ""))
    return "\n\n".join(parts)


def loss_trends(study: dict) -> dict[str, tuple[float, float]]:
    """{method: (mean training loss over the first quarter of steps, over the last quarter)}, seeds pooled."""
    out = {}
    for name, m in study.get("methods", {}).items():
        curves = [c for c in m.get("train_loss", []) if len(c) >= 4]
        if curves:
            q = min(len(c) for c in curves) // 4
            out[name] = (statistics.fmean(x for c in curves for x in c[:q]),
                         statistics.fmean(x for c in curves for x in c[-q:]))
    return out


def loss_curves_png(study: dict, path: Path) -> Path:
    """Training loss per method (mean over seeds, light per-step line plus a moving average)."""
    # deferred on purpose: matplotlib is slow to import and only the report's plot needs it (the sweep and the
    # CLI import this module for its tables); the Figure API draws headless without touching pyplot's backend
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, m in study["methods"].items():
        curves = [c for c in m.get("train_loss", []) if c]
        if not curves:
            continue
        steps = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(steps)]
        w = max(1, steps // 10)
        smooth = [statistics.fmean(mean[max(0, i - w + 1): i + 1]) for i in range(steps)]
        line, = ax.plot(range(1, steps + 1), smooth, label=f"{name} (moving avg. {w})", linewidth=2)
        ax.plot(range(1, steps + 1), mean, color=line.get_color(), alpha=0.25, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats per response token)")
    ax.set_title("Training loss, same data order and schedule")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a killed or failed write leaves the previous plot
        fig.savefig(tmp, dpi=120, format="png")
    return path


def write_report(study: dict, out_dir: str | Path) -> Path:
    """Write report.md (and loss_curves.png) for a finished study into `out_dir`; returns its path."""
    out = Path(out_dir)
    loss_curves_png(study, out / "loss_curves.png")
    seeds = study["seeds"]
    t = study["timings"]
    method_rows = ["| method | trainable parameters | share of model | learning rate | training time per run |",
                   "|---|---:|---:|---:|---:|"]
    for name, m in study["methods"].items():
        secs = statistics.fmean(m["seconds"])
        lr = f"{m['lr']:g}" + (f" (scales x{m['s_lr_mult']:g})" if m.get("s_lr_mult", 1.0) != 1.0 else "")
        method_rows.append(f"| {name} | {m['trainable']:,} | {100 * m['share']:.2f}% | {lr} | {secs:.0f} s |")
    sizes = ", ".join(f"{task} {s['train']:,}" for task, s in study["data_sizes"].items())
    analysis_dir = study.get("analysis_dir", "analysis")
    figures = [f for f in ("spectra.png", "effective_rank_by_depth.png", "energy_share.png", "multilora_scales.png")
               if (out / analysis_dir / f).is_file()]
    md = [
        f"# MultiLoRA vs LoRA vs full fine-tuning on {study['model']}",
        "",
        verdict(study),
        "",
        "## What was run",
        "",
        f"- Model: `{study['model']}`; tasks (the paper's three families): {', '.join(study['tasks'])}.",
        f"- Training examples available per task: {sizes}; mixture `{study['mixture']}`. Each method saw the same "
        f"batches in the same order: {study['steps']} steps x {study['batch_size']} examples, at most "
        f"{study['max_len']} tokens each, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}.",
        f"- Evaluation: held-out splits, at most {study['eval_limit']} items per task "
        f"({study['mmlu_per_subject']} per MMLU subject, all 57 subjects), multiple choice by log-likelihood; "
        "Alpaca by response perplexity.",
        f"- Time: training {t['train']:.0f} s, evaluation {t['eval']:.0f} s, analysis {t['analyze']:.0f} s, "
        f"total {t['total']:.0f} s" + (f" (plus {t['convert']:.0f} s one-time model conversion)" if t.get("convert") else "") + ".",
        "",
        *method_rows,
        "",
        "## Scores per task",
        "",
        ("Mean ± standard deviation over seeds. " if len(seeds) > 1 else "")
        + "Best per task in bold; chance is what guessing scores.",
        "",
        task_table(study),
        "",
        "## Spectra of the learned updates dW",
        "",
        "Means over the adapted layers (attention projections). Effective rank = exp(entropy of the normalized "
        "singular values): higher is flatter. Top-k energy share = fraction of ||dW||_F^2 in the k largest "
        "directions: higher means a few directions dominate.",
        "",
        spectrum_table(study["analysis"]),
        "",
        *[f"![{f}]({analysis_dir}/{f})\n" for f in figures],
        "## Training loss",
        "",
        "![training loss](loss_curves.png)",
        "",
        f"Every number above is in `study.json`; per-layer spectra in `{analysis_dir}/analysis.csv`; each run "
        "folder holds its config, adapter (or weights), metrics.jsonl and eval.json.",
        "",
    ]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(md))
    return path
