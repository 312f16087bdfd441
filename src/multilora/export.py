"""Export a MultiLoRA adapter as a standard PEFT LoRA adapter (MULTILORA.md §4).

After training, MultiLoRA is a rank-(n r) LoRA:

    lora_A.weight = A_cat                      (n r, d_in)
    lora_B.weight = (alpha / r) B_s            (d_out, n r)
    r = lora_alpha = n r                       so PEFT's scaling lora_alpha / r = 1

Every tool that serves LoRA (PEFT, vLLM, lm-eval) can then use it; nothing is lost.

Serving (`pad_to`, `server="vllm"`): the rank R = n r can be padded to R' >= R with zero rows
in lora_A and zero columns in lora_B (r = lora_alpha = R', still scaling 1), which changes no
output. `server="vllm"` pads to the next rank vLLM accepts and returns warnings (also sent to
`warnings.warn`) about what vLLM would reject; the rule, kept simple on purpose:
  - rank above 512, or not one of VLLM_RANKS;
  - bias != "none", use_dora, modules_to_save, or embedding (lora_embedding_*) tensors;
  - a module whose last name is not an attention/MLP projection in PROJECTION_NAMES
    (vLLM applies LoRA only to the projections a model class lists; lm_head and embeddings are
    outside them);
  - fan_in_fan_out (GPT-2-style Conv1D): vLLM's LoRA support is per model class, check yours.

Import (`import_peft`): a PEFT LoRA adapter folder becomes a multilora adapter folder with
n = 1, init = lora, scale = none, the same r, and alpha chosen so that alpha / r equals PEFT's
scaling (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import (
    FORMAT,
    read_adapter,
    write_adapter_folder,
)
from .errors import MultiLoRAError
from .inject import MultiLoRAConfig, linear_layers, unmerged_adapter_modules
from .io import atomic_path, read_json_object, write_json_atomic
from .layers import fuse, in_out_features

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
SERVERS = ("vllm",)
# last module-name parts that are attention / MLP projections in common HF architectures
PROJECTION_NAMES = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    "c_attn", "c_proj", "c_fc", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",
    "fc1", "fc2", "fc_in", "fc_out", "out_proj", "query", "key", "value", "W_pack", "Wqkv", "wqkv", "wo",
    "w1", "w2", "w3",
})


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
    *,
    pad_to: int | None = None,
    server: str | None = None,
) -> Path:
    """Write a PEFT LoRA adapter (rank n r, or `pad_to`) equivalent to the MultiLoRA adapter in `source`.

    `source` is an injected model or an adapter folder written by `save_adapter`. `server="vllm"`
    pads to the next rank vLLM accepts (unless `pad_to` is given) and `warnings.warn`s what vLLM
    would reject; use `export_serving` to get those warnings as a list.
    """
    out, _ = _export_peft(source, out_dir, base_model_name_or_path, pad_to=pad_to, server=server, emit=True)
    return out


def export_serving(
    source: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    server: str = "vllm",
    pad_to: int | None = None,
    base_model_name_or_path: str | None = None,
) -> tuple[Path, list[str]]:
    """Export for a LoRA server: (output folder, warnings about what the server would reject)."""
    return _export_peft(source, out_dir, base_model_name_or_path, pad_to=pad_to, server=server, emit=True)


def serving_rank(rank: int, server: str = "vllm") -> int:
    """The smallest rank >= `rank` that `server` accepts, or `rank` itself if none is large enough."""
    _check_server(server)
    return next((r for r in VLLM_RANKS if r >= rank), rank)


def check_vllm(config: dict[str, Any], tensor_keys: list[str]) -> list[str]:
    """Warnings about what vLLM would reject in a PEFT LoRA adapter (config dict + tensor keys)."""
    problems = []
    rank = config.get("r")
    if isinstance(rank, int) and rank > VLLM_RANKS[-1]:
        problems.append(f"r = {rank} exceeds vLLM's largest LoRA rank {VLLM_RANKS[-1]}; vLLM will refuse this adapter")
    elif rank not in VLLM_RANKS:
        problems.append(f"r = {rank} is not a rank vLLM accepts {VLLM_RANKS}; export with --pad-to or --server vllm")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"bias = {config.get('bias')!r} (lora_bias = {config.get('lora_bias')!r}): vLLM serves "
                        "LoRA without bias terms; train with bias='none'")
    if config.get("use_dora"):
        problems.append("use_dora = true: vLLM does not serve DoRA adapters")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save = {config['modules_to_save']!r}: vLLM does not load fully trained modules")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out = true (GPT-2-style Conv1D layers): vLLM's LoRA support is per model "
                        "class; check that yours supports LoRA")
    odd = {}
    for key in tensor_keys:
        m = _PEFT_KEY.match(key)
        path = m.group(1) if m else key
        leaf = path.rsplit(".", 1)[-1]
        if "lora_embedding" in key or leaf in ("lm_head", "embed_tokens", "wte", "wpe", "embed_out"):
            odd.setdefault(path, "an embedding or output head, not a linear projection")
        elif leaf not in PROJECTION_NAMES:
            odd.setdefault(path, "not an attention/MLP projection")
    for path, why in sorted(odd.items())[:5]:
        problems.append(f"module {path!r} is {why}; vLLM may reject LoRA weights for it")
    if len(odd) > 5:
        problems.append(f"... and {len(odd) - 5} more such modules")
    return problems


def _refuse_same_folder(source: Path, out_dir: str | os.PathLike) -> None:
    """Both formats name their config adapter_config.json: writing into the source would destroy it."""
    if Path(out_dir).resolve() == source.resolve():
        raise MultiLoRAError(f"the output folder {out_dir} is the input folder; both use {PEFT_CONFIG_NAME}: "
                             "choose another --out")


def _check_server(server: str | None) -> None:
    if server is not None and server not in SERVERS:
        raise MultiLoRAError(f"server must be one of {', '.join(SERVERS)}, got {server!r}")


def _export_peft(
    source: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None,
    *,
    pad_to: int | None,
    server: str | None,
    emit: bool,
) -> tuple[Path, list[str]]:
    _check_server(server)
    if pad_to is not None and (not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < 1):
        raise MultiLoRAError(f"pad_to must be a positive integer rank, got {pad_to!r}")
    if isinstance(source, nn.Module):
        factors, fan_in_fan_out, base_name, all_linear = _factors_from_model(source)
    else:
        _refuse_same_folder(Path(source), out_dir)
        factors, fan_in_fan_out, base_name = _factors_from_folder(source)
        all_linear = None
    ranks = {a.shape[0] for a, _ in factors.values()}
    rank = ranks.pop()  # n r
    target = pad_to if pad_to is not None else (serving_rank(rank, server) if server else rank)
    if target < rank:
        raise MultiLoRAError(
            f"pad_to = {target} is smaller than the adapter's rank n*r = {rank}; padding cannot drop rank, "
            f"use pad_to >= {rank}"
        )
    tensors = {}
    for path, (a_cat, b_s) in factors.items():
        a = a_cat.detach().to("cpu")  # (n r, d_in)
        b = b_s.detach().to("cpu")  # (d_out, n r)
        if target > rank:  # zero rows of A / columns of B add nothing to B A: lossless
            a = torch.cat([a, a.new_zeros(target - rank, a.shape[1])], dim=0)  # (R', d_in)
            b = torch.cat([b, b.new_zeros(b.shape[0], target - rank)], dim=1)  # (d_out, R')
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or base_name or None,
        "r": target,
        "lora_alpha": target,  # scaling = lora_alpha / r = 1: alpha / r is already inside lora_B
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
    found = check_vllm(config, list(tensors)) if server == "vllm" else []
    out = Path(out_dir)
    with atomic_path(out / PEFT_WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out / PEFT_CONFIG_NAME, config)
    if emit:
        for w in found:
            warnings.warn(f"{server}: {w}", stacklevel=3)
    return out, found


def _factors_from_model(model: nn.Module) -> tuple[dict[str, Any], bool, str, list[str]]:
    modules = unmerged_adapter_modules(model, "export")
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


# --------------------------------------------------------------------------- PEFT adapters we read

PICKLED_PEFT_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")


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


def check_peft_for_model(folder: str | os.PathLike, cfg: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Check a PEFT adapter's LoRA tensors against `model` before peft loads them; returns the tensors.

    Refuses, naming the file, a pickled adapter, an unreadable tensor file, a LoRA tensor for a
    module the model lacks or whose shape does not fit it, and a rank that disagrees with `r`.
    """
    d = Path(folder)
    refuse_pickled_peft(d)
    weights = d / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        raise MultiLoRAError(f"{weights} is missing: a PEFT adapter folder holds {PEFT_WEIGHTS_NAME} and {PEFT_CONFIG_NAME}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise MultiLoRAError(f"{weights} is not a readable safetensors file ({e})") from None
    modules = dict(model.named_modules())
    made_for = cfg.get("base_model_name_or_path") or "another model"
    r = cfg.get("r")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            continue  # other PEFT tensors (DoRA magnitudes, embeddings): peft itself checks those
        path = m.group(1)
        if path not in modules:
            raise MultiLoRAError(f"{weights}: tensor {key!r} is for module {path!r}, which this "
                                 f"{type(model).__name__} does not have: the adapter was made for {made_for}")
        pairs.setdefault(path, {})[m.group(2)] = t
    for path, ab in pairs.items():
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            side = "A" if a is None else "B"
            raise MultiLoRAError(f"{weights}: tensor 'base_model.model.{path}.lora_{side}.weight' is missing; "
                                 "the adapter is incomplete")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise MultiLoRAError(f"{weights}: module {path!r} has lora_A {tuple(a.shape)} and lora_B "
                                 f"{tuple(b.shape)}, which do not multiply; the adapter is corrupt")
        if not cfg.get("rank_pattern") and isinstance(r, int) and a.shape[0] != r:
            raise MultiLoRAError(f"{weights}: module {path!r} has rank {a.shape[0]} (lora_A {tuple(a.shape)}), "
                                 f"inconsistent with r = {r} in {d / PEFT_CONFIG_NAME}")
        try:
            d_in, d_out = in_out_features(modules[path])
        except MultiLoRAError:
            continue  # not a linear layer: peft decides
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise MultiLoRAError(f"{weights}: module {path!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                 f"but this {type(model).__name__}'s layer maps {d_in} -> {d_out} features: the "
                                 f"adapter was made for {made_for}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise MultiLoRAError(f"{weights}: module {path!r} holds NaN or inf values; the adapter is corrupt")
    return tensors


# --------------------------------------------------------------------------- PEFT import

_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def import_peft(
    peft_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Turn a PEFT LoRA adapter folder into a multilora adapter folder (n = 1, LoRA init); returns out_dir.

    Refuses, naming the field, anything that is not plain LoRA on linear layers: another peft_type,
    use_dora, modules_to_save, bias, per-module ranks/alphas that differ, missing or mis-shaped tensors.
    """
    d = Path(peft_dir)
    cfg_path, weights = d / PEFT_CONFIG_NAME, d / PEFT_WEIGHTS_NAME
    if not d.is_dir():
        raise MultiLoRAError(f"PEFT adapter folder {d} does not exist")
    if not weights.is_file():
        refuse_pickled_peft(d)
        raise MultiLoRAError(f"{weights} is missing: a PEFT adapter folder holds {PEFT_WEIGHTS_NAME} and {PEFT_CONFIG_NAME}")
    if not cfg_path.is_file():
        raise MultiLoRAError(f"{cfg_path} is missing: a PEFT adapter folder holds {PEFT_WEIGHTS_NAME} and {PEFT_CONFIG_NAME}")
    cfg = read_json_object(cfg_path)
    if cfg.get("format") == FORMAT:
        raise MultiLoRAError(f"{d} is already a multilora adapter folder; use it directly")
    _refuse_same_folder(d, out_dir)
    r, alpha = _check_peft_config(cfg, cfg_path)
    try:
        raw = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise MultiLoRAError(f"{weights} is not a readable safetensors file ({e})") from None
    tensors = _peft_tensors(raw, r, weights)
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in tensors))
    config = MultiLoRAConfig.lora(r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0), targets=modules)
    base = {"name_or_path": base_model_name_or_path or cfg.get("base_model_name_or_path") or "", "model_type": None,
            "hidden_size": None, "num_hidden_layers": None, "vocab_size": None}
    extra = {"imported_from": {"format": "peft", "peft_version": (cfg.get("auto_mapping") or {}).get("peft_version")
                               or cfg.get("peft_version"), "lora_alpha": cfg.get("lora_alpha"),
                               "use_rslora": bool(cfg.get("use_rslora"))}}
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


def _peft_tensors(raw: dict[str, torch.Tensor], r: int, weights: Path) -> dict[str, torch.Tensor]:
    """PEFT keys -> ours: lora_A.weight (r, d_in) -> lora_A (1, r, d_in); lora_B.weight (d_out, r) -> lora_B (1, d_out, r)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise MultiLoRAError(f"{weights}: tensor {key!r} is not a LoRA factor of a linear layer "
                                 "(expected base_model.model.<module>.lora_A|lora_B.weight); only plain LoRA can be imported")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise MultiLoRAError(f"{weights} holds no LoRA tensors")
    out = {}
    for path, ab in pairs.items():
        for side in "AB":
            if side not in ab:
                raise MultiLoRAError(f"{weights}: tensor 'base_model.model.{path}.lora_{side}.weight' is missing "
                                     f"(its lora_{'B' if side == 'A' else 'A'} is there); the adapter is incomplete")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise MultiLoRAError(f"{weights}: module {path!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                                 f"inconsistent with r = {r} in {PEFT_CONFIG_NAME} (expected (r, d_in) and (d_out, r))")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise MultiLoRAError(f"{weights}: module {path!r} holds NaN or inf values; the adapter is corrupt")
        out[f"{path}.lora_A"] = a.unsqueeze(0)  # (1, r, d_in)
        out[f"{path}.lora_B"] = b.unsqueeze(0)  # (1, d_out, r)
    return out


# --------------------------------------------------------------------------- CLI helpers (wired in cli.py)

def add_import_peft_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `multilora import-peft`."""
    p.add_argument("peft_dir", help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output multilora adapter folder")
    p.add_argument("--model", default=None, help="base model to record (default: PEFT's base_model_name_or_path)")


def run_import_peft_cli(args: argparse.Namespace) -> None:
    """Run `multilora import-peft` from parsed arguments."""
    out = import_peft(args.peft_dir, args.out, base_model_name_or_path=args.model)
    print(f"wrote multilora adapter (n = 1, LoRA) to {out}; use it with multilora eval/analyze/export or load_adapter")


def add_export_serving_arguments(p: argparse.ArgumentParser) -> None:
    """The serving flags of `multilora export --format peft`."""
    p.add_argument("--pad-to", type=int, default=None, metavar="R",
                   help="pad the PEFT rank n*r to R with zeros (lossless; R >= n*r)")
    p.add_argument("--server", choices=SERVERS, default=None,
                   help="check the export against a LoRA server and pad to its next supported rank")


def run_export_peft_cli(args: argparse.Namespace) -> None:
    """Run `multilora export --format peft` (with the serving flags) and print warnings to stderr."""
    import sys

    out, found = _export_peft(args.adapter, args.out, args.model, pad_to=getattr(args, "pad_to", None),
                              server=getattr(args, "server", None), emit=False)
    for w in found:
        print(f"multilora export: warning: {args.server}: {w}", file=sys.stderr)
    rank = json.loads((Path(out) / PEFT_CONFIG_NAME).read_text(encoding="utf-8"))["r"]
    print(f"wrote PEFT LoRA adapter (rank {rank}) to {out} (load it with peft.PeftModel.from_pretrained)")
