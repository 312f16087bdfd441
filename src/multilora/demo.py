"""`multilora demo`: the paper's study at small scale, on a CPU, with the embedded SmolLM2-135M.

    1. the paper's mixture: Alpaca (instruction following) + MMLU (knowledge) + BoolQ/RTE/WiC (NLU)
    2. train each arm with the same batches, schedule and budget per seed: LoRA (r = 24), MultiLoRA
       (n = 3, r = 8: the same total rank) and full fine-tuning
    3. evaluate the base model and every run on the held-out splits, keeping every item's score
    4. analyze the updates' singular-value spectra (every seed)
    5. write report.md: tables, plots and a verdict on the paper's two claims from paired 95% intervals
       (`verdict.comparisons`: MultiLoRA - LoRA and MultiLoRA - full, per task, over items and seeds)

Two presets (`--preset`):

- `demo` (the default, minutes): 3 arms, 64 steps, 1 seed, 40 items per task (2 per MMLU subject, 0-shot).
- `study` (about 1 hour on a 2-core VM with native bf16): the question the demo cannot answer, with the power
  to answer it. 4 arms (LoRA; MultiLoRA at the paper's `s_lr_mult` 1; MultiLoRA at our tuned `s_lr_mult` 30; full
  fine-tuning), 3 seeds, 96 steps, held-out loss per task every 24 steps (8 fixed examples per task),
  and evaluation on the full held-out splits: RTE 277, WiC 638, CB 56, COPA 100 (the last two are not
  trained on: transfer), Alpaca val 513 (perplexity); BoolQ: the first 300 of its 668 val items (a
  fixed sample: the whole split would cost ~70 s more per model, ~15 min in all); MMLU: the first 4 test
  questions of each of the 57 subjects (228), 5-shot from dev.

Sizing of the study. Planned from costs measured on the slower 2-core VM class (a SmolLM2-135M
MultiLoRA step of 4 x 128 tokens: 2.27 s float32, ~1.8 s bf16) at about 1.5-2 hours. Then measured on
a 2-core AMD EPYC VM with native bf16 (2026-11-30), with nothing else running:

    training   per run, 96 steps in bf16 with 4 held-out evaluations: LoRA 82-85 s, MultiLoRA 85-99 s,
               full fine-tuning 136-143 s; 12 runs                                 ~   20 min
    evaluation per model, bf16 autocast (logits float32): Alpaca 513 responses 38-45 s, MMLU 228
               questions 5-shot 52-65 s (57 groups of 4 sharing a ~530-token prefix: the prefix runs
               57 times), BoolQ 300 22-29 s, WiC 638 16-23 s, RTE 277 11-16 s, CB 3-4 s, COPA 2-4 s
               = 146-185 s, x 13 models (base + 12 runs)                           ~   36 min
               (float32: 311-330 s per model, ~70 min)
    analysis   12 runs                                                             ~   30 s
    total                                                                          ~ 1 h

On the slower class expect 1.4-2.0 h, scaled phase by phase from what was measured there: a bf16 training
step of 1.78 s (1.02 s here), the old demo's float32 evaluation 1.4x as long as here, and a bf16 gain in
evaluation between this VM's (0.51x) and that VM's training gain (0.78x).

Training and evaluation run under bf16 autocast where the CPU computes bfloat16 natively (AVX512-BF16 or
AMX in /proc/cpuinfo), float32 elsewhere (`--precision` overrides). bf16 scores every task ~2.5x faster
here (MMLU 5-shot ~1.7x), with the logits kept in float32. Over the study's 13 models it gave float32's
answer on 96.8% of 20,787 multiple-choice items (the flips are near ties; every arm is scored the same
way, so paired differences stay fair; two of 46 paired calls differ, both at an interval's edge);
`--precision no` trains and evaluates in float32, the evaluation that matches lm-eval item by item. The
study is a fixed grid over arms x seeds run by the sweep's stages (sweep.train_run, sweep.evaluate_target,
sweep.analyze_runs), which call the library's own train, evaluate and analyze, so an interrupted study
(a killed process) continues with `--resume`: finished runs and evaluations are reused, an interrupted
run continues from its checkpoint. `recipes/demo-*.yaml` hold the demo's training configs. `--quick`
is a smoke test on a tiny random model: its report says so and judges no claim.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .config import TrainConfig, config_from_dict
from .errors import MultiLoRAError
from .evaluate import EVAL_NAME
from .io import check_writable_dir, write_json_atomic
from .models import DEFAULT_MODEL, TINY_MODEL, cache_dir, embedded_model_cached, embedded_model_path, tiny_model_path
from .report import write_report
from .run import Run
from .sweep import EVAL_LIMIT, analyze_runs, check_existing, evaluate_target, run_finished_at, train_run
from .sweep_report import trainable_parameters
from .tasks import PAPER_MIXTURE, get_task, load_examples
from .tasks import eval_limit as per_task_limit  # run_demo's eval_limit argument has the name
from .verdict import comparisons, headline, mean_accuracy, module_metrics, spectrum_comparisons

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = ("lora", "multilora", "full")
DEFAULT_STEPS = 64
QUICK_STEPS = 6
QUICK_EVAL_LIMIT = 8  # (the default, EVAL_LIMIT: 40 items per task, is the sweep's)
QUICK_HELDOUT = 2  # held-out examples per task with --quick
# MultiLoRA's scales learn at 30x the lr: with s = 0 at init they gate every gradient to A and B, and at
# the paper's 1x MultiLoRA trails LoRA on a budget this short (README, "Learning dynamics": the sweep)
S_LR_MULT = 30.0
STEP_WEIGHT, EVAL_WEIGHT = 1.0, 8.0  # rough cost of a training step vs evaluating one task, for the ETA
PRECISIONS = ("auto", "bf16", "no")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute bfloat16 natively

__all__ = ["run_demo", "demo_config", "demo_runs", "Arm", "Preset", "PRESETS", "METHODS", "DEFAULT_STEPS",
           "QUICK_STEPS", "EVAL_LIMIT", "QUICK_EVAL_LIMIT", "S_LR_MULT", "PRECISIONS", "cpu_supports_bf16",
           "train_precision"]


@dataclass(frozen=True)
class Arm:
    """One arm of the study: a name (its run folders' prefix), a method and the scales' lr multiplier."""

    name: str
    method: str
    s_lr_mult: float = 1.0


@dataclass(frozen=True)
class Preset:
    """A study design: arms, budget, seeds, what is evaluated and how often held-out loss is logged.

    `limits`: evaluate()'s limit per task (None: the whole split; MMLU's counts per subject), or one
    int for every task (MMLU: that // 20 per subject, tasks.eval_limit). `eval_examples` held-out
    examples per task are scored every `steps // heldout_points` steps (0: no held-out loss).
    """

    name: str
    arms: tuple[Arm, ...]
    steps: int
    seeds: int
    eval_tasks: tuple[str, ...]
    limits: int | Mapping[str, int | None]
    shots: int = 0
    eval_examples: int = 0
    heldout_points: int = 0
    eval_weight: float = EVAL_WEIGHT  # cost of evaluating one task in training steps, for the ETA


DEMO_ARMS = (Arm("lora", "lora"), Arm("multilora", "multilora", S_LR_MULT), Arm("full", "full"))
STUDY_ARMS = (Arm("lora", "lora"), Arm("multilora-paper", "multilora", 1.0), Arm("multilora", "multilora", S_LR_MULT),
              Arm("full", "full"))
STUDY_LIMITS = {"alpaca": None, "mmlu": 4, "boolq": 300, "rte": None, "wic": None, "cb": None, "copa": None}
PRESETS = {
    "demo": Preset("demo", DEMO_ARMS, DEFAULT_STEPS, 1, PAPER_MIXTURE, EVAL_LIMIT),
    "study": Preset("study", STUDY_ARMS, 96, 3, (*PAPER_MIXTURE, "cb", "copa"), STUDY_LIMITS, shots=5,
                    eval_examples=8, heldout_points=4, eval_weight=14.0),  # ~30 s per task and model, ~2.2 s a step
}


def demo_config(method: str, out_dir: str | Path, steps: int = DEFAULT_STEPS, seed: int = 0,
                model: str = DEFAULT_MODEL, s_lr_mult: float | None = None, mixed_precision: str = "no",
                eval_examples: int = 0, eval_every: int = 0) -> TrainConfig:
    """The training config of one arm of the study (with the defaults: recipes/demo-<method>.yaml).

    `s_lr_mult` (MultiLoRA only; default S_LR_MULT) is the scales' lr multiplier; `eval_examples` and
    `eval_every` log held-out loss per task during training.
    """
    adapter = {
        "lora": {"n": 1, "r": 24, "alpha": 48, "init": "lora", "scale": "none", "targets": TARGETS},
        "multilora": {"n": 3, "r": 8, "alpha": 16, "init": "multilora", "scale": "vector", "targets": TARGETS},
        "full": {},
    }[method]
    mult = (S_LR_MULT if s_lr_mult is None else s_lr_mult) if method == "multilora" else 1.0
    return config_from_dict({
        "model": model,
        "method": method,
        **({"adapter": adapter} if adapter else {}),
        "data": {"tasks": list(PAPER_MIXTURE), "mixture": "temperature", "temperature": 2.0, "max_len": 128,
                 "chat": False, "eval_examples": eval_examples},
        "optim": {"lr": 3e-5 if method == "full" else 3e-4, **({"s_lr_mult": mult} if mult != 1.0 else {}),
                  "weight_decay": 0.0, "warmup_steps": max(1, steps // 10), "schedule": "cosine", "grad_clip": 1.0},
        "train": {"batch_size": 4, "grad_accum": 1, "max_steps": steps, "seed": seed, "eval_every": eval_every,
                  "save_every": 0, "keep_last": 1, "save_last": False, "mixed_precision": mixed_precision},
        "output_dir": str(out_dir),
    })


def demo_runs(out: Path, steps: int, seeds: int, model: str, arms: tuple[Arm, ...] = DEMO_ARMS,
              mixed_precision: str = "no", eval_examples: int = 0, eval_every: int = 0) -> list[dict[str, Any]]:
    """The study's fixed grid as planned sweep runs: every arm x seed, in OUT/<arm>-seed<seed>.

    Every arm of a seed gets train.seed = seed: the same adapter-init seed and the same batches in the
    same order (the sampler depends on train.seed and the data only), so the arms are paired per seed.
    """
    return [{"name": f"{arm.name}-seed{seed}", "combination": arm.name, "overrides": {"method": arm.method},
             "seed": seed, "config": demo_config(arm.method, out / f"{arm.name}-seed{seed}", steps, seed, model,
                                                 arm.s_lr_mult, mixed_precision, eval_examples, eval_every)}
            for seed in range(seeds) for arm in arms]


def cpu_supports_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (an avx512_bf16 or amx_bf16 flag); False where unknown."""
    try:
        flags = set(Path(cpuinfo).read_text(encoding="utf-8", errors="replace").split())
    except OSError:
        return False
    return any(f in flags for f in BF16_FLAGS)


def train_precision(requested: str = "auto") -> tuple[str, str]:
    """(train.mixed_precision, why) for `requested` ('auto', 'bf16' or 'no').

    auto: bf16 autocast on a GPU that supports it or a CPU with native bfloat16, float32 ('no') elsewhere.
    """
    if requested not in PRECISIONS:
        raise MultiLoRAError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return requested, "asked for (--precision)"
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ("bf16" if ok else "no"), f"auto: the GPU {'supports' if ok else 'lacks'} bfloat16"
    if cpu_supports_bf16():
        return "bf16", "auto: this CPU computes bfloat16 natively (avx512_bf16 / amx_bf16)"
    return "no", "auto: this CPU lacks native bfloat16 (no avx512_bf16 / amx_bf16), so float32"


def run_demo(out_dir: str | Path | None = None, steps: int | None = None, seeds: int | None = None,
             quick: bool = False, model_name: str | None = None, eval_limit: int | None = None, resume: bool = False,
             overwrite: bool = False, preset: str = "demo", precision: str = "auto") -> Path:
    """Run the whole study into `out_dir` (default runs/<preset>-<date>) and return the report's path.

    `preset`: 'demo' (minutes) or 'study' (PRESETS); `steps`, `seeds` and `eval_limit` (items per task)
    override it. `quick` uses a tiny random model (unless `model_name` is given) and a few steps and items:
    a smoke test of the pipeline, whose report judges no claim; `resume` reuses the finished runs and
    evaluations of an interrupted study in `out_dir`; `precision` is that of training and evaluation
    (auto, bf16, no).
    """
    if preset not in PRESETS:
        raise MultiLoRAError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    design = PRESETS[preset]
    if seeds is not None and seeds < 1:
        raise MultiLoRAError(f"--seeds must be >= 1, got {seeds}")
    if steps is not None and steps < 1:
        raise MultiLoRAError(f"--steps must be >= 1, got {steps}")
    if eval_limit is not None and eval_limit < 1:
        raise MultiLoRAError(f"--limit must be >= 1, got {eval_limit}")
    mixed_precision, precision_reason = train_precision(precision)
    steps_arg, seeds_arg, model_arg = steps, seeds, model_name
    steps = steps or (QUICK_STEPS if quick else design.steps)
    seeds = seeds or design.seeds
    limits: int | Mapping[str, int | None] = eval_limit or (QUICK_EVAL_LIMIT if quick else design.limits)
    eval_every = max(1, steps // design.heldout_points) if design.heldout_points else 0
    heldout_examples = min(design.eval_examples, QUICK_HELDOUT) if quick else design.eval_examples
    default_out = "demo" if preset == "demo" else f"demo-{preset}"
    out = Path(out_dir or f"runs/{default_out}-{datetime.date.today().isoformat()}")
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
    runs = demo_runs(out, steps, seeds, model_name, design.arms, mixed_precision, heldout_examples, eval_every)
    check_existing(runs, out, fix=f"resume with the --preset, --steps, --model and --precision it ran with "
                   f"(this machine's choice is {mixed_precision}), pass --overwrite to replace it, or another --out")
    tasks, eval_tasks, arms = list(PAPER_MIXTURE), list(design.eval_tasks), [a.name for a in design.arms]
    console = Console()
    t_start = time.perf_counter()
    t_convert = _prepare_model(model_name, console)

    study: dict[str, Any] = {
        "preset": preset,
        "command": _command(preset, out, steps_arg, seeds_arg, quick, model_arg, eval_limit, precision),
        "machine": machine(), "model": model_name, "tasks": tasks, "eval_tasks": eval_tasks, "steps": steps,
        "seeds": list(range(seeds)), "batch_size": 4, "max_len": 128, "mixture": "temperature (T = 2)",
        "precision": mixed_precision, "precision_reason": precision_reason,
        "eval_precision": "bf16" if mixed_precision == "bf16" else "float32",
        "eval_limit": limits, "shots": design.shots, "mmlu_per_subject": _mmlu_per_subject(limits),
        "heldout_examples": heldout_examples, "eval_every": eval_every,
        "smoke_test": quick or _is_tiny_model(model_name),
        "methods": {a.name: {"method": a.method, "trainable": 0, "share": 0.0, "seconds": [], "runs": [],
                             "train_loss": [], "heldout": [], "lr": 0.0, "s_lr_mult": 1.0}
                    for a in design.arms},
        "evals": {}, "data_sizes": {},
    }
    n_models = 1 + len(runs)
    eval_weight = EVAL_WEIGHT if quick else design.eval_weight
    total = len(runs) * steps * STEP_WEIGHT + n_models * len(eval_tasks) * eval_weight + EVAL_WEIGHT * seeds
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    timings = {"convert": t_convert, "train": 0.0, "eval": 0.0, "analyze": 0.0}
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("starting", total=total)

        for run in runs:  # 2. training (a finished run is reused as it is, an interrupted one resumed)
            arm, seed, folder = run["combination"], run["seed"], Path(run["config"].output_dir)
            progress.update(bar, description=f"train {arm} (seed {seed}): step 0/{steps}")
            on_step = lambda step, model, record, a=arm, sd=seed: progress.update(  # noqa: E731
                bar, advance=STEP_WEIGHT, description=f"train {a} (seed {sd}): step {step}/{steps}")
            if not train_run(run, progress=False, on_step=on_step):
                progress.update(bar, advance=steps * STEP_WEIGHT)
            record = study["methods"][arm]
            seconds = (Run(folder).finished() or {}).get("seconds", math.nan)
            metrics = Run(folder).metrics()
            record["seconds"].append(seconds)
            record["runs"].append(str(folder))
            record["train_loss"].append([r["loss"] for r in metrics if "loss" in r])
            record["heldout"].append([{"step": r["step"], **r["eval"]} for r in metrics if "eval" in r])
            record["lr"], record["s_lr_mult"] = run["config"].optim.lr, run["config"].optim.s_lr_mult
            timings["train"] += seconds
        _record_sizes(study, arms)

        t0 = time.perf_counter()  # 3. evaluation, each result (every item's score) cached in its eval.json
        targets = [("base", model_name, out / "base-eval.json", None)] + [
            (a, r, Path(r) / EVAL_NAME, run_finished_at(Path(r))) for a in arms for r in study["methods"][a]["runs"]]
        for name, target, path, trained in targets:
            on_task = lambda task, done, n=name: progress.update(  # noqa: E731
                bar, advance=eval_weight if done else 0, description=f"evaluate {n}: {task}")
            result, evaluated = evaluate_target(target, path, eval_tasks, limits, False, trained, on_task,
                                                shots=design.shots, precision=mixed_precision)
            if not evaluated:
                progress.update(bar, advance=eval_weight * len(eval_tasks))
            study["evals"].setdefault(name, []).append(result)
        timings["eval"] = time.perf_counter() - t0
        # what the evaluations took when they ran (this session or an earlier one, for a resumed study)
        timings["eval_recorded"] = sum(r["seconds"] for results in study["evals"].values() for r in results)
        study["data_sizes"] = _data_sizes(study, tasks)

        t0 = time.perf_counter()  # 4. analysis of every seed's runs
        analyses = []
        for seed in range(seeds):
            progress.update(bar, description=f"analyze spectra (seed {seed})")
            folders = {a: Path(study["methods"][a]["runs"][seed]) for a in arms}
            with _threads(1):  # many small SVDs: one thread avoids oversubscription
                report, notes = analyze_runs(folders, out / analysis_dir(seed))
            if notes:  # the sweep keeps going without a failed run's spectrum; the study needs every arm
                name, note = next(iter(notes.items()))
                raise MultiLoRAError(f"the demo's {name} run {folders[name]}: {note}; delete that folder and rerun "
                                     "with --resume to train it again")
            analyses.append(report)
            progress.update(bar, advance=EVAL_WEIGHT)
        study["analysis"], study["analysis_dir"] = analyses[0], analysis_dir(0)
        study["spectra"] = {a: [module_metrics(rep, a) for rep in analyses] for a in arms}
        timings["analyze"] = time.perf_counter() - t0
        progress.update(bar, description="paired intervals, writing report")
        study["spectrum_comparisons"] = spectrum_comparisons(study)
        study["comparisons"] = comparisons(study)

    timings["total"] = time.perf_counter() - t_start  # this session's wall time
    study["timings"], study["resumed"] = timings, resume
    write_json_atomic(out / "study.json", {k: v for k, v in study.items() if k != "analysis"})
    report = write_report(study, out)
    _print_summary(console, study, report)
    return report


def _command(preset: str, out: Path, steps: int | None, seeds: int | None, quick: bool, model: str | None,
             limit: int | None, precision: str) -> str:
    """The `multilora demo` command line that runs this study (what --resume continues)."""
    args = ["multilora", "demo", *(["--preset", preset] if preset != "demo" else []), "--out", str(out)]
    for flag, value in (("--steps", steps), ("--seeds", seeds), ("--model", model), ("--limit", limit)):
        if value is not None:
            args += [flag, str(value)]
    args += (["--quick"] if quick else []) + (["--precision", precision] if precision != "auto" else [])
    return shlex.join(args)


def machine() -> dict[str, Any]:
    """Where the study ran: CPU model, cores torch uses, architecture, torch version, native bfloat16."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "arch": platform.machine(),
            "torch": torch.__version__, "native_bf16": cpu_supports_bf16(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def analysis_dir(seed: int) -> str:
    """The analysis folder of a seed's runs, relative to the study folder (seed 0: 'analysis')."""
    return "analysis" if seed == 0 else f"analysis-seed{seed}"


def _mmlu_per_subject(limits: int | Mapping[str, int | None]) -> int | None:
    """Items per MMLU subject of an evaluation limit (None: all)."""
    return limits.get("mmlu") if isinstance(limits, Mapping) else per_task_limit("mmlu", limits)


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


def _record_sizes(study: dict, arms: list[str]) -> None:
    """Each arm's trainable parameters (the tensors its first run saved) and their share of the base model.

    Full fine-tuning trains (and saves) every parameter, so its count is the base model's size.
    """
    records = study["methods"]
    counts = {a: trainable_parameters(Path(records[a]["runs"][0])) for a in arms}
    full = next(counts[a] for a in arms if records[a]["method"] == "full")
    for a in arms:
        records[a]["trainable"] = int(counts[a])
        records[a]["share"] = counts[a] / full


def _data_sizes(study: dict, tasks: list[str]) -> dict[str, dict[str, int]]:
    """{task: {train: examples, eval: items evaluated}}: the training splits counted (a fraction of a
    second for the bundled tasks), the evaluated items from the base model's result."""
    sizes = {t: len(load_examples(t, get_task(t).train_split)) for t in tasks}
    evaluated = study["evals"]["base"][0]["tasks"]
    return {t: {"train": int(sizes.get(t, 0)), "eval": int(evaluated.get(t, {}).get("n", 0))}
            for t in dict.fromkeys([*tasks, *study["eval_tasks"]])}


class _threads:
    """Temporarily set torch's intra-op thread count."""

    def __init__(self, n: int) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)


def _print_summary(console: Console, study: dict, report: Path) -> None:
    table = Table(title=f"{study['model']}: {study['steps']} steps, {len(study['seeds'])} seed(s), "
                        f"training precision {study['precision']}")
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
