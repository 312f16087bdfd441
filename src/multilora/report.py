"""The study report: `report.md` (+ PNGs) comparing the base model, LoRA, MultiLoRA and full fine-tuning.

Input is the `study` dict `multilora demo` writes to `study.json`:

    preset, model, tasks, eval_tasks, steps, seeds, batch_size, max_len, precision, data_sizes {task: {train, eval}},
    methods {arm: {method, trainable, share, seconds [per seed], runs [per seed], lr, s_lr_mult,
                   train_loss [per seed], heldout [per seed: metrics.jsonl's eval records]}},
    evals {model name: [evaluate() result per seed, with per-item scores]}, analysis (seed 0's analyze() report),
    spectra {arm: [per seed: {module: {effective_rank, energy_top1}}]}, comparisons, spectrum_comparisons,
    timings, smoke_test (a --quick run on the tiny random model: the report judges no claim)

The verdict on the paper's claims comes from `verdict` (paired 95% intervals, never point estimates),
the figures from `report_plots`; this module lays out report.md: the verdict, what was run, the tables.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .io import write_text_atomic
from .paired import interval_text, p_text
from .report_plots import forest_pngs, heldout_png, loss_curves_png
from .verdict import spectrum_number, comparisons, headline, spectrum_comparisons, spectrum_rows, verdict

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


def paired_section(study: dict) -> str:
    """Markdown table of every paired row (spectrum and task scores): comparison, difference [95% CI], verdict."""
    rows = [*study.get("spectrum_comparisons", []), *study.get("comparisons", [])]
    if not rows:
        return "No per-item scores in these results: no paired intervals."
    smoke = (["Smoke test: these rows show that the paired statistics run end to end; the differences of a tiny "
              "random model mean nothing.", ""] if study.get("smoke_test") else [])
    lines = [*smoke, "| comparison | task | metric | difference [95% interval] | McNemar p | verdict | n |",
             "|---|---|---|---:|---:|---|---:|"]
    for r in rows:
        number = spectrum_number(r) if r["task"] == "spectrum" else interval_text(r)
        n = f"{r['n_items']}" + (f" x {r['n_seeds']} seeds" if r["n_seeds"] > 1 else "")
        lines.append(f"| {r['run']} − {r['baseline']} | {r['task']} | {r['metric']} | {number} | "
                     f"{p_text(r['p_mcnemar'])} | {r['verdict']} | {n} |")
    return "\n".join(lines)


def _evaluation_text(study: dict) -> str:
    """What was evaluated: items per task, shots, how scored."""
    sizes = study.get("data_sizes", {})
    limit = study["eval_limit"]
    if isinstance(limit, dict):
        parts = []
        for t in study["eval_tasks"]:
            n = sizes.get(t, {}).get("eval")
            whole = limit.get(t) is None
            what = ("the whole split" if whole else
                    f"the first {limit[t]} per subject" if t == "mmlu" else f"the first {limit[t]}")
            parts.append(f"{t} {n:,} ({what})" if n else f"{t} ({what})")
        items = "items per task: " + ", ".join(parts)
    else:
        items = (f"at most {limit} items per task ({study['mmlu_per_subject']} per MMLU subject, all 57 subjects)")
    shots = study.get("shots", 0)
    return (f"held-out splits, {items}; multiple choice by log-likelihood"
            + (f" (MMLU {shots}-shot from its dev split)" if shots else "") + ", Alpaca by response perplexity; "
            "every item's score is saved in each eval.json (the paired intervals use them).")


def write_report(study: dict, out_dir: str | Path) -> Path:
    """Write report.md (and its PNGs) for a finished study into `out_dir`; returns its path."""
    out = Path(out_dir)
    study = dict(study)  # the paired rows are computed here when the caller did not
    if study.get("spectrum_comparisons") is None:
        study["spectrum_comparisons"] = spectrum_comparisons(study)
    if study.get("comparisons") is None:
        study["comparisons"] = comparisons(study)
    loss_curves_png(study, out / "loss_curves.png")
    heldout = heldout_png(study, out / "heldout_loss.png")
    forests = forest_pngs(study, out)
    seeds = study["seeds"]
    t = study["timings"]
    method_rows = ["| arm | trainable parameters | share of model | learning rate | training time per run |",
                   "|---|---:|---:|---:|---:|"]
    for name, m in study["methods"].items():
        secs = statistics.fmean(m["seconds"])
        lr = f"{m['lr']:g}" + (f" (scales x{m['s_lr_mult']:g})" if m.get("s_lr_mult", 1.0) != 1.0 else "")
        method_rows.append(f"| {name} | {m['trainable']:,} | {100 * m['share']:.2f}% | {lr} | {secs:.0f} s |")
    sizes = ", ".join(f"{task} {s['train']:,}" for task, s in study["data_sizes"].items() if s.get("train"))
    analysis_dir = study.get("analysis_dir", "analysis")
    figures = [f for f in ("spectra.png", "effective_rank_by_depth.png", "energy_share.png", "multilora_scales.png")
               if (out / analysis_dir / f).is_file()]
    precision = study.get("precision", "no")
    precision_text = ("bf16 autocast" if precision == "bf16" else "float32" if precision == "no" else precision)
    heldout_text = (f" Held-out loss per task every {study['eval_every']} steps on {study['heldout_examples']} fixed "
                    "held-out examples per task." if study.get("heldout_examples") else "")
    md = [
        f"# MultiLoRA vs LoRA vs full fine-tuning on {study['model']}",
        "",
        verdict(study),
        "",
        "## What was run",
        "",
        f"- Preset `{study.get('preset', 'demo')}`. Model: `{study['model']}`; training tasks (the paper's three "
        f"families): {', '.join(study['tasks'])}.",
        f"- Training examples available per task: {sizes}; mixture `{study['mixture']}`. Every arm saw the same "
        f"batches in the same order per seed (and the same init seed): {study['steps']} steps x "
        f"{study['batch_size']} examples, at most {study['max_len']} tokens each, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}.{heldout_text}",
        f"- Training precision: {precision_text}" + (
            f" ({study['precision_reason']})" if study.get("precision_reason") else "")
        + f"; evaluation in {_eval_precision_text(study)}.",
        f"- Evaluation: {_evaluation_text(study)}",
        f"- Time: training {t['train']:.0f} s, evaluation {t['eval']:.0f} s, analysis {t['analyze']:.0f} s, "
        f"total {t['total']:.0f} s" + (f" (plus {t['convert']:.0f} s one-time model conversion)" if t.get("convert") else "") + ".",
        "",
        *method_rows,
        "",
        "## Scores per task",
        "",
        ("Mean ± standard deviation over seeds. " if len(seeds) > 1 else "")
        + "Best per task in bold (point estimates: the verdict comes from the paired intervals below); chance is "
        "what guessing scores.",
        "",
        task_table(study),
        "",
        "## Paired differences",
        "",
        "Each arm minus the baseline on the same items (and seeds), with a 95% paired-bootstrap interval "
        "(resampling items, and seeds when there are several; spectrum rows resample adapted modules and seeds). "
        "better / worse when the interval excludes zero in the better / worse direction, else can't tell. "
        "Accuracy in percentage points; Alpaca in nll per response token (lower is better); McNemar p is the "
        "exact paired test of the accuracy (with several seeds the largest per-seed p).",
        "",
        paired_section(study),
        "",
        *[f"![{caption}]({name})\n" for name, caption in forests],
        "## Spectra of the learned updates dW",
        "",
        "Means over the adapted layers (attention projections)" + (", seed 0's runs (every seed's analysis is in "
                                                                   "analysis-seed<k>/)" if len(seeds) > 1 else "")
        + ". Effective rank = exp(entropy of the normalized singular values): higher is flatter. Top-k energy "
        "share = fraction of ||dW||_F^2 in the k largest directions: higher means a few directions dominate.",
        "",
        spectrum_table(study["analysis"]),
        "",
        *[f"![{f}]({analysis_dir}/{f})\n" for f in figures],
        *(["## Held-out loss", "", "![held-out loss](heldout_loss.png)", ""] if heldout else []),
        "## Training loss",
        "",
        "![training loss](loss_curves.png)",
        "",
        f"Every number above is in `study.json`; per-layer spectra in `{analysis_dir}/analysis.csv`; each run "
        "folder holds its config, adapter (or weights), metrics.jsonl and eval.json (with every item's score).",
        "",
    ]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(md))
    return path


def _eval_precision_text(study: dict) -> str:
    """How the evaluation scored: float32 (what matches lm-eval item by item) or bf16 autocast."""
    if study.get("eval_precision", "float32") == "bf16":
        return ("bf16 autocast with the logits in float32 (float32 throughout would match lm-eval item by item; "
                "a near-tied answer can flip in bf16)")
    return "float32"
