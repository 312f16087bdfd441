"""`multilora demo`: the paper's study at small scale, on a CPU, with the embedded SmolLM2-135M.

    1. the paper's mixture: Alpaca (instruction following) + MMLU (knowledge) + BoolQ/RTE/WiC (NLU)
    2. train LoRA (r = 24), MultiLoRA (n = 3, r = 8: the same total rank) and full fine-tuning,
       with the same batches, schedule and budget
    3. evaluate the base model and the three runs on every task's held-out split
    4. analyze the three updates' singular-value spectra
    5. write report.md (tables, plots, and a verdict on the paper's two claims computed from them)

The study is a fixed grid over `method` (x seeds) run by the sweep's stages (sweep.train_run,
sweep.evaluate_target, sweep.analyze_runs), which call the library's own train, evaluate and analyze;
`recipes/demo-*.yaml` hold the same training configs. `--quick` is a smoke test on a tiny random model:
its report says so and judges no claim.
"""

from __future__ import annotations

import datetime
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .config import TrainConfig, config_from_dict
from .errors import MultiLoRAError
from .evaluate import EVAL_NAME
from .io import check_writable_dir, write_json_atomic
from .models import DEFAULT_MODEL, TINY_MODEL, cache_dir, embedded_model_cached, embedded_model_path, tiny_model_path
from .report import headline, mean_accuracy, write_report
from .run import Run
from .sweep import EVAL_LIMIT, analyze_runs, check_existing, evaluate_target, run_finished_at, train_run
from .sweep_report import trainable_parameters
from .tasks import PAPER_MIXTURE, get_task, load_examples
from .tasks import eval_limit as per_task_limit  # run_demo's eval_limit argument has the name

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = ("lora", "multilora", "full")
DEFAULT_STEPS = 64
QUICK_STEPS = 6
QUICK_EVAL_LIMIT = 8  # (the default, EVAL_LIMIT: 40 items per task, is the sweep's)
# MultiLoRA's scales learn at 30x the lr: with s = 0 at init they gate every gradient to A and B, and at
# the paper's 1x MultiLoRA trails LoRA on a budget this short (README, "Learning dynamics": the sweep)
S_LR_MULT = 30.0
STEP_WEIGHT, EVAL_WEIGHT = 1.0, 8.0  # rough cost of a training step vs evaluating one task, for the ETA

__all__ = ["run_demo", "demo_config", "demo_runs", "METHODS", "DEFAULT_STEPS", "QUICK_STEPS", "EVAL_LIMIT",
           "QUICK_EVAL_LIMIT"]


