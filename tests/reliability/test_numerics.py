"""Numerics: a NaN or inf in a batch's loss or in a gradient stops training cleanly -- a MultiLoRAError
naming the step, the last good checkpoint intact and resumable, the adapter weights never updated with
non-finite values -- and merging refuses to write non-finite weights, leaving the base weights
bitwise unchanged (MultiLoRALinear.merge/unmerge, inject.merge/unload, `multilora export --format merged`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, randomize_adapters
from safetensors.torch import load_file, save_file

import multilora as ml
from multilora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, sha256_file
from multilora.cli import main
from multilora.config import load_config
from multilora.errors import MultiLoRAError
from multilora.run import checkpoint_dirs, read_metrics
from multilora.train import train

CAT = "non-finite numbers"
STEPS, BAD = 4, 3  # a 4-step run poisoned at step 3: step-1 and step-2 are the good checkpoints
ADAPTER_KEYS = ("lora_A", "lora_B", "lora_s")


def overrides(tiny_dir: Path, out: Path) -> list[str]:
    args = {"model": str(tiny_dir), "method": "multilora", "output_dir": str(out), "data.tasks": "[rte, wic]",
            "data.max_len": 48, "data.eval_examples": 0, "adapter.targets": "[q_proj, v_proj]", "adapter.r": 4,
            "optim.lr": 1e-2, "train.max_steps": STEPS, "train.batch_size": 2, "train.save_every": 1,
            "train.eval_every": 0, "train.keep_last": 5, "train.cpu": "true"}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}


# ----------------------------------------------------------------------------- poisons, armed at step BAD - 1


def logits_nan(model):
    """A forward hook: every logit NaN, so the loss is NaN."""
    def hook(module, args, out):
        out["logits"] = out.logits * float("nan")
        return out
    model.register_forward_hook(hook)


def logits_inf(model):
    """A forward hook: one vocabulary column +inf, so logsumexp (and the loss) is +inf or NaN."""
    def hook(module, args, out):
        logits = out.logits.clone()
        logits[..., 0] = float("inf")
        out["logits"] = logits
        return out
    model.register_forward_hook(hook)


def grad_of(value):
    def arm(model):
        p = dict(model.named_parameters())["model.layers.1.self_attn.v_proj.lora_B"]
        p.register_hook(lambda g: torch.full_like(g, value))
    return arm


POISONS = {  # name: (arm(model) at step BAD - 1, what the message says)
    "NaN loss (forward hook)": (logits_nan, "loss"),
    "+inf logit (forward hook)": (logits_inf, "loss"),
    "NaN gradient (tensor hook)": (grad_of(float("nan")), "gradient norm"),
    "+inf gradient (tensor hook)": (grad_of(float("inf")), "gradient norm"),
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_non_finite_loss_or_gradient_stops_training_cleanly(tiny_dir, tmp_path, poison, tally):
    arm, kind = POISONS[poison]
    run = tmp_path / "run"
    seen: dict = {}

    def on_step(step, model, record):
        assert all(math.isfinite(v) for v in (record["loss"], record["grad_norm"])), record
        seen["model"] = model
        if step == BAD - 1:
            seen["good"] = adapter_state(model)  # what step-(BAD-1) holds
            arm(model)

    with pytest.raises(MultiLoRAError) as e:
        train(load_config(None, overrides(tiny_dir, run)), on_step=on_step, progress=False)
    msg = str(e.value)
    assert f"non-finite {kind} at step {BAD} " in msg, msg
    assert f"last good checkpoint is {run / 'checkpoints' / f'step-{BAD - 1}'}" in msg, msg
    assert "--resume" in msg

    # the weights were not updated: the model still holds step BAD-1's finite weights
    now, good = adapter_state(seen["model"]), seen["good"]
    assert now.keys() == good.keys() and len(now) == 12
    for k in now:
        assert torch.isfinite(now[k]).all(), k
        assert torch.equal(now[k], good[k]), f"{k} changed in the poisoned step"
    # the last good checkpoint is intact and nothing after it was written
    assert [s for s, _ in checkpoint_dirs(run)] == list(range(1, BAD))
    ck = load_file(str(run / "checkpoints" / f"step-{BAD - 1}" / "model.safetensors"))
    assert ck.keys() == good.keys() and all(torch.equal(ck[k], good[k]) for k in ck)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, BAD))
    assert not (run / WEIGHTS_NAME).exists() and not list((run / "checkpoints").glob(".step-*"))
    tally(CAT, f"train: {poison.split(' (')[0]}")

    # ... and resumable: the hook-free rerun finishes with a finite, loadable adapter
    train(None, resume=run, progress=False)
    assert [s for s, _ in checkpoint_dirs(run)][-1] == STEPS
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, STEPS + 1))
    model = ml.load_adapter(make_tiny("llama"), run)
    assert all(torch.isfinite(p).all() for p in ml.adapter_parameters(model).values())
    tally(CAT, "train: resume after a non-finite stop")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_loss_of_one_task_via_the_cli(tiny_dir, tmp_path, monkeypatch, capsys, value, tally):
    """The loss of one task turns NaN/+inf at step BAD: `multilora train` exits 2 with one line naming it."""
    import multilora.train as T

    real, calls = T.token_losses, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        sums, counts = real(*args, **kwargs)
        if calls["n"] == BAD:
            sums = sums.clone()
            sums[1] = value  # the second task, wic
        return sums, counts

    monkeypatch.setattr(T, "token_losses", poisoned)
    run = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(load_config(None, overrides(tiny_dir, run)).to_yaml())
    capsys.readouterr()
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("multilora train: error: non-finite loss at step 3 "), err
    assert "tasks wic" in err[0] and f"step-{BAD - 1}" in err[0], err
    assert [s for s, _ in checkpoint_dirs(run)] == list(range(1, BAD))
    tally(CAT, "multilora train: non-finite task loss")


# ----------------------------------------------------------------------------- merge


def poisoned_layer(family: str, param: str, poison: str):
    """An injected tiny model with random adapters, one layer's `param` poisoned: (model, layer path)."""
    model = make_tiny(family)
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets="all-linear"))
    randomize_adapters(model)
    path = next(iter(ml.adapter_modules(model)))
    poison_module(ml.adapter_modules(model)[path], param, poison)
    return model, path


