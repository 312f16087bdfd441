"""The training config: typed dataclasses that are the YAML schema, with `--section.key value` overrides.

    model: smollm2-135m            # the embedded model, or a local save_pretrained folder; or a mapping:
    # model: {name: PATH, quantization: nf4, compute_dtype: bfloat16, double_quant: true}   (QLoRA: quant.py)
    method: multilora              # multilora | lora | full
    adapter: {n: 3, r: 8, alpha: 16, dropout: 0.0, init: multilora, scale: vector, scale_init: null,
              targets: [q_proj, v_proj]}
    data:    {tasks: [alpaca, rte], mixture: proportional, temperature: 2.0, weights: null,
              max_len: 256, chat: false, eval_examples: 32}
    optim:   {lr: 2.0e-4, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8, warmup_steps: 0,
              schedule: cosine, grad_clip: 1.0, s_lr_mult: 1.0, b_lr_mult: 1.0, fused: true}
    train:   {batch_size: 4, grad_accum: 1, max_steps: 100, epochs: null, seed: 0, eval_every: 0,
              save_every: 50, keep_last: 2, save_last: true, log_every: 1, mixed_precision: "no", gradient_checkpointing: false,
              log_tensorboard: false, cpu: false}
    output_dir: runs/multilora

`load_config(path, ["--adapter.n", "4", "--optim.lr=3e-4"])` reads the file, applies the overrides
(values parsed as YAML), and validates everything at once: every problem (unknown key with the
nearest valid one, wrong type, bad value, missing model folder) is named in one MultiLoRAError.
"""

from __future__ import annotations

import difflib
import math
import os
import textwrap
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from .data import STRATEGIES
from .errors import MultiLoRAError
from .inject import MultiLoRAConfig
from .models import DEFAULT_MODEL as EMBEDDED_MODEL
from .quant import COMPUTE_DTYPES, INSTALL_HINT, QUANTIZATIONS, QuantConfig, bitsandbytes_available
from .tasks import PAPER_MIXTURE, mixture_weights, resolve_tasks, task_names
from .tasks.entries import resolve_paths, spec_weights
from .typed_config import coerce, field_types, parse_overrides, show, type_name

METHODS = ("multilora", "lora", "full")
SCHEDULES = ("linear", "cosine")
MIXED_PRECISION = ("no", "bf16", "fp16")

@dataclass
class DataOptions:
    """Training tasks, how they are mixed, and the held-out evaluation set."""

    # bundled task names and own-task specs (name, path, format, ...; see tasks/spec.py), or a YAML task file
    tasks: Union[list[Union[str, dict[str, Any]]], str] = field(default_factory=lambda: list(PAPER_MIXTURE))
    mixture: str = "proportional"  # proportional | temperature | uniform | weights
    temperature: float = 2.0  # for mixture: temperature (p_t ~ n_t^(1/T))
    weights: Union[dict[str, float], None] = None  # for mixture: weights, one per task (or a spec's weight:)
    max_len: int = 256  # tokens per example (the prompt is cut from the left)
    chat: bool = False  # wrap prompts in the tokenizer's chat template
    eval_examples: int = 32  # held-out examples per task (its eval split) for the periodic eval; 0: none


@dataclass
class OptimOptions:
    """AdamW and the learning-rate schedule."""

    lr: float = 2e-4
    weight_decay: float = 0.0  # never applied to 1-D parameters or to MultiLoRA's scales
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"  # linear | cosine (both decay to 0 after warmup)
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    s_lr_mult: float = 1.0  # lr of MultiLoRA's scales s = lr x this (no effect without scales)
    b_lr_mult: float = 1.0  # lr of the B factors = lr x this (LoRA+'s ratio; no effect for full)
    fused: bool = True  # AdamW's fused kernel (HF Trainer's default); false: torch's foreach loop, same update up to rounding


@dataclass
class TrainOptions:
    """Batching, length, seed, evaluation, checkpoints and logging."""

    batch_size: int = 4  # examples per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * grad_accum * processes)
    max_steps: Union[int, None] = 100  # optimizer steps; null: use epochs
    epochs: Union[float, None] = None  # passes over the training examples (all tasks); used when max_steps is null
    seed: int = 0
    eval_every: int = 0  # steps between held-out evaluations; 0: only at the end
    save_every: int = 50  # steps between checkpoints; 0: only at the end
    keep_last: int = 2  # checkpoints kept
    save_last: bool = True  # a checkpoint at the last step too (only needed to extend a finished run with --resume)
    log_every: int = 1  # steps between metrics.jsonl lines
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 needs a GPU); trainable weights stay float32
    gradient_checkpointing: bool = False  # recompute activations in backward (non-reentrant): less memory, one more forward
    log_tensorboard: bool = False  # also log to TensorBoard (run folder/tensorboard) via accelerate
    cpu: bool = False  # force CPU even where a GPU is available


