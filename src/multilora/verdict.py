"""The verdict on the paper's two claims, computed from a study's numbers with paired 95% intervals.

    rows = comparisons(study)              # every fine-tuned arm vs LoRA and vs full fine-tuning, per task + overall
    spec = spectrum_comparisons(study)     # each MultiLoRA arm's spectrum vs LoRA's, over modules (and seeds)
    text = verdict(study)                  # Claim 1 (flatter spectrum), Claim 2 (better scores), training loss

"better / worse / can't tell" comes from whether the interval of MultiLoRA's difference to LoRA (or to
full fine-tuning) excludes zero, over items and seeds for the task scores (`paired`, `stats`), over
adapted modules and seeds for the spectrum; never from point estimates. `study` is what `multilora
demo` writes to study.json (see `report`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

from .paired import OVERALL, compare_paired, interval_text
from .stats import paired_bootstrap
from .stats import verdict as interval_verdict

ADAPTED = ("lora", "multilora-paper", "multilora", "full")
BASELINES = ("lora", "full")  # MultiLoRA is compared with each
SPECTRUM_METRICS = (("effective_rank", True), ("energy_top1", False))  # (metric, higher is flatter)
N_BOOT = 10_000
SMOKE_TEST = ("**Smoke test: no verdict on Claim 1 (a flatter spectrum) or Claim 2 (better multi-task scores).** "
              "This run (`--quick`, or the tiny random model) checks that training, evaluation, analysis and this "
              "report work end to end; a model that learns nothing cannot test the paper's claims, so none is "
              "judged here. Run `multilora demo` without `--quick` for a verdict.")


def headline(result: dict, task: str) -> tuple[float, bool] | None:
    """(value, higher_is_better) of a task's headline metric in an evaluate() result, or None."""
    r = result["tasks"].get(task)
    if r is None:
        return None
    if r["kind"] == "perplexity":
        return r["perplexity"], False
    return r["acc"], True


def mean_accuracy(study: dict, name: str) -> list[float]:
    """Per seed: the unweighted mean accuracy over the multiple-choice tasks."""
    out = []
    for r in study["evals"][name]:
        accs = [h[0] for h in (headline(r, t) for t in study["eval_tasks"]) if h is not None and h[1]]
        out.append(statistics.fmean(accs) if accs else math.nan)
    return out


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


def multilora_arms(study: dict) -> list[str]:
    """The MultiLoRA arms of the study (the demo: 'multilora'; the study also 'multilora-paper')."""
    methods = study.get("methods", {})
    return [name for name in study["evals"] if name != "base"
            and (methods.get(name, {}).get("method") == "multilora" or name.startswith("multilora"))]


def has_items(study: dict) -> bool:
    """Whether every adapted model's results hold per-item scores (what the paired intervals need)."""
    return all("items" in t for name, results in study["evals"].items() if name != "base"
               for r in results for t in r["tasks"].values())


def comparisons(study: dict, n_boot: int = N_BOOT) -> list[dict[str, Any]]:
    """paired.compare_paired rows of every fine-tuned arm against LoRA and against full fine-tuning, per task
    and overall (difference = arm - baseline, 95% interval over items and seeds); [] without per-item scores."""
    groups = {name: results for name, results in study["evals"].items() if name != "base"}
    if not has_items(study):
        return []
    rows = [row for base in BASELINES if base in groups and len(groups) > 1
            for row in compare_paired(groups, base, n_boot=n_boot)]
    mirrored = {(r["baseline"], r["run"]) for r in rows if r["baseline"] == BASELINES[0]}
    return [r for r in rows if (r["run"], r["baseline"]) not in mirrored]  # lora - full is -(full - lora)


def module_metrics(analysis: dict, name: str) -> dict[str, dict[str, float]]:
    """{module: {effective_rank, energy_top1}} of the run `name` in an analyze() report."""
    run = next(r for r in analysis["runs"] if r["name"] == name)
    return {layer["module"]: {m: layer[m] for m, _ in SPECTRUM_METRICS} for layer in run["layers"]}


def _spectra(study: dict) -> dict[str, list[dict[str, dict[str, float]]]]:
    """{arm: [per seed: {module: metrics}]}: study["spectra"], else seed 0's analysis."""
    if study.get("spectra"):
        return study["spectra"]
    analysis = study.get("analysis") or {}
    return {run["name"]: [module_metrics(analysis, run["name"])] for run in analysis.get("runs", [])
            if run.get("layers")}


def _matrix(per_seed: list[dict[str, dict[str, float]]], modules: list[str], metric: str) -> np.ndarray:
    return np.array([[seed[m][metric] for m in modules] for seed in per_seed], dtype=np.float64)


