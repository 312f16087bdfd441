"""The `multilora` command: version/help, exit code 2 with one line for user errors, export, tasks, demo."""

from __future__ import annotations

import json

import pytest
import torch

import multilora as ml
from multilora.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"multilora {ml.__version__}"
    assert main([]) == 0 and "export" in capsys.readouterr().out


def test_user_errors_exit_2_with_one_line(capsys, tmp_path):
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path), "--format", "onnx", "--out", "x"])
    assert e.value.code == 2


def test_export_peft_and_merged_from_an_adapter_folder(tmp_path, tiny_dir, capsys):
    model, _ = ml.models.load_model(str(tiny_dir))
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets="all-linear"))
    with torch.no_grad():
        for p in ml.adapter_parameters(model).values():
            p.normal_(std=0.05)
    ml.save_adapter(model, tmp_path / "ad")
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(tokens).logits

    assert main(["export", str(tmp_path / "ad"), "--out", str(tmp_path / "peft")]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == str(tiny_dir)

    assert main(["export", str(tmp_path / "ad"), "--out", str(tmp_path / "vllm"), "--pad-to", "12"]) == 0
    assert json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())["r"] == 12
    assert main(["import-peft", str(tmp_path / "peft"), "--out", str(tmp_path / "imported")]) == 0
    imported = ml.load_adapter(ml.models.load_model(str(tiny_dir))[0], tmp_path / "imported")
    with torch.no_grad():
        torch.testing.assert_close(imported(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path / "ad"), "--out", str(tmp_path / "x"), "--pad-to", "4"]) == 2  # < n*r

    assert main(["export", str(tmp_path / "ad"), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    merged, _ = ml.models.load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_tasks_lists_the_registry(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "rte" in out and "2,490" in out and "alpaca" in out
