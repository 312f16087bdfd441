"""The study report's figures: training loss, held-out loss (mean ± std over seeds), forest plots.

matplotlib is imported inside each function on purpose: it is slow to import and only these figures
need it (the sweep and the CLI import the report for its tables); the Figure API draws headless
without touching pyplot's backend.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .io import atomic_path
from .paired import forest_png
from .verdict import BASELINES


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


def heldout_curves(study: dict) -> dict[str, dict[str, tuple[list[int], list[float], list[float]]]]:
    """{key ('loss' or 'loss/<task>'): {arm: (steps, mean over seeds, std over seeds)}} of the held-out loss,
    at the steps every seed logged."""
    out: dict[str, dict[str, tuple[list[int], list[float], list[float]]]] = {}
    for arm, m in study.get("methods", {}).items():
        seeds = [{r["step"]: r for r in curve} for curve in m.get("heldout", []) if curve]
        if not seeds:
            continue
        steps = sorted(set.intersection(*(set(s) for s in seeds)))
        keys = [k for k in seeds[0][steps[0]] if k.startswith("loss")] if steps else []
        for key in keys:
            vals = [[s[step][key] for s in seeds] for step in steps]
            out.setdefault(key, {})[arm] = (steps, [statistics.fmean(v) for v in vals],
                                            [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals])
    return out


def heldout_png(study: dict, path: Path) -> Path | None:
    """Held-out loss per arm during training, mean ± one standard deviation over seeds (shaded): overall and
    per task, one panel each; None when the runs logged none."""
    curves = heldout_curves(study)
    if not curves:
        return None
    from matplotlib.figure import Figure  # deferred: see loss_curves_png

    keys = ["loss", *sorted(k for k in curves if k != "loss")] if "loss" in curves else sorted(curves)
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for arm, (steps, mean, std) in curves[key].items():
            line, = ax.plot(steps, mean, marker="o", markersize=3, label=arm)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
        ax.set_title("all tasks" if key == "loss" else key.removeprefix("loss/"), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    seeds = len(study["seeds"])
    fig.suptitle("Held-out loss during training" + (f", mean ± std over {seeds} seeds" if seeds > 1 else ""))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def forest_pngs(study: dict, out: Path) -> list[tuple[str, str]]:
    """One forest plot per baseline (every other arm's per-task difference with its interval): [(file, caption)]."""
    made = []
    for base in BASELINES:
        rows = [r for r in study.get("comparisons", []) if r["baseline"] == base]
        if rows:
            name = f"forest-vs-{base}.png"
            forest_png(rows, out / name, f"Paired differences vs {base}, 95% intervals over items and seeds")
            made.append((name, f"Per-task differences vs {base}"))
    return made
