"""Quantized bases (QLoRA): MultiLoRA over bitsandbytes nf4 / fp4 / int8 layers on a tiny Llama, on CPU.

References are computed independently: bitsandbytes' own dequantization of each base weight plus dW
from a loop over the n modules (dW = alpha / r * sum_i diag(s_i) B_i A_i, docs/method.md §2), in a plain
float32 model. Tolerances (float32 compute): nf4 / fp4 logits within 1e-5 of that reference (measured:
3.6e-7); int8 (LLM.int8() also quantizes the activations, via float16) within 0.02 (measured: 0.006; the
adapter itself moves the logits by 0.29), and its adapter path alone within 1e-5.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import multilora as ml
from multilora.cli import main
from multilora.errors import MultiLoRAError
from multilora.models import load_model
from multilora.quant import QuantConfig, quantized_kind

bnb = pytest.importorskip("bitsandbytes")

TOKENS = torch.tensor([[1, 5, 9, 200, 31, 7, 4000, 12], [1, 88, 3, 17, 5, 900, 6, 2]])
QUANTS = ["nf4", "fp4", "int8"]


def quantized(tiny_dir, quantization: str, targets="all-linear", n: int = 2, r: int = 4, seed: int = 0):
    """The tiny model on a quantized base (float32 compute) with a MultiLoRA adapter of random values."""
    model, _ = load_model(tiny_dir, quantization=quantization, compute_dtype="float32")
    torch.manual_seed(seed)
    ml.inject(model, ml.MultiLoRAConfig(n=n, r=r, alpha=8, targets=targets))
    return randomize(model, seed + 1)


def randomize(model, seed: int):
    """Every adapter tensor random (as after training: B != 0, s != 0), so every gradient is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ml.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def bnb_dequantized(layer) -> torch.Tensor:
    """bitsandbytes' own dequantization of a Linear4bit / Linear8bitLt weight (d_out, d_in), float32."""
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    scb = layer.state.SCB if layer.state.SCB is not None else w.SCB
    return w.data.float() * scb.float()[:, None] / 127.0  # LLM.int8(): row-wise absmax scaling


def loop_delta(m) -> torch.Tensor:
    """dW of one MultiLoRA layer, module by module (docs/method.md §2), float64."""
    dw = torch.zeros(m.d_out, m.d_in, dtype=torch.float64)
    for i in range(m.n):
        s = m.lora_s[i].double() if m.lora_s is not None else torch.ones((), dtype=torch.float64)
        s = s[:, None] if s.dim() == 1 else s
        dw += s * (m.lora_B[i].double() @ m.lora_A[i].double())
    return dw * (m.alpha / m.r)


