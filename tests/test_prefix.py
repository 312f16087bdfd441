"""Shared-prefix reuse in the multiple-choice scorer: the same log-likelihoods and answers as the plain path.

The reference is independent of both scorer paths: one unpadded forward per prompt + choice
(`test_evaluate.slow_scores`).
"""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch

import multilora as ml
from conftest import randomize_adapters
from multilora import prefix, scoring
from multilora.data import MCItem
from multilora.models import embedded_tokenizer, tiny_model
from multilora.prefix import expand_kv, prefix_kv, shared_prefix_groups
from multilora.scoring import score_choices
from test_evaluate import slow_scores

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4  # float32, per log-likelihood (sums of a few log-probabilities)


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@functools.lru_cache(maxsize=None)
def tiny(family: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_model(family)


def three_shot_items() -> list[MCItem]:
    """Two 'subjects', each a header + 3 solved examples shared by its questions; questions of mixed length;
    one choice set with multi-token choices; plus two 0-shot items that share nothing."""
    items = []
    for subject, words in (("colours", ["red", "green", "blue", "yellow"]), ("animals", ["cat", "dog", "owl", "eel"])):
        header = f"The following are questions about {subject}.\n\n"
        shots = "".join(f"Question: which word is number {k} in the list {', '.join(words)}?\nAnswer: {words[k]}\n\n"
                        for k in range(3))
        for q, tail in enumerate(["Which one?", "Pick the one that fits best, please, after some thought.",
                                  "And now?", "Last one, which word is the right one here?", "?"]):
            choices = [f" {w}" for w in words] if q != 2 else [" a long answer here", " a long one", " short", " a"]
            items.append(MCItem(subject, header + shots + f"Question: {tail}\nAnswer:", choices, q % 4))
    items.append(MCItem("zero", "Is the sky green?", [" yes", " no"], 1))
    items.append(MCItem("zero", "Two and two make", [" four", " five"], 0))
    return items


def test_groups_share_a_long_prefix_and_keep_each_prompts_last_token():
    prompts = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 8], [7, 7, 7], [1, 2, 3, 4, 5, 6, 7, 8]]
    groups, rest = shared_prefix_groups(prompts, min_prefix=4)
    assert groups == [(4, [0, 4, 1, 2])] and rest == [3]  # sorted: shared starts are neighbours
    # the whole of a prompt is never the prefix: its last token predicts the first answer token
    groups, rest = shared_prefix_groups([[1, 2, 3], [1, 2, 3]], min_prefix=2)
    assert groups == [(2, [0, 1])] and rest == []
    assert shared_prefix_groups([[1, 2, 3], [1, 2, 4]], min_prefix=3) == ([], [0, 1])  # too short a prefix
    assert shared_prefix_groups([[1, 2, 3, 4]], min_prefix=2) == ([], [0])             # one question: nothing to share
    assert shared_prefix_groups([], min_prefix=2) == ([], [])


@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("family, adapter", [("llama", False), ("llama", True), ("gpt2", False)])
def test_prefix_reuse_equals_the_plain_path_and_one_forward_per_choice(tokenizer, batch_size, family, adapter):
    items = three_shot_items()
    model = tiny(family)
    if adapter:
        model = tiny_model(family)
        ml.inject(model, ml.MultiLoRAConfig(n=3, r=4, targets=["q_proj", "v_proj", "o_proj", "down_proj"]))
        randomize_adapters(model)
    prompts = [tokenizer(it.prompt)["input_ids"] for it in items]
    groups, _ = shared_prefix_groups(prompts)
    assert len(groups) == 2 and all(length >= 40 for length, _ in groups), groups  # the path under test is taken

    calls = []
    with mock.patch.object(scoring, "expand_kv", side_effect=lambda kv, rows: calls.append(rows) or expand_kv(kv, rows)):
        reused = score_choices(model, tokenizer, items, batch_size=batch_size)
    assert sum(calls) == 10  # the prefix path ran, for each of the 10 three-shot questions (one row each)
    plain = score_choices(model, tokenizer, items, batch_size=batch_size, reuse_prefix=False)
    slow = slow_scores(model, tokenizer, items)
    for r, p, s in zip(reused, plain, slow):
        assert max(abs(a - b) for a, b in zip(r["ll"], s)) <= TOL
        assert max(abs(a - b) for a, b in zip(r["ll"], p["ll"])) <= TOL
        assert r["pred"] == p["pred"] == max(range(len(s)), key=s.__getitem__)
        assert r["pred_norm"] == p["pred_norm"]


def test_prefix_reuse_on_real_k_shot_mmlu_items(tokenizer):
    from multilora.tasks import load_items

    items = load_items("mmlu_anatomy", k=2)[:4] + load_items("mmlu_astronomy", k=2)[:3]
    model = tiny("llama")
    groups, _ = shared_prefix_groups([tokenizer(it.prompt)["input_ids"] for it in items])
    assert sorted(len(members) for _, members in groups) == [3, 4]
    reused = score_choices(model, tokenizer, items, batch_size=3)
    plain = score_choices(model, tokenizer, items, batch_size=3, reuse_prefix=False)
    for r, p in zip(reused, plain):
        assert r["pred"] == p["pred"] and max(abs(a - b) for a, b in zip(r["ll"], p["ll"])) <= TOL


def test_a_model_without_a_cache_takes_the_plain_path(tokenizer):
    class NoCache(torch.nn.Module):
        """A causal LM whose forward takes no cache."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    items = three_shot_items()
    wrapped = NoCache(tiny("llama"))
    assert prefix_kv(wrapped, [1, 2, 3]) is None
    got = score_choices(wrapped, tokenizer, items, batch_size=4)
    want = slow_scores(tiny("llama"), tokenizer, items)
    for g, s in zip(got, want):
        assert g["pred"] == max(range(len(s)), key=s.__getitem__)
        assert max(abs(a - b) for a, b in zip(g["ll"], s)) <= TOL


def test_a_sliding_window_cache_is_not_reused(monkeypatch, tokenizer):
    """A cache that is not plain full-attention layers (here: a sliding-window model) is refused, then the plain path."""
    from transformers import MistralConfig, MistralForCausalLM

    monkeypatch.setattr(prefix, "_NO_CACHE", set())
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=16, max_position_embeddings=256)).eval()
    with torch.inference_mode():
        kv = prefix_kv(model, list(range(3, 40)))
    if kv is not None:  # transformers made this a full-attention cache after all: then it must be exact
        items = three_shot_items()
        got = score_choices(model, tokenizer, items)
        for g, s in zip(got, slow_scores(model, tokenizer, items)):
            assert max(abs(a - b) for a, b in zip(g["ll"], s)) <= TOL
    else:
        assert MistralForCausalLM in prefix._NO_CACHE
        items = three_shot_items()
        for g, s in zip(score_choices(model, tokenizer, items), slow_scores(model, tokenizer, items)):
            assert max(abs(a - b) for a, b in zip(g["ll"], s)) <= TOL


def test_expanded_cache_is_fresh_for_every_batch():
    model = tiny("llama")
    kv = prefix_kv(model, list(range(3, 40)))
    assert kv is not None and kv[0][0].shape[0] == 1 and kv[0][0].shape[2] == 37
    first, second = expand_kv(kv, 3), expand_kv(kv, 3)
    first.layers[0].keys.add_(1.0)  # a forward appends to its cache; the next batch must not see it
    assert torch.equal(second.layers[0].keys[0], kv[0][0][0]) and second.get_seq_length() == 37
