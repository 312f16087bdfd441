"""The PNG plots of `multilora analyze`: spectra per module type, effective rank by depth, top-k
energy shares and (MultiLoRA) each module's share of dW with the scale norms.

Headless: matplotlib's Figure API only (no pyplot). matplotlib is imported inside the functions
that draw, on purpose: it is an optional dependency, needed only when plots are written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .analysis_report import fmt
from .errors import MultiLoRAError
from .io import atomic_path
from .spectra import TOP_K, TYPE_ORDER, nanmean


def write_plots(runs: list[dict[str, Any]], out: Path, top_k: Sequence[int] = TOP_K) -> list[tuple[str, str]]:
    """Write the PNG plots (headless: matplotlib's Figure API, no pyplot); returns (file, caption) pairs."""
    try:
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise MultiLoRAError("the analysis plots need matplotlib: pip install matplotlib") from None
    figures = [("spectra.png", "Normalized singular-value spectra per module type", _plot_spectra(runs)),
               ("effective_rank_by_depth.png", "Effective rank by layer depth", _plot_depth(runs)),
               ("energy_share.png", "Top-k energy share", _plot_energy(runs, top_k))]
    scaled = [r for r in runs if any("module_share" in rec for rec in r["layers"])]
    if scaled:
        figures.append(("multilora_scales.png", "MultiLoRA: each module's share of dW and the scale norms",
                        _plot_scales(scaled)))
    for file, _, fig in figures:
        with atomic_path(out / file) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return [(file, caption) for file, caption, _ in figures]


def _colors(n: int) -> list[Any]:
    """n distinct colors (tab10, cycled), the same run order in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _plot_spectra(runs: list[dict[str, Any]]) -> Any:
    """(1) Mean normalized spectrum sigma_j / sum sigma per module type, runs overlaid, log-y."""
    from matplotlib.figure import Figure

    types = [t for t in TYPE_ORDER if any(t in r["by_type"] for r in runs)]
    types += sorted({t for r in runs for t in r["by_type"]} - set(types))
    cols = min(4, len(types))
    rows = math.ceil(len(types) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    longest = max(len(g["spectrum_mean"]) for r in runs for g in r["by_type"].values())
    for ax, t in zip(axes.flat, types):
        drawn = False
        for run, color in zip(runs, _colors(len(runs))):
            if t not in run["by_type"]:
                continue
            g = run["by_type"][t]
            spec = [p for p in g["spectrum_mean"] if p > 0]
            if not spec:
                continue
            x = range(1, len(spec) + 1)
            ax.plot(x, spec, marker="o" if len(spec) <= 32 else None, ms=3, color=color, label=run["name"])
            drawn = True
        if drawn:
            ax.set_yscale("log")
            if longest > 64:
                ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "dW = 0 in every layer\n(untrained?)", ha="center", va="center", transform=ax.transAxes)
        counts = ", ".join(f"{r['name']}: {r['by_type'][t]['layers']}" for r in runs if t in r["by_type"])
        ax.set_title(f"{t}  (layers {counts})", fontsize=9)
        ax.set_xlabel("singular value index j")
        ax.set_ylabel(r"$\sigma_j / \Sigma\sigma$ (fraction)")
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(types):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.suptitle("Normalized singular-value spectrum of dW (mean over the layers of each module type; log scale)")
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), fontsize=9,
               bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _plot_depth(runs: list[dict[str, Any]]) -> Any:
    """(2) Effective rank (mean over the module types at each depth) against the layer index, per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for run, color in zip(runs, _colors(len(runs))):
        pts = [(int(d), g["effective_rank"]) for d, g in run["by_depth"].items()
               if d != "None" and math.isfinite(g["effective_rank"])]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", ms=4, color=color, label=run["name"])
    ax.set_title("Effective rank of dW by layer depth (mean over module types)")
    ax.set_xlabel("layer index (depth)")
    ax.set_ylabel(r"effective rank $e^{H(\sigma/\Sigma\sigma)}$ (directions)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_energy(runs: list[dict[str, Any]], top_k: Sequence[int]) -> Any:
    """(3) Grouped bars: mean top-k energy share per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(7.0, 1.6 * len(runs) + 2), 4.2))
    ax = fig.subplots()
    width = 0.8 / len(top_k)
    for i, (k, color) in enumerate(zip(top_k, _colors(len(top_k)))):
        vals = [run["overall"][f"energy_top{k}"] for run in runs]
        xs = [j + (i - (len(top_k) - 1) / 2) * width for j in range(len(runs))]
        bars = ax.bar(xs, [v if math.isfinite(v) else 0.0 for v in vals], width, color=color, label=f"top-{k}")
        ax.bar_label(bars, labels=[fmt(v, 2) for v in vals], fontsize=7)
    long_names = any(len(run["name"]) > 10 for run in runs)
    ax.set_xticks(range(len(runs)), [run["name"] for run in runs], rotation=20 if long_names else 0,
                  ha="right" if long_names else "center")
    ax.set_ylim(0, 1.1)
    ax.set_title(r"Share of $\|dW\|_F^2$ in the top-k singular directions (mean over layers)")
    ax.set_xlabel("run")
    ax.set_ylabel(r"energy share $\Sigma_{j\leq k}\sigma_j^2 / \Sigma_j\sigma_j^2$ (fraction)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_scales(runs: list[dict[str, Any]]) -> Any:
    """(4) Per MultiLoRA run: stacked module shares of ||dW_i||_F per module type, and ||s_i|| by depth."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8 * len(runs)))
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for (ax_share, ax_norm), run in zip(axes, runs):
        types = [t for t, g in run["by_type"].items() if "module_share_mean" in g]
        n = len(run["by_type"][types[0]]["module_share_mean"]) if types else 0
        bottom = [0.0] * len(types)
        for i, color in zip(range(n), _colors(n)):
            vals = [run["by_type"][t]["module_share_mean"][i] for t in types]
            vals = [v if math.isfinite(v) else 0.0 for v in vals]
            ax_share.bar(types, vals, 0.6, bottom=bottom, color=color, label=f"module {i + 1}")
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax_share.axhline(1 / max(n, 1), color="gray", ls="--", lw=1, label="equal share 1/n")
        ax_share.set_ylim(0, 1.05)
        ax_share.set_title(f"{run['name']}: " + r"module i's share $\|s_i B_i A_i\|_F / \Sigma_i \|s_i B_i A_i\|_F$",
                           fontsize=10)
        ax_share.set_xlabel("module type")
        ax_share.set_ylabel("share of the summed norms (fraction)")
        ax_share.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        norms = [rec for rec in run["layers"] if "scale_norms" in rec]
        if norms:
            by_depth: dict[int, list[list[float]]] = {}
            for rec in norms:
                by_depth.setdefault(rec["depth"] if rec["depth"] is not None else -1, []).append(rec["scale_norms"])
            depths = sorted(by_depth)
            for i, color in zip(range(n), _colors(n)):
                ax_norm.plot(depths, [nanmean([v[i] for v in by_depth[d]]) for d in depths], marker="o", ms=4,
                             color=color, label=f"module {i + 1}")
            ax_norm.set_title(f"{run['name']}: " + r"scale norm $\|s_i\|_2$ by depth (mean over module types)",
                              fontsize=10)
            ax_norm.legend(fontsize=7)
        else:
            ax_norm.text(0.5, 0.5, "no learned scales (scale='none')", ha="center", va="center",
                         transform=ax_norm.transAxes)
            ax_norm.set_title(f"{run['name']}: scale norms")
        ax_norm.set_xlabel("layer index (depth)")
        ax_norm.set_ylabel(r"$\|s_i\|_2$ (unitless)")
        ax_norm.set_ylim(bottom=0)
        ax_norm.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig
