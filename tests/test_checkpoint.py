"""Adapter folders: bit-exact round trip, atomic writes, and every refusal with its message."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import multilora as ml
from conftest import make_tiny, randomize_adapters
from multilora.checkpoint import sha256_file


def saved(tmp_path, family="llama", config=None):
    model = make_tiny(family)
    ml.inject(model, config or ml.MultiLoRAConfig(n=3, r=4, targets="all-linear"))
    randomize_adapters(model)
    ml.save_adapter(model, tmp_path / "ad")
    return model, tmp_path / "ad"


def rewrite_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("scale", ["vector", "scalar", "none"])
def test_round_trip_is_bit_exact(tmp_path, family, tokens, scale):
    config = ml.MultiLoRAConfig.lora(r=4, targets="all-linear") if scale == "none" else \
        ml.MultiLoRAConfig(n=3, r=4, scale=scale, targets="all-linear")
    model, folder = saved(tmp_path, family, config)
    fresh = ml.load_adapter(make_tiny(family), folder)
    ours, theirs = ml.adapter_parameters(model), ml.adapter_parameters(fresh)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, fresh(tokens).logits)


def test_files_hold_adapter_tensors_only_and_describe_themselves(tmp_path):
    model, folder = saved(tmp_path)
    tensors = load_file(folder / "adapter.safetensors")
    assert set(tensors) == set(ml.adapter_parameters(model))
    assert all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_s") for k in tensors)
    assert tensors["model.layers.0.self_attn.q_proj.lora_A"].shape == (3, 4, 64)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["method"] == "multilora"
    assert (cfg["n"], cfg["r"], cfg["alpha"], cfg["init"], cfg["scale"]) == (3, 4, 16.0, "multilora", "vector")
    assert cfg["base_model"]["model_type"] == "llama" and cfg["base_model"]["hidden_size"] == 64
    assert len(cfg["modules"]) == 14 and cfg["weights_sha256"] == sha256_file(folder / "adapter.safetensors")
    assert not list(folder.glob(".*tmp"))  # no temporary files left behind


def test_saving_a_merged_adapter_is_refused(tmp_path):
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig())
    ml.merge(model)
    with pytest.raises(ml.MultiLoRAError, match="unmerge"):
        ml.save_adapter(model, tmp_path / "x")


def test_refuses_adapter_for_another_base_model(tmp_path):
    _, folder = saved(tmp_path, "llama")
    with pytest.raises(ml.MultiLoRAError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' is not a linear layer of this GPT2LMHeadModel"):
        ml.load_adapter(make_tiny("gpt2"), folder)
    wider = make_tiny("llama")
    wider.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 96, bias=False)  # another width
    with pytest.raises(ml.MultiLoRAError, match=r"'model\.layers\.0\.self_attn\.q_proj\.lora_B' has shape \(3, 64, 4\) .* needs \(3, 96, 4\)"):
        ml.load_adapter(wider, folder)
    assert not ml.adapter_modules(wider), "a refused load must not leave the model half-injected"


def test_refuses_missing_and_extra_tensors(tmp_path):
    _, folder = saved(tmp_path)
    path = folder / "adapter.safetensors"
    tensors = load_file(path)
    tensors.pop("model.layers.1.mlp.down_proj.lora_s")
    tensors["model.layers.9.mlp.up_proj.lora_A"] = torch.zeros(1)
    save_file(tensors, path)
    rewrite_config(folder, weights_sha256=sha256_file(path))
    with pytest.raises(ml.MultiLoRAError, match=r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.lora_s'.*unexpected tensor 'model\.layers\.9\.mlp\.up_proj\.lora_A'"):
        ml.load_adapter(make_tiny("llama"), folder)


@pytest.mark.parametrize("damage", ["truncate", "empty", "bitflip"])
def test_refuses_corrupt_tensor_file(tmp_path, damage):
    _, folder = saved(tmp_path)
    path = folder / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    else:
        data[len(data) - 10] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ml.MultiLoRAError, match=r"adapter\.safetensors does not match the checksum .* truncated, corrupt"):
        ml.load_adapter(make_tiny("llama"), folder)


def test_refuses_bad_configs(tmp_path):
    _, folder = saved(tmp_path)
    good = (folder / "adapter_config.json").read_text()
    cases = [
        ({"format_version": 7}, r"format_version 7; this multilora .* reads version 1"),
        ({"n": "three"}, r"'n' has the wrong type \('three'\)"),
        ({"format": "something"}, "is not a multilora adapter config"),
        ({"n": 2}, r"lora_A' has shape \(3, 4, 64\) .* needs \(2, 4, 64\)"),
        ({"init": "xavier"}, "init must be one of multilora, lora"),
    ]
    for change, message in cases:
        (folder / "adapter_config.json").write_text(good)
        rewrite_config(folder, **change)
        with pytest.raises(ml.MultiLoRAError, match=message):
            ml.load_adapter(make_tiny("llama"), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ml.MultiLoRAError, match="is not valid JSON"):
        ml.load_adapter(make_tiny("llama"), folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(ml.MultiLoRAError, match="adapter_config.json is missing"):
        ml.load_adapter(make_tiny("llama"), folder)


def test_refuses_non_finite_tensors(tmp_path):
    _, folder = saved(tmp_path)
    path = folder / "adapter.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.lora_B"][0, 0, 0] = float("nan")
    save_file(tensors, path)
    rewrite_config(folder, weights_sha256=sha256_file(path))
    with pytest.raises(ml.MultiLoRAError, match="holds NaN or inf"):
        ml.load_adapter(make_tiny("llama"), folder)


def test_resaving_replaces_files_atomically(tmp_path, monkeypatch):
    model, folder = saved(tmp_path)
    before = (folder / "adapter.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("multilora.checkpoint.save_file", explode)
    with pytest.raises(OSError, match="No space left"):
        ml.save_adapter(model, folder)
    assert (folder / "adapter.safetensors").read_bytes() == before  # the old adapter survives
    assert not list(folder.glob(".*tmp"))
    ml.load_adapter(make_tiny("llama"), folder)  # and still loads


def test_scale_init_survives_a_load_save_round_trip(tmp_path):
    """Regression: config_from_meta dropped scale_init, so a loaded adapter re-saved as `scale_init: null`."""
    _, folder = saved(tmp_path, config=ml.MultiLoRAConfig(n=2, r=4, scale_init=0.5, targets=["q_proj"]))
    assert json.loads((folder / "adapter_config.json").read_text())["scale_init"] == 0.5
    model = ml.load_adapter(make_tiny("llama"), folder)
    assert model.multilora_config.scale_init == 0.5
    ml.save_adapter(model, tmp_path / "again")
    first = json.loads((folder / "adapter_config.json").read_text())
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["scale_init"] == 0.5
    assert {k: v for k, v in again.items() if k != "weights_sha256"} == \
        {k: v for k, v in first.items() if k != "weights_sha256"}  # the round trip changes no metadata
