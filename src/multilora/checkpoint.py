"""Adapter folders: `adapter.safetensors` (adapter tensors only) + `adapter_config.json`.

    adapter.safetensors   keys `<module path>.lora_A` (n, r, d_in), `.lora_B` (n, d_out, r),
                          `.lora_s` (n, d_out) or (n,) -- exactly the layer's parameters
    adapter_config.json   format version, method, n, r, alpha, dropout, init, scale, targets,
                          the resolved module paths, the base model's identity, sizes and
                          quantization (base_model.quantization: null, or quant.QuantConfig's keys), and
                          the sha256 of the tensor file (so a half-written or edited folder is caught)

Both files are written atomically, and the pair is replaced as one: the new tensors go to
`.adapter.safetensors.next`, then the config that vouches for them (its sha256) replaces the old
config (the commit point), then `.next` is renamed over adapter.safetensors. A reader that finds
the config's checksum on `.next` instead (a save killed between the two renames) reads `.next`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._version import __version__
from .errors import MultiLoRAError
from .inject import (MultiLoRAConfig, adapter_parameters, inject, linear_layers, refuse_if_injected,
                     unmerged_adapter_modules)
from .interop import PEFT_WEIGHTS_NAME, refuse_pickled_peft
from .io import WriteError, atomic_path, fsync_dir, read_json_object, write_error, write_json_atomic
from .layers import in_out_features, parameter_shapes
from .quant import INSTALL_HINT, QuantConfig, bitsandbytes_available, quantization_of

FORMAT = "multilora-adapter"
FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
PENDING_NAME = ".adapter.safetensors.next"  # new tensors whose config may already be committed


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
        "quantization": quantization_of(model).record(),  # None, or how the base was quantized (QLoRA)
    }


def _base_record(meta: dict[str, Any]) -> dict[str, Any]:
    """adapter_config.json's base_model mapping ({} if absent or malformed)."""
    return meta["base_model"] if isinstance(meta.get("base_model"), dict) else {}


def _trained_quantization(meta: dict[str, Any], folder: str | os.PathLike) -> QuantConfig:
    """The quantization adapter_config.json records for the base (None or absent: not quantized)."""
    return QuantConfig.from_record(_base_record(meta).get("quantization"), str(Path(folder) / CONFIG_NAME))


def recorded_quantization(meta: dict[str, Any], folder: str | os.PathLike) -> QuantConfig:
    """The quantization of the base an adapter was trained on (adapter_config.json), checked to be loadable here.

    Adapters saved before it was recorded, and PEFT adapters, read as unquantized.
    """
    where = Path(folder) / CONFIG_NAME
    quant = _trained_quantization(meta, folder)
    if quant.quantized and not bitsandbytes_available():
        raise MultiLoRAError(f"the adapter {folder} was trained on a {quant.quantization} quantized base "
                             f"(base_model.quantization in {where}), which needs the package bitsandbytes: "
                             f"{INSTALL_HINT}")
    return quant


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
    weights, pending = out / WEIGHTS_NAME, out / PENDING_NAME
    _finish_interrupted_save(out)
    try:
        with atomic_path(pending) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    except WriteError as e:  # name the file the user knows
        raise write_error(weights, e.__cause__ or e) from e
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
        "weights_sha256": sha256_file(pending),
        **(extra or {}),
    }
    write_json_atomic(out / CONFIG_NAME, meta)  # the commit point: from here on the new adapter is the one
    os.replace(pending, weights)
    fsync_dir(out)
    return out


