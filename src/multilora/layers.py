"""The MultiLoRA linear layer: n parallel LoRA modules with learnable scales, run fused.

    y = W0 x + b + (alpha / r) * sum_i s_i * (B_i A_i dropout(x))          (docs/method.md §2)

computed as one rank-(n r) low-rank path (docs/method.md §3):

    A_cat = [A_1; ...; A_n]                              # (n r, d_in)
    B_s   = (alpha / r) [s_1 * B_1, ..., s_n * B_n]      # (d_out, n r), s_i scales rows of B_i
    y     = W0 x + b + B_s (A_cat dropout(x))

Folding the scales (and alpha / r) into B costs one weight-sized product per call instead of an
activation-sized one, and there is no Python loop over the n modules. Plain LoRA is the same
layer with n = 1, B = 0 at init and no scales (`scale="none"`).

The base may be a bitsandbytes 4-bit or 8-bit layer (QLoRA, see quant.py): W0 x then runs through the
quantized layer, the adapter's tensors are float (float32 unless `dtype` says otherwise), and merging
is refused (export.export_merged dequantizes first).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import MultiLoRAError
from .quant import quantized_kind, refuse_quantized_merge

Init = Literal["multilora", "lora"]
Scale = Literal["vector", "scalar", "none"]
INITS = ("multilora", "lora")
SCALES = ("vector", "scalar", "none")
BASE_TENSORS = ("weight", "bias")  # the tensors of an nn.Linear / Conv1D base layer


def fuse(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_s: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the fused factors (A_cat (n r, d_in), B_s (d_out, n r)) with dW = B_s @ A_cat."""
    n, r, d_in = lora_A.shape
    d_out = lora_B.shape[1]
    a_cat = lora_A.reshape(n * r, d_in)  # a view: modules are stacked along the rank axis
    if lora_s is None:  # plain LoRA
        return a_cat, lora_B.transpose(0, 1).reshape(d_out, n * r) * scaling
    s = lora_s if lora_s.dim() == 2 else lora_s[:, None].expand(n, d_out)  # (n, d_out)
    # (n, d_out, r): row o of B_i times s_i[o]; s is multiplied as a view of the parameter (not as s * scaling,
    # a new tensor autograd would have to keep), so the adapter saves no more for backward than LoRA's B does
    b = (lora_B * s[..., None]) * scaling
    return a_cat, b.transpose(0, 1).reshape(d_out, n * r)  # (d_out, n r)


