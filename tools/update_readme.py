"""Splice generated results into README.md between marker comments, so no number is typed by hand.

    python tools/update_readme.py --demo runs/demo-2026-11-29          # report table, figure, wall time
    python tools/update_readme.py --study runs/demo-study-2026-12-01   # `demo --preset study`: verdict, paired table
    python tools/update_readme.py --bench-layer bench_layer.txt        # printed output of bench_layer.py
    python tools/update_readme.py --sweep runs/sweep-dynamics          # sweep table + held-out loss figure
    MULTILORA_RELIABILITY_JSON=rel.json pytest tests/reliability && \
    python tools/update_readme.py --reliability rel.json                # RELIABILITY.md's figures

Blocks: <!-- demo:start/end -->, <!-- study:start/end -->, <!-- bench-layer:start/end --> and <!-- sweep:start/end -->.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def section(markdown: str, title: str) -> str:
    """The body of the `## title` section of a markdown text."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, flags=re.S | re.M)
    if not m:
        raise SystemExit(f"no '## {title}' section in the report")
    return m.group(1).strip()


def precisions(study: dict) -> str:
    """'training in X, evaluation in Y' of a demo or study run (study.json's precision and eval_precision)."""
    train = "bf16 autocast" if study.get("precision") == "bf16" else "float32"
    evaluation = "bf16 autocast (logits float32)" if study.get("eval_precision") == "bf16" else "float32"
    return f"training in {train}, evaluation in {evaluation}"


def where(study: dict) -> str:
    """'CPU model, N cores, no GPU' from study.json's machine (older files without it: this machine's arch)."""
    m = study.get("machine") or {}
    if not m:
        return f"{platform.machine()} Linux VM, 2 cores, no GPU"
    return f"{m.get('cpu', platform.machine())}, {m.get('cores', '?')} cores, " + (m.get("gpu") or "no GPU")


def demo_block(run: Path) -> str:
    """README text for a finished demo folder: verdict, per-task table, one spectra figure, wall time."""
    report = (run / "report.md").read_text(encoding="utf-8")
    study = json.loads((run / "study.json").read_text(encoding="utf-8"))
    if study.get("smoke_test"):
        raise SystemExit(f"{run} is a --quick smoke test (tiny random model), not results; run `multilora demo`")
    verdict = report.split("## What was run")[0].split("\n", 1)[1].strip()
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    shutil.copyfile(run / "analysis" / "spectra.png", docs / "demo-spectra.png")
    shutil.copyfile(run / "loss_curves.png", docs / "demo-loss.png")
    t = study["timings"]
    date = run.stat().st_mtime
    when = datetime.datetime.fromtimestamp(date, datetime.timezone.utc).strftime("%Y-%m-%d")
    wall = (f"{t['total'] / 60:.1f} min wall time (training {t['train']:.0f} s, evaluation {t['eval']:.0f} s, "
            f"analysis {t['analyze']:.0f} s)" + (f", after a one-time model conversion of {t['convert']:.0f} s"
                                                  if t.get("convert") else ""))
    return "\n".join([
        f"`multilora demo` on {when}, {where(study)}: "
        f"{study['steps']} steps per method, {len(study['seeds'])} seed(s), {precisions(study)}; {wall}.",
        "",
        section(report, "Scores per task"),
        "",
        verdict,
        "",
        "![Normalized singular-value spectra of dW per module type](docs/demo-spectra.png)",
        "",
        "![Training loss per method](docs/demo-loss.png)",
    ])


def study_block(run: Path) -> str:
    """README text for a finished `multilora demo --preset study` folder: the command, machine and time, the
    verdict, the per-task table, the paired differences with the forest plots, held-out loss and spectra."""
    report = (run / "report.md").read_text(encoding="utf-8")
    study = json.loads((run / "study.json").read_text(encoding="utf-8"))
    if study.get("smoke_test"):
        raise SystemExit(f"{run} is a --quick smoke test (tiny random model), not results; run "
                         "`multilora demo --preset study`")
    if study.get("preset") != "study":
        raise SystemExit(f"{run} is a `multilora demo` of preset {study.get('preset', 'demo')!r}; use --demo for it")
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    copies = {"forest-vs-lora.png": "study-forest-vs-lora.png", "forest-vs-full.png": "study-forest-vs-full.png",
              "heldout_loss.png": "study-heldout.png", "analysis/spectra.png": "study-spectra.png",
              "loss_curves.png": "study-loss.png"}
    for src, dst in copies.items():
        if (run / src).is_file():
            shutil.copyfile(run / src, docs / dst)
    verdict = report.split("## What was run")[0].split("\n", 1)[1].strip()
    paired = section(report, "Paired differences")
    for src, dst in copies.items():
        paired = paired.replace(f"]({src})", f"](docs/{dst})")
    t = study["timings"]
    when = datetime.datetime.fromtimestamp((run / "study.json").stat().st_mtime, datetime.timezone.utc)
    wall = (f"{t['total'] / 3600:.2f} h wall time (training {t['train'] / 60:.0f} min, evaluation "
            f"{t['eval'] / 60:.0f} min, analysis {t['analyze']:.0f} s)")
    if study.get("resumed"):  # the wall time is the last session's; the folders record what every session took
        wall = (f"resumed (finished runs and evaluations reused): training {t['train'] / 60:.0f} min and "
                f"evaluation {t.get('eval_recorded', t['eval']) / 60:.0f} min as the runs and eval.json files "
                f"recorded them, {(t['train'] + t.get('eval_recorded', t['eval']) + t['analyze']) / 3600:.2f} h "
                f"in all; the last session {t['total'] / 3600:.2f} h wall time")
    figures = [f"![{caption}](docs/{name})" for name, caption in (
        ("study-heldout.png", "Held-out loss per task during training, mean ± std over seeds"),
        ("study-spectra.png", "Normalized singular-value spectra of dW (seed 0)")) if (docs / name).is_file()]
    return "\n".join([
        f"`{study.get('command', 'multilora demo --preset study')}` on {when:%Y-%m-%d}, {where(study)}, "
        f"{precisions(study)}: {len(study['methods'])} arms x {len(study['seeds'])} seeds, {study['steps']} steps each; "
        f"{wall}.",
        "",
        verdict,
        "",
        section(report, "Scores per task"),
        "",
        paired,
        "",
        *[line for f in figures for line in (f, "")],
    ]).rstrip()


