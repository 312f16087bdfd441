"""`loss.logits_at` and `loss.token_losses`: the logits_to_keep fast path and its fallback give the same numbers.

Recent transformers take a tensor `logits_to_keep` (the LM head runs on the kept positions only);
older ones have no such argument, or take only an int and fail on a tensor. The fallback computes
every position and picks the kept ones: its logits must equal the plain forward's exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import VOCAB, make_tiny
from multilora import loss
from multilora.data import IGNORE


class NoKeepLM(nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (transformers before it had one)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.calls: list[object] = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(None)
        return self.lm(input_ids=input_ids, attention_mask=attention_mask)


class IntKeepLM(nn.Module):
    """A causal LM that takes `logits_to_keep` only as an int and raises `error` for a tensor."""

    error: type[Exception] = IndexError

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.calls: list[object] = []

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        self.calls.append(logits_to_keep)
        if isinstance(logits_to_keep, torch.Tensor):
            raise self.error("only integer tensors of a single element can be converted to an index")
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)


class IntKeepTypeErrorLM(IntKeepLM):
    error = TypeError


class IgnoresKeepLM(IntKeepLM):
    """Takes a tensor `logits_to_keep` without complaint but returns every position (wrong shape)."""

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        self.calls.append(logits_to_keep)
        return self.lm(input_ids=input_ids, attention_mask=attention_mask)


@pytest.fixture(autouse=True)
def fresh_probe():
    """Each test probes its model classes anew."""
    loss._TENSOR_KEEP.clear()
    yield
    loss._TENSOR_KEEP.clear()


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (2, 10), attention_mask with right padding, a bool keep mask, positions (2, 3))."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[0, 3:9] = True
    keep[1, 2:6] = True
    positions = torch.tensor([[1, 4, 8], [0, 2, 6]])
    return ids, mask, keep, positions


@torch.no_grad()
def plain(lm: nn.Module, ids, mask, keep) -> torch.Tensor:
    """The plain path: every position's logits, then the kept ones."""
    logits = lm(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    return logits[keep] if keep.dtype == torch.bool else torch.take_along_dim(logits, keep[..., None], dim=1)


@pytest.mark.parametrize("wrapper", [NoKeepLM, IntKeepLM, IntKeepTypeErrorLM, IgnoresKeepLM])
def test_fallback_gives_the_plain_logits_and_is_probed_once(wrapper):
    lm = make_tiny("llama")
    model = wrapper(lm)
    ids, mask, keep, positions = inputs()
    with torch.no_grad():
        by_mask = loss.logits_at(model, ids, mask, keep)
        by_position = loss.logits_at(model, ids, mask, positions)
    assert by_mask.shape == (int(keep.sum()), VOCAB) and by_position.shape == (2, 3, VOCAB)
    torch.testing.assert_close(by_mask, plain(lm, ids, mask, keep), rtol=0, atol=0)
    torch.testing.assert_close(by_position, plain(lm, ids, mask, positions), rtol=0, atol=0)
    assert loss._TENSOR_KEEP[wrapper] is False
    tensor_tries = sum(isinstance(c, torch.Tensor) for c in model.calls)
    assert tensor_tries == (0 if wrapper is NoKeepLM else 1)  # the failed probe is not repeated


def test_fast_path_matches_the_plain_logits():
    lm = make_tiny("llama")
    ids, mask, keep, positions = inputs()
    with torch.no_grad():
        by_mask = loss.logits_at(lm, ids, mask, keep)
        by_position = loss.logits_at(lm, ids, mask, positions)
    if not loss._TENSOR_KEEP[type(lm)]:
        pytest.skip("this transformers takes no tensor logits_to_keep: only the fallback runs")
    torch.testing.assert_close(by_mask, plain(lm, ids, mask, keep), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(by_position, plain(lm, ids, mask, positions), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("wrapper", [NoKeepLM, IntKeepLM])
def test_token_losses_are_the_same_on_both_paths(wrapper):
    lm = make_tiny("llama")
    ids, mask, keep, _ = inputs()
    labels = ids.masked_fill(~keep, IGNORE)
    labels[:, 0] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": torch.tensor([1, 0])}
    with torch.no_grad():
        fast_sums, fast_counts = loss.token_losses(lm, batch, n_tasks=2)
        slow_sums, slow_counts = loss.token_losses(wrapper(lm), batch, n_tasks=2)
    assert torch.equal(fast_counts, slow_counts) and fast_counts.tolist() == [4.0, 6.0]
    torch.testing.assert_close(slow_sums, fast_sums, rtol=1e-6, atol=1e-6)
