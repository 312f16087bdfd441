"""Tokenization and label masks, chat rendering, padding, and the task-mixture sampler.

The tokenizer here is a byte-level BPE with no merges, built in the test: token id == byte value
(plus <bos> 256, <eos> 257, <pad> 258), so every expected position can be computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from multilora.data import (IGNORE, Example, MixtureSampler, collate, encode_prompt, mixture_probs, render,
                            tokenize_example)
from multilora.errors import MultiLoRAError
from multilora.tasks import load_examples

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BOS, EOS, PAD = 256, 257, 258
CHAT = ("{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def byte_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte, id = byte value; optionally a BOS-adding post-processor (as Llama's)."""
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in _bytes_to_unicode().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<bos>", "<eos>", "<pad>"])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


# ----------------------------------------------------------------------------- label masks


@pytest.mark.parametrize("task", ["alpaca", "mmlu", "boolq", "cb", "copa", "rte", "wic", "wsc", "multirc"])
def test_label_mask_on_a_real_row_of_each_task(tok, task):
    ex = load_examples(task, root=DATA)[0]
    out = tokenize_example(ex, tok, max_len=100_000)
    n = len(ex.prompt.encode("utf-8"))
    assert out["task"] == task
    assert out["input_ids"] == ids(ex.prompt) + ids(ex.response) + [EOS]
    assert out["labels"][:n] == [IGNORE] * n  # every prompt position, nothing else
    assert out["labels"][n:] == ids(ex.response) + [EOS]


def test_label_mask_of_a_known_rte_row(tok):
    ex = load_examples("rte", root=DATA)[0]  # prompt of 125 bytes, response " False"
    out = tokenize_example(ex, tok, max_len=512)
    assert len(ex.prompt) == 125 and ex.response == " False"
    assert [i for i, label in enumerate(out["labels"]) if label != IGNORE] == list(range(125, 132))
    assert out["labels"][125:] == [32, 70, 97, 108, 115, 101, EOS]


def test_too_long_prompt_loses_its_left_end_never_the_response(tok):
    ex = Example("t", "0123456789", " yes")
    out = tokenize_example(ex, tok, max_len=8)  # response + EOS = 5, so 3 prompt tokens remain
    assert out["input_ids"] == ids("789 yes") + [EOS]
    assert out["labels"] == [IGNORE] * 3 + ids(" yes") + [EOS]
    assert tokenize_example(ex, tok, max_len=6)["input_ids"] == ids("9 yes") + [EOS]


@settings(max_examples=40, deadline=None)
@given(prompt=st.text(min_size=1, max_size=30), response=st.text(max_size=10), max_len=st.integers(1, 40))
def test_tokenize_invariants(prompt, response, max_len):
    """Either an error, or: fits max_len, response + EOS intact, labels -100 exactly on a suffix of the prompt."""
    tok = byte_tokenizer()
    p, r = ids(prompt), ids(response) + [EOS]
    try:
        out = tokenize_example(Example("t", prompt, response), tok, max_len)
    except MultiLoRAError:
        assert len(r) + 1 > max_len
        return
    kept = len(out["input_ids"]) - len(r)
    assert len(out["input_ids"]) == min(max_len, len(p) + len(r)) and 1 <= kept <= len(p)
    assert out["input_ids"] == p[len(p) - kept:] + r
    assert out["labels"] == [IGNORE] * kept + r


def test_no_room_for_the_response(tok):
    with pytest.raises(MultiLoRAError, match=r"task 'rte': the response needs 5 tokens \(with EOS\) and the prompt "
                                             r"at least 1, but max_len is 5; raise max_len"):
        tokenize_example(Example("rte", "premise", " yes"), tok, max_len=5)
    with pytest.raises(MultiLoRAError, match="task 'x': empty prompt"):
        tokenize_example(Example("x", "", " yes"), tok, max_len=64)


def test_truncate_cuts_a_too_long_response_keeping_up_to_half_the_window_of_prompt(tok):
    """Training's cut (truncate=True): the row starts at most max_len // 2 tokens before the response."""
    ex = Example("t", "0123456789", " abcdefgh")  # 10 prompt tokens, response + EOS = 10
    with pytest.raises(MultiLoRAError, match="the response needs 10 tokens"):
        tokenize_example(ex, tok, max_len=8)
    out = tokenize_example(ex, tok, max_len=8, truncate=True)  # 4 prompt tokens, then the response's first 4
    assert out == {"input_ids": ids("6789 abc"), "labels": [IGNORE] * 4 + ids(" abc"), "task": "t"}
    short = tokenize_example(Example("t", "01", " abcdefgh"), tok, max_len=8, truncate=True)  # all of a short prompt
    assert short["input_ids"] == ids("01 abcde") and short["labels"] == [IGNORE] * 2 + ids(" abcde")
    assert tokenize_example(ex, tok, max_len=64, truncate=True) == tokenize_example(ex, tok, max_len=64)  # fits


def test_bos_is_added_once_and_kept_when_truncating():
    tok = byte_tokenizer(add_bos=True)
    ex = Example("t", "0123456789", " yes")
    assert tokenize_example(ex, tok, 64)["input_ids"] == [BOS] + ids("0123456789 yes") + [EOS]
    out = tokenize_example(ex, tok, 8)  # BOS + 2 prompt tokens + 5
    assert out["input_ids"] == [BOS] + ids("89 yes") + [EOS]
    assert out["labels"] == [IGNORE] * 3 + ids(" yes") + [EOS]
    with pytest.raises(MultiLoRAError, match="the prompt at least 2"):
        tokenize_example(ex, tok, 6)
    tok.chat_template = CHAT  # the template writes <bos> itself: no second one
    assert encode_prompt("hi", tok, chat=True) == [BOS] + ids("<|user|>hi<|assistant|>")


