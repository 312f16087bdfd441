"""Import a PEFT LoRA adapter folder as a multilora adapter folder (`multilora import-peft`).

The result has n = 1, init = lora, scale = none, the same r, and alpha chosen so that alpha / r
equals PEFT's scaling (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora). Anything that is
not plain LoRA on linear layers is refused, naming the field. The PEFT folder format itself (file
names, tensor keys, reading and validating) is defined once, in `interop`; the output folder follows
the writers' one rule, `export.check_out_dir`.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import FORMAT, write_adapter_folder
from .errors import MultiLoRAError
from .export import OVERWRITE_HELP, check_out_dir, clear_out_dir, refuse_same_folder
from .inject import MultiLoRAConfig
from .interop import PEFT_CONFIG_NAME, read_peft, read_peft_config


def import_peft(
    peft_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Turn a PEFT LoRA adapter folder into a multilora adapter folder (n = 1, LoRA init); returns out_dir.

    Refuses, naming the field, anything that is not plain LoRA on linear layers: another peft_type,
    use_dora, modules_to_save, bias, per-module ranks/alphas that differ, missing or mis-shaped tensors.
    A non-empty `out_dir` is refused unless `overwrite`.
    """
    d = Path(peft_dir)
    cfg = read_peft_config(d)
    if cfg.get("format") == FORMAT:
        raise MultiLoRAError(f"{d} is already a multilora adapter folder; use it directly")
    refuse_same_folder(d, out_dir)
    check_out_dir(out_dir, overwrite, reads=[d])
    r, alpha = _check_peft_config(cfg, d / PEFT_CONFIG_NAME)
    tensors = _our_tensors(read_peft(d, cfg))
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in tensors))
    config = MultiLoRAConfig.lora(r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0), targets=modules)
    base = {"name_or_path": base_model_name_or_path or cfg.get("base_model_name_or_path") or "", "model_type": None,
            "hidden_size": None, "num_hidden_layers": None, "vocab_size": None}
    extra = {"imported_from": {"format": "peft", "peft_version": (cfg.get("auto_mapping") or {}).get("peft_version")
                               or cfg.get("peft_version"), "lora_alpha": cfg.get("lora_alpha"),
                               "use_rslora": bool(cfg.get("use_rslora"))}}
    clear_out_dir(out_dir, overwrite)
    return write_adapter_folder(out_dir, config, tensors, modules, bool(cfg.get("fan_in_fan_out")), base, extra)


def _check_peft_config(cfg: dict[str, Any], path: Path) -> tuple[int, float]:
    """Refuse what is not plain LoRA; return (r, our alpha) with alpha / r == PEFT's scaling."""
    if cfg.get("peft_type") != "LORA":
        raise MultiLoRAError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be imported")
    if cfg.get("use_dora"):
        raise MultiLoRAError(f"{path}: use_dora is true; DoRA adapters (magnitude vectors) cannot be imported, only plain LoRA")
    if cfg.get("modules_to_save"):
        raise MultiLoRAError(f"{path}: modules_to_save = {cfg['modules_to_save']!r}; fully trained modules cannot be "
                             "imported into a LoRA adapter: re-train without modules_to_save")
    if cfg.get("bias", "none") != "none":
        raise MultiLoRAError(f"{path}: bias = {cfg.get('bias')!r}; only bias='none' adapters can be imported")
    if cfg.get("lora_bias"):
        raise MultiLoRAError(f"{path}: lora_bias is true; LoRA bias terms cannot be imported, only bias-free LoRA")
    if cfg.get("target_parameters"):
        raise MultiLoRAError(f"{path}: target_parameters = {cfg['target_parameters']!r}; only LoRA on linear modules "
                             "(target_modules) can be imported")
    r, lora_alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise MultiLoRAError(f"{path}: r must be a positive integer, got {r!r}")
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not lora_alpha > 0:
        raise MultiLoRAError(f"{path}: lora_alpha must be a positive number, got {lora_alpha!r}")
    for key, default in (("rank_pattern", r), ("alpha_pattern", lora_alpha)):
        differing = {k: v for k, v in (cfg.get(key) or {}).items() if v != default}
        if differing:
            name = key.split("_")[0]
            raise MultiLoRAError(f"{path}: {key} gives some modules another {'rank' if name == 'rank' else 'lora_alpha'} "
                                 f"({differing!r} vs {default!r}); a multilora adapter has one r and alpha: "
                                 "import only adapters with a uniform rank and alpha")
    dropout = cfg.get("lora_dropout") or 0.0
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise MultiLoRAError(f"{path}: lora_dropout must be in [0, 1), got {dropout!r}")
    scaling = lora_alpha / math.sqrt(r) if cfg.get("use_rslora") else lora_alpha / r
    return r, scaling * r  # our scaling alpha / r == PEFT's scaling


def _our_tensors(adapter: Any) -> dict[str, torch.Tensor]:
    """PEFT factors -> ours: lora_A.weight (r, d_in) -> lora_A (1, r, d_in); lora_B.weight (d_out, r) -> lora_B (1, d_out, r)."""
    if adapter.other_keys:
        raise MultiLoRAError(f"{adapter.weights}: tensor {adapter.other_keys[0]!r} is not a LoRA factor of a linear "
                             "layer (expected base_model.model.<module>.lora_A|lora_B.weight); only plain LoRA can be "
                             "imported")
    if not adapter.modules:
        raise MultiLoRAError(f"{adapter.weights} holds no LoRA tensors")
    out = {}
    for path, f in adapter.modules.items():
        out[f"{path}.lora_A"] = f.a.unsqueeze(0)  # (1, r, d_in)
        out[f"{path}.lora_B"] = f.b.unsqueeze(0)  # (1, d_out, r)
    return out


# --------------------------------------------------------------------------- CLI helpers (wired in cli.py)


def add_import_peft_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `multilora import-peft`."""
    p.add_argument("peft_dir", help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output multilora adapter folder")
    p.add_argument("--model", default=None, help="base model to record (default: PEFT's base_model_name_or_path)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def run_import_peft_cli(args: argparse.Namespace) -> None:
    """Run `multilora import-peft` from parsed arguments."""
    out = import_peft(args.peft_dir, args.out, base_model_name_or_path=args.model,
                      overwrite=getattr(args, "overwrite", False))
    print(f"wrote multilora adapter (n = 1, LoRA) to {out}; use it with multilora eval/analyze/export or load_adapter")