def demo_config(method: str, out_dir: str | Path, steps: int = DEFAULT_STEPS, seed: int = 0,
                model: str = DEFAULT_MODEL) -> TrainConfig:
    """The training config of one arm of the study (the same as recipes/demo-<method>.yaml)."""
    adapter = {
        "lora": {"n": 1, "r": 24, "alpha": 48, "init": "lora", "scale": "none", "targets": TARGETS},
        "multilora": {"n": 3, "r": 8, "alpha": 16, "init": "multilora", "scale": "vector", "targets": TARGETS},
        "full": {},
    }[method]
    return config_from_dict({
        "model": model,
        "method": method,
        **({"adapter": adapter} if adapter else {}),
        "data": {"tasks": list(PAPER_MIXTURE), "mixture": "temperature", "temperature": 2.0, "max_len": 128,
                 "chat": False, "eval_examples": 0},
        "optim": {"lr": 3e-5 if method == "full" else 3e-4,
                  **({"s_lr_mult": S_LR_MULT} if method == "multilora" else {}), "weight_decay": 0.0, "warmup_steps": max(1, steps // 10),
                  "schedule": "cosine", "grad_clip": 1.0},
        "train": {"batch_size": 4, "grad_accum": 1, "max_steps": steps, "seed": seed, "eval_every": 0,
                  "save_every": 0, "keep_last": 1},
        "output_dir": str(out_dir),
    })


def demo_runs(out: Path, steps: int, seeds: int, model: str) -> list[dict[str, Any]]:
    """The study's fixed grid as planned sweep runs: every method x seed, in OUT/<method>-seed<seed>."""
    return [{"name": f"{method}-seed{seed}", "combination": method, "overrides": {"method": method}, "seed": seed,
             "config": demo_config(method, out / f"{method}-seed{seed}", steps, seed, model)}
            for seed in range(seeds) for method in METHODS]


def run_demo(out_dir: str | Path | None = None, steps: int | None = None, seeds: int = 1, quick: bool = False,
             model_name: str | None = None, eval_limit: int | None = None, resume: bool = False,
             overwrite: bool = False) -> Path:
    """Run the whole study into `out_dir` (default runs/demo-<date>) and return the report's path.

    `quick` uses a tiny random model (unless `model_name` is given) and a few steps and items: a smoke test
    of the pipeline, whose report judges no claim; `resume` reuses the finished runs and evaluations of an
    interrupted demo in `out_dir`.
    """
    if seeds < 1:
        raise MultiLoRAError(f"--seeds must be >= 1, got {seeds}")
    if steps is not None and steps < 1:
        raise MultiLoRAError(f"--steps must be >= 1, got {steps}")
    if eval_limit is not None and eval_limit < 1:
        raise MultiLoRAError(f"--limit must be >= 1, got {eval_limit}")
    steps = steps or (QUICK_STEPS if quick else DEFAULT_STEPS)
    limit = eval_limit or (QUICK_EVAL_LIMIT if quick else EVAL_LIMIT)
    out = Path(out_dir or f"runs/demo-{datetime.date.today().isoformat()}")
    if resume and overwrite:
        raise MultiLoRAError("--resume and --overwrite exclude each other: resume keeps finished runs, overwrite deletes them")
    if out.exists() and not out.is_dir():
        raise MultiLoRAError(f"--out {out} is a file; pass a folder")
    check_writable_dir(out, "--out folder")  # now, not after the first training run
    if out.is_dir() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise MultiLoRAError(f"{out} already exists and is not empty: pass --resume to continue it, "
                                 "--overwrite to replace it, or another --out")
        shutil.rmtree(out)
    model_name = model_name or (str(tiny_model_path()) if quick else DEFAULT_MODEL)
    runs = demo_runs(out, steps, seeds, model_name)
    check_existing(runs, out, fix="resume with the --steps and --model it ran with, pass --overwrite to replace "
                   "it, or another --out")
    tasks = list(PAPER_MIXTURE)
    console = Console()
    t_start = time.perf_counter()
    t_convert = _prepare_model(model_name, console)

    study: dict[str, Any] = {
        "model": model_name, "tasks": tasks, "eval_tasks": tasks, "steps": steps, "seeds": list(range(seeds)),
        "batch_size": 4, "max_len": 128, "mixture": "temperature (T = 2)", "eval_limit": limit,
        "mmlu_per_subject": per_task_limit("mmlu", limit), "smoke_test": quick or _is_tiny_model(model_name),
        "methods": {m: {"trainable": 0, "share": 0.0, "seconds": [], "runs": [], "train_loss": [], "lr": 0.0,
                        "s_lr_mult": 1.0}
                    for m in METHODS},
        "evals": {}, "data_sizes": {},
    }
    n_models = 1 + len(runs)
    total = len(runs) * steps * STEP_WEIGHT + n_models * len(tasks) * EVAL_WEIGHT + EVAL_WEIGHT
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    timings = {"convert": t_convert, "train": 0.0, "eval": 0.0, "analyze": 0.0}
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("starting", total=total)

        for run in runs:  # 2. training (a finished run is reused as it is, an interrupted one resumed)
            method, seed, folder = run["combination"], run["seed"], Path(run["config"].output_dir)
            progress.update(bar, description=f"train {method} (seed {seed}): step 0/{steps}")
            on_step = lambda step, model, record, m=method, sd=seed: progress.update(  # noqa: E731
                bar, advance=STEP_WEIGHT, description=f"train {m} (seed {sd}): step {step}/{steps}")
            if not train_run(run, progress=False, on_step=on_step):
                progress.update(bar, advance=steps * STEP_WEIGHT)
            seconds = (Run(folder).finished() or {}).get("seconds", math.nan)
            arm = study["methods"][method]
            arm["seconds"].append(seconds)
            arm["runs"].append(str(folder))
            arm["train_loss"].append([r["loss"] for r in Run(folder).metrics() if "loss" in r])
            arm["lr"], arm["s_lr_mult"] = run["config"].optim.lr, run["config"].optim.s_lr_mult
            timings["train"] += seconds
        _record_sizes(study)

        t0 = time.perf_counter()  # 3. evaluation, each result cached in its eval.json
        targets = [("base", model_name, out / "base-eval.json", None)] + [
            (m, r, Path(r) / EVAL_NAME, run_finished_at(Path(r))) for m in METHODS for r in study["methods"][m]["runs"]]
        for name, target, path, trained in targets:
            on_task = lambda task, done, n=name: progress.update(  # noqa: E731
                bar, advance=EVAL_WEIGHT if done else 0, description=f"evaluate {n}: {task}")
            result, evaluated = evaluate_target(target, path, tasks, limit, False, trained, on_task)
            if not evaluated:
                progress.update(bar, advance=EVAL_WEIGHT * len(tasks))
            study["evals"].setdefault(name, []).append(result)
        timings["eval"] = time.perf_counter() - t0
        study["data_sizes"] = _data_sizes(tasks, limit)

        t0 = time.perf_counter()  # 4. analysis (first seed)
        progress.update(bar, description="analyze spectra")
        first = {m: Path(study["methods"][m]["runs"][0]) for m in METHODS}
        with _threads(1):  # many small SVDs: one thread avoids oversubscription
            study["analysis"], notes = analyze_runs(first, out / "analysis")
        if notes:  # the sweep keeps going without a failed run's spectrum; the study needs all three
            name, note = next(iter(notes.items()))
            raise MultiLoRAError(f"the demo's {name} run {first[name]}: {note}; delete that folder and rerun with "
                                 "--resume to train it again")
        study["analysis_dir"] = "analysis"
        timings["analyze"] = time.perf_counter() - t0
        progress.update(bar, advance=EVAL_WEIGHT, description="writing report")

    timings["total"] = time.perf_counter() - t_start
    study["timings"] = timings
    write_json_atomic(out / "study.json", {k: v for k, v in study.items() if k != "analysis"})
    report = write_report(study, out)
    _print_summary(console, study, report)
    return report


def _prepare_model(model_name: str, console: Console) -> float:
    """Convert the embedded model once (timed separately); 0.0 when already cached or not embedded."""
    if model_name != DEFAULT_MODEL:
        return 0.0
    if embedded_model_cached():
        return 0.0
    console.print("first run: converting the embedded SmolLM2-135M once (GGUF -> safetensors cache)")
    t0 = time.perf_counter()
    embedded_model_path()
    return time.perf_counter() - t0


def _is_tiny_model(model_name: str) -> bool:
    """Whether `model_name` is the tiny random model of --quick (a model that learns nothing worth judging)."""
    return model_name != DEFAULT_MODEL and Path(model_name).resolve() == (cache_dir() / TINY_MODEL).resolve()


def _record_sizes(study: dict) -> None:
    """Each method's trainable parameters (the tensors its first run saved) and their share of the base model.

    Full fine-tuning trains (and saves) every parameter, so its count is the base model's size.
    """
    arms = study["methods"]
    counts = {m: trainable_parameters(Path(arms[m]["runs"][0])) for m in METHODS}
    for m in METHODS:
        arms[m]["trainable"] = int(counts[m])
        arms[m]["share"] = counts[m] / counts["full"]


def _data_sizes(tasks: list[str], limit: int) -> dict[str, dict[str, int]]:
    return {t: {"train": len(load_examples(t, get_task(t).train_split)), "eval": limit} for t in tasks}


class _threads:
    """Temporarily set torch's intra-op thread count."""

    def __init__(self, n: int) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)


