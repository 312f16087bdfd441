"""PEFT export: the exported rank-(n r) LoRA reproduces our logits under peft.PeftModel."""

from __future__ import annotations

import json

import pytest
import torch

import multilora as ml
from conftest import make_tiny, randomize_adapters

peft = pytest.importorskip("peft")


def peft_logits(family, folder, tokens):
    model = peft.PeftModel.from_pretrained(make_tiny(family), str(folder)).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("scale", ["vector", "scalar"])
@pytest.mark.parametrize("source", ["model", "folder"])
def test_peft_export_reproduces_logits(tmp_path, family, tokens, scale, source):
    model = make_tiny(family)
    ml.inject(model, ml.MultiLoRAConfig(n=3, r=4, alpha=8, scale=scale, targets="all-linear"))
    randomize_adapters(model)
    with torch.no_grad():
        ours = model(tokens).logits
        base = make_tiny(family)(tokens).logits
    if source == "folder":
        ml.save_adapter(model, tmp_path / "ad")
        ml.export_peft(tmp_path / "ad", tmp_path / "peft")
    else:
        ml.export_peft(model, tmp_path / "peft")
    theirs = peft_logits(family, tmp_path / "peft", tokens)
    assert (ours - base).abs().max() > 1e-2, "the adapter must actually change the logits"
    assert (theirs - ours).abs().max() <= 1e-5 * ours.abs().max()


def test_exported_config_and_tensors_follow_the_spec(tmp_path):
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig(n=3, r=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    ml.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 12 and cfg["lora_alpha"] == 12
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["fan_in_fan_out"] is False
    from safetensors.torch import load_file

    t = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    layer = model.get_submodule("model.layers.0.self_attn.v_proj")
    a = t["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
    b = t["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert a.shape == (12, 64) and b.shape == (32, 12)
    # independent check: B_full A_full == alpha/r * sum_i diag(s_i) B_i A_i
    expected = sum((8 / 4) * layer.lora_s[i, :, None] * (layer.lora_B[i] @ layer.lora_A[i]) for i in range(3))
    torch.testing.assert_close(b @ a, expected.detach(), rtol=1e-5, atol=1e-6)


def test_partial_suffix_targets_export_as_exact_regex(tmp_path, tokens):
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets=r"model\.layers\.1\.self_attn\.q_proj"))
    randomize_adapters(model)
    ml.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str)  # 'q_proj' alone would also adapt layer 0
    with torch.no_grad():
        ours = model(tokens).logits
    theirs = peft_logits("llama", tmp_path / "peft", tokens)
    assert (theirs - ours).abs().max() <= 1e-5 * ours.abs().max()


def test_export_of_merged_model_is_refused(tmp_path):
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig())
    ml.merge(model)
    with pytest.raises(ml.MultiLoRAError, match="unmerge"):
        ml.export_peft(model, tmp_path / "peft")
