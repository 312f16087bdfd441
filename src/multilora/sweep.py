"""`multilora sweep`: train every combination of a grid of config values x seeds, evaluate, analyze, compare.

    multilora sweep base.yaml --grid adapter.n=1,2,3,4 adapter.init=multilora,lora --seeds 3

    1. expand the grid: the tokens of one --grid form a Cartesian product; several --grid are unioned
    2. validate every combination x seed (base YAML + overrides, via config.load_config) before training
    3. train each as a normal run folder OUT/runs/<slug> (finished runs are skipped, interrupted ones resumed)
    4. evaluate each run on the tasks (cached in its eval.json) and analyze all spectra into OUT/analysis
    5. summarize: sweep.csv (one row per run), sweep.md (mean ± std over seeds per combination), 3 plots

Step 1 is sweep_grid's (parsing and naming the combinations), step 5 sweep_report's (`summarize(out)` redoes
it from the folders alone); this module plans, validates and runs steps 2-4, and holds the CLI.

Steps 3 and 4 are stages of their own (`check_existing`, `train_run`, `evaluate_run`, `evaluate_target`,
`analyze_runs`): `multilora demo` runs its fixed grid (lora / multilora / full x seeds) through them too.
A planned run is a dict {"name", "combination" (label), "overrides" {key: value}, "seed", "config" (TrainConfig,
whose output_dir is the run folder)}.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from .allocator import release_freed_memory
from .analyze import analyze, analyze_run
from .config import flatten, load_config
from .errors import MultiLoRAError
from .evaluate import EVAL_NAME, evaluate, resolve_target
from .io import write_json_atomic
from .run import Run
from .sweep_grid import combination_label, expand_grid, swept_keys, value_text
from .sweep_report import ANALYSIS_DIR, ANALYSIS_NOTES, MANIFEST, cached_json, summarize
from .tasks import MMLU_SUBJECTS_SHARE, eval_limit, get_task, task_names
from .train import train

EVAL_LIMIT = 40  # items per task (per MMLU subject: 40 // 20 = 2), a few minutes per model on 2 cores
# the key of an eval.json under which its cache settings are kept (the name predates the demo's use of it:
# kept so the eval.json files of existing sweeps stay valid)
CACHE_KEY = "sweep"


# ----------------------------------------------------------------------------- planning and validation


def _override_args(overrides: dict[str, Any]) -> list[str]:
    """{key: value} -> ['--key=<YAML>', ...] for load_config (safe_dump round-trips every value exactly)."""
    out = []
    for key, value in overrides.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()
        out.append(f"--{key}={text}")
    return out


def plan_runs(base: Path, combos: list[dict[str, Any]], seeds: int, out: Path) -> list[dict[str, Any]]:
    """One entry per combination x seed, each validated via load_config; every invalid combination in one error."""
    keys = swept_keys(combos)
    runs, problems = [], {}
    for combo in combos:
        label = combination_label(combo, keys)
        try:
            first = load_config(base, _override_args(combo))
            for seed in range(first.train.seed, first.train.seed + seeds):
                name = f"seed={seed}" if not combo else f"{label}__seed={seed}"
                extra = _override_args({"train.seed": seed, "output_dir": str(out / "runs" / name)})
                config = load_config(base, _override_args(combo) + extra)
                runs.append({"name": name, "combination": label, "overrides": combo, "seed": seed, "config": config})
        except MultiLoRAError as e:
            problems.setdefault(str(e), []).append(label)
    if problems:
        listed = "; ".join(f"[{', '.join(labels)}] {msg}" for msg, labels in problems.items())
        bad = sum(map(len, problems.values()))
        raise MultiLoRAError(f"{bad} of {len(combos)} grid combination(s) are invalid, nothing was trained: "
                             f"{listed}; fix the base config or drop those values from --grid")
    names = [r["name"] for r in runs]
    same = sorted({n for n in names if names.count(n) > 1})
    if same:
        raise MultiLoRAError(f"two grid combinations get the same run folder name {same[0]!r} (values differing "
                             "only in characters outside [A-Za-z0-9_.+=-]); sweep them in separate --out folders")
    return runs


CHECKPOINT_KEYS = ("train.save_every", "train.keep_last", "train.save_last")  # when to save: the run is the same


def check_existing(runs: list[dict[str, Any]], out: Path, fix: str | None = None) -> None:
    """Refuse if a run folder already holds a run trained with another config than the one requested now
    (how often it saved checkpoints aside).

    `fix` ends the message (default: the sweep's advice, another --out or the base config it ran with).
    """
    for run in runs:
        folder = Run(run["config"].output_dir)
        diff = folder.config_diff(run["config"], ignore=CHECKPOINT_KEYS) if folder.has_config() else []
        if diff:
            k, saved, wanted = diff[0], folder.saved_values(), flatten(run["config"].to_dict())
            raise MultiLoRAError(
                f"run {run['name']} in {out} was trained with a different config: {k} is "
                f"{value_text(saved.get(k))} there but {value_text(wanted[k])} now"
                + (f" (and {len(diff) - 1} more key(s))" if len(diff) > 1 else "")
                + "; " + (fix or f"pass another --out (e.g. {out}-2) or restore the base config it ran with"))


def eval_tasks(tasks: str | Sequence[str] | None, runs: list[dict[str, Any]], limit: int) -> list[str]:
    """The tasks to evaluate: `tasks`, else every task the runs train on; none when limit is 0."""
    if limit == 0:
        return []
    if tasks is None:
        tasks = [t for r in runs for t in task_names(r["config"].data.tasks)]  # own tasks are specs
    elif isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    tasks = list(dict.fromkeys(t for t in tasks if t))
    if not tasks:
        raise MultiLoRAError("--tasks names no task; give e.g. --tasks rte,boolq, or --limit 0 to skip evaluation")
    for t in tasks:
        get_task(t)  # an unknown name fails before any training
    return tasks


# ----------------------------------------------------------------------------- the stages


def train_run(run: dict[str, Any], progress: bool, on_step: Callable[[int, Any, dict], None] | None = None) -> bool:
    """Train one run unless finished (resume it from its newest checkpoint if interrupted); True if it trained.

    `on_step` is train's per-step callback (the demo's progress bar).
    """
    folder = Run(run["config"].output_dir)
    if folder.finished() is not None:
        return False
    if folder.checkpoints():
        train(None, resume=folder.path, progress=progress, on_step=on_step)
    else:
        train(run["config"], progress=progress, on_step=on_step, overwrite=folder.path.exists())
    release_freed_memory()  # the run's model and optimizer state, not kept under the next job's peak
    return True


def eval_settings(tasks: list[str], limit: int | Mapping[str, int | None], shots: int = 0) -> dict[str, Any]:
    """What an eval.json of the sweep was computed with (a cached one is reused only if these match).

    `limit`: items per task (MMLU: tasks.eval_limit per subject), or {task: evaluate()'s limit, None: all}.
    """
    if isinstance(limit, Mapping):
        settings: dict[str, Any] = {"tasks": tasks, "limits": {t: limit.get(t) for t in tasks}}
    else:
        settings = {"tasks": tasks, "limit": limit, "mmlu_per_subject": eval_limit("mmlu", limit)}
    return {**settings, "shots": shots} if shots else settings  # (no key at 0: older eval.json files stay valid)


def evaluate_target(target: str, path: Path, tasks: list[str], limit: int | Mapping[str, int | None], progress: bool,
                    trained: Any = None, on_task: Callable[[str, bool], None] | None = None,
                    shots: int = 0, precision: str = "no") -> tuple[dict[str, Any] | None, bool]:
    """Write `path`: the evaluate() result of `target` (a run folder or a model) on `tasks`, unless a cached
    one is there; returns (the result, True if it evaluated now). No tasks: (None, False).

    MMLU's limit is per subject (tasks.eval_limit); a mapping gives each task evaluate()'s own limit (None:
    the whole split); `shots` is MMLU's k-shot. A cached file is reused if it has the same settings and
    the same `trained` (when the run's training finished). `on_task(task, done)` is called before (done
    False) and after (done True) each task. `precision`: evaluate()'s ('bf16': under bfloat16 autocast).
    """
    # save_items: per-item scores for the paired statistics (an eval.json cached without them is redone)
    settings = {**eval_settings(tasks, limit, shots), "save_items": True, "trained": trained}
    if precision != "no":  # (no key for float32: older eval.json files stay valid)
        # bf16 scoring keeps the logits in float32 (evaluate.autocast); an eval.json scored before that, with
        # bf16 logits, lacks the key and is redone
        settings.update(precision=precision, logits="float32")
    if not tasks:
        return None, False
    cached = cached_json(path) if path.is_file() else {}
    if cached.get(CACHE_KEY) == settings:
        return cached, False
    model, tokenizer, identity = resolve_target(str(target))
    parts = []
    for t in tasks:
        if on_task is not None:
            on_task(t, False)
        task_limit = limit.get(t) if isinstance(limit, Mapping) else eval_limit(t, limit)
        parts.append(evaluate(model, tokenizer, [t], shots=shots, limit=task_limit, identity=identity,
                              progress=progress, save_items=True, precision=precision))
        if on_task is not None:
            on_task(t, True)
    result = {**parts[0], "tasks": {t: p["tasks"][t] for t, p in zip(tasks, parts)},
              "seconds": sum(p["seconds"] for p in parts)}
    result["settings"].update(tasks=tasks, limit=dict(limit) if isinstance(limit, Mapping) else limit,
                              mmlu_per_subject=settings.get("mmlu_per_subject", (settings.get("limits") or {}).get("mmlu")))
    result[CACHE_KEY] = settings
    write_json_atomic(path, result)
    del model  # unreferenced, so the release below gives its memory back
    release_freed_memory()
    return result, True


def evaluate_run(folder: Path, tasks: list[str], limit: int, progress: bool) -> bool:
    """Write folder/eval.json for `tasks` (see evaluate_target); True if it evaluated, False if the cached one
    (made after the run's training finished, with the same settings) was reused."""
    return evaluate_target(str(folder), folder / EVAL_NAME, tasks, limit, progress, run_finished_at(folder))[1]


def run_finished_at(folder: Path) -> float | None:
    """When the run's training finished (unix time; the cache key of its eval.json), None if not or unknown."""
    return (Run(folder).finished() or {}).get("finished")


def analyze_runs(folders: dict[str, Path], analysis_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """analyze.analyze over the finished runs of {name: folder} into `analysis_dir`; returns (the analysis
    report, {name: note} for the runs it failed on): a failed run gets a note, not a lost sweep.

    The analysis of the very same finished runs is reused from analysis_dir.
    """
    records = {name: Run(folder).finished() for name, folder in folders.items()}
    done = {name: folders[name] for name, record in records.items() if record is not None}
    inputs = {name: records[name].get("finished") for name in done}
    notes_path, report_path = analysis_dir / ANALYSIS_NOTES, analysis_dir / "analysis.json"
    if not done:
        return {}, {}
    cached = cached_json(notes_path)
    if report_path.is_file() and cached.get("inputs") == inputs:  # these very runs were analyzed before
        return cached_json(report_path), cached.get("notes", {})
    names, paths = list(done), list(done.values())
    notes: dict[str, str] = {}
    try:
        report = analyze(paths, analysis_dir, names=names)
    except Exception:  # noqa: BLE001 - find the run(s) it fails on; the rest of the sweep keeps its spectra
        for folder, name in zip(paths, names):
            try:
                analyze_run(folder, name=name)
            except Exception as e:  # noqa: BLE001 - recorded in sweep.md as a note and NaN in sweep.csv
                notes[name] = f"analysis failed: {type(e).__name__}: {' '.join(str(e).split())}"
        ok = [i for i, n in enumerate(names) if n not in notes]
        report = analyze([paths[i] for i in ok], analysis_dir, names=[names[i] for i in ok]) if ok else {}
    write_json_atomic(notes_path, {"inputs": inputs, "notes": notes})
    return report, notes


def run_sweep(base: str | Path, grid: Sequence[Sequence[str] | str], seeds: int = 1, out_dir: str | Path | None = None,
              tasks: str | Sequence[str] | None = None, limit: int = EVAL_LIMIT, progress: bool = True) -> Path:
    """Train, evaluate and analyze every grid combination x seed into `out_dir` (resumable); returns sweep.md's path.

    `grid`: groups of 'key=v1,v2' tokens (see expand_grid); `tasks`: evaluation tasks (default: the
    runs' data.tasks); `limit`: items per task (per MMLU subject: limit // 20), 0 skips the evaluation.
    """
    if not isinstance(seeds, int) or seeds < 1:
        raise MultiLoRAError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if not isinstance(limit, int) or limit < 0:
        raise MultiLoRAError(f"--limit must be an integer >= 0 (0 skips the task evaluation), got {limit!r}")
    base = Path(base)
    if not base.is_file():
        raise MultiLoRAError(f"base config {base} not found; pass a YAML file such as recipes/demo-multilora.yaml")
    out = Path(out_dir or f"runs/sweep-{base.stem}")
    if out.exists() and not out.is_dir():
        raise MultiLoRAError(f"--out {out} is a file; pass a folder")
    groups = [g.split() if isinstance(g, str) else list(g) for g in grid]
    combos = expand_grid(groups)
    runs = plan_runs(base, combos, seeds, out)
    tasks = eval_tasks(tasks, runs, limit)
    check_existing(runs, out)
    say = print if progress else (lambda *a, **k: None)
    write_json_atomic(out / MANIFEST, {
        "base": str(base), "base_yaml": base.read_text(encoding="utf-8"), "grid": groups,
        "keys": swept_keys(combos), "seeds": seeds, "eval": eval_settings(tasks, limit),
        "runs": [{k: r[k] for k in ("name", "combination", "overrides", "seed")} for r in runs]})
    say(f"sweep: {len(combos)} combination(s) x {seeds} seed(s) = {len(runs)} runs in {out}")
    for i, run in enumerate(runs, 1):
        say(f"[{i}/{len(runs)}] train {run['name']}")
        if not train_run(run, progress):
            say("  finished before: skipped")
    for i, run in enumerate(runs, 1):
        if tasks:
            say(f"[{i}/{len(runs)}] evaluate {run['name']} on {', '.join(tasks)}")
            if not evaluate_run(out / "runs" / run["name"], tasks, limit, progress):
                say("  evaluated before: reused eval.json")
    say("analyze spectra")
    analyze_runs({r["name"]: out / "runs" / r["name"] for r in runs}, out / ANALYSIS_DIR)
    path = summarize(out)
    say(f"wrote {path}, {out / 'sweep.csv'} and plots")
    return path


# ----------------------------------------------------------------------------- CLI


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `multilora sweep` arguments to `p`."""
    p.add_argument("base", nargs="?", default=None, metavar="BASE.yaml",
                   help="the base training config; each run is it plus one grid combination")
    p.add_argument("--grid", nargs="+", action="append", metavar="KEY=V1,V2", default=None,
                   help="config keys and values to sweep, e.g. adapter.n=1,2,3 adapter.init=multilora,lora; the "
                   "tokens of one --grid form a product, a repeated --grid adds another product (values: YAML, "
                   "commas inside [...] do not split)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per combination: base train.seed + 0..N-1 (default: 1)")
    p.add_argument("--out", default=None, help="output folder (default: runs/sweep-<BASE stem>); rerun with the "
                   "same --out to resume: finished runs are skipped")
    p.add_argument("--tasks", default=None, help="comma-separated evaluation tasks (default: the config's data.tasks)")
    p.add_argument("--limit", type=int, default=EVAL_LIMIT,
                   help=f"evaluation items per task (MMLU: limit // {MMLU_SUBJECTS_SHARE} per subject); 0 skips the "
                   f"task evaluation, keeping held-out loss and spectra (default: {EVAL_LIMIT})")
    p.add_argument("--summarize-only", default=None, metavar="OUT",
                   help="only rebuild sweep.md, sweep.csv and the plots of the sweep in OUT from its folders")


def run_sweep_cli(args: argparse.Namespace) -> None:
    """Run `multilora sweep` from parsed arguments."""
    if args.summarize_only is not None:
        if args.base is not None or args.grid:
            raise MultiLoRAError("--summarize-only OUT takes no BASE.yaml or --grid: it only rebuilds the summary "
                                 "of the sweep in OUT")
        print(f"wrote {summarize(args.summarize_only)}")
        return
    if args.base is None:
        raise MultiLoRAError("name the base config: multilora sweep BASE.yaml --grid KEY=V1,V2 ... "
                             "(or --summarize-only OUT)")
    run_sweep(args.base, args.grid or [], seeds=args.seeds, out_dir=args.out, tasks=args.tasks, limit=args.limit)