def poison_module(m, param: str, poison: str) -> None:
    with torch.no_grad():
        t = getattr(m, param)
        if poison == "overflow":  # finite factors whose product overflows float32
            m.lora_A.fill_(1e25)
            m.lora_B.fill_(1e25)
        else:
            t.view(-1)[3] = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}[poison]


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every base weight by module path (wrapped or not), cloned."""
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and not isinstance(mod, ml.MultiLoRALinear):
            out[name.replace(".base", "")] = w.detach().clone()
    return out


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


POISON_KINDS = [("lora_A", "nan"), ("lora_B", "+inf"), ("lora_s", "-inf"), ("lora_B", "nan"),
                ("lora_A", "-inf"), ("lora_s", "nan"), ("lora_A", "overflow")]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and transformers Conv1D
def test_layer_merge_and_unmerge_refuse_non_finite_weights(family, tally):
    for param, poison in POISON_KINDS:
        model, path = poisoned_layer(family, param, poison)
        layer = ml.adapter_modules(model)[path]
        before = layer.base.weight.detach().clone()
        with pytest.raises(MultiLoRAError, match="NaN/inf"):
            layer.merge()
        assert not layer.merged and torch.equal(layer.base.weight.view(torch.int32), before.view(torch.int32))
        tally(CAT, "MultiLoRALinear.merge")

    # unmerge: a merged layer whose adapter went bad afterwards (e.g. edited in place) is not "unmerged" into NaN
    for param, poison in POISON_KINDS:
        model = make_tiny(family)
        ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets="all-linear"))
        randomize_adapters(model)
        layer = next(iter(ml.adapter_modules(model).values()))
        layer.merge()
        merged = layer.base.weight.detach().clone()
        poison_module(layer, param, poison)
        with pytest.raises(MultiLoRAError, match="NaN/inf"):
            layer.unmerge()
        assert layer.merged and torch.equal(layer.base.weight.view(torch.int32), merged.view(torch.int32))
        tally(CAT, "MultiLoRALinear.unmerge")


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("fn", ["merge", "unload"])
def test_model_merge_and_unload_refuse_without_changing_any_weight(fn, where, tally):
    entry = f"inject.{fn} (bad layer {where})"
    try:
        for param, poison in POISON_KINDS:
            model = make_tiny("llama")
            ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets="all-linear"))
            randomize_adapters(model)
            modules = ml.adapter_modules(model)
            path = list(modules)[0 if where == "first" else -1]
            poison_module(modules[path], param, poison)
            before = base_weights(model)
            with pytest.raises(MultiLoRAError, match="NaN/inf"):
                getattr(ml, fn)(model)
            assert same_bits(base_weights(model), before), "a refused merge changed base weights"
            assert list(ml.adapter_modules(model)) == list(modules), "a refused unload removed adapter layers"
            assert not any(m.merged for m in ml.adapter_modules(model).values()), "a refused merge left layers merged"
            tally(CAT, entry)
    except AssertionError:
        tally(CAT, entry, failures=1)
        raise


def _adapter_folder(tiny_dir: Path, out: Path, edit) -> Path:
    from multilora.models import load_model

    model, _ = load_model(str(tiny_dir))
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    ml.save_adapter(model, out)
    tensors = load_file(str(out / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "multilora-adapter", "format_version": "1"})
    cfg = json.loads((out / CONFIG_NAME).read_text())
    cfg["weights_sha256"] = sha256_file(out / WEIGHTS_NAME)  # a consistent folder: the numbers are the problem
    (out / CONFIG_NAME).write_text(json.dumps(cfg))
    return out


def test_export_merged_refuses_non_finite_weights(tiny_dir, tmp_path, capsys, tally):
    q = "model.layers.0.self_attn.q_proj"  # the first layer merged: unload's partial-merge gap is tested above
    base_sha = {p.name: sha256_file(p) for p in tiny_dir.iterdir() if p.is_file()}

    def nan(t):
        t[f"{q}.lora_B"][0, 0, 0] = float("nan")

    def inf(t):
        t[f"{q}.lora_s"][1, 3] = float("inf")

    def overflow(t):  # every number finite, dW = B A overflows float32
        t[f"{q}.lora_A"].fill_(1e25)
        t[f"{q}.lora_B"].fill_(1e25)

    for name, edit, needles in (("NaN tensor", nan, ("NaN or inf", WEIGHTS_NAME)),
                                ("inf tensor", inf, ("NaN or inf", WEIGHTS_NAME)),
                                ("overflowing update", overflow, ("NaN/inf", "unchanged"))):
        folder = _adapter_folder(tiny_dir, tmp_path / name.replace(" ", "-"), edit)
        out = tmp_path / f"merged-{name.replace(' ', '-')}"
        capsys.readouterr()
        assert main(["export", str(folder), "--format", "merged", "--model", str(tiny_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("multilora export: error: "), err
        assert all(n in err[0] for n in needles), err
        assert not out.exists(), "a refused merge wrote a model"
        tally(CAT, "multilora export --format merged")
        # the library path the command uses: unload(load_adapter(...)) refuses the same way
        from multilora.models import load_model

        model, _ = load_model(str(tiny_dir))
        before = base_weights(model)
        with pytest.raises(MultiLoRAError):
            ml.unload(ml.load_adapter(model, folder))
        assert same_bits(base_weights(model), before), name
        tally(CAT, "unload(load_adapter(...))")
    assert {p.name: sha256_file(p) for p in tiny_dir.iterdir() if p.is_file()} == base_sha  # base files untouched
