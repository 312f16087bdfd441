"""A `data.tasks` list: bundled task names, own-task specs and YAML task files, checked and registered.

`resolve_tasks(entries)` expands task files, checks every spec (all problems at once) and registers
the own tasks, so that `tasks.get_task(name)` and everything built on it (training, `evaluate`,
the sweep) treat them as bundled tasks. Relative paths resolve against the YAML file naming them
(`resolve_paths`); the specs kept in a config hold absolute paths. One spec's checks and rows are
`tasks.spec`.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..data import Example, MCItem
from ..errors import MultiLoRAError
from .custom import _show, custom_rows
from .spec import Loaded, Spec, column_names, load_spec, parse_spec

TASK_FILE_SUFFIXES = (".yaml", ".yml")
FAMILY = "own"


# ----------------------------------------------------------------------------- paths and task files


def is_task_file(entry: Any) -> bool:
    """Whether a `data.tasks` entry is the path of a YAML file of task specs."""
    return isinstance(entry, str) and entry.lower().endswith(TASK_FILE_SUFFIXES)


def resolve_paths(entries: Any, base: str | Path | None) -> Any:
    """`entries` with every relative path (task files, spec `path` and `eval.path`) made absolute against `base`."""
    root = Path(base) if base is not None else Path.cwd()

    def absolute(p: Any) -> Any:
        return str((root / Path(p).expanduser()).resolve()) if isinstance(p, str) and p else p

    if is_task_file(entries):
        return absolute(entries)
    if not isinstance(entries, list):
        return entries
    out = []
    for entry in entries:
        if is_task_file(entry):
            entry = absolute(entry)
        elif isinstance(entry, dict):
            entry = dict(entry)
            if "path" in entry:
                entry["path"] = absolute(entry["path"])
            if isinstance(entry.get("eval"), dict) and "path" in entry["eval"]:
                entry["eval"] = {**entry["eval"], "path": absolute(entry["eval"]["path"])}
        out.append(entry)
    return out


def read_task_file(path: str | Path) -> list:
    """The task entries of a YAML task file (a list, `tasks: [...]` or a training config's data.tasks), paths absolute."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MultiLoRAError(f"task file {path} not found; pass a YAML file listing task specs")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, RecursionError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split())[:200]
        raise MultiLoRAError(f"task file {p} is not readable YAML ({type(e).__name__}: {detail}); fix it") from None
    if isinstance(data, dict) and set(data) == {"tasks"}:
        data = data["tasks"]
    elif isinstance(data, dict) and isinstance(data.get("data"), dict) and "tasks" in data["data"]:
        data = data["data"]["tasks"]  # a training config: its data.tasks
    if not isinstance(data, list):
        raise MultiLoRAError(f"task file {p} must hold a list of tasks (names or specs with name, path, format), "
                             f"a mapping with tasks:, or a training config with data.tasks; got {type(data).__name__}")
    return resolve_paths(data, p.parent)


def expand(entries: Any, base: str | Path | None = None, depth: int = 0) -> list:
    """The list of task names and specs: task files read in place (paths absolute)."""
    entries = resolve_paths(entries, base)
    if is_task_file(entries):
        entries = [entries]
    if not isinstance(entries, list):
        raise MultiLoRAError(f"data.tasks must be a list of task names and specs, or a YAML task file, "
                             f"got {_show(entries)}")
    out = []
    for entry in entries:
        if is_task_file(entry):
            if depth >= 4:
                raise MultiLoRAError(f"task file {entry} is included too deeply (a loop?); list the tasks directly")
            out += expand(read_task_file(entry), None, depth + 1)
        else:
            out.append(entry)
    return out


def task_names(entries: Sequence[Any]) -> list[str]:
    """The task names of a list of names and specs (no checks)."""
    return [e.get("name", "?") if isinstance(e, dict) else str(e) for e in entries]


# ----------------------------------------------------------------------------- spec -> TaskInfo, the registry


_CACHE: dict[str, tuple[tuple, Loaded]] = {}  # spec as JSON -> (data files' (mtime, size), loaded)


def _stamp(spec: Spec) -> tuple:
    stamps = []
    for path in (spec.path, spec.eval_path):
        if path is not None:
            p = Path(path)
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            stamps += [(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()]
    return tuple(stamps)


def loaded(spec: Spec) -> Loaded:
    """`load_spec(spec)`, cached while its data files are unchanged."""
    key, stamp = json.dumps(spec.__dict__, sort_keys=True, default=list), _stamp(spec)
    hit = _CACHE.get(key)
    if hit is None or hit[0] != stamp:
        hit = (stamp, load_spec(spec))
        _CACHE[key] = hit
    return hit[1]


def task_info(spec: Spec) -> Any:
    """The registry entry of an own task: its splits, examples, items (choice, classification), metrics."""
    from . import TaskInfo  # the registry imports this module

    data = loaded(spec)
    has_eval = spec.eval_split is not None or spec.eval_path is not None
    splits = ("train", "val") if has_eval else ("train",)

    def examples(split: str, root: Any = None, **_: Any) -> list[Example]:
        _check(split)
        return list(data.examples[split])

    def items(split: str, root: Any = None, **_: Any) -> list[MCItem]:
        _check(split)
        return list(data.items[split])

    def _check(split: str) -> None:
        if split not in splits:
            raise MultiLoRAError(f"task {spec.name!r} has no {split!r} split" + (
                "" if has_eval else " (eval: none); give eval: {split: 0.1} or eval: {path: FILE} to evaluate it"))

    how = ("accuracy by log-likelihood" if spec.format in ("choice", "classification")
           else "response perplexity" + (" and exact match" if spec.metric == "exact_match" else ""))
    held = (f"val: {spec.eval_path}" if spec.eval_path else
            f"{round(100 * spec.eval_split)}% val by prompt hash" if spec.eval_split else "no eval split")
    return TaskInfo(spec.name, FAMILY, splits, "train", "val", spec.path, examples,
                    items if spec.format in ("choice", "classification") else None,
                    f"own {spec.format} task; {held}; evaluated by {how}",
                    generation=spec.metric == "exact_match")


def check_entries(entries: Any, base: str | Path | None = None) -> tuple[list, list[str], list[Spec]]:
    """(entries expanded, every problem, the own tasks' specs): names known, specs valid, their data loadable."""
    from . import TASKS

    try:
        entries = expand(entries, base)
    except MultiLoRAError as e:
        return (entries if isinstance(entries, list) else []), [str(e)], []
    problems: list[str] = []
    specs: list[Spec] = []
    for entry in entries:
        if isinstance(entry, str):
            if entry not in TASKS:
                if Path(entry).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
                    problems.append(f"{entry!r} is a data file, not a task: describe it as a mapping "
                                    "(name, path, format, fields); see 'Training on your own tasks' in the README")
                    continue
                close = difflib.get_close_matches(entry, list(TASKS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"unknown task {_show(entry)}{hint}; `multilora tasks` lists them, or give a spec "
                                "(name, path, format) for your own data")
            continue
        columns = None
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and Path(entry["path"]).exists():
            try:
                columns = column_names(custom_rows(entry["path"], "train"))
            except MultiLoRAError as e:
                problems.append(str(e))
                continue
        spec, spec_problems = parse_spec(entry, columns)
        problems += spec_problems
        if spec is None:
            continue
        try:
            loaded(spec)
        except MultiLoRAError as e:
            problems.append(str(e) if str(e).startswith("task ") else f"task {spec.name!r}: {e}")
            continue
        specs.append(spec)
    names = task_names(entries)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        problems.append(f"task(s) {', '.join(twice)} listed twice; list each task once")
    return entries, problems, specs


USER_TASKS: dict[str, Any] = {}  # own tasks registered by resolve_tasks, looked up by tasks.get_task


def resolve_tasks(entries: Any, base: str | Path | None = None) -> tuple[list, list[str]]:
    """Expand, check and register the own tasks of `entries`; returns (the expanded entries, every problem)."""
    entries, problems, specs = check_entries(entries, base)
    if not problems:
        for spec in specs:
            USER_TASKS[spec.name] = task_info(spec)
    return entries, problems


def use_tasks(entries: Any, base: str | Path | None = None) -> list[str]:
    """Register the own tasks of `entries` and return all their names; a MultiLoRAError lists every problem."""
    entries, problems = resolve_tasks(entries, base)
    if problems:
        raise MultiLoRAError(f"{len(problems)} problem(s) in the tasks: " + "; ".join(problems))
    return task_names(entries)


def spec_weights(entries: Sequence[Any]) -> dict[str, float]:
    """{task: weight} of the specs that give `weight`."""
    return {e["name"]: float(e["weight"]) for e in entries if isinstance(e, dict) and e.get("weight") is not None}


def mixture_weights(entries: Sequence[Any], weights: dict[str, float] | None) -> dict[str, float] | None:
    """The mixture weights: data.weights, completed by the specs' `weight:` (None when neither gives any)."""
    merged = {**spec_weights(entries), **(weights or {})}
    return merged or None


def eval_task_names(text: str, target: str | os.PathLike | None = None) -> list[str]:
    """`multilora eval --tasks`: comma-separated names and task files; a name may be an own task of TARGET's run."""
    entries = [t.strip() for t in text.split(",") if t.strip()]
    from . import TASKS

    unknown = [e for e in entries if not is_task_file(e) and e not in TASKS]
    config = Path(target) / "config.yaml" if target is not None else None
    if unknown and config is not None and config.is_file():
        try:
            data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = {}
        run_specs = {e["name"]: e for e in ((data.get("data") or {}).get("tasks") or [])
                     if isinstance(e, dict) and isinstance(e.get("name"), str)}
        entries = [run_specs.get(e, e) if e in unknown else e for e in entries]
    return use_tasks(entries)
