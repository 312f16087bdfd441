"""Corrupt files: every damaged adapter, config, PEFT adapter or run folder is refused with a message
that names the file and what is wrong -- from the library entry points and from the CLI (exit code 2,
one line on stderr, no traceback).

    adapter.safetensors    truncated, zero-length, bit-flipped (header and data: the sha256 recorded
                           in adapter_config.json catches every flipped byte), wrong dtype, NaN/inf,
                           missing/extra tensors, shapes that disagree with the config or the model
    adapter_config.json    not JSON, wrong types, unknown format version, n/r/scale/modules that
                           disagree with the tensors, fan_in_fan_out that does not fit the model
    PEFT adapter           a rank or a target module the model lacks, a truncated tensor file
    run folder             a half-written checkpoint, a damaged newest checkpoint, a half-written
                           final adapter
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, randomize_adapters
from safetensors.torch import load_file, save_file

import multilora as ml
from multilora.analyze import analyze_run
from multilora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_adapter, sha256_file
from multilora.cli import main
from multilora.errors import MultiLoRAError
from multilora.evaluate import resolve_target
from multilora.export import export_peft
from multilora.peft_import import import_peft

peft = pytest.importorskip("peft")

CAT = "corrupt files"
PEFT_WEIGHTS = "adapter_model.safetensors"


# ----------------------------------------------------------------------------- helpers


def refused(fn, *needles) -> str:
    """Call fn; it must raise MultiLoRAError whose message holds every needle. Returns the message."""
    with pytest.raises(MultiLoRAError) as e:
        fn()
    msg = str(e.value)
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in message: {msg}"
    assert "\n" not in msg, msg
    return msg


def cli_refuses(capsys, argv: list[str], *needles) -> str:
    """`multilora ARGV` returns 2 and prints exactly one line `multilora CMD: error: ...` naming the needles."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 2, (code, out.err)
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith(f"multilora {argv[0]}: error: "), lines[0]
    assert "Traceback" not in out.err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def set_config(folder: Path, good: dict, changes: dict, drop: tuple = ()) -> None:
    cfg = {k: v for k, v in good.items() if k not in drop}
    cfg.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


