"""`multilora sweep`: train every combination of a grid of config values x seeds, evaluate, analyze, compare.

    multilora sweep base.yaml --grid adapter.n=1,2,3,4 adapter.init=multilora,lora --seeds 3

    1. expand the grid: the tokens of one --grid form a Cartesian product; several --grid are unioned
    2. validate every combination x seed (base YAML + overrides, via config.load_config) before training
    3. train each as a normal run folder OUT/runs/<slug> (finished runs are skipped, interrupted ones resumed)
    4. evaluate each run on the tasks (cached in its eval.json) and analyze all spectra into OUT/analysis
    5. summarize: sweep.csv (one row per run), sweep.md (mean ± std over seeds per combination), 3 plots

`summarize(out)` redoes step 5 from the folders alone: OUT/sweep.json (what was swept), each run
folder (config.yaml, metrics.jsonl, finished.json, eval.json, adapter or weights) and OUT/analysis.

Steps 3 and 4 are stages of their own (`check_existing`, `train_run`, `evaluate_run`, `evaluate_target`,
`analyze_runs`): `multilora demo` runs its fixed grid (lora / multilora / full x seeds) through them too.
A planned run is a dict {"name", "combination" (label), "overrides" {key: value}, "seed", "config" (TrainConfig,
whose output_dir is the run folder)}.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import itertools
import math
import re
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from safetensors import safe_open

from .analyze import analyze, analyze_run
from .config import ALIASES, flatten, load_config, valid_keys
from .errors import MultiLoRAError
from .evaluate import EVAL_NAME, evaluate, resolve_target
from .io import atomic_path, read_json_object, write_json_atomic, write_text_atomic
from .report import headline
from .run import Run
from .tasks import MMLU_SUBJECTS_SHARE, eval_limit, get_task
from .train import train

EVAL_LIMIT = 40  # items per task (per MMLU subject: 40 // 20 = 2), a few minutes per model on 2 cores
# the key of an eval.json under which its cache settings are kept (the name predates the demo's use of it:
# kept so the eval.json files of existing sweeps stay valid)
CACHE_KEY = "sweep"
MANIFEST = "sweep.json"  # what the sweep ran: base, grid, seeds, tasks, and each run's overrides
ANALYSIS_DIR = "analysis"
ANALYSIS_NOTES = "sweep_analysis.json"  # which finished runs the analysis covers, and runs it failed on
NOT_SWEPT = {"train.seed": "use --seeds N (runs use the base train.seed + 0..N-1)",
             "output_dir": "use --out DIR (runs go to DIR/runs/<name>)"}
FIGURES = (("sweep-scores.png", "Final score per task vs each swept key (mean ± std over seeds)"),
           ("sweep-heldout.png", "Held-out loss during training (mean over seeds, ± std shaded)"),
           ("sweep-spectrum.png", "Spectrum of the update dW: effective rank and top-1 energy share"))


# ----------------------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
    """'1,2,[q_proj,v_proj]' -> ['1', '2', '[q_proj,v_proj]']: split on the commas outside [...] and {...}."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _check_key(key: str, token: str) -> None:
    """Refuse keys that --seeds / --out own, and unknown keys (naming the nearest valid one)."""
    if key in NOT_SWEPT:
        raise MultiLoRAError(f"--grid {token!r}: {key} cannot be swept; {NOT_SWEPT[key]}")
    keys = valid_keys()
    if key not in keys:
        section, _, leaf = key.rpartition(".")
        leaf = ALIASES.get(leaf, leaf)  # other tools' names for our keys (learning_rate -> lr)
        same = sorted((k.rpartition(".")[0] != section, k) for k in keys if k.rpartition(".")[2] == leaf)
        close = [k for _, k in same] or difflib.get_close_matches(key, keys, 1, 0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(keys)}"
        raise MultiLoRAError(f"--grid {token!r}: unknown config key {key!r}; {hint}")


