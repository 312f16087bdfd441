"""Export a MultiLoRA adapter as a standard PEFT LoRA adapter (docs/method.md §4) or as a merged model.

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

The PEFT folder format itself (file names, tensor keys, reading and validating) is defined once, in
`interop`; the reverse direction, a PEFT adapter imported as a multilora one, is `peft_import`.

Merged (`export_merged`): the base model with the adapter's update merged into its weights, as a
save_pretrained folder (weights + tokenizer). An adapter trained on a quantized base (QLoRA) is
merged into that base dequantized: W0 = dequantize(W_q), W = W0 + dW in float32, saved as an
ordinary (unquantized) model in the recorded compute dtype.

Every writer here (and `peft_import`) follows one rule for its output folder (`check_out_dir`): an
existing non-empty folder is refused unless `overwrite`, which replaces it (never a folder that holds an input).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from . import models  # models.load_model, looked up at call time (tests stub it to catch early model loads)
from .checkpoint import load_adapter, read_adapter, recorded_quantization
from .errors import MultiLoRAError
from .inject import linear_layers, unload, unmerged_adapter_modules
from .interop import PEFT_CONFIG_NAME, PEFT_KEY, lora_config, lora_tensors, write_peft
from .io import check_writable_dir, failed_write, read_json_object
from .layers import MultiLoRALinear, fuse
from .quant import dequantize, quantized_kind
from .run import Run

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
    overwrite: bool = False,
) -> Path:
    """Write a PEFT LoRA adapter (rank n r, or `pad_to`) equivalent to the MultiLoRA adapter in `source`.

    `source` is an injected model or an adapter folder written by `save_adapter`. `server="vllm"`
    pads to the next rank vLLM accepts (unless `pad_to` is given) and `warnings.warn`s what vLLM
    would reject; use `export_serving` to get those warnings as a list. A non-empty `out_dir` is
    refused unless `overwrite`.
    """
    out, _ = _export_peft(source, out_dir, base_model_name_or_path, pad_to=pad_to, server=server,
                          overwrite=overwrite, emit=True)
    return out


def export_serving(
    source: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    server: str = "vllm",
    pad_to: int | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, list[str]]:
    """Export for a LoRA server: (output folder, warnings about what the server would reject)."""
    return _export_peft(source, out_dir, base_model_name_or_path, pad_to=pad_to, server=server,
                        overwrite=overwrite, emit=True)


def export_merged(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the base model with the adapter in `adapter_dir` merged into its weights (a save_pretrained
    folder: weights + tokenizer) to `out_dir`; returns it.

    The base model is `model`, else the one the adapter's run records (`Run.base_model`: config.yaml's
    `model` as the user named it, else adapter_config.json). A non-empty `out_dir` is refused unless
    `overwrite`.
    """
    adapter = Path(adapter_dir)
    base = model or Run(adapter).base_model()
    reads = [adapter, models.cache_dir()] + ([Path(base).expanduser()] if base else [])
    check_out_dir(out_dir, overwrite, reads)  # before the model is loaded
    meta, _ = read_adapter(adapter)  # a damaged adapter is refused before the base model is loaded
    quant = recorded_quantization(meta, adapter)
    if not base:
        raise MultiLoRAError(f"the adapter {adapter} does not record its base model; pass --model PATH")
    net, tokenizer = models.load_model(base, quantization=quant.quantization, compute_dtype=quant.compute_dtype,
                                       double_quant=quant.double_quant)
    load_adapter(net, adapter)
    if quant.quantized:  # dequantize, merge in float32, save in the compute dtype
        net = merge_dequantized(net, getattr(torch, quant.compute_dtype))
    else:
        unload(net)  # merge into the base weights, drop the adapter layers
    out = Path(out_dir)
    clear_out_dir(out, overwrite)
    try:
        net.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except Exception as e:  # a full disk: one line, not a traceback
        error = failed_write(e, f"saving the merged model to {out}", out if out.is_dir() else out.parent,
                             kept="the merged model there is incomplete",
                             then=" (or choose another --out) and export again")
        if error is None:
            raise
        raise error from e
    return out


def merge_dequantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An ordinary model from an adapter on a quantized base: W = dequantize(W_q) + dW in float32, cast to `dtype`.

    Every bitsandbytes layer becomes an `nn.Linear` holding its dequantized float32 weight, the adapters
    are merged into those (MultiLoRALinear.merge computes in float32), and the weights move into a model
    built from the config without quantization_config, so that it saves as a plain save_pretrained folder.
    """
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            target = module.base if isinstance(module, MultiLoRALinear) else module
            if not quantized_kind(target):
                continue
            plain = nn.Linear(target.in_features, target.out_features, bias=target.bias is not None,
                              device=module_device(target), dtype=torch.float32)
            plain.weight.copy_(dequantize(target))  # (d_out, d_in)
            if target.bias is not None:
                plain.bias.copy_(target.bias.float())
            if isinstance(module, MultiLoRALinear):
                module.base, module.quantized = plain, None
            else:
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, plain)
    unload(model)  # merge dW into the float32 weights, drop the adapter layers
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    missing, unexpected = plain_model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise MultiLoRAError(f"cannot rebuild the dequantized model: missing {sorted(set(missing) - tied)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
    plain_model.config._name_or_path = model.config._name_or_path
    return plain_model.to(dtype).eval()


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter."""
    return next(module.parameters()).device


