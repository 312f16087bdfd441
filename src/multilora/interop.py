"""A PEFT LoRA adapter folder: the one definition of what multilora reads and writes in PEFT's format.

    adapter_config.json         peft_type "LORA", r, lora_alpha, use_rslora, rank_pattern, alpha_pattern,
                                target_modules, fan_in_fan_out, base_model_name_or_path, ...
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight   (r, d_in)
                                base_model.model.<module path>.lora_B.weight   (d_out, r)
    adapter_model.bin           a pickle (older peft): never opened; refused, saying how to convert it

A module's update is dW = scaling * lora_B @ lora_A with scaling = lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora, where rank_pattern / alpha_pattern can give a module
another r / lora_alpha (the first pattern that matches the end of its path).

Users: `export` (export_peft writes this format), `peft_import` (import_peft reads it), `analyze` (spectra
of a PEFT adapter) and `evaluate` (check_peft_for_model before peft loads an adapter).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import MultiLoRAError
from .io import atomic_path, read_json_object, write_json_atomic
from .layers import in_out_features

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_PEFT_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")  # groups: module path, A or B


def peft_key(path: str, side: str) -> str:
    """The tensor key of factor `side` ('A' or 'B') of the module at `path`."""
    return f"base_model.model.{path}.lora_{side}.weight"


@dataclass
class LoraFactors:
    """One module of a PEFT LoRA adapter: dW = scaling * b @ a."""

    a: torch.Tensor  # (r, d_in)
    b: torch.Tensor  # (d_out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter folder as read by `read_peft`."""

    folder: Path
    config: dict[str, Any]
    modules: dict[str, LoraFactors]  # by module path, in file order
    tensors: dict[str, torch.Tensor]  # every tensor of the file, by key

    @property
    def weights(self) -> Path:
        return self.folder / PEFT_WEIGHTS_NAME

    @property
    def other_keys(self) -> list[str]:
        """Tensor keys that are not LoRA factors of a linear layer (DoRA magnitudes, embeddings, ...)."""
        return [k for k in self.tensors if PEFT_KEY.match(k) is None]


def refuse_pickled_peft(folder: str | os.PathLike) -> None:
    """Raise if `folder` holds a pickled PEFT adapter (adapter_model.bin) but no adapter_model.safetensors.

    Pickle files can run arbitrary code when loaded, so they are never opened: the message says how
    to convert one to safetensors in an environment the user trusts.
    """
    d = Path(folder)
    if (d / PEFT_WEIGHTS_NAME).is_file():
        return
    found = next((name for name in PICKLED_PEFT_NAMES if (d / name).is_file()), None)
    if found is None:
        return
    raise MultiLoRAError(
        f"{d / found} is a pickle file and {d} has no {PEFT_WEIGHTS_NAME}: multilora never loads pickles "
        "(unpickling an untrusted file can run arbitrary code). Convert it to safetensors once, where you "
        f"trust the file: peft.PeftModel.from_pretrained(base_model, '{d}').save_pretrained(OUT, "
        f"safe_serialization=True), or safetensors.torch.save_file(torch.load('{d / found}', weights_only=True), "
        f"'{d / PEFT_WEIGHTS_NAME}'); then use the safetensors folder"
    )


