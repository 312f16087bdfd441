"""The response-token loss, shared by training and evaluation, and the LM head run only where it is needed.

Position t of a sequence predicts token t + 1, so the loss of a response is taken at the positions
just before its tokens. `logits_at` asks the model for logits only at those positions
(`logits_to_keep` with a tensor, which recent transformers accept), which skips the output head
(49k x 576 for SmolLM2) on prompt tokens; models that cannot do that compute every position and
the wanted ones are picked afterwards. Which of the two a model class supports is probed once.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE
from .prefix import cache_argument

_TENSOR_KEEP: dict[type, bool] = {}  # model class -> accepts a tensor logits_to_keep (probed on first use)


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP wraps the model


def _may_keep(model: nn.Module) -> bool:
    cls = type(_inner(model))
    if cls not in _TENSOR_KEEP:
        try:
            _TENSOR_KEEP[cls] = "logits_to_keep" in inspect.signature(_inner(model).forward).parameters
        except (TypeError, ValueError):
            _TENSOR_KEEP[cls] = False
    return _TENSOR_KEEP[cls]


def logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              keep: torch.Tensor, cache: Callable[[], Any] | None = None) -> torch.Tensor:
    """Logits at the kept positions only.

    keep: a bool mask (B, T) -> logits (K, V) for its K True positions in row-major order, or
    positions (R, P) of long indices -> logits (R, P, V). `cache`, if given, makes a fresh
    past_key_values for each forward (a KV cache of a shared prefix, `prefix.expand_kv`); then
    attention_mask covers the prefix and input_ids (B, T - L) only what follows it.
    """
    want = (int(keep.sum()),) if keep.dtype == torch.bool else tuple(keep.shape)
    name = cache_argument(model) if cache is not None else None
    past = (lambda: {name: cache(), "use_cache": True}) if cache is not None else dict  # noqa: E731
    if _may_keep(model):
        try:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **past()).logits
            logits = logits.reshape(-1, logits.shape[-1]) if keep.dtype == torch.bool else logits
            if tuple(logits.shape[:-1]) == want:
                return logits
        except (TypeError, IndexError, RuntimeError):  # an older transformers takes only an int
            pass
        _TENSOR_KEEP[type(_inner(model))] = False  # do not try again for this model class
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **past()).logits  # (B, T, V)
    if keep.dtype == torch.bool:
        return logits[keep]
    return torch.take_along_dim(logits, keep[..., None], dim=1)


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor], n_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token losses per task (n_tasks,), response-token count per task (n_tasks,)).

    `batch` is what `data.collate` returns: input_ids, attention_mask, labels (IGNORE where no
    loss) and task_ids, each (B, T) except task_ids (B,).
    """
    labels = batch["labels"]  # (B, T)
    keep = torch.zeros_like(labels, dtype=torch.bool)  # (B, T): position t predicts token t + 1
    keep[:, :-1] = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][keep[:, :-1]]  # (K,)
    logits = logits_at(model, batch["input_ids"], batch["attention_mask"], keep)  # (K, V)
    loss = F.cross_entropy(logits.float(), targets, reduction="none")  # (K,)
    task_of = batch["task_ids"][:, None].expand_as(keep)[keep]  # (K,)
    sums = torch.zeros(n_tasks, device=loss.device, dtype=loss.dtype).index_add(0, task_of, loss)  # (n_tasks,)
    counts = torch.bincount(task_of, minlength=n_tasks).to(loss.dtype)  # (n_tasks,)
    return sums, counts
