"""Serving-ready PEFT export: lossless zero-padding of the rank and vLLM constraint warnings."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import make_tiny, randomize_adapters

import multilora as ml
from multilora.export import (
    add_export_serving_arguments,
    check_vllm,
    export_serving,
    run_export_peft_cli,
    serving_rank,
)

peft = pytest.importorskip("peft")


def peft_logits(family, folder, tokens):
    model = peft.PeftModel.from_pretrained(make_tiny(family), str(folder)).eval()
    with torch.no_grad():
        return model(tokens).logits


def adapted(family="llama", n=3, r=4, targets="all-linear"):
    model = make_tiny(family)
    ml.inject(model, ml.MultiLoRAConfig(n=n, r=r, alpha=8, targets=targets))
    randomize_adapters(model)
    return model


def read_config(folder):
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize("pad_to", [12, 20])
def test_padded_export_keeps_logits(tmp_path, family, tokens, pad_to):
    model = adapted(family)
    with torch.no_grad():
        ours = model(tokens).logits
    ml.save_adapter(model, tmp_path / "ad")
    ml.export_peft(tmp_path / "ad", tmp_path / "peft", pad_to=pad_to)
    cfg = read_config(tmp_path / "peft")
    assert cfg["r"] == pad_to and cfg["lora_alpha"] == pad_to
    theirs = peft_logits(family, tmp_path / "peft", tokens)
    assert (theirs - ours).abs().max() <= 1e-5 * ours.abs().max()


def test_vllm_export_pads_to_the_next_supported_rank(tmp_path, tokens):
    model = adapted("llama")  # n r = 12 -> 16
    with torch.no_grad():
        ours = model(tokens).logits
    out, found = export_serving(model, tmp_path / "peft", server="vllm")
    assert read_config(out)["r"] == 16 and found == []
    from safetensors.torch import load_file

    t = load_file(out / "adapter_model.safetensors")
    a = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (16, 64) and b.shape == (64, 16)
    assert not a[12:].any() and not b[:, 12:].any()  # the padding is zeros
    theirs = peft_logits("llama", out, tokens)
    assert (theirs - ours).abs().max() <= 1e-5 * ours.abs().max()


def test_pad_below_rank_is_refused(tmp_path):
    model = adapted("llama")
    with pytest.raises(ml.MultiLoRAError, match=r"pad_to = 8 is smaller than .*n\*r = 12"):
        ml.export_peft(model, tmp_path / "peft", pad_to=8)
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ml.MultiLoRAError, match="server"):
        ml.export_peft(model, tmp_path / "peft", server="tgi")


def test_vllm_warns_about_rank_too_large_and_gpt2_layers(tmp_path):
    model = adapted("gpt2", n=1, r=520, targets=["c_attn"])
    with pytest.warns(UserWarning) as caught:
        ml.export_peft(model, tmp_path / "peft", server="vllm")
    assert any("exceeds vLLM's largest LoRA rank" in str(w.message) for w in caught)
    assert read_config(tmp_path / "peft")["r"] == 520  # not padded, not truncated
    with pytest.warns(UserWarning):
        _, found = export_serving(model, tmp_path / "peft2")
    assert any("fan_in_fan_out" in w for w in found)
    assert serving_rank(300) == 320 and serving_rank(8) == 8


def test_check_vllm_rule():
    cfg = {"r": 16, "bias": "all", "use_dora": False, "modules_to_save": ["score"], "fan_in_fan_out": False}
    keys = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.model.layers.0.router.lora_A.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A"]
    found = check_vllm(cfg, keys)
    text = "\n".join(found)
    assert "bias" in text and "modules_to_save" in text
    assert "'lm_head' is an embedding or output head" in text
    assert "router' is not an attention/MLP projection" in text and "embed_tokens" in text
    assert "q_proj" not in text
    assert check_vllm({"r": 16, "bias": "none"}, keys[:1]) == []


def test_cli_helpers(tmp_path, capsys):
    model = adapted("llama")
    ml.save_adapter(model, tmp_path / "ad")
    p = argparse.ArgumentParser()
    p.add_argument("adapter")
    p.add_argument("--out")
    p.add_argument("--model", default=None)
    add_export_serving_arguments(p)
    run_export_peft_cli(p.parse_args([str(tmp_path / "ad"), "--out", str(tmp_path / "peft"), "--server", "vllm"]))
    assert "rank 16" in capsys.readouterr().out
    run_export_peft_cli(p.parse_args([str(tmp_path / "ad"), "--out", str(tmp_path / "p2"), "--pad-to", "24",
                                      "--server", "vllm"]))
    err = capsys.readouterr().err
    assert "warning: vllm: r = 24 is not a rank vLLM accepts" in err
