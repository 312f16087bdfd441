"""Shared fixtures: tiny randomly initialised Llama- and GPT-2-style models (hidden 64)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

VOCAB = 128


def make_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model of `family` ('llama' or 'gpt2') with fixed random weights, in eval mode."""
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                         bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(cfg)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A save_pretrained folder: tiny random Llama (vocab of the embedded tokenizer) + that tokenizer."""
    from multilora.models import embedded_tokenizer, tiny_model

    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tiny_model("llama").save_pretrained(d)
    embedded_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(params=["llama", "gpt2"])
def family(request) -> str:
    return request.param


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, VOCAB, (2, 12), generator=g)


def randomize_adapters(model: torch.nn.Module, seed: int = 7, std: float = 0.2) -> None:
    """Give every adapter tensor random non-zero values (s too), as after some training."""
    import multilora as ml

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ml.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and two threads on shared cores run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
