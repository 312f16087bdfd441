"""Quantized base models (QLoRA): 4-bit NF4/FP4 or 8-bit weights from bitsandbytes, adapters in float.

    model, tok = load_model("models/llama-2-7b", quantization="nf4")   # models.load_model
    prepare_kbit_training(model)                                       # norms / head in float32, base frozen
    inject(model, MultiLoRAConfig(...))                                # adapters in float32 over the 4-bit base

`QuantConfig` is the one description of a quantized base: the `model.quantization`,
`model.compute_dtype` and `model.double_quant` keys of a training config, the arguments of
`load_model`, and the `base_model.quantization` record of adapter_config.json (so eval, export
and load_adapter rebuild the same base). bitsandbytes is optional (`pip install 'multilora[qlora]'`):
it is imported only when a quantized model is loaded or one of its layers is handled.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from .errors import MultiLoRAError

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
INSTALL_HINT = "pip install 'multilora[qlora]' (or pip install bitsandbytes)"
MERGED_EXPORT = "multilora export ADAPTER --format merged --out OUT"


@dataclass
class QuantConfig:
    """How the base model's linear weights are stored: none, nf4 / fp4 (4-bit) or int8 (LLM.int8()).

    In a training config these are the keys of the `model:` mapping besides its name
    (`model: {name: PATH, quantization: nf4}`, `--model.quantization nf4`).

    compute_dtype: the dtype 4-bit layers dequantize to for their matmul (bfloat16 as in QLoRA;
    float32 for exact tests). double_quant: also quantize the 4-bit block scales (QLoRA's
    "double quantization", about 0.4 bit per weight saved); 4-bit only.
    """

    quantization: str = "none"
    compute_dtype: str = "bfloat16"
    double_quant: bool = True

    @property
    def quantized(self) -> bool:
        """Whether the base is loaded quantized."""
        return self.quantization != "none"

    def problems(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """Every invalid option as (key, requirement, choices); empty when valid."""
        p = []
        if self.quantization not in QUANTIZATIONS:
            p.append(("quantization", f"must be one of {', '.join(QUANTIZATIONS)}", QUANTIZATIONS))
        if self.compute_dtype not in COMPUTE_DTYPES:
            p.append(("compute_dtype", f"must be one of {', '.join(COMPUTE_DTYPES)}", COMPUTE_DTYPES))
        if not isinstance(self.double_quant, bool):
            p.append(("double_quant", "must be true or false", ()))
        return p

    def check(self) -> None:
        """Raise MultiLoRAError naming every invalid option, or a missing bitsandbytes."""
        problems = self.problems()
        if problems:
            values = asdict(self)
            raise MultiLoRAError("invalid quantization options: " + "; ".join(
                f"{key} = {values[key]!r} {requirement}" for key, requirement, _ in problems))
        if self.quantized:
            require_bitsandbytes(self.quantization)

    def record(self) -> dict[str, Any] | None:
        """What adapter_config.json stores under base_model.quantization (None: not quantized)."""
        return asdict(self) if self.quantized else None

    @classmethod
    def from_record(cls, record: Any, where: str) -> "QuantConfig":
        """The QuantConfig an adapter_config.json recorded (None or absent: not quantized); `where` names the file."""
        if record is None:
            return cls()
        if not isinstance(record, dict) or not isinstance(record.get("quantization"), str):
            raise MultiLoRAError(f"{where}: base_model.quantization must be null or an object with 'quantization' "
                                 f"(one of {', '.join(QUANTIZATIONS)}), got {record!r}; re-save the adapter")
        known = {k: record[k] for k in ("quantization", "compute_dtype", "double_quant") if k in record}
        config = cls(**known)
        if config.problems():
            key, requirement, _ = config.problems()[0]
            raise MultiLoRAError(f"{where}: base_model.quantization.{key} = {record.get(key)!r} {requirement}; "
                                 "re-save the adapter")
        return config


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):
        return False


def require_bitsandbytes(quantization: str = "a quantized base") -> Any:
    """Import and return bitsandbytes, or raise one line naming the install command."""
    if not bitsandbytes_available():
        raise MultiLoRAError(f"model.quantization = {quantization!r} needs the package bitsandbytes, which is not "
                             f"installed: {INSTALL_HINT}; or use model.quantization none")
    import bitsandbytes  # deferred: optional and slow to import

    return bitsandbytes


def bnb_config(q: QuantConfig) -> BitsAndBytesConfig:
    """transformers' BitsAndBytesConfig for `q` (which must be quantized)."""
    require_bitsandbytes(q.quantization)
    if q.quantization == "int8":
        _say_once("bitsandbytes.autograd._functions")  # the compute dtype only rides along (recorded; dtype of a merged export)
        return BitsAndBytesConfig(load_in_8bit=True, bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quantization,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
                              bnb_4bit_use_double_quant=q.double_quant)


