"""`multilora demo`: the paper's study at small scale, on a CPU, with the embedded SmolLM2-135M.

    1. the paper's mixture: Alpaca (instruction following) + MMLU (knowledge) + BoolQ/RTE/WiC (NLU)
    2. train LoRA (r = 24), MultiLoRA (n = 3, r = 8: the same total rank) and full fine-tuning,
       with the same batches, schedule and budget
    3. evaluate the base model and the three runs on every task's held-out split
    4. analyze the three updates' singular-value spectra
    5. write report.md (tables, plots, and a verdict on the paper's two claims computed from them)

Each stage is the library's own command (train, evaluate, analyze), so the demo is also an example
of using them from Python. `recipes/demo-*.yaml` hold the same training configs.
"""

from __future__ import annotations

import datetime
import json
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
from .io import check_writable_dir, write_json_atomic
from .models import DEFAULT_MODEL

TASKS = ["alpaca", "mmlu", "boolq", "rte", "wic"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = ("lora", "multilora", "full")
DEFAULT_STEPS = 64
QUICK_STEPS = 6
EVAL_LIMIT = 40  # items per task (per MMLU subject: 1), a few minutes per model on 2 cores
QUICK_EVAL_LIMIT = 8
# MultiLoRA's scales learn at 30x the lr: with s = 0 at init they gate every gradient to A and B, and at
# the paper's 1x MultiLoRA trails LoRA on a budget this short (README, "Learning dynamics": the sweep)
S_LR_MULT = 30.0
DONE_FILE = "demo_run.json"  # written into a run folder when its training finished
MMLU_SUBJECTS_SHARE = 20  # MMLU's limit is per subject (57 of them): use limit // 20 per subject
STEP_WEIGHT, EVAL_WEIGHT = 1.0, 8.0  # rough cost of a training step vs evaluating one task, for the ETA


def task_limit(task: str, limit: int) -> int:
    """The `evaluate` limit that gives `task` about `limit` items: MMLU's limit counts per subject."""
    return max(1, limit // MMLU_SUBJECTS_SHARE) if task == "mmlu" else limit


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
        "data": {"tasks": TASKS, "mixture": "temperature", "temperature": 2.0, "max_len": 128, "chat": False,
                 "eval_examples": 0},
        "optim": {"lr": 3e-5 if method == "full" else 3e-4,
                  **({"s_lr_mult": S_LR_MULT} if method == "multilora" else {}), "weight_decay": 0.0, "warmup_steps": max(1, steps // 10),
                  "schedule": "cosine", "grad_clip": 1.0},
        "train": {"batch_size": 4, "grad_accum": 1, "max_steps": steps, "seed": seed, "eval_every": 0,
                  "save_every": 0, "keep_last": 1},
        "output_dir": str(out_dir),
    })


def run_demo(out_dir: str | Path | None = None, steps: int | None = None, seeds: int = 1, quick: bool = False,
             model_name: str | None = None, eval_limit: int | None = None, resume: bool = False,
             overwrite: bool = False) -> Path:
    """Run the whole study into `out_dir` (default runs/demo-<date>) and return the report's path.

    `quick` uses a tiny random model (unless `model_name` is given) and a few steps and items;
    `resume` reuses the finished runs and evaluations of an interrupted demo in `out_dir`.
    """
    from .analyze import analyze
    from .evaluate import evaluate, resolve_target
    from .models import tiny_model_path
    from .train import checkpoint_dirs, read_metrics, train

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
    console = Console()
    t_start = time.perf_counter()
    t_convert = _prepare_model(model_name, console)

    study: dict[str, Any] = {
        "model": model_name, "tasks": TASKS, "eval_tasks": TASKS, "steps": steps, "seeds": list(range(seeds)),
        "batch_size": 4, "max_len": 128, "mixture": "temperature (T = 2)", "eval_limit": limit,
        "mmlu_per_subject": task_limit("mmlu", limit),
        "methods": {m: {"trainable": 0, "share": 0.0, "seconds": [], "runs": [], "train_loss": [], "lr": 0.0,
                        "s_lr_mult": 1.0}
                    for m in METHODS},
        "evals": {}, "data_sizes": {},
    }
    n_models = 1 + len(METHODS) * seeds
    total = len(METHODS) * seeds * steps * STEP_WEIGHT + n_models * len(TASKS) * EVAL_WEIGHT + EVAL_WEIGHT
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    timings = {"convert": t_convert, "train": 0.0, "eval": 0.0, "analyze": 0.0}
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("starting", total=total)

        def stage(text: str) -> None:
            progress.update(bar, description=text)

        for seed in range(seeds):  # 2. training
            for method in METHODS:
                run = out / f"{method}-seed{seed}"
                config = demo_config(method, run, steps, seed, model_name)
                done = run / DONE_FILE
                if done.is_file():  # --resume: a finished run is reused as it is
                    seconds = json.loads(done.read_text(encoding="utf-8"))["seconds"]
                    progress.update(bar, advance=steps * STEP_WEIGHT)
                else:
                    stage(f"train {method} (seed {seed}): step 0/{steps}")
                    t0 = time.perf_counter()
                    on_step = lambda step, model, record, m=method, sd=seed: progress.update(  # noqa: E731
                        bar, advance=STEP_WEIGHT, description=f"train {m} (seed {sd}): step {step}/{steps}")
                    if checkpoint_dirs(run):  # interrupted mid-run: continue from its newest checkpoint
                        train(None, resume=run, progress=False, on_step=on_step)
                    else:
                        train(config, progress=False, on_step=on_step, overwrite=run.exists())
                    seconds = time.perf_counter() - t0
                    write_json_atomic(done, {"seconds": seconds})
                arm = study["methods"][method]
                arm["seconds"].append(seconds)
                arm["runs"].append(str(run))
                arm["train_loss"].append([r["loss"] for r in read_metrics(run) if "loss" in r])
                arm["lr"], arm["s_lr_mult"] = config.optim.lr, config.optim.s_lr_mult
                timings["train"] += seconds

        t0 = time.perf_counter()  # 3. evaluation
        targets = [("base", model_name, out / "base-eval.json")] + [
            (m, r, Path(r) / "eval.json") for m in METHODS for r in study["methods"][m]["runs"]]
        for name, target, saved in targets:
            model, tokenizer, identity = resolve_target(str(target), model=model_name)
            if name in METHODS:
                _record_size(study, name, model)
            if saved.is_file():  # --resume: evaluated before
                result = json.loads(saved.read_text(encoding="utf-8"))
                progress.update(bar, advance=EVAL_WEIGHT * len(TASKS))
            else:
                result = {"tasks": {}, "identity": identity, "limit": limit}
                for task in TASKS:
                    stage(f"evaluate {name}: {task}")
                    result["tasks"].update(evaluate(model, tokenizer, [task], limit=task_limit(task, limit))["tasks"])
                    progress.update(bar, advance=EVAL_WEIGHT)
                write_json_atomic(saved, result)
            study["evals"].setdefault(name, []).append(result)
            del model
        timings["eval"] = time.perf_counter() - t0
        study["data_sizes"] = _data_sizes(limit)

        t0 = time.perf_counter()  # 4. analysis (first seed)
        stage("analyze spectra")
        runs = [study["methods"][m]["runs"][0] for m in METHODS]
        with _threads(1):  # many small SVDs: one thread avoids oversubscription
            study["analysis"] = analyze(runs, out / "analysis", names=list(METHODS))
        study["analysis_dir"] = "analysis"
        timings["analyze"] = time.perf_counter() - t0
        progress.update(bar, advance=EVAL_WEIGHT, description="writing report")

    from .report import write_report

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
    from .models import embedded_model_cached, embedded_model_path

    if embedded_model_cached():
        return 0.0
    console.print("first run: converting the embedded SmolLM2-135M once (GGUF -> safetensors cache)")
    t0 = time.perf_counter()
    embedded_model_path()
    return time.perf_counter() - t0


def _record_size(study: dict, name: str, model: torch.nn.Module) -> None:
    from .inject import adapter_parameters

    total = sum(p.numel() for p in model.parameters())
    adapter = sum(p.numel() for p in adapter_parameters(model).values())
    trainable = total if name == "full" else adapter
    study["methods"][name]["trainable"] = trainable
    study["methods"][name]["share"] = trainable / (total - adapter)


def _data_sizes(limit: int) -> dict[str, dict[str, int]]:
    from .tasks import get_task, load_examples

    return {t: {"train": len(load_examples(t, get_task(t).train_split)), "eval": limit} for t in TASKS}


class _threads:
    """Temporarily set torch's intra-op thread count."""

    def __init__(self, n: int) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)


def _print_summary(console: Console, study: dict, report: Path) -> None:
    from .report import headline, mean_accuracy

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
    console.print(f"[bold]report:[/] {report}")
