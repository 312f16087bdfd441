"""`multilora demo` end to end on a tiny local model, and its configs against recipes/demo-*.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from multilora.cli import main
from multilora.config import load_config
from multilora.demo import METHODS, demo_config
from multilora.models import embedded_tokenizer, tiny_model

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    tiny_model("llama").save_pretrained(folder)
    embedded_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", METHODS)
def test_recipes_are_the_demo_configs(method):
    recipe = load_config(RECIPES / f"demo-{method}.yaml")
    ours = demo_config(method, recipe.output_dir, steps=recipe.train.max_steps)
    assert recipe.to_dict() == ours.to_dict()


def test_demo_runs_the_study_and_writes_the_report(tmp_path, tiny_folder):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--steps", "3", "--limit", "4", "--model", str(tiny_folder), "--out", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    assert set(study["evals"]) == {"base", "lora", "multilora", "full"}
    for name in ("lora", "multilora", "full"):
        run = Path(study["methods"][name]["runs"][0])
        assert len(study["methods"][name]["train_loss"][0]) == 3 and (run / "eval.json").is_file()
    # same total rank: LoRA r = 24 vs MultiLoRA n = 3 x r = 8 (plus the scales)
    lora, multi = study["methods"]["lora"]["trainable"], study["methods"]["multilora"]["trainable"]
    assert lora < multi < 1.1 * lora and study["methods"]["full"]["share"] == 1.0
    report = (out / "report.md").read_text()
    assert "Claim 1" in report and "Claim 2" in report and "| task | metric | chance |" in report
    for png in ("loss_curves.png", "analysis/spectra.png", "analysis/energy_share.png"):
        assert (out / png).stat().st_size > 1000, png
    # a second run into the same folder is refused, and the first one's files are untouched
    before = (out / "report.md").read_bytes()
    assert main(["demo", "--quick", "--model", str(tiny_folder), "--out", str(out)]) == 2
    assert (out / "report.md").read_bytes() == before