def spectrum_comparisons(study: dict, n_boot: int = N_BOOT) -> list[dict[str, Any]]:
    """Each MultiLoRA arm's spectrum vs LoRA's: effective rank and top-1 energy share, the paired difference
    (arm - LoRA, mean over the adapted modules both share and over seeds) with its 95% bootstrap interval
    over modules and seeds (`stats.paired_bootstrap`, modules as items); with a full fine-tuning arm also
    the distance of the top-1 share to full fine-tuning's (smaller: closer). Rows as compare_paired's."""
    spectra, rows = _spectra(study), []
    if "lora" not in spectra:
        return []
    for arm in (a for a in spectra if a.startswith("multilora") or a in multilora_arms(study)):
        seeds = min(len(spectra["lora"]), len(spectra[arm]))
        lora, ml = spectra["lora"][:seeds], spectra[arm][:seeds]
        modules = [m for m in lora[0] if all(m in s for s in lora + ml)]
        if not modules:
            continue
        note = f"interval over {len(modules)} adapted modules" + (f" and {seeds} seeds" if seeds > 1 else
                                                                   ", one seed: seed-to-seed variation not in it")
        for k, (metric, higher) in enumerate(SPECTRUM_METRICS):
            a, b = _matrix(lora, modules, metric), _matrix(ml, modules, metric)
            rows.append(_spectrum_row(metric, arm, "lora", paired_bootstrap(a, b, n_boot=n_boot, seed=k), higher,
                                      len(modules), seeds, note))
        full = spectra.get("full", [])[:seeds]
        shared = [m for m in modules if len(full) == seeds and all(m in s for s in full)]
        if shared:
            f = _matrix(full, shared, "energy_top1")
            a = np.abs(_matrix(lora, shared, "energy_top1") - f)
            b = np.abs(_matrix(ml, shared, "energy_top1") - f)
            rows.append(_spectrum_row("energy_top1 distance to full", arm, "lora",
                                      paired_bootstrap(a, b, n_boot=n_boot, seed=len(SPECTRUM_METRICS)), False,
                                      len(shared), seeds, note))
    return rows


def _spectrum_row(metric: str, run: str, base: str, iv: Any, higher: bool, n: int, seeds: int,
                  note: str) -> dict[str, Any]:
    return {"task": "spectrum", "metric": metric, "run": run, "baseline": base, "diff": iv.diff, "low": iv.low,
            "high": iv.high, "p_mcnemar": None, "n_items": n, "n_seeds": seeds, "higher_is_better": higher,
            "verdict": interval_verdict(iv, higher), "note": note}


def _status(verdicts: list[str]) -> str:
    """A claim's status from the verdicts it needs: all 'better' supports it, any 'worse' refutes it."""
    if verdicts and all(v == "better" for v in verdicts):
        return "supported"
    if any(v == "worse" for v in verdicts):
        return "not supported"
    return "can't tell"


def _claim_head(claim: str, statuses: dict[str, str]) -> str:
    if len(set(statuses.values())) == 1:
        return f"**{claim}: {next(iter(statuses.values()))} here.**"
    return f"**{claim}: " + "; ".join(f"{s} for {arm}" for arm, s in statuses.items()) + ".**"


def spectrum_number(row: dict[str, Any]) -> str:
    """A spectrum row's difference with its interval."""
    digits = 1 if row["metric"] == "effective_rank" else 3
    return f"{row['diff']:+.{digits}f} [{row['low']:+.{digits}f}, {row['high']:+.{digits}f}]"


def claim1(study: dict, rows: list[dict[str, Any]]) -> str | None:
    """Claim 1 (a flatter spectrum) from the spectrum rows; None without LoRA and MultiLoRA spectra."""
    arms = list(dict.fromkeys(r["run"] for r in rows))
    if not arms:
        return None
    statuses, details = {}, []
    values = spectrum_rows(study["analysis"]) if study.get("analysis") else {}
    for arm in arms:
        mine = {r["metric"]: r for r in rows if r["run"] == arm}
        core = [mine[m] for m, _ in SPECTRUM_METRICS if m in mine]
        statuses[arm] = _status([r["verdict"] for r in core])
        flat = {"better": "flatter", "worse": "less flat", "can't tell": "can't tell"}
        text = (f"{arm} minus LoRA (same total rank), mean over modules and seeds with its 95% interval: effective "
                f"rank {spectrum_number(mine['effective_rank'])} ({flat[mine['effective_rank']['verdict']]}), top-1 energy "
                f"share {spectrum_number(mine['energy_top1'])} ({flat[mine['energy_top1']['verdict']]})")
        dist = mine.get("energy_top1 distance to full")
        if dist is not None:
            closer = {"better": "closer to", "worse": "further from", "can't tell": "can't tell whether closer to"}
            text += (f"; its top-1 share is {closer[dist['verdict']]} full fine-tuning's than LoRA's "
                     f"(distance difference {spectrum_number(dist)})")
        details.append(text + f" [{core[0]['note']}].")
    if values:
        details.append("Seed 0's means: " + ", ".join(
            f"{name} effective rank {v['effective_rank']:.1f}, top-1 share {v['energy_top1']:.2f}"
            for name, v in values.items()) + ".")
    details.append("Part of MultiLoRA's flatness is present from the first step: B_i A_i start random and the "
                   "learned scales pick them up, so a short run shows the init as much as the training.")
    return _claim_head("Claim 1, a flatter spectrum", statuses) + " " + " ".join(details)