def test_chat_rendering(tok):
    assert render("hi", tok, chat=False) == "hi"
    with pytest.raises(MultiLoRAError, match="no chat_template; turn chat off"):
        render("hi", tok, chat=True)
    chat_tok = byte_tokenizer()
    chat_tok.chat_template = CHAT
    assert render("hi", chat_tok, chat=True) == "<bos><|user|>hi<|assistant|>"
    out = tokenize_example(Example("t", "hi", " yes"), chat_tok, 64, chat=True)
    prompt = [BOS] + ids("<|user|>hi<|assistant|>")
    assert out["input_ids"] == prompt + ids(" yes") + [EOS]
    assert out["labels"] == [IGNORE] * len(prompt) + ids(" yes") + [EOS]


def test_collate_pads_right_to_a_multiple_of_8(tok):
    rows = [tokenize_example(Example("b", "ab", "c"), tok, 64), tokenize_example(Example("a", "x" * 9, "yz"), tok, 64)]
    batch = collate(rows, PAD, ["a", "b"])
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == ids("abc") + [EOS] + [PAD] * 12
    assert batch["labels"][0].tolist() == [IGNORE] * 2 + ids("c") + [EOS] + [IGNORE] * 12
    assert batch["attention_mask"].sum(1).tolist() == [4, 12]
    assert batch["task_ids"].tolist() == [1, 0] and batch["task_ids"].dtype == torch.long
    assert collate(rows, PAD, ["a", "b"], multiple_of=1)["input_ids"].shape == (2, 12)


# ----------------------------------------------------------------------------- the mixture

SIZES = {"big": 1000, "mid": 300, "small": 50}


@pytest.mark.parametrize("strategy, options, expected", [
    ("proportional", {}, {t: n / 1350 for t, n in SIZES.items()}),
    ("temperature", {"temperature": 2.0}, {t: n**0.5 / sum(m**0.5 for m in SIZES.values()) for t, n in SIZES.items()}),
    ("uniform", {}, {t: 1 / 3 for t in SIZES}),
    ("weights", {"weights": {"big": 1, "mid": 2, "small": 1}}, {"big": 0.25, "mid": 0.5, "small": 0.25}),
])
def test_sampler_frequencies_match_the_strategy(strategy, options, expected):
    """20,000 draws: each task's frequency within 0.01 of its probability (about 3 standard deviations)."""
    sampler = MixtureSampler(SIZES, strategy, seed=3, **options)
    assert sampler.probs == pytest.approx(expected)
    draws = [next(sampler) for _ in range(20_000)]
    for task, p in expected.items():
        assert abs(sum(t == task for t, _ in draws) / len(draws) - p) < 0.01
    assert all(0 <= i < SIZES[t] for t, i in draws)


def test_sampler_walks_each_task_by_per_epoch_permutations():
    sampler = MixtureSampler({"a": 5, "b": 7}, "uniform", seed=1)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for task, index in (next(sampler) for _ in range(200)):
        seen[task].append(index)
    for task, n in (("a", 5), ("b", 7)):
        epochs = [seen[task][i:i + n] for i in range(0, len(seen[task]) - n + 1, n)]
        assert all(sorted(e) == list(range(n)) for e in epochs) and len({tuple(e) for e in epochs}) > 1


def test_sampler_is_deterministic_given_the_seed():
    stream = lambda seed: [next(s) for s in [MixtureSampler(SIZES, seed=seed)] for _ in range(500)]  # noqa: E731
    assert stream(7) == stream(7)
    assert stream(7) != stream(8)


def test_sampler_resumes_from_its_state():
    first = MixtureSampler(SIZES, "temperature", temperature=3.0, seed=11)
    for _ in range(1234):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = MixtureSampler(SIZES, "temperature", temperature=3.0, seed=0)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(2000)] == [next(first) for _ in range(2000)]
    other = MixtureSampler(SIZES, "uniform")
    with pytest.raises(MultiLoRAError, match="resume with the same tasks, data and mixture settings"):
        other.load_state_dict(state)


@pytest.mark.parametrize("sizes, options, message", [
    ({"a": 3, "b": 0}, {}, "task\\(s\\) b have no examples"),
    ({}, {}, "the mixture has no tasks"),
    ({"a": 3}, {"strategy": "zipf"}, "unknown mixture strategy 'zipf'; use one of proportional, temperature"),
    ({"a": 3, "b": 4}, {"strategy": "weights", "weights": {"a": 1, "b": 1, "c": 2}},
     "unknown task\\(s\\) in weights: c \\(mixture tasks: a, b\\)"),
    ({"a": 3, "b": 4}, {"strategy": "weights", "weights": {"a": 0, "b": -1}},
     "weights must be positive numbers: a=0, b=-1"),
    ({"a": 3, "b": 4}, {"strategy": "weights", "weights": {"a": 1}}, "no weight for b"),
    ({"a": 3}, {"weights": {"a": 1}}, "weights given but strategy is 'proportional'"),
    ({"a": 3}, {"strategy": "temperature", "temperature": 0}, "temperature must be a positive number, got 0"),
])
def test_bad_mixtures(sizes, options, message):
    with pytest.raises(MultiLoRAError, match=message):
        mixture_probs(sizes, **options)