def _finish_interrupted_save(folder: Path) -> None:
    """Rename `.next` into place if a killed save had already committed its config (else `.next` is stale)."""
    pending = folder / PENDING_NAME
    if not pending.is_file():
        return
    try:
        committed = read_json_object(folder / CONFIG_NAME).get("weights_sha256")
    except MultiLoRAError:
        committed = None
    weights = folder / WEIGHTS_NAME
    if committed is not None and committed == sha256_file(pending) and \
            (not weights.is_file() or committed != sha256_file(weights)):
        os.replace(pending, weights)
        fsync_dir(folder)
    else:
        pending.unlink(missing_ok=True)


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate an adapter folder: (config dict, tensors), or a MultiLoRAError naming the problem."""
    d = Path(adapter_dir)
    cfg_path, weights = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir():
        raise MultiLoRAError(f"adapter folder {d} does not exist")
    if not weights.is_file() and (d / PENDING_NAME).is_file():
        weights = d / PENDING_NAME  # a first save killed between its last two renames
    if not weights.is_file():
        refuse_pickled_peft(d)  # a pickled PEFT adapter: say why it is never opened and how to convert it
        if (d / PEFT_WEIGHTS_NAME).is_file():
            raise MultiLoRAError(f"{d} is a PEFT adapter folder ({PEFT_WEIGHTS_NAME}), not a multilora adapter "
                                 f"({WEIGHTS_NAME}): convert it with `multilora import-peft {d} --out OUT`")
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
    if meta.get("weights_sha256") != sha256_file(weights) and (d / PENDING_NAME).is_file() \
            and meta.get("weights_sha256") == sha256_file(d / PENDING_NAME):
        weights = d / PENDING_NAME  # a save killed after its config was written: its tensors are complete here
    if meta.get("weights_sha256") != sha256_file(weights):
        raise MultiLoRAError(
            f"{weights} does not match the checksum in {CONFIG_NAME}: the file is truncated, corrupt, or was "
            "replaced after saving; re-save the adapter or restore it from a good copy"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise MultiLoRAError(f"{weights} is not a readable safetensors file ({e})") from None
    _check_tensors(meta, tensors, weights)
    return meta, tensors


def _check_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor], weights: Path) -> None:
    """The tensors must be exactly those the config describes (keys, n, r, scale), floating point and finite."""
    config = config_from_meta(meta, weights.parent / CONFIG_NAME)
    expected = {f"{m}.{p}" for m in meta["modules"] for p in ("lora_A", "lora_B")}
    expected |= {f"{m}.lora_s" for m in meta["modules"]} if config.scale != "none" else set()
    missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or extra:
        raise MultiLoRAError(
            f"{weights} does not match its config: "
            + (f"missing tensor {missing[0]!r} ({len(missing)} missing) " if missing else "")
            + (f"unexpected tensor {extra[0]!r} ({len(extra)} unexpected)" if extra else "")
            + f"; {CONFIG_NAME} (modules, scale) and the tensor file disagree: re-save the adapter"
        )
    for path in meta["modules"]:
        a, b = tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"]
        d_in = a.shape[-1] if a.dim() else 0
        d_out = b.shape[1] if b.dim() > 1 else 0
        shapes = parameter_shapes(config.n, config.r, d_in, d_out, config.scale)
        for name, shape in shapes.items():
            key = f"{path}.{name}"
            t = tensors[key]
            if tuple(t.shape) != shape:
                raise MultiLoRAError(
                    f"{weights}: tensor '{key}' has shape {tuple(t.shape)} but {CONFIG_NAME} (n={config.n}, "
                    f"r={config.r}, scale={config.scale}) needs {shape}: the config and the tensors disagree; "
                    "re-save the adapter"
                )
            if not t.is_floating_point():
                raise MultiLoRAError(f"{weights}: tensor '{key}' has dtype {t.dtype}; adapter tensors are floating "
                                     "point: re-save the adapter")
            if not torch.isfinite(t).all():
                raise MultiLoRAError(f"adapter tensor '{key}' in {weights} holds NaN or inf values: the adapter is "
                                     "corrupt or its run diverged; re-save it or use an earlier checkpoint")


def _check_config_types(meta: dict[str, Any], path: Path) -> None:
    expected = {"n": int, "r": int, "alpha": (int, float), "dropout": (int, float), "init": str,
                "scale": str, "modules": list, "weights_sha256": str, "fan_in_fan_out": bool}
    for key, typ in expected.items():
        if key not in meta:
            raise MultiLoRAError(f"{path} lacks the key {key!r}; re-save the adapter")
        if not isinstance(meta[key], typ) or (typ is int and isinstance(meta[key], bool)):
            raise MultiLoRAError(f"{path}: {key!r} has the wrong type ({meta[key]!r}); re-save the adapter")
    if not meta["modules"] or not all(isinstance(m, str) and m for m in meta["modules"]):
        raise MultiLoRAError(f"{path}: 'modules' must be a non-empty list of module paths")
    if len(set(meta["modules"])) != len(meta["modules"]):
        dup = next(m for m in meta["modules"] if meta["modules"].count(m) > 1)
        raise MultiLoRAError(f"{path}: 'modules' lists {dup!r} twice; re-save the adapter")
    if not isinstance(meta.get("method", "multilora"), str):
        raise MultiLoRAError(f"{path}: 'method' has the wrong type ({meta['method']!r}); re-save the adapter")
    if "base_model" in meta and not isinstance(meta["base_model"], dict):
        raise MultiLoRAError(f"{path}: 'base_model' has the wrong type ({meta['base_model']!r}); it must be an "
                             "object (name_or_path, model_type, ...): re-save the adapter")


def config_from_meta(meta: dict[str, Any], path: str | os.PathLike = CONFIG_NAME) -> MultiLoRAConfig:
    """Rebuild the MultiLoRAConfig recorded in an adapter_config.json dict (`path` names it in errors)."""
    try:
        return MultiLoRAConfig(n=meta["n"], r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"],
                               init=meta["init"], scale=meta["scale"], scale_init=meta.get("scale_init"),
                               targets=meta.get("targets") or meta["modules"])
    except MultiLoRAError as e:
        raise MultiLoRAError(f"{path}: {e}") from None


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Inject the adapter saved in `adapter_dir` into `model` and load its weights; returns the model.

    Refuses, naming the module and shapes, an adapter made for another base model, a missing or
    extra tensor, a truncated or corrupt file, or an unknown format version. Warns when `model` is
    quantized differently from the base the adapter was trained on (an nf4-trained adapter on a float
    base is allowed, but its outputs differ slightly from training's).
    """
    refuse_if_injected(model)
    meta, tensors = read_adapter(adapter_dir)
    config = config_from_meta(meta, Path(adapter_dir) / CONFIG_NAME)  # read_adapter checked keys and finiteness
    _warn_if_quantized_differently(meta, adapter_dir, model)
    layers = linear_layers(model)
    for path in meta["modules"]:  # check everything before the model is touched
        if path not in layers:
            raise MultiLoRAError(
                f"adapter {adapter_dir}: module {path!r} is not a linear layer of this {type(model).__name__}: "
                f"the adapter was made for another base model ({_made_for(meta)})"
            )
        if isinstance(layers[path], Conv1D) != meta["fan_in_fan_out"]:
            raise MultiLoRAError(
                f"{Path(adapter_dir) / CONFIG_NAME}: fan_in_fan_out is {meta['fan_in_fan_out']} but module {path!r} "
                f"of this {type(model).__name__} is a {type(layers[path]).__name__}: the config does not fit this "
                f"model ({_made_for(meta)}); re-save the adapter"
            )
        shapes = parameter_shapes(config.n, config.r, *in_out_features(layers[path]), config.scale)
        for name, shape in shapes.items():
            t = tensors[f"{path}.{name}"]
            if tuple(t.shape) != shape:
                raise MultiLoRAError(
                    f"adapter {adapter_dir}: tensor '{path}.{name}' has shape {tuple(t.shape)} but module {path!r} "
                    f"of this model needs {shape}: the adapter was made for another base model ({_made_for(meta)})"
                )
    inject(model, config, modules=meta["modules"])
    params = adapter_parameters(model)
    with torch.no_grad():
        for key, t in tensors.items():
            params[key].copy_(t)
    return model


def _warn_if_quantized_differently(meta: dict[str, Any], adapter_dir: str | os.PathLike, model: nn.Module) -> None:
    """A warning naming both quantizations when `model`'s base differs from the one the adapter recorded."""
    trained = _trained_quantization(meta, adapter_dir).quantization
    here = quantization_of(model).quantization
    if trained != here:
        fix = (f"load the base with multilora.models.load_model(..., quantization={trained!r}) to reproduce them"
               if trained != "none" else "load the base without quantization to reproduce them")
        warnings.warn(f"adapter {adapter_dir} was trained on a base quantized as {trained!r}, but this model's is "
                      f"{here!r}: its outputs will differ somewhat from training's; {fix}", stacklevel=3)


def _made_for(meta: dict[str, Any]) -> str:
    base = _base_record(meta)
    return f"made for {base.get('name_or_path') or base.get('model_type') or 'an unknown model'}"
