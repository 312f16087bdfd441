"""A prompt prefix shared by many questions, run once: its KV cache, reused by every batch of suffixes.

In k-shot MMLU every prompt of a subject starts with the same header and k solved examples (~87%
of the prompt tokens). Those tokens give the same keys and values in every prompt (causal
attention: a token never sees what follows it), so they are computed once:

    groups, rest = shared_prefix_groups(prompts, min_prefix=32)   # [(L, question indices)], the others
    kv = prefix_kv(model, prompts[groups[0][1][0]][:L])           # per layer (keys, values), each (1, H, L, D)
    cache = expand_kv(kv, R)                                      # a fresh DynamicCache for R suffix rows
    model(input_ids=suffixes, attention_mask=ones(R, L) ++ suffix_mask, cache=cache)  # past_key_values= before 5.2x

With right-padded suffixes behind an unpadded prefix, position t of every row is position L + t,
which is what the model counts from the cache's length, so no position ids are passed. A model
whose cache is not a plain DynamicCache of full-attention layers (sliding windows, recurrent
state), or whose forward takes no cache, gets None from `prefix_kv`: the caller scores the plain
way. docs/method.md §7 states the equality this relies on.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # a transformers without per-layer caches: every model scores the plain way
    DynamicLayer = None

MIN_PREFIX = 32  # shared leading prompt tokens worth a cached prefix (fewer: the plain path)

_NO_CACHE: set[type] = set()  # model classes whose cache cannot be reused (found on first use)


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def shared_prefix_groups(prompts: Sequence[Sequence[int]], min_prefix: int = MIN_PREFIX
                         ) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Questions whose prompts share at least `min_prefix` leading tokens: ([(L, indices)], the other indices).

    Prompts are sorted, so prompts with a common start are neighbours; a group is a run of
    neighbours whose common prefix stays >= `min_prefix`. L is that prefix minus at least one token:
    each prompt's last token stays in its suffix (its logits score the first answer token).
    A group has two or more questions.
    """
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    groups: list[tuple[int, list[int]]] = []
    rest: list[int] = []

    def close(members: list[int], shared: int) -> None:
        length = min([shared] + [len(prompts[i]) - 1 for i in members])
        if len(members) >= 2 and length >= min_prefix:
            groups.append((length, members))
        else:
            rest.extend(members)

    if not order:
        return groups, rest
    members, shared = [order[0]], len(prompts[order[0]])
    for prev, i in zip(order, order[1:]):
        common = min(shared, _common_length(prompts[prev], prompts[i]))
        if common >= min_prefix:
            members.append(i)
            shared = common
        else:
            close(members, shared)
            members, shared = [i], len(prompts[i])
    close(members, shared)
    return groups, rest


def cache_argument(model: nn.Module) -> str | None:
    """The name under which the model's forward takes a KV cache ("cache" in transformers >= 5.2x, before
    "past_key_values"); None if it takes none or its cache proved not reusable."""
    inner = getattr(model, "module", model)  # DDP wraps the model
    if type(inner) in _NO_CACHE:
        return None
    try:
        params = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


@torch.inference_mode()
def prefix_kv(model: nn.Module, prefix: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (keys, values) of `prefix`, each (1, H, L, D); None if the model's cache cannot be reused."""
    name = cache_argument(model)
    if name is None or DynamicLayer is None:
        return None
    device = next(model.parameters()).device
    ids = torch.tensor([list(prefix)], device=device)  # (1, L)
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    except TypeError:  # no logits_to_keep
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
    plain = isinstance(cache, DynamicCache) and len(cache.layers) > 0 and all(
        type(layer) is DynamicLayer and layer.get_seq_length() == ids.shape[1] for layer in cache.layers)
    if not plain:  # sliding windows, recurrent state, legacy tuples, ...: score the plain way from now on
        _NO_CACHE.add(type(getattr(model, "module", model)))
        return None
    return [(layer.keys, layer.values) for layer in cache.layers]


def expand_kv(kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> DynamicCache:
    """A fresh DynamicCache holding the prefix for `rows` rows: (rows, H, L, D) per layer (the forward appends to it)."""
    return DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in kv])
