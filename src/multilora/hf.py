"""Train an injected model under `transformers.Trainer` or TRL's `SFTTrainer`, keeping adapter-only checkpoints.

    import multilora as ml
    from multilora.hf import MultiLoRACallback

    ml.inject(model, ml.MultiLoRAConfig(n=3, r=8, alpha=16))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[MultiLoRACallback()])
    trainer.train()                      # checkpoint-N/adapter/ holds the adapter, no model.safetensors
    ml.load_adapter(fresh_model, "out/checkpoint-N/adapter")

Nothing else is needed: `inject` already freezes every non-adapter parameter, so the Trainer's
optimizer only sees `lora_A / lora_B / lora_s`. The callback uses the public `on_save` event
(called right after the Trainer wrote `checkpoint-N/`): it writes `save_adapter(model,
checkpoint-N/adapter)` and deletes the full-model weight files the Trainer wrote there. A callback
rather than a Trainer subclass because it works unchanged with `Trainer`, `SFTTrainer` and any
other Trainer subclass, and touches no private Trainer method. The price: the Trainer still writes
the full weights once per checkpoint before they are removed, and `resume_from_checkpoint` needs
full weights (so do `load_best_model_at_end`, refused here): to continue, `load_adapter` the
checkpoint's `adapter/` into a fresh base model and train again (optimizer state is not restored).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoint import save_adapter
from .errors import MultiLoRAError
from .inject import adapter_modules

ADAPTER_SUBDIR = "adapter"
# Full-model weight files `save_pretrained` may write (single file or sharded, safetensors or torch).
_FULL_WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model")
_FULL_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def checkpoint_dir(args: TrainingArguments, state: TrainerState) -> Path:
    """The folder the Trainer just wrote for this step: `<output_dir>/checkpoint-<global_step>`."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def remove_full_weights(folder: str | os.PathLike) -> list[str]:
    """Delete the full-model weight files `save_pretrained` wrote in `folder`; return their names."""
    removed = []
    for p in Path(folder).iterdir():
        if p.is_file() and p.name.startswith(_FULL_WEIGHT_PREFIXES) and p.name.endswith(_FULL_WEIGHT_SUFFIXES):
            p.unlink()
            removed.append(p.name)
    return sorted(removed)


class MultiLoRACallback(TrainerCallback):
    """Make every Trainer checkpoint adapter-only: `checkpoint-N/adapter/` (see `multilora.save_adapter`).

    keep_full_weights=True keeps the Trainer's full `model.safetensors` next to the adapter: the base
    weights under the plain model's names (a plain `from_pretrained(checkpoint)` loads the base model)
    and the adapter tensors beside them (`load_best_model_at_end` puts them back into the injected
    model); see `inject.checkpoint_state_dict`.
    """

    def __init__(self, keep_full_weights: bool = False, subdir: str = ADAPTER_SUBDIR):
        self.keep_full_weights = keep_full_weights
        self.subdir = subdir

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model=None, **kwargs):
        if model is not None and not adapter_modules(model):
            raise MultiLoRAError(
                "MultiLoRACallback: the Trainer's model has no MultiLoRA adapter; "
                "call multilora.inject(model, config) before building the Trainer"
            )
        if args.load_best_model_at_end and not self.keep_full_weights:
            raise MultiLoRAError(
                "MultiLoRACallback: load_best_model_at_end=True needs the full weights in each checkpoint; "
                "set it to False and load the best checkpoint's adapter/ with multilora.load_adapter, "
                "or pass MultiLoRACallback(keep_full_weights=True)"
            )

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model=None, **kwargs):
        if not args.should_save:  # only the main process writes files
            return
        folder = checkpoint_dir(args, state)
        if not folder.is_dir():
            raise MultiLoRAError(f"MultiLoRACallback: expected the Trainer's checkpoint folder {folder}, which is missing")
        save_adapter(model, folder / self.subdir)
        if not self.keep_full_weights:
            remove_full_weights(folder)
