"""Put MultiLoRA (or LoRA) layers into a Hugging Face model by module-name patterns.

    import multilora as ml
    summary = ml.inject(model, ml.MultiLoRAConfig(n=3, r=8, alpha=16, targets=["q_proj", "v_proj"]))
    print(summary)            # adapted modules, trainable parameters and their share

The model stays the same `PreTrainedModel`: only the matched linear layers are wrapped in
`MultiLoRALinear`, and every parameter that is not an adapter parameter is frozen.

`model.save_pretrained(folder)` keeps writing a checkpoint a plain
`AutoModelForCausalLM.from_pretrained(folder)` loads: `inject` gives the model a `save_pretrained`
that writes every base layer's tensors under the plain model's names (`q_proj.weight`, not the
wrapper's `q_proj.base.weight`; see `checkpoint_state_dict`). The model's own `state_dict()` keeps
the wrapper's names (Accelerate, FSDP and the trainer's checkpoints rely on them).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import MultiLoRAError
from .layers import MultiLoRALinear, OptionProblem, describe_problem, in_out_features, option_problems
from .quant import keep_4bit_layout, refuse_quantized_merge

ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_s")


@dataclass
class MultiLoRAConfig:
    """Adapter options (docs/method.md §2) and the modules they go into.

    targets: a list of module-name suffixes (`["q_proj", "v_proj"]`), a regular expression
    matched against the full module path (`r".*\\.(q|v)_proj"`), or `"all-linear"` (every
    linear layer except the output head). `MultiLoRAConfig.lora(r, alpha)` is plain LoRA.
    """

    n: int = 3
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "multilora"  # "multilora": A, B Kaiming and s = 0 | "lora": B = 0 (s = 1)
    scale: str = "vector"  # "vector": s is (n, d_out) | "scalar": (n,) | "none": no s (LoRA)
    scale_init: float | None = None  # initial s; None: 0 for init "multilora", 1 for "lora"
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        problems = self.problems()
        if problems:
            values = asdict(self)
            raise MultiLoRAError("invalid adapter options: " + "; ".join(describe_problem(p, values[p.key])
                                                                           for p in problems))

    def problems(self) -> list[OptionProblem]:
        """Every invalid option (layers.option_problems, plus the targets); empty when the config is valid."""
        p = option_problems(**self.layer_options())
        t = self.targets
        if not ((isinstance(t, str) and t) or (isinstance(t, (list, tuple)) and t
                                               and all(isinstance(x, str) and x for x in t))):
            p.append(OptionProblem("targets", "must be a non-empty list of module-name suffixes (e.g. [q_proj, "
                                              "v_proj]), a regex string or 'all-linear'"))
        elif isinstance(t, str) and t != "all-linear":
            try:
                re.compile(t)
            except re.error as e:
                p.append(OptionProblem("targets", f"targets {t!r} is not a valid regular expression ({e}); fix it "
                                                  "or list module suffixes (e.g. [q_proj, v_proj])"))
        return p

    @classmethod
    def lora(cls, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: list[str] | str = ("q_proj", "v_proj")) -> "MultiLoRAConfig":
        """Plain LoRA: one module, B = 0 at init, no scales."""
        return cls(n=1, r=r, alpha=alpha, dropout=dropout, init="lora", scale="none", targets=list(targets)
                   if not isinstance(targets, str) else targets)

    @property
    def method(self) -> str:
        """'lora' for the plain-LoRA case, else 'multilora'."""
        return "lora" if (self.n == 1 and self.init == "lora" and self.scale == "none") else "multilora"

    def layer_options(self) -> dict:
        """The keyword arguments of `MultiLoRALinear` this config sets."""
        d = asdict(self)
        d.pop("targets")
        return d


@dataclass
class InjectSummary:
    """What `inject` did: the adapted module paths and the parameter counts."""

    modules: list[str]
    trainable: int
    total: int

    @property
    def share(self) -> float:
        """Trainable parameters as a fraction of all parameters."""
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"adapted {len(self.modules)} modules; trainable {self.trainable:,} of {self.total:,} "
                f"parameters ({100 * self.share:.3f}%)")


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every `nn.Linear` / `Conv1D` (or MultiLoRA-wrapped one) except the output head, by path."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, MultiLoRALinear)}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D, MultiLoRALinear)) and m is not head and name and id(m) not in wrapped}


def find_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Resolve target patterns to module paths; raise, listing what exists, if none match."""
    layers = linear_layers(model)
    if targets == "all-linear":
        found = list(layers)
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise MultiLoRAError(f"targets {targets!r} is not a valid regular expression: {e}") from None
        found = [name for name in layers if pattern.fullmatch(name)]
    else:
        found = [name for name in layers if any(name == t or name.endswith("." + t) for t in targets)]
    if not found:
        leaves = Counter(name.rsplit(".", 1)[-1] for name in layers)
        listing = ", ".join(f"{k} ({v})" for k, v in sorted(leaves.items()))
        raise MultiLoRAError(
            f"targets {targets!r} match no linear layer of this {type(model).__name__}; "
            f"its linear layers are: {listing}. Use some of these names, a regex or 'all-linear'"
        )
    return found


