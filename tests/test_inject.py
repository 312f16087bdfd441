"""Injection by name patterns, freezing, parameter counts, merge/unload on whole models."""

from __future__ import annotations

import pytest
import torch

import multilora as ml
from conftest import make_tiny, randomize_adapters


def test_suffix_targets_adapt_exactly_those_modules_and_freeze_the_rest():
    model = make_tiny("llama")
    summary = ml.inject(model, ml.MultiLoRAConfig(n=3, r=4, targets=["q_proj", "v_proj"]))
    assert summary.modules == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in summary.modules for p in ("lora_A", "lora_B", "lora_s")}
    # n r (d_in + d_out) + n d_out per layer; q: 64 -> 64, v: 64 -> 32 (2 kv heads of 16)
    per = lambda d_in, d_out: 3 * 4 * (d_in + d_out) + 3 * d_out  # noqa: E731
    assert summary.trainable == 2 * (per(64, 64) + per(64, 32))
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert summary.share == pytest.approx(summary.trainable / summary.total)


def test_regex_and_all_linear_targets():
    model = make_tiny("llama")
    s = ml.inject(model, ml.MultiLoRAConfig(targets=r"model\.layers\.1\.mlp\.(up|down)_proj"))
    assert s.modules == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    model = make_tiny("llama")
    s = ml.inject(model, ml.MultiLoRAConfig(targets="all-linear"))
    assert len(s.modules) == 2 * 7 and "lm_head" not in s.modules


def test_gpt2_conv1d_modules_are_adapted():
    model = make_tiny("gpt2")
    s = ml.inject(model, ml.MultiLoRAConfig(targets=["c_attn"]))
    assert s.modules == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert layer.is_conv1d and (layer.d_in, layer.d_out) == (64, 192)


def test_pattern_matching_nothing_lists_the_linear_layers():
    with pytest.raises(ml.MultiLoRAError, match=r"match no linear layer.*c_attn \(2\), c_fc \(2\), c_proj \(4\)"):
        ml.inject(make_tiny("gpt2"), ml.MultiLoRAConfig(targets=["q_proj"]))
    with pytest.raises(ml.MultiLoRAError, match="not a valid regular expression"):
        ml.inject(make_tiny("gpt2"), ml.MultiLoRAConfig(targets="(unclosed"))


def test_injecting_twice_is_an_error():
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig())
    with pytest.raises(ml.MultiLoRAError, match="already has MultiLoRA adapters"):
        ml.inject(model, ml.MultiLoRAConfig(targets=["k_proj"]))


def test_output_unchanged_at_init_for_both_inits(family, tokens):
    for config in (ml.MultiLoRAConfig(targets="all-linear"), ml.MultiLoRAConfig.lora(r=4, targets="all-linear")):
        model = make_tiny(family)
        ref = model(tokens).logits
        ml.inject(model, config)
        torch.testing.assert_close(model(tokens).logits, ref, rtol=0, atol=0)


def test_merge_matches_unmerged_logits_and_unmerge_restores_base(family, tokens):
    model = make_tiny(family)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ml.inject(model, ml.MultiLoRAConfig(n=3, r=4, targets="all-linear"))
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(tokens).logits
        ml.merge(model)
        merged = model(tokens).logits
    scale = unmerged.abs().max()
    assert (merged - unmerged).abs().max() <= 1e-5 * scale
    ml.unmerge(model)
    for path, m in ml.adapter_modules(model).items():
        torch.testing.assert_close(m.base.weight, base_state[f"{path}.weight"], rtol=0, atol=1e-6)


def test_unload_leaves_a_plain_model_with_the_merged_weights(family, tokens):
    model = make_tiny(family)
    plain_types = {type(m) for m in model.modules()}
    ml.inject(model, ml.MultiLoRAConfig(targets="all-linear"))
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(tokens).logits
    ml.unload(model)
    assert not ml.adapter_modules(model)
    assert {type(m) for m in model.modules()} == plain_types
    assert not any("lora_" in k for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_injected_model_still_generates_and_saves_with_save_pretrained(tmp_path, tokens):
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig())
    randomize_adapters(model)
    out = model.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    model.save_pretrained(tmp_path / "injected")  # does not break on adapter modules
    with torch.no_grad():
        expected = model(tokens).logits
    ml.unload(model)  # merged, plain modules: a normal checkpoint any transformers user can load
    model.save_pretrained(tmp_path / "merged")
    reloaded = type(model).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_training_changes_only_adapter_parameters(tokens):
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4))
    trainable, _ = ml.count_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        key = k if k in after else k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(after[key], v), f"frozen {k} changed"
    assert trainable == sum(p.numel() for p in ml.adapter_parameters(model).values())