def parse_token(token: str) -> tuple[str, list[Any]]:
    """'adapter.n=1,2' -> ('adapter.n', [1, 2]); each value is parsed as YAML."""
    key, eq, text = token.partition("=")
    key = key.strip().removeprefix("--")
    if not eq or not key:
        hint = "; put BASE.yaml before --grid" if token.endswith((".yaml", ".yml")) else ""
        raise MultiLoRAError(f"--grid token {token!r} is not KEY=V1,V2,...; write e.g. adapter.n=1,2,3{hint}")
    _check_key(key, token)
    values = []
    for part in split_values(text):
        if not part.strip():
            raise MultiLoRAError(f"--grid {token!r} has an empty value; write KEY=V1,V2 with no empty items")
        try:
            values.append(yaml.safe_load(part))
        except yaml.YAMLError as e:
            raise MultiLoRAError(f"--grid {token!r}: cannot parse value {part!r} as YAML "
                                 f"({str(e).splitlines()[0]})") from None
    return key, values


def expand_grid(groups: Sequence[Sequence[str] | str]) -> list[dict[str, Any]]:
    """The combinations of the grid: a product over the tokens of each group, unioned over groups (no duplicates).

    `[["adapter.n=1,2", "adapter.init=multilora,lora"], ["method=lora"]]` -> 5 override dicts;
    no groups -> [{}] (the base config alone).
    """
    combos: list[dict[str, Any]] = []
    for group in groups:
        tokens = group.split() if isinstance(group, str) else list(group)
        parsed = [parse_token(t) for t in tokens]
        keys = [k for k, _ in parsed]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise MultiLoRAError(f"--grid {' '.join(tokens)} names {twice[0]} twice; give each key once per "
                                 "--grid, its values comma-separated (KEY=V1,V2)")
        for values in itertools.product(*(v for _, v in parsed)):
            combo = dict(zip(keys, values))
            if combo not in combos:
                combos.append(combo)
    return combos or [{}]


def value_text(value: Any) -> str:
    """A config value as it reads in YAML flow style: 3, 0.0003, true, lora, [q_proj,v_proj]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each swept key's name in run folder names: its leaf, or the full dotted key where two leaves collide."""
    leaves = [k.rpartition(".")[2] for k in keys]
    return {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(keys, leaves)}


def combination_label(combo: dict[str, Any], keys: Sequence[str]) -> str:
    """'n=3__init=lora' (swept keys in grid order; characters outside [A-Za-z0-9_.+=-] become '-'), or 'base'."""
    names = short_names(keys)
    parts = [f"{names[k]}={value_text(combo[k])}" for k in keys if k in combo]
    return "__".join(re.sub(r"[^A-Za-z0-9_.+=\-]", "-", p) for p in parts) or "base"


def swept_keys(combos: Sequence[dict[str, Any]]) -> list[str]:
    """The keys the combinations set, in the order they first appear."""
    return list(dict.fromkeys(k for c in combos for k in c))


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


def check_existing(runs: list[dict[str, Any]], out: Path, fix: str | None = None) -> None:
    """Refuse if a run folder already holds a run trained with another config than the one requested now.

    `fix` ends the message (default: the sweep's advice, another --out or the base config it ran with).
    """
    for run in runs:
        folder = Run(run["config"].output_dir)
        diff = folder.config_diff(run["config"]) if folder.has_config() else []
        if diff:
            k, saved, wanted = diff[0], folder.saved_config(), flatten(run["config"].to_dict())
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
        tasks = [t for r in runs for t in r["config"].data.tasks]
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
    return True


def eval_settings(tasks: list[str], limit: int) -> dict[str, Any]:
    """What an eval.json of the sweep was computed with (a cached one is reused only if these match)."""
    return {"tasks": tasks, "limit": limit, "mmlu_per_subject": eval_limit("mmlu", limit)}