# --------------------------------------------------------------------------- output folders


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool, reads: Sequence[str | os.PathLike] = ()) -> None:
    """The rule for every folder an export or import writes: it must be writable, and an existing non-empty
    one is refused unless `overwrite` (which may not replace a folder holding one of the inputs `reads`).

    Call it before the work; `clear_out_dir` then empties the folder just before writing.
    """
    out = Path(out_dir)
    check_writable_dir(out, "--out folder")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        what = "is not empty" if out.is_dir() else "is a file"
        raise MultiLoRAError(f"{out} already exists and {what}; pass --overwrite to replace it or choose another --out")
    for src in reads:
        src = Path(src).resolve()
        if src == out.resolve() or out.resolve() in src.parents:
            raise MultiLoRAError(f"--out {out} holds the input {src}, which --overwrite would delete; choose "
                                 "another --out")


def clear_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """With `overwrite`, delete `out_dir` (a folder or a file) so the export starts from an empty folder."""
    out = Path(out_dir)
    if not overwrite or not out.exists():
        return
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    else:
        out.unlink()


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
        m = PEFT_KEY.match(key)
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


def refuse_same_folder(source: Path, out_dir: str | os.PathLike) -> None:
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
    overwrite: bool,
    emit: bool,
) -> tuple[Path, list[str]]:
    _check_server(server)
    if pad_to is not None and (not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < 1):
        raise MultiLoRAError(f"pad_to must be a positive integer rank, got {pad_to!r}")
    if isinstance(source, nn.Module):
        check_out_dir(out_dir, overwrite)
        factors, fan_in_fan_out, base_name, all_linear = _factors_from_model(source)
    else:
        refuse_same_folder(Path(source), out_dir)
        check_out_dir(out_dir, overwrite, reads=[source])
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
    padded = {}
    for path, (a_cat, b_s) in factors.items():
        a = a_cat.detach().to("cpu")  # (n r, d_in)
        b = b_s.detach().to("cpu")  # (d_out, n r)
        if target > rank:  # zero rows of A / columns of B add nothing to B A: lossless
            a = torch.cat([a, a.new_zeros(target - rank, a.shape[1])], dim=0)  # (R', d_in)
            b = torch.cat([b, b.new_zeros(b.shape[0], target - rank)], dim=1)  # (d_out, R')
        padded[path] = (a, b)
    tensors = lora_tensors(padded)
    # r = lora_alpha = R': PEFT's scaling is 1, alpha / r is already inside lora_B
    config = lora_config(target, peft_target_modules(list(factors), all_linear), fan_in_fan_out,
                         base_model_name_or_path or base_name)
    found = check_vllm(config, list(tensors)) if server == "vllm" else []
    clear_out_dir(out_dir, overwrite)
    out = write_peft(out_dir, tensors, config)
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
    return factors, meta["fan_in_fan_out"], Run(adapter_dir).base_model() or ""  # as the user named it


# --------------------------------------------------------------------------- CLI helpers (wired in cli.py)

OVERWRITE_HELP = "replace --out if it exists and is not empty (default: refuse)"


def add_export_serving_arguments(p: argparse.ArgumentParser) -> None:
    """The serving flags of `multilora export --format peft`."""
    p.add_argument("--pad-to", type=int, default=None, metavar="R",
                   help="pad the PEFT rank n*r to R with zeros (lossless; R >= n*r)")
    p.add_argument("--server", choices=SERVERS, default=None,
                   help="check the export against a LoRA server and pad to its next supported rank")


def run_export_peft_cli(args: argparse.Namespace) -> None:
    """Run `multilora export --format peft` (with the serving flags) and print warnings to stderr."""
    out, found = _export_peft(args.adapter, args.out, args.model, pad_to=getattr(args, "pad_to", None),
                              server=getattr(args, "server", None), overwrite=getattr(args, "overwrite", False),
                              emit=False)
    for w in found:
        print(f"multilora export: warning: {args.server}: {w}", file=sys.stderr)
    rank = read_json_object(Path(out) / PEFT_CONFIG_NAME)["r"]
    print(f"wrote PEFT LoRA adapter (rank {rank}) to {out} (load it with peft.PeftModel.from_pretrained)")