@dataclass
class TrainConfig:
    """A whole training run: the YAML file's top level. Its `adapter` section is the MultiLoRAConfig itself."""

    model: str = EMBEDDED_MODEL  # 'smollm2-135m' (embedded) or a local model folder (YAML: `model.name` too)
    quant: QuantConfig = field(default_factory=QuantConfig)  # YAML/CLI: model.quantization, model.compute_dtype, ...
    method: str = "multilora"  # multilora | lora | full
    adapter: MultiLoRAConfig = field(default_factory=MultiLoRAConfig)  # ignored by method full
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    output_dir: str = "runs/run"

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-ready data (`model` as the mapping {name, quantization, ...})."""
        data = asdict(self)
        data["model"] = {"name": self.model, **data.pop("quant")}
        return data

    def to_yaml(self) -> str:
        """The resolved config as YAML text (loads back to the same config); an unquantized `model` stays a string."""
        data = self.to_dict()
        if self.quant == QuantConfig():
            data["model"] = self.model
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


SECTIONS = {"adapter": MultiLoRAConfig, "data": DataOptions, "optim": OptimOptions, "train": TrainOptions}


def valid_keys() -> list[str]:
    """Every settable dotted key (`model`, `adapter.n`, ...)."""
    keys = []
    for f in fields(TrainConfig):
        if f.name in SECTIONS:
            keys += [f"{f.name}.{g.name}" for g in fields(SECTIONS[f.name])]
        elif f.name == "quant":  # the `model:` mapping's keys besides its name
            keys += [f"model.{g.name}" for g in fields(QuantConfig)]
        else:
            keys.append(f.name)
    return keys


def help_text() -> str:
    """The config's sections and keys with their defaults, for `multilora train --help`."""
    lines = []
    default = TrainConfig()
    for f in fields(TrainConfig):
        if f.name in SECTIONS:
            section = getattr(default, f.name)
            items = ", ".join(f"{g.name}={getattr(section, g.name)!r}" for g in fields(section))
            lines.append(textwrap.fill(items, width=98, initial_indent=f"  {f.name}: ",
                                       subsequent_indent=" " * (4 + len(f.name)), break_on_hyphens=False))
        elif f.name == "method":
            lines.append(f"  method: {' | '.join(METHODS)} (default {default.method!r})")
        elif f.name == "model":
            options = ", ".join(f"{g.name}={getattr(default.quant, g.name)!r}" for g in fields(QuantConfig))
            lines.append(textwrap.fill(f"{default.model!r}, or a mapping: name, {options} (quantization: "
                                       f"{' | '.join(QUANTIZATIONS)})", width=98, initial_indent="  model: ",
                                       subsequent_indent=" " * 9, break_on_hyphens=False))
        elif f.name == "quant":
            continue
        else:
            lines.append(f"  {f.name}: {getattr(default, f.name)!r}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate; raise once listing every problem."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MultiLoRAError(f"config file {p} not found; pass a YAML file such as recipes/demo-multilora.yaml")
        try:
            loaded = yaml.safe_load(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise MultiLoRAError(f"{p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                                 "save it as UTF-8") from None
        except RecursionError:
            raise MultiLoRAError(f"{p} is nested too deeply to be a config; fix or rewrite it") from None
        except yaml.YAMLError as e:
            raise MultiLoRAError(f"{p} is not valid YAML: {' '.join(str(e).split())}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise MultiLoRAError(f"{p} must hold a mapping of sections (model, method, adapter, data, optim, "
                                 f"train, output_dir), got {type(loaded).__name__}")
        raw = loaded
        if isinstance(raw.get("data"), dict) and "tasks" in raw["data"]:  # own tasks' paths: relative to the file
            raw["data"]["tasks"] = resolve_paths(raw["data"]["tasks"], p.parent)
    flat = flatten(raw)
    flat.update(parse_overrides(list(overrides or [])))
    return config_from_flat(flat)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a config from nested plain data (as in a YAML file)."""
    return config_from_flat(flatten(data))


def flatten(data: dict[str, Any]) -> dict[str, Any]:
    """{section: {key: value}} -> {"section.key": value}; top-level scalars keep their name."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "model" and isinstance(value, dict):  # {name: ..., quantization: ...}: name is `model`
            for sub, v in value.items():
                flat["model" if sub == "name" else f"model.{sub}"] = v
        elif key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[str(key)] = value
    return flat


def config_from_flat(flat: dict[str, Any]) -> TrainConfig:
    """Build and validate a config from {dotted key: value}; raise one MultiLoRAError naming every problem."""
    problems: list[str] = []
    keys = valid_keys()
    list_keys = False  # an unknown key without a near match: list the valid keys once, at the end
    config = TrainConfig()
    if "model.name" in flat:  # --model.name PATH: the model mapping's name
        flat = {("model" if k == "model.name" else k): v for k, v in flat.items()}
    for key, value in flat.items():
        if key not in keys:
            if key in SECTIONS:
                problems.append(f"section {key!r} must be a mapping of keys, got {show(value)}")
                continue
            close = _alias(key, keys) or difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            if not close and "." in key:  # match the leaf within its section
                section, _, leaf = key.partition(".")
                leaves = [k.partition(".")[2] for k in keys if k.startswith(section + ".")]
                near = difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.4)
                close = [f"{section}.{near[0]}"] if near else []
            hint = f"; did you mean {close[0]!r}?" if close else ""
            list_keys = list_keys or not close
            problems.append(f"unknown key {show(key)}{hint}")
            continue
        if key == "train.mixed_precision" and value is False:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        owner, name = _owner(config, key)
        hint = field_types(type(owner))[name]
        ok, coerced = coerce(value, hint)
        if not ok:
            problems.append(f"{key} = {show(value)} has the wrong type: expected {type_name(hint)}")
            continue
        setattr(owner, name, coerced)
    problems += _check_values(config, set(flat))  # keys with a type problem keep their default here
    if problems:
        raise MultiLoRAError(f"{len(problems)} problem(s) in the config: " + "; ".join(problems)
                             + (f" (valid keys: {', '.join(keys)})" if list_keys else ""))
    return config


# names other tools (PEFT, HF Trainer, alpaca-lora) use for our keys, for "did you mean"
ALIASES = {"learning_rate": "lr", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
           "target_modules": "targets", "num_modules": "n", "micro_batch_size": "batch_size",
           "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
           "steps": "max_steps", "num_epochs": "epochs", "num_train_epochs": "epochs", "warmup": "warmup_steps",
           "max_grad_norm": "grad_clip", "cutoff_len": "max_len", "max_length": "max_len",
           "lr_scheduler_type": "schedule", "scheduler": "schedule", "output": "output_dir"}


def _alias(key: str, keys: list[str]) -> list[str]:
    """The valid key another tool's name for it points to (`optim.learning_rate` -> `optim.lr`), if any."""
    section, _, leaf = key.rpartition(".")
    target = ALIASES.get(leaf)
    if target is None:
        return []
    matches = [k for k in keys if k.rpartition(".")[2] == target]
    same = [k for k in matches if k.rpartition(".")[0] == section]
    return (same or matches)[:1]


def _owner(config: TrainConfig, key: str) -> tuple[Any, str]:
    section, dot, name = key.partition(".")
    if section == "model" and dot:  # model.quantization, ...: the QuantConfig
        return config.quant, name
    return (getattr(config, section), name) if dot else (config, key)


def _check_values(c: TrainConfig, given: set[str]) -> list[str]:
    """Cross-field and range rules, all in one place; returns the problems found."""
    p: list[str] = []

    def one_of(key: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            p.append(f"{key} = {show(value)} is not valid{hint}; use one of {', '.join(allowed)}")

    def positive(key: str, value: float, zero_ok: bool = False) -> None:
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            p.append(f"{key} = {show(value)} must be {'>= 0' if zero_ok else '> 0'}")

    one_of("method", c.method, METHODS)
    q = c.quant
    one_of("model.quantization", q.quantization, QUANTIZATIONS)
    one_of("model.compute_dtype", q.compute_dtype, COMPUTE_DTYPES)
    if q.quantization in QUANTIZATIONS and q.quantized:
        if c.method == "full":
            p.append(f"model.quantization = {q.quantization!r} cannot be trained with method full (quantized "
                     "weights get no gradients); use method lora or multilora (QLoRA), or model.quantization none")
        if not bitsandbytes_available():
            p.append(f"model.quantization = {q.quantization!r} needs the package bitsandbytes, which is not "
                     f"installed: {INSTALL_HINT}; or use model.quantization none")
    a, d, o, t = c.adapter, c.data, c.optim, c.train
    if c.method == "lora":  # plain LoRA is MultiLoRA with n = 1, B = 0 at init and no scales
        for key, want in (("n", 1), ("init", "lora"), ("scale", "none")):
            if f"adapter.{key}" in given and getattr(a, key) != want:
                p.append(f"method lora uses adapter.{key} = {want!r}, got {show(getattr(a, key))}; "
                         f"drop adapter.{key} or use method multilora")
        if "adapter.scale_init" in given and a.scale_init is not None:
            p.append("method lora has no scales, so adapter.scale_init does not apply; drop it or use method multilora")
        a.n, a.init, a.scale, a.scale_init = 1, "lora", "none", None
    if c.method != "full":
        for problem in a.problems():  # the adapter's own rules (MultiLoRAConfig.problems), in the config's words
            key, value = f"adapter.{problem.key}", getattr(a, problem.key)
            if problem.choices:
                one_of(key, value, problem.choices)
            elif problem.requirement.startswith("must"):
                p.append(f"{key} = {show(value)} {problem.requirement}")
            else:
                p.append(f"adapter.{problem.requirement}")
    if not d.tasks:
        p.append("data.tasks is empty: name at least one task (e.g. [alpaca, rte])")
    elif isinstance(d.tasks, str) and not d.tasks.lower().endswith((".yaml", ".yml")):
        p.append(f"data.tasks = {show(d.tasks)} has the wrong type: expected a list of a string or a task spec, "
                 f"or a .yaml task file; write [{d.tasks}] for one task")
        d.tasks = [d.tasks]
    else:  # task files read in place; own tasks checked (their data too), registered, paths kept absolute
        d.tasks, task_problems = resolve_tasks(d.tasks)
        p += [f"data.tasks: {x}" for x in task_problems]
    names = task_names(d.tasks)
    one_of("data.mixture", d.mixture, STRATEGIES)
    positive("data.temperature", d.temperature)
    spec_weighted = list(spec_weights(d.tasks))
    if d.weights is not None and d.mixture != "weights":
        p.append(f"data.weights is set but data.mixture is {show(d.mixture)}; set data.mixture: weights")
    elif spec_weighted and d.mixture != "weights":
        p.append(f"task(s) {', '.join(spec_weighted)} give a weight but data.mixture is {show(d.mixture)}; "
                 "set data.mixture: weights")
    if d.mixture == "weights":
        w = mixture_weights(d.tasks, d.weights) or {}
        if set(w) != set(names) or any(not (v > 0 and math.isfinite(v)) for v in w.values()):
            p.append(f"data.weights must give one positive weight per task in data.tasks {show(names)} "
                     f"(or the task spec's weight:), got {show(w or d.weights)}")
    if d.max_len < 8:
        p.append(f"data.max_len = {d.max_len} is too short; use at least 8 (typically 256-512)")
    positive("data.eval_examples", d.eval_examples, zero_ok=True)
    positive("optim.lr", o.lr)
    positive("optim.weight_decay", o.weight_decay, zero_ok=True)
    positive("optim.eps", o.eps)
    positive("optim.grad_clip", o.grad_clip, zero_ok=True)
    positive("optim.warmup_steps", o.warmup_steps, zero_ok=True)
    positive("optim.s_lr_mult", o.s_lr_mult)
    positive("optim.b_lr_mult", o.b_lr_mult)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas = {show(o.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    one_of("optim.schedule", o.schedule, SCHEDULES)
    for key in ("batch_size", "grad_accum", "keep_last", "log_every"):
        positive(f"train.{key}", getattr(t, key))
    for key in ("eval_every", "save_every"):
        positive(f"train.{key}", getattr(t, key), zero_ok=True)
    if t.max_steps is None and t.epochs is None:
        p.append("train.max_steps and train.epochs are both null: set one of them")
    elif t.max_steps is not None and t.epochs is not None:
        p.append(f"train.max_steps = {t.max_steps} and train.epochs = {t.epochs} are both set: set one, "
                 "the other to null")
    elif t.max_steps is not None:
        positive("train.max_steps", t.max_steps)
    else:
        positive("train.epochs", t.epochs)
    if t.max_steps is not None and o.warmup_steps >= t.max_steps > 0:
        p.append(f"optim.warmup_steps = {o.warmup_steps} must be below train.max_steps = {t.max_steps}")
    one_of("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    if not c.output_dir:
        p.append("output_dir is empty: name the run folder (e.g. runs/my-run)")
    if c.model != EMBEDDED_MODEL:
        path = Path(c.model).expanduser()
        if not path.is_dir():
            p.append(f"model {show(c.model)} is not a local folder (this tool never downloads): pass --model PATH "
                     f"to a save_pretrained folder, or {EMBEDDED_MODEL!r} for the embedded model")
        elif not (path / "config.json").is_file():
            p.append(f"model folder {show(c.model)} has no config.json: pass a folder written by save_pretrained")
    return p


__all__ = ["DataOptions", "OptimOptions", "TrainOptions", "TrainConfig", "load_config",
           "config_from_dict", "config_from_flat", "flatten", "parse_overrides", "valid_keys", "help_text"]
