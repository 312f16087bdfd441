"""`save_pretrained` on an injected model writes a checkpoint a plain `from_pretrained` loads correctly."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import multilora as ml
from conftest import make_tiny, randomize_adapters

CONFIG = ml.MultiLoRAConfig(n=2, r=4, alpha=8, targets="all-linear")
TIED = {"lm_head.weight"}  # GPT-2 ties its output head to the embedding: saved once, under the embedding's name


@torch.no_grad()
def logits(model, tokens) -> torch.Tensor:
    return model.eval()(tokens).logits


def injected(family: str) -> torch.nn.Module:
    model = make_tiny(family)
    ml.inject(model, CONFIG)
    randomize_adapters(model)
    return model


class LoadReport(logging.Handler):
    """Collect what transformers logs while loading (its load report names missing keys)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def plain_load(folder) -> tuple[torch.nn.Module, str]:
    """`AutoModelForCausalLM.from_pretrained(folder)` and the warnings it logged (transformers 5 lists
    MISSING keys in a load report; 4.x says which weights were "newly initialized")."""
    from transformers.utils import logging as hf_logging

    handler, logger = LoadReport(), hf_logging.get_logger("transformers")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(level)
    return model, "\n".join(handler.messages)


def missing(report: str) -> bool:
    """Whether the load report says some weight was missing from the checkpoint (and initialised at random)."""
    return "MISSING" in report or "newly initialized" in report


def test_merged_model_saves_a_plain_checkpoint_with_our_logits(family, tmp_path, tokens):
    model = injected(family)
    ml.merge(model)
    expected = logits(model, tokens)
    model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert not any(".base." in k or "lora_" in k for k in keys), sorted(keys)[:5]
    reloaded, report = plain_load(tmp_path)
    assert not missing(report) and "UNEXPECTED" not in report, report
    torch.testing.assert_close(logits(reloaded, tokens), expected, rtol=0, atol=0)


def test_unmerged_model_saves_the_base_weights_under_their_own_names(family, tmp_path, tokens):
    model = injected(family)
    base_logits = logits(make_tiny(family), tokens)
    ours = logits(model, tokens)
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter matters, so the test means something
    model.save_pretrained(tmp_path)
    # the model itself is untouched:
    torch.testing.assert_close(logits(model, tokens), ours, rtol=0, atol=0)
    assert any(".base." in k for k in model.state_dict())  # its own state dict keeps the layer's names
    reloaded, report = plain_load(tmp_path)
    assert not missing(report), report  # no base weight re-initialised at random
    torch.testing.assert_close(logits(reloaded, tokens), base_logits, rtol=0, atol=0)
    # the adapter comes back exactly: inject the same config, load the same file
    ml.inject(reloaded, CONFIG)
    result = reloaded.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= TIED, result
    torch.testing.assert_close(logits(reloaded, tokens), ours, rtol=0, atol=0)


def test_a_saved_checkpoint_loads_back_into_the_injected_model(tmp_path, tokens):
    """What Trainer's resume and load_best_model_at_end do: load model.safetensors into the injected model."""
    model = injected("llama")
    model.save_pretrained(tmp_path)
    ours = logits(model, tokens)
    other = injected("llama")
    randomize_adapters(other, seed=99)
    result = other.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    torch.testing.assert_close(logits(other, tokens), ours, rtol=0, atol=0)


def test_explicit_state_dict_is_renamed_too(tmp_path, tokens):
    """Trainer passes `state_dict=` (gathered by Accelerate); those keys are renamed the same way."""
    model = injected("llama")
    model.save_pretrained(tmp_path, state_dict=model.state_dict())
    reloaded, report = plain_load(tmp_path)
    assert not missing(report), report
    torch.testing.assert_close(logits(reloaded, tokens), logits(make_tiny("llama"), tokens), rtol=0, atol=0)


def test_unload_restores_the_plain_save_pretrained(tmp_path):
    model = injected("llama")
    ml.unload(model)
    assert "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path)
    assert not any("lora_" in k for k in load_file(str(tmp_path / "model.safetensors")))


def test_an_injected_model_still_deep_copies_and_saves_its_copy(tmp_path, tokens):
    import copy

    model = injected("llama")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        next(iter(ml.adapter_parameters(twin).values())).add_(1.0)
    twin.save_pretrained(tmp_path)  # the copy's own weights, not the original's
    saved = load_file(str(tmp_path / "model.safetensors"))
    key = next(iter(ml.adapter_parameters(twin)))
    assert torch.equal(saved[key], ml.adapter_parameters(twin)[key])


@pytest.mark.parametrize("merged", [False, True])
def test_sharded_save_loads_too(tmp_path, tokens, merged):
    model = injected("llama")
    if merged:
        ml.merge(model)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    reloaded, report = plain_load(tmp_path)
    assert not missing(report), report
    expected = logits(model, tokens) if merged else logits(make_tiny("llama"), tokens)
    torch.testing.assert_close(logits(reloaded, tokens), expected, rtol=0, atol=0)