def adapter_modules(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """The model's MultiLoRA layers by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def unmerged_adapter_modules(model: nn.Module, action: str) -> dict[str, MultiLoRALinear]:
    """The model's MultiLoRA layers for `action` ("save", "export"); raise if it has none or they are merged."""
    modules = adapter_modules(model)
    if not modules:
        raise MultiLoRAError(f"this model has no MultiLoRA adapter to {action}; "
                             "call multilora.inject(model, config) or multilora.load_adapter first")
    if any(m.merged for m in modules.values()):
        raise MultiLoRAError(f"the adapter is merged into the base weights; call multilora.unmerge(model) "
                             f"before you {action} it")
    return modules


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter tensors by their on-disk key `<module path>.lora_A|lora_B|lora_s`."""
    out = {}
    for path, m in adapter_modules(model).items():
        for p in ADAPTER_PARAMS:
            t = getattr(m, p)
            if t is not None:
                out[f"{path}.{p}"] = t
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    params = list(model.parameters())  # parameters() already de-duplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def checkpoint_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict `save_pretrained` writes for an injected model (default: `model.state_dict()`).

    Every base layer's tensors go under the plain model's names (`<path>.weight`, `<path>.bias`), so a
    plain `from_pretrained` loads them instead of re-initialising them. An unmerged layer's adapter
    tensors stay under their own keys (`<path>.lora_A`, ...): `from_pretrained` reports them as
    unexpected and ignores them, and the injected model loads the whole file back (`MultiLoRALinear`
    maps the plain names to its own). A merged layer's are left out: its weight already holds dW, so a
    merged model saves as a plain checkpoint.
    """
    state = model.state_dict() if state is None else state
    modules = adapter_modules(model)
    merged = {f"{path}.{p}" for path, m in modules.items() if m.merged for p in ADAPTER_PARAMS}
    out = {}
    for key, value in state.items():
        if key in merged:
            continue
        path, base, name = key.rpartition(".base.")  # "<path>", "weight" (or a 4-bit layer's "weight.absmax", ...)
        out[f"{path}.{name}" if base and path in modules else key] = value
    return out


class SavePretrained:
    """`model.save_pretrained` of an injected model: the model class's own, given `checkpoint_state_dict`.

    `inject` installs it as an instance attribute (`unload` removes it); an object holding the model
    rather than a bound method, so that a deep copy or a pickle of the model saves through its own copy.
    A caller's `state_dict` (the Trainer passes the one Accelerate gathered) is renamed the same way.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None,
                 *args, **kwargs):
        model = self.model
        return type(model).save_pretrained(model, save_directory, is_main_process,
                                           checkpoint_state_dict(model, state_dict), *args, **kwargs)


def refuse_if_injected(model: nn.Module) -> None:
    """Raise if the model already carries MultiLoRA layers (a second adapter would stack)."""
    if adapter_modules(model):
        raise MultiLoRAError(
            "this model already has MultiLoRA adapters; injecting twice would stack two adapters. "
            "Use a fresh model, or call multilora.unload(model) first"
        )


def inject(model: nn.Module, config: MultiLoRAConfig, modules: list[str] | None = None,
           dtype: torch.dtype | None = None) -> InjectSummary:
    """Wrap the target linear layers in MultiLoRA layers and freeze everything else.

    `modules` (exact module paths) overrides `config.targets`; `load_adapter` uses it. `dtype`: the
    adapter tensors' dtype (default: each base weight's; float32 over a 4-bit/8-bit base).
    """
    refuse_if_injected(model)
    if modules is None:
        modules = find_targets(model, config.targets)
    else:
        layers = linear_layers(model)
        missing = [m for m in modules if m not in layers]
        if missing:
            raise MultiLoRAError(
                f"module {missing[0]!r} is not a linear layer of this {type(model).__name__} "
                f"({len(missing)} of {len(modules)} adapter modules are missing): the adapter was made for another base model"
            )
    for path in modules:  # an unsupported layer is refused before the model changes
        in_out_features(model.get_submodule(path))
    for p in model.parameters():
        p.requires_grad_(False)
    keep_4bit_layout(model)  # a quantized base stays bit-identical (quant.keep_4bit_layout)
    for path in modules:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, leaf, MultiLoRALinear(getattr(parent, leaf), **config.layer_options(), dtype=dtype))
    model.multilora_config = config  # read by save_adapter / export; plain attribute, not saved by HF
    if hasattr(model, "save_pretrained"):  # a transformers model: keep its checkpoints loadable
        model.save_pretrained = SavePretrained(model)
    trainable, total = count_parameters(model)
    return InjectSummary(modules=list(modules), trainable=trainable, total=total)


def _refuse_non_finite_merge(modules: dict[str, MultiLoRALinear]) -> None:
    """Raise, before any weight changes, if some layer's base is quantized or merging would put NaN/inf into it."""
    for path, m in modules.items():
        refuse_quantized_merge(m.base, path)
    with torch.no_grad():
        for path, m in modules.items():
            if not m.merged and not torch.isfinite(m.base.weight.float() + m.delta_weight().float()).all():
                raise MultiLoRAError(
                    f"merging the adapter of {path!r} would put NaN/inf into its base weight (the adapter weights "
                    "are not finite, or their update overflows); every weight was left unchanged"
                )


def merge(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (zero inference overhead); returns the model.

    All or nothing: if any layer's merge would be non-finite, no weight is changed.
    """
    modules = adapter_modules(model)
    _refuse_non_finite_merge(modules)
    for m in modules.values():
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: subtract every adapter's update from its base weight; returns the model."""
    for m in adapter_modules(model).values():
        m.unmerge()
    return model


def unload(model: nn.Module, merge_first: bool = True) -> nn.Module:
    """Replace every MultiLoRA layer by its (merged, by default) base layer; returns the model."""
    modules = adapter_modules(model)
    if merge_first:
        _refuse_non_finite_merge(modules)  # all or nothing, as merge()
    for path, m in modules.items():
        if merge_first:
            m.merge()
        elif m.merged:
            m.unmerge()
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, m.base)
    if hasattr(model, "multilora_config"):
        del model.multilora_config
    if isinstance(vars(model).get("save_pretrained"), SavePretrained):
        del model.save_pretrained  # the class's own again
    return model