def rewrite_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace adapter.safetensors and record its checksum: damage the checksum cannot see."""
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "multilora-adapter", "format_version": "1"})
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg["weights_sha256"] = sha256_file(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory) -> Path:
    """A multilora adapter (n 3, r 4, q/v) of the tiny Llama in tiny_dir, which it records as its base."""
    from multilora.models import load_model

    model, _ = load_model(str(tiny_dir))
    ml.inject(model, ml.MultiLoRAConfig(n=3, r=4, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    folder = tmp_path_factory.mktemp("adapter") / "ad"
    ml.save_adapter(model, folder)
    return folder


def library_entries(folder: Path, out: Path, model: torch.nn.Module) -> dict:
    """The library entry points that read a multilora adapter folder."""
    return {
        "read_adapter": lambda: read_adapter(folder),
        "load_adapter": lambda: ml.load_adapter(model, folder),
        "export_peft": lambda: export_peft(folder, out / "peft"),
        "analyze_run": lambda: analyze_run(folder),
    }


def cli_entries(folder: Path, out: Path, tiny_dir: Path) -> dict:
    return {
        "eval": ["eval", folder, "--tasks", "rte", "--limit", "1", "--model", tiny_dir, "--out", out / "eval.json"],
        "analyze": ["analyze", folder, "--out", out / "analysis"],
        "export": ["export", folder, "--out", out / "peft"],
        "export merged": ["export", folder, "--format", "merged", "--out", out / "merged", "--model", tiny_dir],
    }


LIB = ("read_adapter", "load_adapter", "export_peft", "analyze_run")
CLI = ("eval", "analyze", "export", "export merged")
NEEDS_MODEL = {"lib": ("load_adapter",), "cli": ("eval", "export merged")}  # what only a model can reveal


def check_all(folder: Path, out: Path, model, tiny_dir, capsys, tally, what: str, needles: tuple,
              lib=LIB, cli=CLI) -> None:
    """Each named library entry point and CLI command refuses `folder` naming the needles; nothing is written."""
    for name, fn in library_entries(folder, out, model).items():
        if name in lib:
            refused(fn, *needles)
            if name == "load_adapter":
                assert not ml.adapter_modules(model), "a refused load must leave the model untouched"
            tally(CAT, f"{name}: {what}")
    for name, argv in cli_entries(folder, out, tiny_dir).items():
        if name in cli:
            cli_refuses(capsys, argv, *needles)
            tally(CAT, f"multilora {name}: {what}")
    assert not any(out.iterdir()), f"a refused command wrote {list(out.iterdir())}"


# ----------------------------------------------------------------------------- adapter.safetensors


def _tensor_file_case(adapter: Path, tmp_path: Path) -> tuple[Path, Path, bytes, int, Path]:
    """A copy of the adapter to damage: (folder, its tensor file, the good bytes, end of the header, an out folder)."""
    work = copy(adapter, tmp_path / "ad")
    weights = work / WEIGHTS_NAME
    good = weights.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    return work, weights, good, 8 + int.from_bytes(good[:8], "little"), out


def test_truncated_zero_length_and_padded_tensor_files(adapter, tiny_dir, tmp_path, capsys, tally):
    work, weights, good, header_end, out = _tensor_file_case(adapter, tmp_path)
    model = make_tiny("llama")
    damages = {
        "zero-length": b"",
        "truncated to 1 byte": good[:1],
        "truncated inside the length prefix": good[:7],
        "truncated after the length prefix": good[:8],
        "truncated inside the header": good[: header_end - 1],
        "truncated at the end of the header": good[:header_end],
        "truncated inside the data": good[: (header_end + len(good)) // 2],
        "last byte missing": good[:-1],
        "trailing garbage": good + b"\0" * 8,
    }
    for i, (what, data) in enumerate(damages.items()):
        weights.write_bytes(data)
        # the CLI for a few of them, the library for all
        check_all(work, out, model, tiny_dir, capsys, tally, WEIGHTS_NAME,
                  (weights, "does not match the checksum", "truncated, corrupt"), cli=CLI if i % 3 == 0 else ())
    weights.write_bytes(good)
    read_adapter(work)  # restored: loads again


def test_bit_flips_anywhere_are_caught_by_the_checksum(adapter, tiny_dir, tmp_path, capsys, tally):
    work, weights, good, header_end, out = _tensor_file_case(adapter, tmp_path)
    model = make_tiny("llama")
    rng = random.Random(20240611)
    positions = (list(range(8)) + rng.sample(range(8, header_end), 72)  # the length prefix, the JSON header
                 + rng.sample(range(header_end, len(good)), 120))  # and the tensor data
    for i, pos in enumerate(positions):
        bad = bytearray(good)
        bad[pos] ^= 1 << rng.randrange(8)
        if i % 10 == 9:  # some cases flip several bytes at once
            for extra in rng.sample(range(len(good)), 5):
                bad[extra] ^= 0xFF
        weights.write_bytes(bytes(bad))
        check_all(work, out, model, tiny_dir, capsys, tally, WEIGHTS_NAME,
                  (weights, "does not match the checksum"), cli=CLI if i % 25 == 0 else ())
    weights.write_bytes(good)
    read_adapter(work)


def test_header_bit_flips_with_a_forged_checksum_never_load_other_numbers(adapter, tmp_path, tally):
    """Defence in depth: someone 'fixed' the checksum after damaging the header. The file is then refused
    as unreadable / not matching its config, or -- a flip in the free-form metadata -- loads the same numbers."""
    work = copy(adapter, tmp_path / "ad")
    weights = work / WEIGHTS_NAME
    good_bytes, good_cfg = weights.read_bytes(), json.loads((work / CONFIG_NAME).read_text())
    good_tensors = load_file(str(weights))
    header_end = 8 + int.from_bytes(good_bytes[:8], "little")
    rng = random.Random(7)
    refusals = 0
    for pos in list(range(8)) + rng.sample(range(8, header_end), 60):
        bad = bytearray(good_bytes)
        bad[pos] ^= 1 << rng.randrange(8)
        weights.write_bytes(bytes(bad))
        set_config(work, good_cfg, {"weights_sha256": sha256_file(weights)})
        try:
            _, tensors = read_adapter(work)
        except MultiLoRAError as e:
            assert str(weights) in str(e), str(e)
            refusals += 1
        else:
            assert tensors.keys() == good_tensors.keys()
            assert all(torch.equal(tensors[k], good_tensors[k]) for k in tensors), f"flip at {pos} changed numbers"
        tally(CAT, f"read_adapter: {WEIGHTS_NAME}")
    assert refusals >= 50, refusals  # only flips inside __metadata__ can be harmless


def test_tensor_damage_the_checksum_cannot_see(adapter, tiny_dir, tmp_path, capsys, tally):
    """A file rewritten (checksum updated) with tensors that do not fit the config or hold bad values."""
    good = load_file(str(adapter / WEIGHTS_NAME))
    q = "model.layers.0.self_attn.q_proj"
    model = make_tiny("llama")

    def edit(fn):
        t = {k: v.clone() for k, v in good.items()}
        fn(t)
        return t

    def poke(key, value):
        return lambda t: t[key].view(-1).__setitem__(0, value)

    cases = [
        ("integer tensor", edit(lambda t: t.__setitem__(f"{q}.lora_A", t[f"{q}.lora_A"].to(torch.int32))),
         ("dtype torch.int32",)),
        ("NaN in lora_B", edit(poke(f"{q}.lora_B", math.nan)), ("NaN or inf",)),
        ("+inf in lora_A", edit(poke(f"{q}.lora_A", math.inf)), ("NaN or inf",)),
        ("-inf in lora_s", edit(poke(f"{q}.lora_s", -math.inf)), ("NaN or inf",)),
        ("missing tensor", edit(lambda t: t.pop(f"{q}.lora_s")), ("missing tensor", f"{q}.lora_s")),
        ("extra tensor", edit(lambda t: t.__setitem__("model.layers.9.mlp.up_proj.lora_A", torch.zeros(3, 4, 64))),
         ("unexpected tensor", "model.layers.9.mlp.up_proj.lora_A")),
        ("lora_s of another width", edit(lambda t: t.__setitem__(f"{q}.lora_s", torch.zeros(3, 32))),
         (f"{q}.lora_s' has shape (3, 32)", "disagree")),
        ("rank that disagrees with r", edit(lambda t: t.__setitem__(f"{q}.lora_A", torch.zeros(3, 5, 64))),
         (f"{q}.lora_A' has shape (3, 5, 64)", "needs (3, 4, 64)")),
        ("1-D lora_B", edit(lambda t: t.__setitem__(f"{q}.lora_B", torch.zeros(3))), (f"{q}.lora_B' has shape (3,)",)),
    ]
    out = tmp_path / "out"
    out.mkdir()
    for i, (what, tensors, needles) in enumerate(cases):
        work = copy(adapter, tmp_path / f"case{i}")
        rewrite_tensors(work, tensors)
        check_all(work, out, model, tiny_dir, capsys, tally, WEIGHTS_NAME,
                  (work / WEIGHTS_NAME, *needles))
    # bytes that are no safetensors file at all, with a matching checksum
    for what, data in (("zero-length", b""), ("garbage", b"\x08" + b"\0" * 7 + b"{not json"),
                       ("a JSON file", b'{"a": 1}')):
        work = copy(adapter, tmp_path / f"junk-{what}")
        (work / WEIGHTS_NAME).write_bytes(data)
        cfg = json.loads((work / CONFIG_NAME).read_text())
        set_config(work, cfg, {"weights_sha256": sha256_file(work / WEIGHTS_NAME)})
        check_all(work, out, model, tiny_dir, capsys, tally, WEIGHTS_NAME,
                  (work / WEIGHTS_NAME, "is not a readable safetensors file"), cli=CLI if what == "garbage" else ())


def test_tensors_that_fit_the_config_but_not_the_model(adapter, tiny_dir, tmp_path, capsys, tally):
    """Self-consistent files for another base model: only load_adapter (and eval/export merged) can tell."""
    good = load_file(str(adapter / WEIGHTS_NAME))
    q = "model.layers.0.self_attn.q_proj"
    out = tmp_path / "out"
    out.mkdir()
    model = make_tiny("llama")
    t = dict(good)
    t[f"{q}.lora_A"] = torch.zeros(3, 4, 48)  # d_in 48: consistent, but q_proj takes 64 features
    work = copy(adapter, tmp_path / "narrow")
    rewrite_tensors(work, t)
    read_adapter(work)
    check_all(work, out, model, tiny_dir, capsys, tally, WEIGHTS_NAME,
              (work, f"'{q}.lora_A' has shape (3, 4, 48)", "needs (3, 4, 64)", "another base model"),
              lib=NEEDS_MODEL["lib"], cli=NEEDS_MODEL["cli"])
    work = copy(adapter, tmp_path / "gpt2")
    refused(lambda: ml.load_adapter(make_tiny("gpt2"), work), work, "is not a linear layer of this GPT2LMHeadModel")
    tally(CAT, f"load_adapter: {WEIGHTS_NAME}")


# ----------------------------------------------------------------------------- adapter_config.json

Q_V = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
       "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]

CONFIG_CASES = [
    # (what, changes, keys to drop, file the message must name, needles)
    ("n as a string", {"n": "three"}, (), CONFIG_NAME, ("'n' has the wrong type",)),
    ("n as a bool", {"n": True}, (), CONFIG_NAME, ("'n' has the wrong type",)),
    ("r as a float", {"r": 4.0}, (), CONFIG_NAME, ("'r' has the wrong type",)),
    ("alpha as a string", {"alpha": "16"}, (), CONFIG_NAME, ("'alpha' has the wrong type",)),
    ("alpha NaN", {"alpha": math.nan}, (), CONFIG_NAME, ("alpha must be a positive number",)),
    ("alpha negative", {"alpha": -1}, (), CONFIG_NAME, ("alpha must be a positive number",)),
    ("dropout null", {"dropout": None}, (), CONFIG_NAME, ("'dropout' has the wrong type",)),
    ("dropout 2", {"dropout": 2}, (), CONFIG_NAME, ("dropout must be in [0, 1)",)),
    ("init as a number", {"init": 3}, (), CONFIG_NAME, ("'init' has the wrong type",)),
    ("unknown init", {"init": "xavier"}, (), CONFIG_NAME, ("init must be one of",)),
    ("scale as a list", {"scale": ["vector"]}, (), CONFIG_NAME, ("'scale' has the wrong type",)),
    ("unknown scale", {"scale": "matrix"}, (), CONFIG_NAME, ("scale must be one of",)),
    ("modules as a string", {"modules": Q_V[0]}, (), CONFIG_NAME, ("'modules' has the wrong type",)),
    ("modules empty", {"modules": []}, (), CONFIG_NAME, ("'modules' must be a non-empty list",)),
    ("modules of numbers", {"modules": [1, 2]}, (), CONFIG_NAME, ("'modules' must be a non-empty list",)),
    ("module listed twice", {"modules": [Q_V[0], *Q_V]}, (), CONFIG_NAME, ("lists", "twice")),
    ("fan_in_fan_out as a string", {"fan_in_fan_out": "false"}, (), CONFIG_NAME, ("'fan_in_fan_out' has the wrong type",)),
    ("checksum as a number", {"weights_sha256": 0}, (), CONFIG_NAME, ("'weights_sha256' has the wrong type",)),
    ("base_model as a string", {"base_model": "tiny"}, (), CONFIG_NAME, ("'base_model' has the wrong type",)),
    ("targets as a number", {"targets": 5}, (), CONFIG_NAME, ("targets must be",)),
    ("no r", {}, ("r",), CONFIG_NAME, ("lacks the key 'r'",)),
    ("no checksum", {}, ("weights_sha256",), CONFIG_NAME, ("lacks the key 'weights_sha256'",)),
    ("format_version 2", {"format_version": 2}, (), CONFIG_NAME, ("format_version 2", "reads version 1")),
    ("format_version '1'", {"format_version": "1"}, (), CONFIG_NAME, ("format_version '1'", "reads version 1")),
    ("format_version null", {"format_version": None}, (), CONFIG_NAME, ("format_version None",)),
    ("no format_version", {}, ("format_version",), CONFIG_NAME, ("format_version None",)),
    ("another format", {"format": "something"}, (), CONFIG_NAME, ("multilora adapter",)),
    ("n that disagrees with the tensors", {"n": 2}, (), WEIGHTS_NAME, ("lora_A' has shape (3, 4, 64)", "needs (2, 4, 64)")),
    ("r that disagrees with the tensors", {"r": 8}, (), WEIGHTS_NAME, ("lora_A' has shape (3, 4, 64)", "needs (3, 8, 64)")),
    ("scalar scale for vector tensors", {"scale": "scalar"}, (), WEIGHTS_NAME, ("q_proj.lora_s' has shape (3, 64)", "needs (3,)")),
    ("no scale for scaled tensors", {"scale": "none", "init": "lora"}, (), WEIGHTS_NAME, ("unexpected tensor",)),
    ("a module dropped", {"modules": Q_V[:3]}, (), WEIGHTS_NAME, ("unexpected tensor", Q_V[3])),
    ("a module added", {"modules": [*Q_V, "model.layers.1.mlp.up_proj"]}, (), WEIGHTS_NAME,
     ("missing tensor 'model.layers.1.mlp.up_proj.lora_A'",)),
]


def test_bad_adapter_configs(adapter, tiny_dir, tmp_path, capsys, tally):
    good = json.loads((adapter / CONFIG_NAME).read_text())
    out = tmp_path / "out"
    out.mkdir()
    model = make_tiny("llama")
    for i, (what, changes, drop, file, needles) in enumerate(CONFIG_CASES):
        work = copy(adapter, tmp_path / f"case{i}")
        set_config(work, good, changes, drop)
        check_all(work, out, model, tiny_dir, capsys, tally, CONFIG_NAME, (work / file, *needles))


def test_unreadable_adapter_configs(adapter, tiny_dir, tmp_path, capsys, tally):
    out = tmp_path / "out"
    out.mkdir()
    model = make_tiny("llama")
    cases = [("not JSON", b"{not json", "is not valid JSON"), ("empty", b"", "is not valid JSON"),
             ("truncated", (adapter / CONFIG_NAME).read_bytes()[:40], "is not valid JSON"),
             ("not UTF-8", b'{"format": "\xff\xfe"}', "is not valid JSON"),
             ("a JSON list", b"[1, 2]", "must hold a JSON object")]
    for i, (what, data, needle) in enumerate(cases):
        work = copy(adapter, tmp_path / f"case{i}")
        (work / CONFIG_NAME).write_bytes(data)
        check_all(work, out, model, tiny_dir, capsys, tally, CONFIG_NAME, (work / CONFIG_NAME, needle))
    work = copy(adapter, tmp_path / "noconfig")
    (work / CONFIG_NAME).unlink()
    refused(lambda: read_adapter(work), work / CONFIG_NAME, "is missing")
    tally(CAT, f"read_adapter: {CONFIG_NAME}")
    work = copy(adapter, tmp_path / "noweights")
    (work / WEIGHTS_NAME).unlink()
    check_all(work, out, model, tiny_dir, capsys, tally, WEIGHTS_NAME, (work / WEIGHTS_NAME, "is missing"))


def test_fan_in_fan_out_that_does_not_fit_the_model(adapter, tiny_dir, tmp_path, capsys, tally):
    good = json.loads((adapter / CONFIG_NAME).read_text())
    work = copy(adapter, tmp_path / "ad")
    set_config(work, good, {"fan_in_fan_out": True})  # a Llama has nn.Linear layers, not Conv1D
    out = tmp_path / "out"
    out.mkdir()
    check_all(work, out, make_tiny("llama"), tiny_dir, capsys, tally, CONFIG_NAME,
              (work / CONFIG_NAME, "fan_in_fan_out is True", "is a Linear"), lib=NEEDS_MODEL["lib"], cli=NEEDS_MODEL["cli"])


# ----------------------------------------------------------------------------- PEFT adapters


@pytest.fixture(scope="module")
def peft_adapter(tiny_dir, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter (r 4 on q_proj, v_proj) of the tiny Llama in tiny_dir, with random factors."""
    from multilora.models import load_model

    model, _ = load_model(str(tiny_dir))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(str(folder))
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)
    return folder


