"""Adapter folders: `adapter.safetensors` (adapter tensors only) + `adapter_config.json`.

    adapter.safetensors   keys `<module path>.lora_A` (n, r, d_in), `.lora_B` (n, d_out, r),
                          `.lora_s` (n, d_out) or (n,) -- exactly the layer's parameters
    adapter_config.json   format version, method, n, r, alpha, dropout, init, scale, targets,
                          the resolved module paths, the base model's identity and sizes, and
                          the sha256 of the tensor file (so a half-written or edited folder is caught)

Both files are written atomically; tensors first, then the config that vouches for them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import MultiLoRAError
from .inject import (MultiLoRAConfig, adapter_parameters, inject, linear_layers, refuse_if_injected,
                     unmerged_adapter_modules)
from .layers import in_out_features, parameter_shapes
from .io import atomic_path, read_json_object, write_json_atomic

FORMAT = "multilora-adapter"
FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_model_info(model: nn.Module) -> dict[str, Any]:
    """The identity and sizes of the base model, recorded so a mismatched load is caught early."""
    cfg = getattr(model, "config", None)
    get = lambda *names: next((getattr(cfg, k) for k in names if getattr(cfg, k, None) is not None), None)  # noqa: E731
    return {
        "name_or_path": get("_name_or_path", "name_or_path") or "",
        "model_type": get("model_type"),
        "hidden_size": get("hidden_size", "n_embd"),
        "num_hidden_layers": get("num_hidden_layers", "n_layer"),
        "vocab_size": get("vocab_size"),
    }


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write the model's adapter to `out_dir` (adapter.safetensors + adapter_config.json)."""
    modules = unmerged_adapter_modules(model, "save")
    first = next(iter(modules.values()))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_parameters(model).items()}
    return write_adapter_folder(out_dir, model.multilora_config, tensors, list(modules), first.is_conv1d,
                                base_model_info(model))


def write_adapter_folder(
    out_dir: str | os.PathLike,
    config: MultiLoRAConfig,
    tensors: dict[str, torch.Tensor],
    modules: list[str],
    fan_in_fan_out: bool,
    base_model: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write adapter.safetensors + adapter_config.json exactly as `save_adapter` does (same keys, sha256)."""
    out = Path(out_dir)
    weights = out / WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    first = next(iter(tensors.values()))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "multilora_version": __version__,
        "method": config.method,
        **config.layer_options(),
        "targets": config.targets,
        "modules": list(modules),
        "fan_in_fan_out": fan_in_fan_out,
        "dtype": str(first.dtype).removeprefix("torch."),
        "base_model": base_model,
        "weights_sha256": sha256_file(weights),
        **(extra or {}),
    }
    write_json_atomic(out / CONFIG_NAME, meta)
    return out


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate an adapter folder: (config dict, tensors), or a MultiLoRAError naming the problem."""
    d = Path(adapter_dir)
    cfg_path, weights = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir():
        raise MultiLoRAError(f"adapter folder {d} does not exist")
    for p in (cfg_path, weights):
        if not p.is_file():
            raise MultiLoRAError(f"{p} is missing: an adapter folder holds {WEIGHTS_NAME} and {CONFIG_NAME}")
    meta = read_json_object(cfg_path, fix="re-save the adapter")
    if meta.get("format") != FORMAT:
        hint = " (it looks like a PEFT adapter; use it with peft, or import it)" if "peft_type" in meta else ""
        raise MultiLoRAError(f"{cfg_path} is not a multilora adapter config (format={meta.get('format')!r}){hint}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MultiLoRAError(
            f"{cfg_path} has format_version {meta.get('format_version')!r}; this multilora {__version__} "
            f"reads version {FORMAT_VERSION}: upgrade multilora or re-save the adapter"
        )
    _check_config_types(meta, cfg_path)
    if meta.get("weights_sha256") != sha256_file(weights):
        raise MultiLoRAError(
            f"{weights} does not match the checksum in {CONFIG_NAME}: the file is truncated, corrupt, or was "
            "replaced after saving; re-save the adapter or restore it from a good copy"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise MultiLoRAError(f"{weights} is not a readable safetensors file ({e})") from None
    return meta, tensors


def _check_config_types(meta: dict[str, Any], path: Path) -> None:
    expected = {"n": int, "r": int, "alpha": (int, float), "dropout": (int, float), "init": str,
                "scale": str, "modules": list, "weights_sha256": str, "fan_in_fan_out": bool}
    for key, typ in expected.items():
        if key not in meta:
            raise MultiLoRAError(f"{path} lacks the key {key!r}; re-save the adapter")
        if not isinstance(meta[key], typ) or (typ is int and isinstance(meta[key], bool)):
            raise MultiLoRAError(f"{path}: {key!r} has the wrong type ({meta[key]!r}); re-save the adapter")
    if not meta["modules"] or not all(isinstance(m, str) for m in meta["modules"]):
        raise MultiLoRAError(f"{path}: 'modules' must be a non-empty list of module paths")


def config_from_meta(meta: dict[str, Any]) -> MultiLoRAConfig:
    """Rebuild the MultiLoRAConfig recorded in an adapter_config.json dict."""
    try:
        return MultiLoRAConfig(n=meta["n"], r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"],
                               init=meta["init"], scale=meta["scale"], targets=meta.get("targets") or meta["modules"])
    except MultiLoRAError as e:
        raise MultiLoRAError(f"{CONFIG_NAME}: {e}") from None


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Inject the adapter saved in `adapter_dir` into `model` and load its weights; returns the model.

    Refuses, naming the module and shapes, an adapter made for another base model, a missing or
    extra tensor, a truncated or corrupt file, or an unknown format version.
    """
    refuse_if_injected(model)
    meta, tensors = read_adapter(adapter_dir)
    config = config_from_meta(meta)
    expected = {f"{m}.{p}" for m in meta["modules"] for p in ("lora_A", "lora_B")}
    expected |= {f"{m}.lora_s" for m in meta["modules"]} if config.scale != "none" else set()
    missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or extra:
        raise MultiLoRAError(
            f"{Path(adapter_dir) / WEIGHTS_NAME} does not match its config: "
            + (f"missing tensor {missing[0]!r} ({len(missing)} missing) " if missing else "")
            + (f"unexpected tensor {extra[0]!r} ({len(extra)} unexpected)" if extra else "")
        )
    layers = linear_layers(model)
    for path in meta["modules"]:  # check everything before the model is touched
        if path not in layers:
            raise MultiLoRAError(
                f"module {path!r} is not a linear layer of this {type(model).__name__}: the adapter was made "
                f"for another base model ({_made_for(meta)})"
            )
        shapes = parameter_shapes(config.n, config.r, *in_out_features(layers[path]), config.scale)
        for name, shape in shapes.items():
            t = tensors[f"{path}.{name}"]
            if tuple(t.shape) != shape:
                raise MultiLoRAError(
                    f"adapter tensor '{path}.{name}' has shape {tuple(t.shape)} but module {path!r} of this model "
                    f"needs {shape}: the adapter was made for another base model ({_made_for(meta)})"
                )
            if not torch.isfinite(t).all():
                raise MultiLoRAError(f"adapter tensor '{path}.{name}' holds NaN or inf values; the adapter is corrupt")
    inject(model, config, modules=meta["modules"])
    params = adapter_parameters(model)
    with torch.no_grad():
        for key, t in tensors.items():
            params[key].copy_(t)
    return model


def _made_for(meta: dict[str, Any]) -> str:
    base = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
    return f"made for {base.get('name_or_path') or base.get('model_type') or 'an unknown model'}"