class MultiLoRALinear(nn.Module):
    """A frozen `nn.Linear`, transformers `Conv1D` or bitsandbytes 4/8-bit linear plus n fused LoRA modules of rank r.

    Parameters (also the on-disk names): `lora_A` (n, r, d_in), `lora_B` (n, d_out, r),
    `lora_s` (n, d_out) for `scale="vector"`, (n,) for `scale="scalar"`, absent for "none".
    Their dtype is `dtype`, else the base weight's (float32 over a quantized base).
    """

    def __init__(
        self,
        base: nn.Module,
        n: int = 3,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        init: Init = "multilora",
        scale: Scale = "vector",
        scale_init: float | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d_in, d_out = in_out_features(base)
        check_options(n=n, r=r, alpha=alpha, dropout=dropout, init=init, scale=scale, scale_init=scale_init)
        self.base = base
        self.n, self.r, self.alpha, self.init, self.scale = n, r, float(alpha), init, scale
        self.scale_init = default_scale_init(init) if scale_init is None else float(scale_init)
        self.d_in, self.d_out = d_in, d_out
        self.scaling = self.alpha / r
        self.is_conv1d = isinstance(base, Conv1D)
        self.quantized = quantized_kind(base)  # "4bit" | "8bit" | None
        self.merged = False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        shapes = parameter_shapes(n, r, d_in, d_out, scale)
        if dtype is None:
            dtype = torch.float32 if self.quantized else base.weight.dtype
        if not dtype.is_floating_point:
            raise MultiLoRAError(f"adapter dtype must be a floating-point dtype, got {dtype}")
        empty = lambda name: nn.Parameter(torch.empty(shapes[name], device=base.weight.device, dtype=dtype))  # noqa: E731
        self.lora_A, self.lora_B = empty("lora_A"), empty("lora_B")
        self.lora_s = empty("lora_s") if "lora_s" in shapes else None
        self.reset_parameters()
        # the underscored spelling exists in every torch this project admits (the public alias is newer)
        self._register_load_state_dict_pre_hook(load_base_under_plain_names, with_module=True)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise per docs/method.md §2: A (and B for `multilora`) Kaiming-uniform, s = `scale_init`.

        dW = 0 at step 0 holds for `init="lora"` (B = 0) whatever s is, and for `init="multilora"`
        only with `scale_init = 0` (the default); a non-zero value there starts the model away from the base.
        """
        for i in range(self.n):  # init-time loop: Kaiming's fan-in must be per module
            nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))  # fan_in = d_in
            if self.init == "multilora":
                nn.init.kaiming_uniform_(self.lora_B[i], a=math.sqrt(5))  # fan_in = r
        if self.init == "lora":
            self.lora_B.zero_()
        if self.lora_s is not None:  # multilora: s = 0 keeps dW = 0; lora init: B = 0 does
            self.lora_s.fill_(self.scale_init)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused factors (A_cat (n r, d_in), B_s (d_out, n r)), alpha / r included."""
        return fuse(self.lora_A, self.lora_B, self.lora_s, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """dW in the base weight's own layout ((d_out, d_in), or (d_in, d_out) for Conv1D)."""
        a_cat, b_s = self.factors()
        dw = b_s @ a_cat  # (d_out, d_in)
        return dw.T if self.is_conv1d else dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., d_out)
        if self.merged:
            return y
        a_cat, b_s = self.factors()
        h = F.linear(self.dropout(x).to(a_cat.dtype), a_cat)  # (..., n r)
        return y + F.linear(h, b_s).to(y.dtype)  # (..., d_out)

    @torch.no_grad()
    def merge(self) -> None:
        """Add dW into the base weight (W <- W0 + dW); a no-op if already merged."""
        if self.merged:
            return
        self._add_to_base(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract dW from the base weight again; a no-op if not merged."""
        if not self.merged:
            return
        self._add_to_base(-1.0)
        self.merged = False

    def _add_to_base(self, sign: float) -> None:
        refuse_quantized_merge(self.base)
        w = self.base.weight
        new = w.float() + sign * self.delta_weight().float()  # compute in float32, then cast
        if not torch.isfinite(new).all():
            raise MultiLoRAError(
                "merging this adapter would put NaN/inf into the base weight "
                "(the adapter weights are not finite); the weight was left unchanged"
            )
        w.copy_(new.to(w.dtype))

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, n={self.n}, r={self.r}, alpha={self.alpha}, "
            f"init={self.init}, scale={self.scale}, scale_init={self.scale_init}, merged={self.merged}"
            + (f", quantized={self.quantized}" if self.quantized else "")
        )


def load_base_under_plain_names(module: MultiLoRALinear, state_dict: dict, prefix: str, *_) -> None:
    """Load pre-hook: take the base layer's tensors from the plain model's keys when the checkpoint has them.

    `save_pretrained` of an injected model writes `<path>.weight` / `<path>.bias` (what a plain model
    loads), not this layer's `<path>.base.weight`; this maps them back, so such a checkpoint also loads
    into the injected model (Trainer's resume and load_best_model_at_end). `state_dict` is the copy
    `load_state_dict` made: renaming in it leaves the caller's dict alone.
    """
    for name in BASE_TENSORS:
        plain, ours = prefix + name, prefix + "base." + name
        if plain in state_dict and ours not in state_dict:
            state_dict[ours] = state_dict.pop(plain)


def in_out_features(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an `nn.Linear`, a transformers `Conv1D` (whose weight is transposed) or a bitsandbytes layer."""
    if quantized_kind(base):  # packed weights: the shape is not (d_out, d_in)
        return base.in_features, base.out_features
    if isinstance(base, nn.Linear) and not base.weight.is_floating_point():
        raise MultiLoRAError(
            f"cannot adapt {type(base).__name__}: its weight is {base.weight.dtype}, not a floating-point tensor, and "
            "multilora knows only the bitsandbytes quantized layers (Linear4bit, Linear8bitLt); load the base with "
            "multilora.models.load_model(..., quantization='nf4' | 'int8') or in a float dtype")
    if isinstance(base, Conv1D):  # GPT-2 style: weight is (d_in, d_out), y = x W + b
        d_in, d_out = base.weight.shape
    elif isinstance(base, nn.Linear):  # weight is (d_out, d_in), y = x W^T + b
        d_out, d_in = base.weight.shape
    else:
        raise MultiLoRAError(f"MultiLoRA adapts nn.Linear and transformers Conv1D layers, not {type(base).__name__}")
    return d_in, d_out


def parameter_shapes(n: int, r: int, d_in: int, d_out: int, scale: str) -> dict[str, tuple[int, ...]]:
    """The adapter parameters' names and shapes for one layer (the on-disk format)."""
    shapes = {"lora_A": (n, r, d_in), "lora_B": (n, d_out, r)}
    if scale != "none":
        shapes["lora_s"] = (n, d_out) if scale == "vector" else (n,)
    return shapes


def default_scale_init(init: str) -> float:
    """The initial value of the scales s: 0 for the MultiLoRA init (random B), 1 for the LoRA init (B = 0)."""
    return 0.0 if init == "multilora" else 1.0


class OptionProblem(NamedTuple):
    """One invalid adapter option: its name, what it must be, and the allowed values of a choice."""

    key: str
    requirement: str  # "must be ..." reads after "<key> = <value>"; anything else is the whole message
    choices: tuple[str, ...] = ()


def option_problems(*, n: int, r: int, alpha: float, dropout: float, init: str, scale: str,
                    scale_init: float | None = None) -> list[OptionProblem]:
    """Every invalid layer option (empty when all are valid): the one set of rules for the layer and the configs."""
    p = []
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        p.append(OptionProblem("n", "must be an integer >= 1"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        p.append(OptionProblem("r", "must be an integer >= 1"))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        p.append(OptionProblem("alpha", "must be a positive number"))
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        p.append(OptionProblem("dropout", "must be in [0, 1)"))
    if init not in INITS:
        p.append(OptionProblem("init", f"must be one of {', '.join(INITS)}", INITS))
    if scale not in SCALES:
        p.append(OptionProblem("scale", f"must be one of {', '.join(SCALES)}", SCALES))
    elif scale == "none" and init != "lora":
        p.append(OptionProblem("scale", "scale='none' needs init='lora' (without scales, a random B would make dW != 0 at step 0)"))
    if scale_init is not None:
        if not isinstance(scale_init, (int, float)) or isinstance(scale_init, bool) or not math.isfinite(scale_init):
            p.append(OptionProblem("scale_init", "must be a finite number (or None/null for the init's default)"))
        elif scale == "none":
            p.append(OptionProblem("scale_init", "scale_init is set but scale='none' has no scales; drop scale_init or use a scale"))
    return p


def describe_problem(problem: OptionProblem, value: Any) -> str:
    """'<key> <requirement>, got <value>' (the layer's wording)."""
    if problem.requirement.startswith("must"):
        return f"{problem.key} {problem.requirement}, got {value!r}"
    return problem.requirement


def check_options(*, n: int, r: int, alpha: float, dropout: float, init: str, scale: str,
                  scale_init: float | None = None) -> None:
    """Raise MultiLoRAError naming every invalid layer option."""
    values = dict(n=n, r=r, alpha=alpha, dropout=dropout, init=init, scale=scale, scale_init=scale_init)
    problems = option_problems(**values)
    if problems:
        raise MultiLoRAError("invalid adapter options: " + "; ".join(describe_problem(p, values[p.key])
                                                                       for p in problems))