class _Once(logging.Filter):
    """Let each distinct log message through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        new = record.msg not in self.seen
        self.seen.add(record.msg)
        return new


def _say_once(logger: str) -> None:
    """LLM.int8() logs "inputs will be cast ... to float16" on every matmul of a float32 model: once is enough."""
    log = logging.getLogger(logger)
    if not any(isinstance(f, _Once) for f in log.filters):
        log.addFilter(_Once())


def quantization_of(model: nn.Module) -> QuantConfig:
    """The QuantConfig a loaded model (or its config) was quantized with (bitsandbytes 4/8-bit), else none."""
    cfg = model if not isinstance(model, nn.Module) else getattr(model, "config", None)
    qc = getattr(cfg, "quantization_config", None)
    if qc is None:
        return QuantConfig()
    d = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc) if isinstance(qc, dict) else {}
    if d.get("quant_method", "bitsandbytes") != "bitsandbytes":
        return QuantConfig()
    dtype = str(d.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch.")
    if d.get("load_in_8bit"):
        return QuantConfig("int8", dtype, False)
    if d.get("load_in_4bit"):
        return QuantConfig(d.get("bnb_4bit_quant_type", "fp4"), dtype, bool(d.get("bnb_4bit_use_double_quant")))
    return QuantConfig()


def quantized_kind(layer: nn.Module) -> str | None:
    """'4bit' for a bitsandbytes Linear4bit, '8bit' for a Linear8bitLt, else None."""
    bnb = sys.modules.get("bitsandbytes")  # a layer of bitsandbytes exists only once it is imported
    if bnb is None:
        return None
    if isinstance(layer, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def is_quantized_model(model: nn.Module) -> bool:
    """Whether any linear layer of `model` is a bitsandbytes 4-bit or 8-bit layer."""
    return any(quantized_kind(m) for m in model.modules())


@torch.no_grad()
def dequantize(layer: nn.Module) -> torch.Tensor:
    """The float32 weight (d_out, d_in) a bitsandbytes Linear4bit / Linear8bitLt computes with."""
    bnb = require_bitsandbytes()
    kind = quantized_kind(layer)
    if kind == "4bit":
        w = layer.weight
        if getattr(w.quant_state, "packing_format_for_cpu", False):  # repacked before keep_4bit_layout ran
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # deferred: optional package

            w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if kind == "8bit":
        w, state = layer.weight, layer.state
        scb = state.SCB if state.SCB is not None else w.SCB
        cb = state.CB if state.CB is not None else w.data
        return bnb.functional.int8_vectorwise_dequant(cb, scb.to(cb.device)).float()
    raise MultiLoRAError(f"{type(layer).__name__} is not a bitsandbytes quantized layer")


def keep_4bit_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place the first time it
    runs in eval mode without gradients, rounding its block scales to bfloat16: the frozen base tensor
    changes in memory and evaluation computes with other weights than training did (logits off by
    ~4e-3 on the tiny test model). Turning that fast path off keeps one layout; GPUs never take it.
    """
    for m in model.modules():
        if quantized_kind(m) == "4bit":
            m.support_avx512bf16_for_cpu = False


def prepare_kbit_training(model: nn.Module) -> nn.Module:
    """Ready a quantized model for adapter training, once (what peft.prepare_model_for_kbit_training does).

    Freezes every parameter and casts the float16/bfloat16 ones that are not quantized (norms, embeddings,
    the output head) to float32, so that they are computed in full precision; the gradient-checkpointing
    part of PEFT's preparation (input gradients) is `models.enable_gradient_checkpointing`. Returns the model.
    """
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
            p.data = p.data.float()
    keep_4bit_layout(model)
    return model


def refuse_quantized_merge(layer: nn.Module, path: str = "") -> None:
    """Raise if `layer` is quantized: dW cannot be added to 4-bit/8-bit weights without re-quantizing them."""
    kind = quantized_kind(layer)
    if kind:
        where = f" of {path!r}" if path else ""
        raise MultiLoRAError(
            f"cannot merge the adapter into the {kind} quantized base layer{where}: adding dW to quantized weights "
            f"would re-quantize (and lose) it. Use `{MERGED_EXPORT}` (export.export_merged), which dequantizes the "
            "base, merges in float32 and writes an ordinary model folder")