def evaluate_target(target: str, path: Path, tasks: list[str], limit: int, progress: bool, trained: Any = None,
                    on_task: Callable[[str, bool], None] | None = None) -> tuple[dict[str, Any] | None, bool]:
    """Write `path`: the evaluate() result of `target` (a run folder or a model) on `tasks`, unless a cached
    one is there; returns (the result, True if it evaluated now). No tasks: (None, False).

    MMLU's limit is per subject (tasks.eval_limit). A cached file is reused if it has the same settings and
    the same `trained` (when the run's training finished). `on_task(task, done)` is called before (done
    False) and after (done True) each task.
    """
    settings = {**eval_settings(tasks, limit), "trained": trained}
    if not tasks:
        return None, False
    cached = _read_json(path) if path.is_file() else {}
    if cached.get(CACHE_KEY) == settings:
        return cached, False
    model, tokenizer, identity = resolve_target(str(target))
    parts = []
    for t in tasks:
        if on_task is not None:
            on_task(t, False)
        parts.append(evaluate(model, tokenizer, [t], limit=eval_limit(t, limit), identity=identity,
                              progress=progress))
        if on_task is not None:
            on_task(t, True)
    result = {**parts[0], "tasks": {t: p["tasks"][t] for t, p in zip(tasks, parts)},
              "seconds": sum(p["seconds"] for p in parts)}
    result["settings"].update(tasks=tasks, limit=limit, mmlu_per_subject=settings["mmlu_per_subject"])
    result[CACHE_KEY] = settings
    write_json_atomic(path, result)
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
    cached = _read_json(notes_path)
    if report_path.is_file() and cached.get("inputs") == inputs:  # these very runs were analyzed before
        return _read_json(report_path), cached.get("notes", {})
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


