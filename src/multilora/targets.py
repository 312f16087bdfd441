"""What `multilora eval` evaluates: a run/adapter/PEFT/model folder or the embedded model, loaded, with its identity.

    model, tokenizer, identity = resolve_target("runs/demo")        # a run or adapter folder
    model, tokenizer, identity = resolve_target("peft/", model="smollm2-135m")
    identity = model_identity(model)                                 # from the model alone

The identity (kind, base model, adapter options and checksum) is recorded in eval.json, so a
result says what produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import load_adapter, read_adapter, recorded_quantization
from .errors import MultiLoRAError
from .interop import check_peft_for_model, refuse_pickled_peft
from .inject import adapter_modules
from .io import read_json_object
from .models import DEFAULT_MODEL, SOURCE_FILE, embedded_model_path, load_model
from .run import CHECKPOINTS, CONFIG_FILE, FULL_INFO, Run


def resolve_target(target: str, model: str | None = None) -> tuple[nn.Module, Any, dict]:
    """(model, tokenizer, identity) for a run/adapter folder, PEFT folder, model folder or 'smollm2-135m'.

    `model` overrides the base model an adapter records.
    """
    if str(target) == DEFAULT_MODEL:
        m, tok = load_model(DEFAULT_MODEL)
        source = embedded_model_path() / SOURCE_FILE
        return m, tok, {"target": DEFAULT_MODEL, "kind": "model", "base_model": DEFAULT_MODEL,
                        "source": read_json_object(source) if source.is_file() else None}
    folder = Path(target).expanduser()
    what = ("pass a run or adapter folder (adapter_config.json), a PEFT adapter folder, a model folder "
            f"(config.json) or '{DEFAULT_MODEL}'")
    if not folder.is_dir():
        raise MultiLoRAError(f"eval target '{target}' is {'a file' if folder.exists() else 'not a folder'}; {what}")
    ident: dict[str, Any] = {"target": str(target), "path": str(folder.resolve())}
    if (folder / "adapter_config.json").is_file():
        meta = read_json_object(folder / "adapter_config.json")
        if meta.get("format") == "multilora-adapter":
            m, tok, loaded = _load_adapter(folder, meta, model)
        elif "peft_type" in meta:
            m, tok, loaded = _load_peft(folder, meta, model)
        else:
            raise MultiLoRAError(f"{folder}/adapter_config.json is neither a multilora adapter (format "
                                 f"'multilora-adapter') nor a PEFT adapter (peft_type); {what}")
        return m, tok, {**ident, **loaded}
    if (folder / "config.json").is_file():
        m, tok = load_model(folder)
        ident.update(kind="model", base_model=str(folder))
        if (folder / FULL_INFO).is_file():  # a full fine-tuning run folder
            full = read_json_object(folder / FULL_INFO)
            ident.update(kind="full", base_model=str((full.get("base_model") or {}).get("name_or_path") or folder),
                         weights_sha256=full.get("weights_sha256"))
        return m, tok, ident
    if (folder / CHECKPOINTS).is_dir() and (folder / CONFIG_FILE).is_file():
        raise MultiLoRAError(f"run folder {folder} has checkpoints but no final adapter or model yet; let the "
                             "run finish (or continue it with `multilora train --resume RUN`) before evaluating it")
    if any(folder.glob("model*.safetensors")):
        raise MultiLoRAError(f"{folder} holds model weights but no config.json; save the model with "
                             "save_pretrained (config.json, *.safetensors, tokenizer files)")
    raise MultiLoRAError(f"eval target '{target}' holds neither adapter_config.json nor config.json; {what}")


def _load_adapter(folder: Path, meta: dict, model: str | None) -> tuple[nn.Module, Any, dict]:
    """A multilora adapter folder on its base model (`model`, else the run's config.yaml, else the adapter's record)."""
    read_adapter(folder)  # validate (checksum, keys) before loading a base model
    quant = recorded_quantization(meta, folder)  # the base is rebuilt as it was trained: nf4 / int8 / none
    # the run's config names the model as the user gave it ('smollm2-135m'), the adapter its resolved path
    base = model or Run(folder).base_model()
    if not base:
        raise MultiLoRAError(f"{folder}/adapter_config.json does not record its base model; pass --model BASE")
    m, tok = load_model(base, quantization=quant.quantization, compute_dtype=quant.compute_dtype,
                        double_quant=quant.double_quant)
    load_adapter(m, folder)
    return m.eval(), tok, {
        "kind": "adapter", "base_model": str(base), "adapter_sha256": meta.get("weights_sha256"),
        **({"quantization": quant.record()} if quant.quantized else {}),
        "adapter": {k: meta.get(k) for k in ("method", "n", "r", "alpha", "scale", "init", "targets")}}


def _load_peft(folder: Path, meta: dict, model: str | None) -> tuple[nn.Module, Any, dict]:
    """A PEFT LoRA adapter folder on its base model, every tensor checked to be loaded and every target filled."""
    refuse_pickled_peft(folder)  # adapter_model.bin is a pickle: never opened
    try:  # peft is optional (evaluating a PEFT adapter only): imported when needed
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict
    except ImportError:
        raise MultiLoRAError(f"{folder} is a PEFT adapter and evaluating it needs the package peft: "
                             "pip install peft") from None
    base = model or meta.get("base_model_name_or_path")
    if not base:
        raise MultiLoRAError(f"{folder}/adapter_config.json does not name its base model; pass --model BASE")
    m, tok = load_model(base)
    tensors = check_peft_for_model(folder, meta, m)
    try:
        m = PeftModel.from_pretrained(m, str(folder)).eval()
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as e:
        detail = " ".join(str(e).split())[:300]
        raise MultiLoRAError(f"{folder}: peft cannot load this adapter into {base} "
                             f"({type(e).__name__}: {detail})") from None
    loaded = set(get_peft_model_state_dict(m))
    unused = sorted(k for k in tensors if k not in loaded)
    if unused:
        raise MultiLoRAError(f"{folder}/adapter_model.safetensors: tensor {unused[0]!r} ({len(unused)} in all) "
                             "was not loaded: target_modules in adapter_config.json does not select its "
                             "module; fix target_modules or re-save the adapter")
    absent = sorted(k for k in loaded if ".lora_" in k and k not in tensors)
    if absent:
        raise MultiLoRAError(f"{folder}/adapter_model.safetensors lacks tensor {absent[0]!r} ({len(absent)} "
                             "in all) that target_modules in adapter_config.json selects; the adapter is "
                             "incomplete: re-save it")
    keys = ("peft_type", "r", "lora_alpha", "target_modules")
    return m, tok, {"kind": "peft", "base_model": str(base), "adapter": {k: meta.get(k) for k in keys}}


def model_identity(model: nn.Module) -> dict:
    """What is being evaluated, from the model alone: class, name/path, adapter options if injected."""
    cfg = getattr(model, "config", None)
    ident = {"model_class": type(model).__name__, "base_model": getattr(cfg, "_name_or_path", "") or "",
             "parameters": sum(p.numel() for p in model.parameters())}
    config = getattr(model, "multilora_config", None)
    if config is not None and adapter_modules(model):
        ident["adapter"] = {"method": config.method, **config.layer_options(),
                            "modules": len(adapter_modules(model))}
    return ident