def sweep_block(out: Path) -> str:
    """README text for a finished `multilora sweep` folder: its table, the run command, two figures."""
    md = (out / "sweep.md").read_text(encoding="utf-8")
    manifest = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in md.split("## What was run")[0].splitlines() if line.startswith("|")]
    drop = [i for i, cell in enumerate(rows[0]) if cell.strip() == "train s"]  # depends on other load: in sweep.csv
    table = "\n".join("| " + " | ".join(c for i, c in enumerate(r) if i not in drop) + " |" for r in rows)
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    figures = []
    for name, caption in (("sweep-heldout.png", "Held-out loss during training, mean ± std over seeds"),
                          ("sweep-spectrum.png", "Effective rank and top-1 energy share of dW")):
        if (out / name).is_file():
            shutil.copyfile(out / name, docs / name)
            figures += [f"![{caption}](docs/{name})", ""]
    grid = " ".join(f"--grid {' '.join(g)}" for g in manifest["grid"])
    limit = manifest["eval"]["limit"]
    command = (f"multilora sweep {manifest['base']} --seeds {manifest['seeds']} --limit {limit} {grid}")
    return "\n".join([f"`{command}` ({len(manifest['runs'])} runs, {platform.machine()} Linux VM, 2 CPU cores):",
                      "", table, "", *figures]).rstrip()


def reliability_block(figures: Path) -> str:
    """RELIABILITY.md's tables: cases tried and protection failures per category, then per entry point."""
    data = json.loads(figures.read_text(encoding="utf-8"))
    summary = ["| category | entry points | cases tried | failures |", "|---|---:|---:|---:|"]
    detail = ["| category | entry point | cases tried | failures |", "|---|---|---:|---:|"]
    for category in sorted(data):
        cells = data[category]
        summary.append(f"| {category} | {len(cells)} | {sum(c['cases'] for c in cells.values()):,} | "
                       f"{sum(c['failures'] for c in cells.values())} |")
        detail += [f"| {category} | {entry} | {c['cases']:,} | {c['failures']} |" for entry, c in sorted(cells.items())]
    return "\n".join(summary + ["", "<details><summary>Per entry point</summary>", "", *detail, "", "</details>"])


def splice(readme: str, name: str, body: str) -> str:
    """Replace the text between <!-- name:start --> and <!-- name:end -->."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in readme or end not in readme:
        raise SystemExit(f"the document lacks the markers {start} ... {end}")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, help="a finished `multilora demo` folder")
    parser.add_argument("--bench-layer", type=Path, help="a file holding the printed output of bench_layer.py")
    parser.add_argument("--study", type=Path, help="a finished `multilora demo --preset study` folder")
    parser.add_argument("--sweep", type=Path, help="a finished `multilora sweep` folder")
    parser.add_argument("--reliability", type=Path, help="the JSON figures of a tests/reliability run (RELIABILITY.md)")
    args = parser.parse_args()
    path = ROOT / "README.md"
    readme = path.read_text(encoding="utf-8")
    if args.demo:
        readme = splice(readme, "demo", demo_block(args.demo))
    if args.study:
        readme = splice(readme, "study", study_block(args.study))
    if args.sweep:
        readme = splice(readme, "sweep", sweep_block(args.sweep))
    if args.bench_layer:
        text = args.bench_layer.read_text(encoding="utf-8")
        skip = ("built ", "ran ", "wrote ", "rc=", "warnings.warn(")
        text = "\n".join(line for line in text.splitlines()
                         if not line.lstrip().startswith(skip) and "Warning:" not in line)
        readme = splice(readme, "bench-layer", f"```text\n{text.strip()}\n```")
    write(path, readme)
    if args.reliability:
        doc = ROOT / "RELIABILITY.md"
        write(doc, splice(doc.read_text(encoding="utf-8"), "figures", reliability_block(args.reliability)))


def write(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    main()