# ----------------------------------------------------------------------------- summary


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} if it is unreadable (a cache miss, not an error)."""
    try:
        return read_json_object(path)
    except MultiLoRAError:
        return {}


def trainable_parameters(folder: Path) -> float:
    """Trainable parameters of a finished run: the tensors of adapter.safetensors (or, full, of the model)."""
    files = [folder / "adapter.safetensors"] if (folder / "adapter.safetensors").is_file() else \
        sorted(folder.glob("model*.safetensors"))
    if not files:
        return math.nan
    total = 0
    for f in files:
        with safe_open(f, framework="pt") as h:
            total += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())  # noqa: SIM118 - safe_open has no __iter__
    return total


def _mean_last(values: list[float], share: float = 0.1) -> float:
    """Mean of the last `share` of `values` (at least one); NaN if empty."""
    if not values:
        return math.nan
    return statistics.fmean(values[-max(1, int(len(values) * share)):])


def read_run(out: Path, run: dict[str, Any], keys: list[str], tasks: list[str], spectra: dict[str, dict],
             notes: dict[str, str]) -> dict[str, Any]:
    """One sweep.csv row, from the run folder alone (plus its held-out curve under 'curve')."""
    folder = out / "runs" / run["name"]
    config = Run(folder).saved_config()
    metrics = Run(folder).metrics()
    steps = sorted((r["step"], r["loss"]) for r in metrics if "loss" in r)
    curve = dict(sorted((r["step"], r["eval"]["loss"]) for r in metrics if "loss" in r.get("eval", {})))
    result = _read_json(folder / EVAL_NAME) if (folder / EVAL_NAME).is_file() else {"tasks": {}}
    scores = {t: headline(result, t) if t in result.get("tasks", {}) else None for t in tasks}
    accs = [h[0] for h in scores.values() if h is not None and h[1]]
    spec = spectra.get(run["name"], {})
    done = Run(folder).finished() or {}
    note = notes.get(run["name"], "") or ("" if done else "not finished")
    return {
        "run": run["name"], "combination": run["combination"],
        **{k: "n/a" if k.startswith("adapter.") and config.get("method") == "full"  # full FT has no adapter
           else value_text(config.get(k, run["overrides"].get(k))) for k in keys},
        "seed": run["seed"], "steps": steps[-1][0] if steps else 0,
        "train_loss": _mean_last([loss for _, loss in steps]),
        "heldout_loss": curve[max(curve)] if curve else math.nan,
        **{t: math.nan if h is None else h[0] for t, h in scores.items()},
        "mean_acc": statistics.fmean(accs) if accs else math.nan,
        "effective_rank": _num(spec.get("effective_rank")), "top1_share": _num(spec.get("energy_top1")),
        "trainable_params": trainable_parameters(folder) if done else math.nan,
        "train_seconds": _num(done.get("seconds")), "note": note, "curve": curve,
    }


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """sweep.csv: one row per run (floats at full precision, 'nan' where a number is missing)."""
    cols = [c for c in rows[0] if c != "curve"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in rows:
        w.writerow([repr(row[c]) if isinstance(row[c], float) else row[c] for c in cols])
    return buf.getvalue()


def _stats(values: list[float]) -> tuple[float, float]:
    """(mean, std) of the finite values; std 0 for one value; NaNs if none."""
    good = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not good:
        return math.nan, math.nan
    return statistics.fmean(good), statistics.stdev(good) if len(good) > 1 else 0.0


def _cell(values: list[float], fmt: str, scale: float = 1.0) -> str:
    mean, std = _stats(values)
    if not math.isfinite(mean):
        return "n/a"
    n = sum(1 for v in values if math.isfinite(v))
    return format(mean * scale, fmt) + (f" ± {format(std * scale, fmt)}" if n > 1 else "")


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by combination, in grid order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["combination"], []).append(row)
    return out


def summary_markdown(manifest: dict[str, Any], rows: list[dict[str, Any]], figures: list[tuple[str, str]],
                     notes: list[str]) -> str:
    """sweep.md: the per-combination table (mean ± std over seeds), what was run, the figures and notes."""
    keys, tasks = manifest["keys"], manifest["eval"]["tasks"]
    mc = {t: is_multiple_choice(t) for t in tasks}
    cols = [("train_loss", "train loss", ".4f", 1), ("heldout_loss", "held-out loss", ".4f", 1)]
    cols += [(t, f"{t} {'acc %' if mc[t] else 'ppl ↓'}", ".1f" if mc[t] else ".2f", 100 if mc[t] else 1)
             for t in tasks]
    cols += [("mean_acc", "mean acc %", ".1f", 100)] if any(mc.values()) else []
    cols += [("effective_rank", "effective rank", ".2f", 1), ("top1_share", "top-1 share", ".3f", 1),
             ("trainable_params", "trainable", ",.0f", 1), ("train_seconds", "train s", ".0f", 1)]
    head = (keys or ["combination"]) + ["seeds"] + [c[1] for c in cols]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, group in _groups(rows).items():
        ids = [group[0][k] for k in keys] if keys else [label]
        table.append("| " + " | ".join(ids + [str(len(group))] + [_cell([r[c] for r in group], f, s)
                                                                   for c, _, f, s in cols]) + " |")
    ev = manifest["eval"]
    evaluation = (f"{', '.join(tasks)} on their held-out splits, at most {ev['limit']} items per task"
                  + (f" ({ev['mmlu_per_subject']} per MMLU subject)" if "mmlu" in tasks else "")
                  + "; multiple choice by log-likelihood (accuracy), instruction following by response perplexity"
                  if tasks else "none (--limit 0): held-out loss and spectra only")
    seeds = sorted({r["seed"] for r in rows})
    md = [f"# Sweep over {', '.join(f'`{k}`' for k in keys) or 'seeds'} on `{manifest['base']}`", "",
          (f"{len(_groups(rows))} combination(s) x {manifest['seeds']} seed(s) ({', '.join(map(str, seeds))}) = "
           f"{len(rows)} runs. Mean ± standard deviation over seeds; train loss = mean of the last 10% of logged "
           "steps; held-out loss = the last periodic evaluation on the held-out examples; effective rank and "
           "top-1 energy share of dW are means over the adapted layers."), "",
          *table, "",
          "## What was run", "",
          "Grid (the tokens of one `--grid` form a product, several `--grid` are unioned):", "",
          *([f"- `--grid {' '.join(g)}`" for g in manifest["grid"]] or ["- (none: the base config only)"]), "",
          f"Evaluation: {evaluation}.", "",
          f"Base config `{manifest['base']}`:", "", "```yaml", manifest["base_yaml"].rstrip("\n"), "```", ""]
    if figures:
        md += ["## Figures", ""]
        md += [line for file, caption in figures for line in (f"### {caption}", "", f"![{caption}]({file})", "")]
    if notes:
        md += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    md += [("Files: `sweep.csv` (one row per run), `runs/<run>/` (config.yaml, metrics.jsonl, eval.json, adapter "
            f"or weights), `{ANALYSIS_DIR}/summary.md` (spectra per run, with its own plots)."), ""]
    return "\n".join(md)


def is_multiple_choice(task: str) -> bool:
    """True for a task scored by accuracy, False for one scored by response perplexity (as evaluate() does)."""
    return get_task(task).items is not None


def summarize(out_dir: str | Path) -> Path:
    """Rebuild sweep.csv, sweep.md and the plots of the sweep in `out_dir` from its folders; returns sweep.md's path."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        raise MultiLoRAError(f"{out} holds no {MANIFEST}; pass the --out folder of a `multilora sweep`")
    manifest = read_json_object(out / MANIFEST, fix="rerun `multilora sweep` with the same --out to rewrite it")
    analysis = _read_json(out / ANALYSIS_DIR / "analysis.json")
    spectra = {r["name"]: r.get("overall", {}) for r in analysis.get("runs", [])}
    run_notes = _read_json(out / ANALYSIS_DIR / ANALYSIS_NOTES).get("notes", {})
    rows = [read_run(out, run, manifest["keys"], manifest["eval"]["tasks"], spectra, run_notes)
            for run in manifest["runs"]]
    write_text_atomic(out / "sweep.csv", csv_text(rows))
    notes = [f"{name}: {note}" for name, note in run_notes.items()]
    notes += [f"{r['run']}: not finished (rerun the same `multilora sweep` to complete it)"
              for r in rows if r["note"] == "not finished"]
    if not any(r["curve"] for r in rows):
        notes.append("no held-out loss curves: the runs logged no held-out evaluation; set data.eval_examples > 0 "
                     "and train.eval_every > 0 in the base config to get them")
    figures = write_plots([r for r in rows if r["note"] != "not finished"], manifest, out)
    path = out / "sweep.md"
    write_text_atomic(path, summary_markdown(manifest, rows, figures, notes))
    return path