def reference(tiny_dir, qmodel, with_adapter: bool = True):
    """A plain float32 model whose linear weights are the quantized model's, dequantized (+ dW)."""
    plain, _ = load_model(tiny_dir)
    wrapped = {id(m.base) for m in ml.adapter_modules(qmodel).values()}
    with torch.no_grad():
        for name, module in qmodel.named_modules():
            if isinstance(module, ml.MultiLoRALinear):
                w = bnb_dequantized(module.base).double() + (loop_delta(module) if with_adapter else 0)
            elif quantized_kind(module) and id(module) not in wrapped:
                w = bnb_dequantized(module).double()
            else:
                continue
            plain.get_submodule(name).weight.copy_(w.float())
    return plain


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.mark.parametrize("quantization", QUANTS)
def test_logits_equal_dequantized_base_plus_dw(tiny_dir, quantization):
    model = quantized(tiny_dir, quantization)
    layer = model.model.layers[0].self_attn.q_proj
    assert quantized_kind(layer.base) == ("8bit" if quantization == "int8" else "4bit")
    assert all(p.dtype == torch.float32 for p in ml.adapter_parameters(model).values())
    assert (layer.d_in, layer.d_out) == (64, 64) and tuple(layer.lora_A.shape) == (2, 4, 64)
    ours, ref = logits(model), logits(reference(tiny_dir, model))
    base_only = logits(reference(tiny_dir, model, with_adapter=False))
    assert (ref - base_only).abs().max() > 0.05  # the adapter changes the logits: the check below has teeth
    if quantization == "int8":
        assert (ours - ref).abs().max() < 0.02
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():  # the adapter's own path, exactly: layer(x) - base(x) = x dW^T
            torch.testing.assert_close(layer(x) - layer.base(x), (x.double() @ loop_delta(layer).T).float(),
                                       rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_training_steps_lower_the_loss_and_change_only_adapters(tiny_dir, quantization):
    model, _ = load_model(tiny_dir, quantization=quantization, compute_dtype="float32")
    ml.quant.prepare_kbit_training(model)
    torch.manual_seed(0)
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets="all-linear"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    raw = {n: m.base.weight.data.clone() for n, m in ml.adapter_modules(model).items()}  # as held in memory
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{k}" for k in ml.adapter_parameters(model)}
    losses = []
    for _ in range(8):
        loss = model(TOKENS, labels=TOKENS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        train_mode = model(TOKENS).logits
    model.eval()
    if quantization == "nf4":  # eval computes with the same base (LLM.int8() has its own train/eval paths)
        torch.testing.assert_close(logits(model), train_mode, rtol=0, atol=0)
    assert all(torch.equal(m.base.weight.data, raw[n]) for n, m in ml.adapter_modules(model).items())
    after = model.state_dict()
    assert losses[-1] < losses[0] - 0.1, losses
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every adapter tensor moved; the base (quantized bytes, scales) is bit-identical
    assert any(".base.weight" in k and before[k].dtype in (torch.uint8, torch.int8) for k in before)


def test_quantization_is_recorded_and_rebuilt_by_load_and_eval(tiny_dir, tmp_path):
    from multilora.targets import resolve_target

    model = quantized(tiny_dir, "nf4")
    expected = logits(model)
    ml.save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["base_model"]["quantization"] == {"quantization": "nf4", "compute_dtype": "float32",
                                                  "double_quant": True}
    assert meta["dtype"] == "float32"
    again, _, ident = resolve_target(str(tmp_path / "ad"))
    assert quantized_kind(again.model.layers[1].mlp.down_proj.base) == "4bit"
    assert ident["quantization"]["quantization"] == "nf4"
    torch.testing.assert_close(logits(again), expected, rtol=0, atol=0)


def test_load_adapter_warns_on_a_base_quantized_otherwise_than_it_was_trained_on(tiny_dir, tmp_path):
    import warnings

    ml.save_adapter(quantized(tiny_dir, "nf4"), tmp_path / "nf4")
    ml.save_adapter(quantized(tiny_dir, "none"), tmp_path / "float")
    with pytest.warns(UserWarning, match=r"trained on a base quantized as 'nf4', but this model's is 'none'.*"
                      r"load_model\(\.\.\., quantization='nf4'\)"):
        ml.load_adapter(load_model(tiny_dir)[0], tmp_path / "nf4")
    with pytest.warns(UserWarning, match=r"quantized as 'none', but this model's is 'int8'.*without quantization"):
        ml.load_adapter(load_model(tiny_dir, quantization="int8", compute_dtype="float32")[0], tmp_path / "float")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same quantization loads silently
        ml.load_adapter(load_model(tiny_dir, quantization="nf4", compute_dtype="float32")[0], tmp_path / "nf4")
        ml.load_adapter(load_model(tiny_dir)[0], tmp_path / "float")


def test_merged_export_equals_the_adapter_on_the_dequantized_base(tiny_dir, tmp_path):
    model = quantized(tiny_dir, "nf4")
    ml.save_adapter(model, tmp_path / "ad")
    ref = logits(reference(tiny_dir, model))
    with pytest.raises(MultiLoRAError, match="multilora export .*--format merged") as e:
        ml.merge(model)
    assert "\n" not in str(e.value)
    assert main(["export", str(tmp_path / "ad"), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_model(tmp_path / "merged")
    assert not any(quantized_kind(m) for m in merged.modules())
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    torch.testing.assert_close(logits(merged), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_peft_export_loads_on_the_same_quantized_base(tiny_dir, tmp_path, quantization):
    peft = pytest.importorskip("peft")
    model = quantized(tiny_dir, quantization, targets=["q_proj", "v_proj", "down_proj"])
    expected = logits(model)
    ml.export_peft(model, tmp_path / "peft")
    base, _ = load_model(tiny_dir, quantization=quantization, compute_dtype="float32")
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith("peft.tuners.lora.bnb")
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- gradient checkpointing


def grads(model, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Gradients of every trainable tensor for one loss on TOKENS, with or without checkpointing."""
    if checkpointing:
        ml.models.enable_gradient_checkpointing(model)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    model(TOKENS, labels=TOKENS).loss.backward()
    assert len(calls) == (2 if checkpointing else 1)  # checkpointing recomputes attention in backward
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "multilora", "full", "multilora-nf4"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, method):
    def build():
        if method == "multilora-nf4":
            return quantized(tiny_dir, "nf4")
        model, _ = load_model(tiny_dir)
        torch.manual_seed(0)
        if method == "full":
            model.requires_grad_(True)
            return model
        config = ml.MultiLoRAConfig.lora(r=4, targets="all-linear") if method == "lora" else \
            ml.MultiLoRAConfig(n=2, r=4, targets="all-linear")
        ml.inject(model, config)
        return randomize(model, 1)

    plain, checkpointed = grads(build(), False), grads(build(), True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 1
    assert all(g.abs().sum() > 0 for g in plain.values())
    for k in plain:  # recomputation replays the same float32 ops (measured: bit-equal on CPU)
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)


# ----------------------------------------------------------------------------- the trainer


def overrides(tiny_dir, out, **extra) -> list[str]:
    args = {"model": str(tiny_dir), "method": "multilora", "output_dir": str(out), "data.tasks": "[rte]",
            "data.max_len": 48, "data.eval_examples": 4, "adapter.targets": "all-linear", "adapter.n": 2,
            "adapter.r": 4, "optim.lr": 1e-2, "train.max_steps": 3, "train.batch_size": 2, "train.save_every": 0,
            "train.cpu": "true", **extra}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def test_train_on_nf4_with_checkpointing_then_eval_and_export(tiny_dir, tmp_path):
    from multilora.config import load_config
    from multilora.train import train

    seen = {}
    config = load_config(None, overrides(tiny_dir, tmp_path / "run", **{
        "model.quantization": "nf4", "model.compute_dtype": "float32", "train.gradient_checkpointing": "true"}))

    def on_step(step, model, record):
        if step == 1:
            seen["checkpointing"] = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        seen["model"] = model

    run = train(config, progress=False, on_step=on_step)
    model = seen["model"]
    assert seen["checkpointing"] and quantized_kind(model.model.layers[0].self_attn.q_proj.base) == "4bit"
    fresh, _ = load_model(tiny_dir, quantization="nf4", compute_dtype="float32")
    trained = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert trained.keys() == fresh.state_dict().keys()
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())  # base bit-identical
    saved = (run / "config.yaml").read_text()
    assert "quantization: nf4" in saved and load_config(run / "config.yaml").quant.quantization == "nf4"
    meta = json.loads((run / "adapter_config.json").read_text())
    assert meta["base_model"]["quantization"]["quantization"] == "nf4" and meta["dtype"] == "float32"
    assert main(["eval", str(run), "--tasks", "rte", "--limit", "2", "--out", str(tmp_path / "eval.json")]) == 0
    ident = json.loads((tmp_path / "eval.json").read_text())["identity"]
    assert ident["quantization"]["quantization"] == "nf4"


def test_bf16_on_cpu_tracks_float32_and_saves_float32_adapters(tiny_dir, tmp_path):
    from multilora.config import load_config
    from multilora.run import read_metrics
    from multilora.train import train
    from safetensors.torch import load_file

    from accelerate.state import AcceleratorState

    runs = {}
    for mp in ("no", "bf16"):  # one process, two precisions: train() renews accelerate's per-process state
        runs[mp] = train(load_config(None, overrides(tiny_dir, tmp_path / mp, **{
            "train.max_steps": 20, "train.mixed_precision": mp, "data.eval_examples": 0})), progress=False)
    AcceleratorState._reset_state()  # later tests get a fresh (float32) state
    loss = {mp: [r["loss"] for r in read_metrics(run) if "loss" in r] for mp, run in runs.items()}
    assert len(loss["bf16"]) == 20 and loss["bf16"] != loss["no"]  # bf16 really computed differently
    last = {mp: sum(v[-5:]) / 5 for mp, v in loss.items()}
    # measured: last-5 means 10.3498 (float32) vs 10.3506 (bf16), every step within 0.004; learning moves 0.5
    assert abs(last["bf16"] - last["no"]) < 0.02, last
    assert max(abs(a - b) for a, b in zip(loss["bf16"], loss["no"])) < 0.05
    assert last["bf16"] < loss["bf16"][0] - 0.2
    meta = json.loads((runs["bf16"] / "adapter_config.json").read_text())
    tensors = load_file(str(runs["bf16"] / "adapter.safetensors"))
    assert meta["dtype"] == "float32" and {t.dtype for t in tensors.values()} == {torch.float32}


# ----------------------------------------------------------------------------- bad input


def train_argv(tiny_dir, tmp_path, **extra) -> list[str]:
    """`multilora train CONFIG --key value ...` of a small run."""
    (tmp_path / "c.yaml").write_text("method: multilora\n")
    return ["train", str(tmp_path / "c.yaml"), *overrides(tiny_dir, tmp_path / "r", **extra)]


def cli_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input is refused before any model weights load."""
    import multilora.plan

    def refuse(*_, **__):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(multilora.plan, "load_model", refuse)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_store_frozen_in_leaves_quantized_layers_alone(tiny_dir, quantization):
    from multilora.models import store_frozen_in

    model = quantized(tiny_dir, quantization)
    before = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    assert store_frozen_in(model, torch.bfloat16) == 0  # every frozen projection is a bitsandbytes layer
    assert {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()} == before


def test_quantization_without_bitsandbytes_names_the_install(tiny_dir, tmp_path, capsys, monkeypatch,
                                                             no_model_load):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now fails, find_spec is None
    err = cli_error(train_argv(tiny_dir, tmp_path, **{"model.quantization": "nf4"}), capsys)
    assert "bitsandbytes" in err and "pip install 'multilora[qlora]'" in err
    with pytest.raises(MultiLoRAError, match=r"pip install 'multilora\[qlora\]'"):
        load_model(tiny_dir, quantization="int8")


def test_bad_quantization_settings_exit_2(tiny_dir, tmp_path, capsys, no_model_load):
    err = cli_error(train_argv(tiny_dir, tmp_path, **{"model.quantization": "nf4",
                                                                       "method": "full"}), capsys)
    assert "cannot be trained with method full" in err
    err = cli_error(train_argv(tiny_dir, tmp_path, **{"model.quantization": "nf5"}), capsys)
    assert "model.quantization = 'nf5' is not valid (did you mean 'nf4'?)" in err
    err = cli_error(train_argv(tiny_dir, tmp_path, **{"model.quantisation": "nf4"}), capsys)
    assert "did you mean 'model.quantization'?" in err


def test_model_without_gradient_checkpointing_is_refused(tiny_dir, tmp_path, capsys, monkeypatch, no_model_load):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    err = cli_error(train_argv(tiny_dir, tmp_path, **{"train.gradient_checkpointing": "true"}),
                    capsys)
    assert "does not support gradient checkpointing" in err and "train.gradient_checkpointing false" in err


def test_non_float_linear_is_refused_before_the_model_changes():
    class IntLinear(torch.nn.Linear):
        def __init__(self):
            super().__init__(4, 4)
            self.weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)

    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(4, 4))
    model.add_module("v_proj", IntLinear())
    with pytest.raises(MultiLoRAError, match="cannot adapt IntLinear: its weight is torch.int8"):
        ml.inject(model, ml.MultiLoRAConfig(n=2, r=2))
    assert not ml.adapter_modules(model) and model.q_proj.weight.requires_grad  # nothing was touched


def test_quant_config_record_round_trip_and_bad_record(tmp_path):
    q = QuantConfig("fp4", "float16", False)
    assert QuantConfig.from_record(q.record(), "x") == q and QuantConfig.from_record(None, "x") == QuantConfig()
    with pytest.raises(MultiLoRAError, match="base_model.quantization.quantization = 'nf3' must be one of"):
        QuantConfig.from_record({"quantization": "nf3"}, "x")


def test_qlora_recipe_reads_as_documented(tiny_dir):
    from pathlib import Path

    from multilora.config import load_config

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "llama2-7b-qlora.yaml"
    c = load_config(recipe, ["--model", str(tiny_dir)])  # --model replaces the mapping's name only
    assert c.model == str(tiny_dir) and c.quant == QuantConfig("nf4", "bfloat16", True)
    assert c.train.gradient_checkpointing and c.train.mixed_precision == "bf16" and c.method == "multilora"


def test_both_model_forms_in_config_yaml_diff_and_base_model(tiny_dir, tmp_path):
    from multilora.config import TrainConfig, flatten, load_config
    from multilora.run import Run

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (old / "config.yaml").write_text(f"model: {tiny_dir}\nmethod: multilora\n")  # the string form (older runs)
    plain = load_config(old / "config.yaml")
    nf4 = load_config(old / "config.yaml", ["--model.quantization", "nf4"])
    assert Run(old).base_model() == str(tiny_dir) and plain.quant == QuantConfig()
    assert Run(old).config_diff(plain) == [] and Run(old).config_diff(nf4) == ["model.quantization"]
    assert TrainConfig(model=str(tiny_dir)).to_yaml().startswith(f"model: {tiny_dir}\n")  # unquantized: a string
    new.mkdir()
    Run(new).write_config(nf4)
    assert "quantization: nf4" in (new / "config.yaml").read_text() and Run(new).base_model() == str(tiny_dir)
    assert Run(new).config_diff(nf4) == [] and Run(new).config_diff(plain) == ["model.quantization"]
    assert load_config(new / "config.yaml") == nf4
    assert flatten({"model": {"name": "x", "quantization": "int8"}}) == {"model": "x", "model.quantization": "int8"}
    assert load_config(None, ["--model.name", str(tiny_dir)]).model == str(tiny_dir)