def read_peft_config(folder: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json of a PEFT adapter folder, after checking that both files are there (no pickle)."""
    d = Path(folder)
    if not d.is_dir():
        raise MultiLoRAError(f"PEFT adapter folder {d} does not exist")
    _weights_file(d)
    cfg_path = d / PEFT_CONFIG_NAME
    if not cfg_path.is_file():
        raise MultiLoRAError(f"{cfg_path} is missing: a PEFT adapter folder holds {PEFT_WEIGHTS_NAME} and "
                             f"{PEFT_CONFIG_NAME}")
    return read_json_object(cfg_path)


def read_peft(folder: str | os.PathLike, config: dict[str, Any] | None = None) -> PeftAdapter:
    """Read and validate a PEFT adapter's LoRA factors and per-module scaling (`config`: its adapter_config.json,
    read here if not given).

    Refuses, naming the file and module, a pickled adapter, an unreadable tensor file, a factor
    without its partner, factors that do not multiply, a rank that disagrees with r (or rank_pattern),
    a lora_alpha that is not a positive number, and NaN or inf values. Other tensors are kept in
    `tensors` but not checked: the caller decides (import refuses them, peft loads them).
    """
    d = Path(folder)
    cfg = read_peft_config(d) if config is None else config
    weights = _weights_file(d)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise MultiLoRAError(f"{weights} is not a readable safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = PEFT_KEY.match(key)
        if m is not None:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
    modules = {path: _factors(path, ab, cfg, weights) for path, ab in pairs.items()}
    return PeftAdapter(folder=d, config=cfg, modules=modules, tensors=tensors)


def check_peft_for_model(folder: str | os.PathLike, cfg: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Check a PEFT adapter's LoRA tensors against `model` before peft loads them; returns the tensors.

    Refuses, naming the file, what `read_peft` refuses, and a LoRA tensor for a module the model
    lacks or whose shape does not fit it.
    """
    adapter = read_peft(folder, cfg)
    modules = dict(model.named_modules())
    made_for = cfg.get("base_model_name_or_path") or "another model"
    for path, f in adapter.modules.items():
        if path not in modules:
            raise MultiLoRAError(f"{adapter.weights}: tensor {peft_key(path, 'A')!r} is for module {path!r}, which "
                                 f"this {type(model).__name__} does not have: the adapter was made for {made_for}")
        try:
            d_in, d_out = in_out_features(modules[path])
        except MultiLoRAError:
            continue  # not a linear layer: peft decides
        if f.a.shape[1] != d_in or f.b.shape[0] != d_out:
            raise MultiLoRAError(f"{adapter.weights}: module {path!r} has lora_A {tuple(f.a.shape)} and lora_B "
                                 f"{tuple(f.b.shape)} but this {type(model).__name__}'s layer maps {d_in} -> {d_out} "
                                 f"features: the adapter was made for {made_for}")
    return adapter.tensors


def pattern_value(patterns: Any, path: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the value of the first key that matches the end of `path`, else `default`."""
    for key, value in (patterns or {}).items():
        if path == key or re.match(rf"(.*\.)?{key}$", path):
            return value
    return default


def lora_config(r: int, target_modules: list[str] | str, fan_in_fan_out: bool,
                base_model_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json of a plain LoRA adapter of rank r with scaling 1 (lora_alpha = r)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1: the caller folds its scaling into lora_B
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }


def lora_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{module path: (A (r, d_in), B (d_out, r))} -> the tensors of adapter_model.safetensors."""
    tensors = {}
    for path, (a, b) in factors.items():
        tensors[peft_key(path, "A")] = a.detach().to("cpu").contiguous()
        tensors[peft_key(path, "B")] = b.detach().to("cpu").contiguous()
    return tensors


def write_peft(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (each atomically) into `out_dir`."""
    out = Path(out_dir)
    with atomic_path(out / PEFT_WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out / PEFT_CONFIG_NAME, config)
    return out


# --------------------------------------------------------------------------- internals


def _weights_file(d: Path) -> Path:
    """adapter_model.safetensors of `d`, or a MultiLoRAError (a pickled adapter: why it is never opened)."""
    weights = d / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        refuse_pickled_peft(d)
        raise MultiLoRAError(f"{weights} is missing: a PEFT adapter folder holds {PEFT_WEIGHTS_NAME} and "
                             f"{PEFT_CONFIG_NAME}")
    return weights


def _factors(path: str, ab: dict[str, torch.Tensor], cfg: dict[str, Any], weights: Path) -> LoraFactors:
    """Check one module's lora_A / lora_B against each other and the config; compute its scaling."""
    for side in "AB":
        if side not in ab:
            other = "B" if side == "A" else "A"
            raise MultiLoRAError(f"{weights}: tensor {peft_key(path, side)!r} is missing (its lora_{other} is there); "
                                 "the adapter is incomplete")
    a, b = ab["A"], ab["B"]  # (r, d_in), (d_out, r)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise MultiLoRAError(f"{weights}: module {path!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                             "which do not multiply (expected (r, d_in) and (d_out, r)); the adapter is corrupt")
    rank = a.shape[0]
    r = pattern_value(cfg.get("rank_pattern"), path, cfg.get("r", rank))
    if r != rank:
        raise MultiLoRAError(f"{weights}: module {path!r} has rank {rank} (lora_A {tuple(a.shape)}), inconsistent "
                             f"with r = {r!r} in {weights.parent / PEFT_CONFIG_NAME}; the adapter is corrupt")
    alpha = pattern_value(cfg.get("alpha_pattern"), path, cfg.get("lora_alpha", rank))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise MultiLoRAError(f"{weights.parent / PEFT_CONFIG_NAME}: lora_alpha of module {path!r} must be a positive "
                             f"number, got {alpha!r}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise MultiLoRAError(f"{weights}: module {path!r} holds NaN or inf values; the adapter is corrupt")
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return LoraFactors(a=a, b=b, scaling=float(scaling))
