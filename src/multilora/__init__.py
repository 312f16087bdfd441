"""multilora: multi-task fine-tuning of Hugging Face causal LMs with MultiLoRA.

    import multilora as ml
    ml.inject(model, ml.MultiLoRAConfig(n=3, r=8, alpha=16, targets=["q_proj", "v_proj"]))
    ...train...
    ml.save_adapter(model, "out/")     ml.merge(model)     ml.export_peft(model, "peft/")
"""

import logging

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

# bitsandbytes (when installed) warns at import time that it cannot fetch an optional CPU kernel from a
# hub; offline that is always so, and the line would open every command's output. Only that logger.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = [
    "InjectSummary", "MultiLoRAConfig", "MultiLoRAError", "MultiLoRALinear", "adapter_modules",
    "adapter_parameters", "count_parameters", "export_peft", "inject", "load_adapter", "merge",
    "save_adapter", "unload", "unmerge", "__version__",
]