# ----------------------------------------------------------------------------- plots


def write_plots(rows: list[dict[str, Any]], manifest: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Write the sweep's PNGs that have data (headless Figure API); returns (file, caption) pairs."""
    try:  # matplotlib is imported by the plotting functions only (deliberately: slow to import, unused elsewhere)
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise MultiLoRAError("the sweep plots need matplotlib: pip install matplotlib") from None
    all_keys = manifest["keys"] or ["combination"]
    tasks = manifest["eval"]["tasks"]
    scores = [(t, f"{t} {'accuracy' if is_multiple_choice(t) else 'perplexity ↓'}") for t in tasks]
    scores = [m for m in scores + [("heldout_loss", "held-out loss ↓")] if _has(rows, m[0])]
    spectrum = [m for m in (("effective_rank", "effective rank"), ("top1_share", "top-1 energy share"))
                if _has(rows, m[0])]
    keys = independent_keys(rows, all_keys)
    by_n = ["adapter.n"] if "adapter.n" in keys else keys
    made = {}
    if scores:
        made[FIGURES[0]] = _panels(rows, scores, keys, keys)
    if any(r["curve"] for r in rows):
        made[FIGURES[1]] = _plot_heldout(rows)
    if spectrum:
        made[FIGURES[2]] = _panels(rows, spectrum, by_n, keys)
    for file, caption in FIGURES:
        if (file, caption) not in made:
            (out / file).unlink(missing_ok=True)  # no data now: drop a stale plot of an earlier summary
    for (file, _), fig in made.items():
        with atomic_path(out / file) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return list(made)


def independent_keys(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The swept keys worth a panel: a key whose values pair one-to-one with an earlier key's values
    (adapter.r and adapter.alpha set together with method=lora, say) is left out."""
    kept: list[str] = []
    for key in keys:
        if not any(_one_to_one(rows, earlier, key) for earlier in kept):
            kept.append(key)
    return kept


def _one_to_one(rows: list[dict[str, Any]], a: str, b: str) -> bool:
    pairs = {(r[a], r[b]) for r in rows}
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})


def _has(rows: list[dict[str, Any]], metric: str) -> bool:
    return any(math.isfinite(r[metric]) for r in rows)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _positions(values: list[str]) -> tuple[dict[str, float], bool]:
    """x positions of the values: the numbers themselves if all are numeric, else 0, 1, ... with the
    numeric values first (ascending), then the others ('lora', 'n/a') in first-seen order."""
    distinct = list(dict.fromkeys(values))
    nums = {v: _number(v) for v in distinct}
    if all(x is not None for x in nums.values()):
        return {v: x for v, x in nums.items()}, True
    order = sorted((v for v in distinct if nums[v] is not None), key=nums.get)
    order += [v for v in distinct if nums[v] is None]
    return {v: float(i) for i, v in enumerate(order)}, False


def _panels(rows: list[dict[str, Any]], metrics: list[tuple[str, str]], plot_keys: list[str],
            all_keys: list[str]) -> Any:
    """One panel per metric x key: the metric vs the key's value, one line per value of the other swept keys,
    mean ± std over seeds as error bars."""
    from matplotlib.figure import Figure

    names = short_names(all_keys)
    fig = Figure(figsize=(4.2 * len(plot_keys), 3.2 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), len(plot_keys), squeeze=False)
    for i, (metric, title) in enumerate(metrics):
        for j, key in enumerate(plot_keys):
            ax = axes[i][j]
            pos, numeric = _positions([r[key] for r in rows])
            lines: dict[str, dict[str, list[float]]] = {}
            for r in rows:
                other = ", ".join(f"{names[k]}={r[k]}" for k in all_keys if k != key) or title
                lines.setdefault(other, {}).setdefault(r[key], []).append(r[metric])
            for label, points in lines.items():
                xs = sorted(points, key=pos.get)
                stats = [_stats(points[x]) for x in xs]
                ax.errorbar([pos[x] for x in xs], [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                            capsize=3, label=label)
            ticks = sorted(pos.items(), key=lambda kv: kv[1])
            if numeric and ticks[0][1] > 0 and ticks[-1][1] >= 10 * ticks[0][1]:  # e.g. lr multipliers 1..100
                ax.set_xscale("log")
                ax.minorticks_off()
            ax.set_xticks([x for _, x in ticks], [v for v, _ in ticks], rotation=0 if numeric else 20)
            ax.set_xlabel(key)
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            if len(lines) > 1:
                ax.legend(fontsize=7)
    return fig


def _plot_heldout(rows: list[dict[str, Any]]) -> Any:
    """Held-out loss vs step, one line per combination (mean over seeds, ± std shaded)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for label, group in _groups(rows).items():
        curves = [r["curve"] for r in group if r["curve"]]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [_stats([c[s] for c in curves]) for s in steps]
        mean, std = [m for m, _ in stats], [s for _, s in stats]
        line, = ax.plot(steps, mean, marker=".", label=label)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss (nats per response token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


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