def edit_peft(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    copy(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(str(dst / PEFT_WEIGHTS))
        save_file(tensors(t), str(dst / PEFT_WEIGHTS), metadata={"format": "pt"})
    return dst


def test_peft_adapter_works_when_intact(peft_adapter, tmp_path):
    """The baseline the damaged copies below are compared with."""
    resolve_target(str(peft_adapter))
    import_peft(peft_adapter, tmp_path / "ours")
    ml.load_adapter(make_tiny("llama"), tmp_path / "ours")
    analyze_run(peft_adapter)


def test_peft_adapter_with_a_rank_the_config_lacks(peft_adapter, tiny_dir, tmp_path, capsys, tally):
    d = edit_peft(peft_adapter, tmp_path / "r8", config={"r": 8})  # the tensors have rank 4
    for name, fn in {"import_peft": lambda: import_peft(d, tmp_path / "ours"),
                     "analyze_run": lambda: analyze_run(d),
                     "resolve_target": lambda: resolve_target(str(d))}.items():
        refused(fn, d / PEFT_WEIGHTS, "inconsistent with r = 8")
        tally(CAT, f"{name}: PEFT adapter")
    for name, argv in {"import-peft": ["import-peft", d, "--out", tmp_path / "ours"],
                       "analyze": ["analyze", d, "--out", tmp_path / "an"],
                       "eval": ["eval", d, "--tasks", "rte", "--limit", "1", "--out", tmp_path / "e.json"]}.items():
        cli_refuses(capsys, argv, d / PEFT_WEIGHTS, "inconsistent with r = 8")
        tally(CAT, f"multilora {name}: PEFT adapter")
    assert not (tmp_path / "ours").exists()


def test_peft_adapter_with_a_target_the_model_lacks(peft_adapter, tiny_dir, tmp_path, capsys, tally):
    def to_layer7(t):
        return {k.replace(".layers.1.", ".layers.7."): v for k, v in t.items()}

    d = edit_peft(peft_adapter, tmp_path / "layer7", tensors=to_layer7)
    refused(lambda: resolve_target(str(d)), d / PEFT_WEIGHTS, "model.layers.7.self_attn.q_proj",
            "does not have")
    tally(CAT, "resolve_target: PEFT adapter")
    cli_refuses(capsys, ["eval", d, "--tasks", "rte", "--limit", "1", "--out", tmp_path / "e.json"],
                d / PEFT_WEIGHTS, "does not have")
    tally(CAT, "multilora eval: PEFT adapter")
    # import cannot know the model; the imported adapter is refused where it meets one
    import_peft(d, tmp_path / "ours")
    refused(lambda: ml.load_adapter(make_tiny("llama"), tmp_path / "ours"), tmp_path / "ours",
            "model.layers.7.self_attn", "another base model")
    tally(CAT, "load_adapter: PEFT adapter")
    cli_refuses(capsys, ["eval", tmp_path / "ours", "--tasks", "rte", "--limit", "1", "--model", tiny_dir,
                         "--out", tmp_path / "e.json"], tmp_path / "ours", "model.layers.7.self_attn")
    tally(CAT, "multilora eval: PEFT adapter")
    cli_refuses(capsys, ["export", tmp_path / "ours", "--format", "merged", "--model", tiny_dir,
                         "--out", tmp_path / "merged"], tmp_path / "ours", "model.layers.7.self_attn")
    tally(CAT, "multilora export merged: PEFT adapter")

    # target_modules that select no module of the model, or fewer than the file holds
    d = edit_peft(peft_adapter, tmp_path / "qkv", config={"target_modules": ["query_key_value"]})
    refused(lambda: resolve_target(str(d)), d, "peft cannot load this adapter")
    tally(CAT, "resolve_target: PEFT adapter")
    d = edit_peft(peft_adapter, tmp_path / "qonly", config={"target_modules": ["q_proj"]})
    refused(lambda: resolve_target(str(d)), d / PEFT_WEIGHTS, "v_proj", "was not loaded")
    tally(CAT, "resolve_target: PEFT adapter")


def test_peft_adapter_with_a_width_the_model_lacks(peft_adapter, tiny_dir, tmp_path, capsys, tally):
    def narrow(t):
        return {k: (torch.zeros(4, 48) if k.endswith("layers.0.self_attn.q_proj.lora_A.weight") else v)
                for k, v in t.items()}

    d = edit_peft(peft_adapter, tmp_path / "narrow", tensors=narrow)
    refused(lambda: resolve_target(str(d)), d / PEFT_WEIGHTS, "(4, 48)", "64 -> 64")
    tally(CAT, "resolve_target: PEFT adapter")
    import_peft(d, tmp_path / "ours")
    refused(lambda: ml.load_adapter(make_tiny("llama"), tmp_path / "ours"), tmp_path / "ours", "needs (1, 4, 64)")
    tally(CAT, "load_adapter: PEFT adapter")


def test_truncated_peft_tensor_file(peft_adapter, tmp_path, capsys, tally):
    for i, cut in enumerate((0, 5, 100, -1)):
        d = copy(peft_adapter, tmp_path / f"cut{i}")
        data = (d / PEFT_WEIGHTS).read_bytes()
        (d / PEFT_WEIGHTS).write_bytes(data[:cut])
        for name, fn in {"import_peft": lambda d=d: import_peft(d, tmp_path / "ours"),
                         "analyze_run": lambda d=d: analyze_run(d),
                         "resolve_target": lambda d=d: resolve_target(str(d))}.items():
            refused(fn, d / PEFT_WEIGHTS, "is not a readable safetensors file")
            tally(CAT, f"{name}: PEFT adapter")
        cli_refuses(capsys, ["import-peft", d, "--out", tmp_path / "ours"], d / PEFT_WEIGHTS, "not a readable")
        tally(CAT, "multilora import-peft: PEFT adapter")
    assert not (tmp_path / "ours").exists()


# ----------------------------------------------------------------------------- run folders


def run_overrides(tiny_dir: Path, out: Path, steps: int) -> list[str]:
    args = {"model": str(tiny_dir), "method": "multilora", "output_dir": str(out), "data.tasks": "[rte]",
            "data.max_len": 48, "data.eval_examples": 0, "adapter.targets": "[q_proj, v_proj]", "adapter.r": 4,
            "optim.lr": 1e-2, "train.max_steps": steps, "train.batch_size": 2, "train.save_every": 1,
            "train.eval_every": 0, "train.keep_last": 5, "train.cpu": "true"}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def killed_run(tiny_dir, tmp_path_factory) -> Path:
    """A run of 4 steps killed during step 3 (after its optimizer step, before its checkpoint): step-1, step-2."""
    from multilora.config import load_config
    from multilora.run import checkpoint_dirs
    from multilora.train import train

    run = tmp_path_factory.mktemp("runs") / "killed"

    def kill(step, model, record):
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train(load_config(None, run_overrides(tiny_dir, run, 4)), on_step=kill, progress=False)
    assert [s for s, _ in checkpoint_dirs(run)] == [1, 2] and not (run / WEIGHTS_NAME).exists()
    return run


def _resume(run: Path):
    from multilora.train import train

    return train(None, resume=run, progress=False)


def test_half_written_newest_checkpoint_is_skipped(killed_run, tmp_path, capsys, tally):
    """A checkpoint without trainer_state.json (written last) is incomplete: resume uses the one before."""
    from multilora.run import checkpoint_dirs

    for i, (partial_name, via) in enumerate((("step-3", "train"), (".step-3.tmp", "multilora train --resume"))):
        run = copy(killed_run, tmp_path / f"run{i}")
        partial = run / "checkpoints" / partial_name  # a save killed half-way: no trainer_state.json, torn tensors
        shutil.copytree(run / "checkpoints" / "step-2", partial)
        (partial / "trainer_state.json").unlink()
        (partial / "model.safetensors").write_bytes((partial / "model.safetensors").read_bytes()[:64])
        if via == "train":
            _resume(run)
        else:
            assert main(["train", "--resume", str(run), "--no-progress"]) == 0
        assert [s for s, _ in checkpoint_dirs(run)][-1] == 4
        assert not (run / "checkpoints" / ".step-3.tmp").exists()
        ml.load_adapter(make_tiny("llama"), run)  # the finished run's adapter is complete
        tally(CAT, f"{via}: run folder")


def test_run_without_a_complete_checkpoint_is_refused(killed_run, tmp_path, capsys, tally):
    run = copy(killed_run, tmp_path / "run")
    for _, ck in [(1, run / "checkpoints" / "step-1"), (2, run / "checkpoints" / "step-2")]:
        (ck / "trainer_state.json").unlink()
    refused(lambda: _resume(run), run, "no complete checkpoint")
    tally(CAT, "train: run folder")
    cli_refuses(capsys, ["train", "--resume", run, "--no-progress"], run, "no complete checkpoint")
    tally(CAT, "multilora train --resume: run folder")
    refused(lambda: resolve_target(str(run)), run, "has checkpoints but no final adapter")
    tally(CAT, "resolve_target: run folder")


CHECKPOINT_DAMAGE = [
    ("model.safetensors missing", "model.safetensors", lambda p: p.unlink()),
    ("model.safetensors truncated", "model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
    ("model.safetensors zero-length", "model.safetensors", lambda p: p.write_bytes(b"")),
    ("optimizer.bin missing", "optimizer.bin", lambda p: p.unlink()),
    ("optimizer.bin truncated", "optimizer.bin", lambda p: p.write_bytes(p.read_bytes()[:100])),
    ("scheduler.bin missing", "scheduler.bin", lambda p: p.unlink()),
    ("sampler.json not JSON", "sampler.json", lambda p: p.write_text("{")),
    ("sampler.json missing", "sampler.json", lambda p: p.unlink()),
]


@pytest.mark.parametrize("what, file, damage", [pytest.param(w, f, d, id=w) for w, f, d in CHECKPOINT_DAMAGE])
def test_damaged_newest_checkpoint_is_refused_naming_the_file(killed_run, tmp_path, capsys, tally, what, file, damage):
    run = copy(killed_run, tmp_path / "run")
    ck = run / "checkpoints" / "step-2"
    damage(ck / file)
    refused(lambda: _resume(run), ck, file)
    tally(CAT, "train: run folder")
    cli_refuses(capsys, ["train", "--resume", run, "--no-progress"], ck, file)
    tally(CAT, "multilora train --resume: run folder")


def test_half_written_final_adapter_of_a_run(killed_run, tiny_dir, tmp_path, capsys, tally):
    """A finished run whose adapter.safetensors was cut short (copied while written, disk full)."""
    run = copy(killed_run, tmp_path / "run")
    _resume(run)
    weights = run / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    out = tmp_path / "out"
    out.mkdir()
    for name, fn in {"resolve_target": lambda: resolve_target(str(run)), "analyze_run": lambda: analyze_run(run),
                     "export_peft": lambda: export_peft(run, out / "peft")}.items():
        refused(fn, weights, "does not match the checksum")
        tally(CAT, f"{name}: run folder")
    for name, argv in cli_entries(run, out, tiny_dir).items():
        cli_refuses(capsys, argv, weights, "does not match the checksum")
        tally(CAT, f"multilora {name}: run folder")
    assert not any(out.iterdir())