def _task_list(rows: list[dict[str, Any]]) -> str:
    by: dict[str, list[str]] = {}
    for r in rows:
        by.setdefault(r["verdict"], []).append(r["task"] + (" (nll/token)" if r["metric"] == "nll/token" else ""))
    return "; ".join(f"{v} on {', '.join(by[v])}" for v in ("better", "worse", "can't tell") if v in by)


def claim2(study: dict, rows: list[dict[str, Any]]) -> str | None:
    """Claim 2 (better multi-task scores than LoRA and full fine-tuning) from the paired rows."""
    arms = multilora_arms(study)
    if not arms or len(study["evals"]) < 2 or not any(a in study["evals"] for a in BASELINES):
        return None
    if not rows:
        return ("**Claim 2, better multi-task scores: can't tell here.** These results hold no per-item scores, so "
                "no paired interval can be computed; rerun the demo (it saves them) for a verdict.")
    statuses, details = {}, []
    for arm in arms:
        verdicts = []
        for base in BASELINES:
            mine = [r for r in rows if r["run"] == arm and r["baseline"] == base]
            if not mine:
                continue
            overall = next((r for r in mine if r["task"] == OVERALL), None)
            head = (f"mean accuracy over the multiple-choice tasks {interval_text(overall)}: {overall['verdict']}"
                    if overall else "")
            if overall:
                verdicts.append(overall["verdict"])
            else:  # one multiple-choice task: its row decides (perplexity is listed, not judged here)
                verdicts += [r["verdict"] for r in mine if r["higher_is_better"]]
            per_task = _task_list([r for r in mine if r["task"] != OVERALL])
            details.append(f"{arm} − {base}: {head}{'; per task ' if head else 'per task '}{per_task}.")
        statuses[arm] = _status(verdicts)
    seeds = len(study["seeds"])
    text = (_claim_head("Claim 2, better multi-task scores", statuses) + " Paired differences with 95% intervals "
            f"over the items{' and the ' + str(seeds) + ' seeds' if seeds > 1 else ''} (each arm scored on the same "
            "items; accuracy in percentage points, Alpaca in nll per response token, lower is better): "
            + " ".join(details))
    if any(s == "can't tell" for s in statuses.values()):
        text += (" \"can't tell\" means the interval includes zero: this run cannot separate the methods there"
                 + ("; more steps, items and seeds (`--preset study`) would narrow it."
                    if study.get("preset", "demo") == "demo" else "."))
    if "base" in study["evals"]:
        means = {m: statistics.fmean(mean_accuracy(study, m)) for m in study["evals"] if m != "base"}
        base = statistics.fmean(mean_accuracy(study, "base"))
        best = max(means, key=means.get)
        text += (f" The untuned base model scores {100 * base:.1f}%; the best fine-tuned model ({best}) "
                 f"{'gains' if means[best] > base else 'does not gain'} over it"
                 f" ({100 * (means[best] - base):+.1f} points).")
    return text


def verdict(study: dict) -> str:
    """A plain-language paragraph on the paper's two claims, computed from paired intervals (none for a smoke test)."""
    if study.get("smoke_test"):
        return SMOKE_TEST
    spectrum = study.get("spectrum_comparisons")
    paired = study.get("comparisons")
    parts = [claim1(study, spectrum_comparisons(study) if spectrum is None else spectrum),
             claim2(study, comparisons(study) if paired is None else paired)]
    dynamics = loss_trends(study)
    if dynamics:
        rising = [m for m, (a, b) in dynamics.items() if b > a]
        parts.append("**Training loss**, mean of the first vs the last quarter of the steps: "
                     + ", ".join(f"{m} {a:.2f} → {b:.2f}" for m, (a, b) in dynamics.items()) + "."
                     + (f" It rose for {', '.join(rising)}: with these settings that method did not learn "
                        "from the mixture in this budget." if rising else ""))
    return "\n\n".join(p for p in parts if p)
