"""The text outputs of `multilora analyze`: analysis.json's JSON-safe form, analysis.csv (one row per
run x layer) and summary.md (tables of the mean metrics, the plots)."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Sequence

from .spectra import SUBSPACE_METRICS, TOP_K, TYPE_ORDER, scalar_metrics


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def fmt(x: Any, digits: int = 3) -> str:
    """A number for tables and bar labels, 'n/a' for None / NaN / inf."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def csv_text(runs: list[dict[str, Any]], top_k: Sequence[int] = TOP_K) -> str:
    """One CSV row per run x layer with every scalar metric (lists joined with ';')."""
    cols = ["run", "kind", "module", "type", "depth", "d_out", "d_in", "rank_bound", *scalar_metrics(top_k),
            *SUBSPACE_METRICS, "scale_norms", "module_share", "note"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for run in runs:
        for rec in run["layers"]:
            row = {**rec, "run": run["name"], "kind": run["kind"]}
            for k in ("scale_norms", "module_share"):
                row[k] = ";".join(f"{v:.6g}" for v in rec[k]) if k in rec else ""
            w.writerow(["" if row.get(c) is None else row.get(c) for c in cols])
    return buf.getvalue()


def summary_markdown(runs: list[dict[str, Any]], figures: list[tuple[str, str]], top_k: Sequence[int] = TOP_K) -> str:
    """summary.md: a table of the mean metrics per run, effective rank per module type, the plots."""
    ek = [f"energy_top{k}" for k in top_k]
    lines = ["# Spectra of the learned updates dW", "",
             "Means over the adapted layers. Energy top-k: share of ||dW||_F^2 in the k largest singular "
             "directions (higher = dominated by few directions). Effective rank: exp(entropy of sigma / sum sigma) "
             "(higher = flatter spectrum). Stable rank: ||dW||_F^2 / sigma_1^2.", "",
             "| run | kind | layers | rank bound | " + " | ".join(f"energy top-{k}" for k in top_k)
             + " | effective rank | stable rank | ‖dW‖_F |",
             "|---|---|---|---|" + "---|" * (len(top_k) + 3)]
    for run in runs:
        o = run["overall"]
        bounds = sorted({rec["rank_bound"] for rec in run["layers"]})
        bound = str(bounds[0]) if len(bounds) == 1 else f"{bounds[0]}-{bounds[-1]}"
        lines.append(f"| {run['name']} | {run['kind']} | {o['layers']} | {bound} | "
                     + " | ".join(fmt(o[k]) for k in ek)
                     + f" | {fmt(o['effective_rank'])} | {fmt(o['stable_rank'])} | {fmt(o['frobenius'])} |")
    types = [t for t in TYPE_ORDER if any(t in r["by_type"] for r in runs)]
    types += sorted({t for r in runs for t in r["by_type"]} - set(types))
    lines += ["", "Effective rank by module type (mean over layers):", "",
              "| run | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for run in runs:
        lines.append(f"| {run['name']} | " + " | ".join(
            fmt(run["by_type"][t]["effective_rank"]) if t in run["by_type"] else "" for t in types) + " |")
    sub = [r for r in runs if "w0_overlap" in r["overall"]]
    if sub:
        lines += ["", "dW's top singular directions against W0's (LoRA paper, section 7): overlap "
                  "||U_k^T U0_k||_F^2 / k (chance level k / d_out), amplification ||dW||_F / ||U_k^T W0 V_k||_F.", "",
                  "| run | k | overlap with W0 | chance level | amplification |", "|---|---|---|---|---|"]
        for run in sub:
            o = run["overall"]
            lines.append(f"| {run['name']} | {fmt(o['subspace_k'])} | {fmt(o['w0_overlap'])} | "
                         f"{fmt(o['w0_overlap_chance'])} | {fmt(o['amplification'])} |")
    zero = sum(1 for r in runs for rec in r["layers"] if rec["note"])
    if zero:
        lines += ["", f"Note: {zero} layer(s) have dW = 0 (e.g. untrained); their ratios are n/a and excluded "
                  "from the means."]
    lines += ["", "Files: `analysis.json` (every number, per layer and aggregated), `analysis.csv` "
              "(one row per run x layer)."]
    for file, caption in figures:
        lines += ["", f"## {caption}", "", f"![{caption}]({file})"]
    return "\n".join(lines) + "\n"