def _print_summary(console: Console, study: dict, report: Path) -> None:
    table = Table(title=f"{study['model']}: {study['steps']} steps, {len(study['seeds'])} seed(s)")
    table.add_column("model")
    for t in study["eval_tasks"]:
        table.add_column(t, justify="right")
    table.add_column("mean acc", justify="right")
    for name, results in study["evals"].items():
        cells = []
        for t in study["eval_tasks"]:
            vals = [h[0] for h in (headline(r, t) for r in results) if h]
            higher = headline(results[0], t)[1]
            cells.append(f"{100 * statistics.fmean(vals):.1f}" if higher else f"ppl {statistics.fmean(vals):.2f}")
        table.add_row(name, *cells, f"{100 * statistics.fmean(mean_accuracy(study, name)):.1f}")
    console.print(table)
    t = study["timings"]
    console.print(f"time: {t['total']:.0f} s (train {t['train']:.0f} s, eval {t['eval']:.0f} s, "
                  f"analysis {t['analyze']:.0f} s" + (f"; one-time conversion {t['convert']:.0f} s" if t["convert"] else "")
                  + ")")
    if study.get("smoke_test"):
        console.print("[bold]smoke test[/] (--quick or the tiny random model): the pipeline ran end to end; a model "
                      "that learns nothing cannot judge the paper's claims, so no verdict. Run `multilora demo` "
                      "without --quick for one.")
    console.print(f"[bold]report:[/] {report}")
