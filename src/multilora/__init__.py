"""multilora: multi-task fine-tuning of Hugging Face causal LMs with MultiLoRA.

    import multilora as ml
    ml.inject(model, ml.MultiLoRAConfig(n=3, r=8, alpha=16, targets=["q_proj", "v_proj"]))
    ...train...
    ml.save_adapter(model, "out/")     ml.merge(model)     ml.export_peft(model, "peft/")
"""

from ._version import __version__
from .checkpoint import load_adapter, save_adapter
from .errors import MultiLoRAError
from .export import export_peft
from .inject import (
    InjectSummary,
    MultiLoRAConfig,
    adapter_modules,
    adapter_parameters,
    count_parameters,
    inject,
    merge,
    unload,
    unmerge,
)
from .layers import MultiLoRALinear

__all__ = [
    "InjectSummary", "MultiLoRAConfig", "MultiLoRAError", "MultiLoRALinear", "adapter_modules",
    "adapter_parameters", "count_parameters", "export_peft", "inject", "load_adapter", "merge",
    "save_adapter", "unload", "unmerge", "__version__",
]
