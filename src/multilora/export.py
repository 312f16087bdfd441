"""Export a MultiLoRA adapter as a standard PEFT LoRA adapter (MULTILORA.md §4).

After training, MultiLoRA is a rank-(n r) LoRA:

    lora_A.weight = A_cat                      (n r, d_in)
    lora_B.weight = (alpha / r) B_s            (d_out, n r)
    r = lora_alpha = n r                       so PEFT's scaling lora_alpha / r = 1

Every tool that serves LoRA (PEFT, vLLM, lm-eval) can then use it; nothing is lost.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint import read_adapter
from .errors import MultiLoRAError
from .inject import adapter_modules, linear_layers
from .io import atomic_path, write_json_atomic
from .layers import fuse

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"


def peft_target_modules(modules: list[str], all_linear: list[str] | None = None) -> list[str] | str:
    """Module-name suffixes that select exactly `modules`, or an exact regex if no suffix set does."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if all_linear is None or {m for m in all_linear if m.rsplit(".", 1)[-1] in leaves} == set(modules):
        return leaves
    return "^(" + "|".join(map(re.escape, modules)) + ")$"


def export_peft(
    source: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a PEFT LoRA adapter (rank n r) equivalent to the MultiLoRA adapter in `source`.

    `source` is an injected model or an adapter folder written by `save_adapter`.
    """
    if isinstance(source, nn.Module):
        factors, fan_in_fan_out, base_name, all_linear = _factors_from_model(source)
    else:
        factors, fan_in_fan_out, base_name = _factors_from_folder(source)
        all_linear = None
    tensors = {}
    for path, (a_cat, b_s) in factors.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a_cat.detach().to("cpu").contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b_s.detach().to("cpu").contiguous()
    ranks = {a.shape[0] for a, _ in factors.values()}
    rank = ranks.pop()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or base_name or None,
        "r": rank,
        "lora_alpha": rank,  # scaling = lora_alpha / r = 1: alpha / r is already inside lora_B
        "lora_dropout": 0.0,
        "target_modules": peft_target_modules(list(factors), all_linear),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    out = Path(out_dir)
    with atomic_path(out / PEFT_WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out / PEFT_CONFIG_NAME, config)
    return out


def _factors_from_model(model: nn.Module) -> tuple[dict[str, Any], bool, str, list[str]]:
    modules = adapter_modules(model)
    if not modules:
        raise MultiLoRAError("this model has no MultiLoRA adapter to export; call multilora.inject or load_adapter first")
    if any(m.merged for m in modules.values()):
        raise MultiLoRAError("the adapter is merged into the base weights; call multilora.unmerge(model) before exporting")
    conv = {m.is_conv1d for m in modules.values()}
    if len(conv) > 1:
        raise MultiLoRAError("PEFT has one fan_in_fan_out flag per adapter, but this adapter mixes Conv1D and Linear layers")
    with torch.no_grad():
        factors = {path: m.factors() for path, m in modules.items()}
    base_name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    all_linear = list(linear_layers(model))
    return factors, conv.pop(), base_name, all_linear


def _factors_from_folder(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], bool, str]:
    meta, tensors = read_adapter(adapter_dir)
    scaling = meta["alpha"] / meta["r"]
    factors = {}
    for path in meta["modules"]:
        try:
            a, b = tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"]
        except KeyError as e:
            raise MultiLoRAError(f"{adapter_dir}: tensor {e.args[0]!r} is missing from the adapter file") from None
        factors[path] = fuse(a, b, tensors.get(f"{path}.lora_s"), scaling)
    base = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
    return factors, meta["fan_in_fan_out"], base.get("name_or_path", "")
