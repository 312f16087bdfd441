"""PEFT import: a PEFT LoRA adapter becomes an n = 1 multilora adapter with the same logits, and back."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from conftest import make_tiny
from safetensors.torch import load_file, save_file

import multilora as ml
from multilora.checkpoint import read_adapter
from multilora.peft_import import add_import_peft_arguments, import_peft, run_import_peft_cli

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def make_peft_adapter(folder, family="llama", r=4, lora_alpha=8, use_rslora=False, seed=3):
    """Save a PEFT LoRA adapter with random non-zero factors; return PeftModel's logits function."""
    cfg = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=TARGETS[family], lora_dropout=0.0,
                          use_rslora=use_rslora, fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM")
    model = peft.get_peft_model(make_tiny(family), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(str(folder))
    return model.eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def close(a, b):
    return (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("family, use_rslora", [("llama", False), ("gpt2", False), ("llama", True)])
def test_import_then_export_round_trip_keeps_logits(tmp_path, family, tokens, use_rslora):
    peft_model = make_peft_adapter(tmp_path / "peft", family, use_rslora=use_rslora)
    theirs = logits(peft_model, tokens)
    assert (theirs - logits(make_tiny(family), tokens)).abs().max() > 1e-2, "the adapter must change the logits"

    import_peft(tmp_path / "peft", tmp_path / "ours")
    meta, tensors = read_adapter(tmp_path / "ours")
    assert (meta["n"], meta["r"], meta["init"], meta["scale"], meta["method"]) == (1, 4, "lora", "none", "lora")
    assert meta["fan_in_fan_out"] is (family == "gpt2")
    assert meta["alpha"] / meta["r"] == pytest.approx(8 / 4 ** 0.5 if use_rslora else 8 / 4)
    path = next(iter(meta["modules"]))
    assert tensors[f"{path}.lora_A"].shape[:2] == (1, 4) and tensors[f"{path}.lora_B"].shape[::2] == (1, 4)

    ours_model = ml.load_adapter(make_tiny(family), tmp_path / "ours")
    ours = logits(ours_model, tokens)
    assert close(ours, theirs)

    ml.export_peft(tmp_path / "ours", tmp_path / "back")
    back = logits(peft.PeftModel.from_pretrained(make_tiny(family), str(tmp_path / "back")).eval(), tokens)
    assert close(back, theirs)


def test_imported_adapter_for_another_base_model_is_refused_at_load(tmp_path):
    make_peft_adapter(tmp_path / "peft", "llama")
    import_peft(tmp_path / "peft", tmp_path / "ours")
    with pytest.raises(ml.MultiLoRAError, match="another base model"):
        ml.load_adapter(make_tiny("gpt2"), tmp_path / "ours")


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    make_peft_adapter(folder, "llama")
    return folder


def edited(peft_dir, tmp_path, **changes):
    """A copy of the PEFT adapter with adapter_config.json fields changed."""
    d = tmp_path / "edited"
    shutil.copytree(peft_dir, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("changes, field", [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"r": 8}, "inconsistent with r = 8"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"v_proj": 32}}, "alpha_pattern"),
])
def test_non_lora_or_inconsistent_adapters_are_refused(peft_dir, tmp_path, changes, field):
    with pytest.raises(ml.MultiLoRAError, match=field):
        import_peft(edited(peft_dir, tmp_path, **changes), tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_uniform_patterns_are_accepted(peft_dir, tmp_path):
    import_peft(edited(peft_dir, tmp_path, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 8}), tmp_path / "ours")
    assert read_adapter(tmp_path / "ours")[0]["alpha"] == 8


def test_missing_tensor_and_bin_only_are_refused(peft_dir, tmp_path):
    d = edited(peft_dir, tmp_path)
    t = load_file(d / "adapter_model.safetensors")
    key = next(k for k in t if k.endswith("lora_B.weight"))
    del t[key]
    save_file(t, d / "adapter_model.safetensors")
    with pytest.raises(ml.MultiLoRAError, match="missing"):
        import_peft(d, tmp_path / "ours")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(ml.MultiLoRAError, match="adapter_model.bin"):
        import_peft(d, tmp_path / "ours")


def test_cli_helpers(peft_dir, tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_import_peft_arguments(p)
    run_import_peft_cli(p.parse_args([str(peft_dir), "--out", str(tmp_path / "ours"), "--model", "tiny-llama"]))
    assert "wrote multilora adapter" in capsys.readouterr().out
    meta, _ = read_adapter(tmp_path / "ours")
    assert meta["base_model"]["name_or_path"] == "tiny-llama"


def test_writing_into_the_source_folder_is_refused(peft_dir, tmp_path):
    d = edited(peft_dir, tmp_path)
    with pytest.raises(ml.MultiLoRAError, match="input folder"):
        import_peft(d, d)
    import_peft(d, tmp_path / "ours")
    with pytest.raises(ml.MultiLoRAError, match="input folder"):
        ml.export_peft(tmp_path / "ours", tmp_path / "ours")
    read_adapter(tmp_path / "ours")  # untouched
