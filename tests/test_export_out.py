"""One rule for the folder every export and import writes: a non-empty --out is refused unless --overwrite,
which replaces it (never a folder holding an input); `export_merged` finds the base model the run names."""

from __future__ import annotations

import json

import pytest
import torch

import multilora as ml
from conftest import make_tiny, randomize_adapters
from multilora.cli import main
from multilora.export import export_merged, export_serving
from multilora.peft_import import import_peft

REFUSED = "already exists and is not empty; pass --overwrite to replace it or choose another --out"


@pytest.fixture
def adapter(tmp_path):
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    ml.save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad"


def occupied(folder):
    """A non-empty folder with a file no export writes."""
    folder.mkdir()
    (folder / "stale.txt").write_text("from an earlier export")
    return folder


def test_library_writers_refuse_a_non_empty_folder_and_replace_it_with_overwrite(adapter, tmp_path):
    out = occupied(tmp_path / "out")
    writers = {
        "export_peft": lambda **kw: ml.export_peft(adapter, out, **kw),
        "export_serving": lambda **kw: export_serving(adapter, out, **kw),
        "import_peft": lambda **kw: import_peft(tmp_path / "peft", out, **kw),
    }
    ml.export_peft(adapter, tmp_path / "peft")
    for name, write in writers.items():
        (out / "stale.txt").write_text("from an earlier export")
        with pytest.raises(ml.MultiLoRAError, match=REFUSED):
            write()
        assert (out / "stale.txt").is_file(), name  # nothing touched
        write(overwrite=True)
        assert not (out / "stale.txt").exists(), name  # replaced, not mixed with the old files
        assert (out / "adapter_config.json").is_file(), name
    ml.export_peft(adapter, tmp_path / "empty_is_fine")
    (tmp_path / "empty").mkdir()
    ml.export_peft(adapter, tmp_path / "empty")


def test_overwrite_never_deletes_an_input(adapter, tmp_path):
    with pytest.raises(ml.MultiLoRAError, match="holds the input"):
        ml.export_peft(adapter, tmp_path, overwrite=True)
    with pytest.raises(ml.MultiLoRAError, match="input folder"):
        ml.export_peft(adapter, adapter, overwrite=True)
    ml.load_adapter(make_tiny("llama"), adapter)  # intact


def test_cli_export_and_import_follow_the_rule(adapter, tmp_path, tiny_dir, capsys):
    ml.export_peft(adapter, tmp_path / "peft")
    commands = {
        "export": ["export", str(adapter)],
        "export --server": ["export", str(adapter), "--server", "vllm"],
        "export merged": ["export", str(adapter), "--format", "merged", "--model", str(tiny_dir)],
        "import-peft": ["import-peft", str(tmp_path / "peft")],
    }
    for name, argv in commands.items():
        out = occupied(tmp_path / name.replace(" ", "_"))
        capsys.readouterr()
        assert main([*argv, "--out", str(out)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and REFUSED in err[0] and str(out) in err[0], (name, err)
        assert main([*argv, "--out", str(out), "--overwrite"]) == 0, name
        assert not (out / "stale.txt").exists(), name


def test_export_merged_finds_the_base_model_the_run_names(tmp_path, tiny_dir):
    """The adapter records no usable base; the run's config.yaml names it as the user gave it."""
    model, _ = ml.models.load_model(str(tiny_dir))
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets=["q_proj"]))
    randomize_adapters(model)
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(tokens).logits
    run = tmp_path / "run"
    ml.save_adapter(model, run)
    meta = json.loads((run / "adapter_config.json").read_text())
    meta["base_model"]["name_or_path"] = "/elsewhere/on/another/machine"
    (run / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ml.MultiLoRAError, match="/elsewhere/on/another/machine"):
        export_merged(run, tmp_path / "merged")
    (run / "config.yaml").write_text(f"model: {tiny_dir}\nmethod: multilora\n")
    out = export_merged(run, tmp_path / "merged")
    merged, _ = ml.models.load_model(str(out))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ml.MultiLoRAError, match=REFUSED):
        export_merged(run, out)
    assert export_merged(run, out, model=str(tiny_dir), overwrite=True) == out


def test_peft_export_of_a_run_records_the_base_model_as_the_run_names_it(adapter, tmp_path):
    (adapter / "config.yaml").write_text("model: smollm2-135m\nmethod: multilora\n")
    ml.export_peft(adapter, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "smollm2-135m"
