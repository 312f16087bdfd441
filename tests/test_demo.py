"""`multilora demo` end to end on a tiny local model, and its configs against recipes/demo-*.yaml."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from multilora.cli import main
from multilora.config import load_config
from multilora.demo import METHODS, demo_config
from multilora.evaluate import read_result
from multilora.run import FINISHED

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("method", METHODS)
def test_recipes_are_the_demo_configs(method):
    recipe = load_config(RECIPES / f"demo-{method}.yaml")
    ours = demo_config(method, recipe.output_dir, steps=recipe.train.max_steps)
    assert recipe.to_dict() == ours.to_dict()


def test_demo_quick_runs_the_study_and_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MULTILORA_CACHE", str(tmp_path / "cache"))  # the tiny model is built once, here
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    assert set(study["evals"]) == {"base", "lora", "multilora", "full"}
    runs = {name: Path(study["methods"][name]["runs"][0]) for name in METHODS}
    for name, run in runs.items():
        assert len(study["methods"][name]["train_loss"][0]) == study["steps"]
        assert (run / "eval.json").is_file() and (run / "metrics.jsonl").is_file()
        assert read_result(run / "eval.json")["settings"]["limit"] == study["eval_limit"]  # a full evaluate() result
        assert study["methods"][name]["seconds"][0] == json.loads((run / FINISHED).read_text())["seconds"]
    # same total rank: LoRA r = 24 vs MultiLoRA n = 3 x r = 8 (plus the scales)
    lora, multi = study["methods"]["lora"]["trainable"], study["methods"]["multilora"]["trainable"]
    assert lora < multi < 1.1 * lora and study["methods"]["full"]["share"] == 1.0
    report = (out / "report.md").read_text()
    assert "Claim 1" in report and "Claim 2" in report
    # a tiny random model learns nothing: a smoke test, judging no claim, in the report and the printed summary
    assert study["smoke_test"] is True
    assert "Smoke test: no verdict" in report and "supported" not in report
    printed = " ".join(capsys.readouterr().out.split())
    assert "smoke test" in printed and "no verdict" in printed
    for png in ("loss_curves.png", "analysis/spectra.png", "analysis/energy_share.png", "analysis/multilora_scales.png"):
        assert (out / png).stat().st_size > 1000, png
    # the report's numbers are the run folders' numbers
    rows = {line.split("|")[1].strip(): [c.strip().strip("*") for c in line.split("|")[4:-1]]
            for line in report.splitlines() if line.startswith("| ") and "|---" not in line}
    header = rows["task"]
    for name, run in runs.items():
        ev = json.loads((run / "eval.json").read_text())["tasks"]
        assert rows["rte"][header.index(name)] == f"{100 * ev['rte']['acc']:.1f}"
        assert rows["alpaca"][header.index(name)] == f"{ev['alpaca']['perplexity']:.2f}"
    analysis = json.loads((out / "analysis" / "analysis.json").read_text())
    ml = next(r for r in analysis["runs"] if r["name"] == "multilora")["overall"]
    assert f"| multilora | {ml['effective_rank']:.1f} | {ml['energy_top1']:.3f} |" in report


def test_demo_refuses_an_existing_folder_and_resumes_reusing_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MULTILORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--steps", "2", "--limit", "2", "--out", str(out)]) == 0
    before = (out / "report.md").read_bytes()
    assert main(["demo", "--quick", "--out", str(out)]) == 2  # neither --resume nor --overwrite
    assert (out / "report.md").read_bytes() == before
    # resuming with other settings would mix runs of two configs: refused before any training
    assert main(["demo", "--quick", "--steps", "3", "--limit", "2", "--out", str(out), "--resume"]) == 2
    assert "train.max_steps is 2 there but 3 now" in capsys.readouterr().err
    assert (out / "report.md").read_bytes() == before
    # an interrupted demo: the full run and its evaluation are gone, the others stay
    shutil.rmtree(out / "full-seed0")
    lora_adapter = (out / "lora-seed0" / "adapter.safetensors").read_bytes()
    lora_mtime = (out / "lora-seed0" / "eval.json").stat().st_mtime_ns
    # a run finished by the old version: marked by demo_run.json, no finished.json
    legacy = out / "multilora-seed0"
    seconds = json.loads((legacy / FINISHED).read_text())["seconds"]
    (legacy / "demo_run.json").write_text(json.dumps({"seconds": seconds}))
    (legacy / FINISHED).unlink()
    legacy_adapter = (legacy / "adapter.safetensors").read_bytes()
    assert main(["demo", "--quick", "--steps", "2", "--limit", "2", "--out", str(out), "--resume"]) == 0
    assert (out / "full-seed0" / "eval.json").is_file()
    assert (out / "lora-seed0" / "adapter.safetensors").read_bytes() == lora_adapter
    assert (out / "lora-seed0" / "eval.json").stat().st_mtime_ns == lora_mtime  # reused, not re-evaluated
    assert (legacy / "adapter.safetensors").read_bytes() == legacy_adapter and not (legacy / FINISHED).exists()
    assert json.loads((out / "study.json").read_text())["methods"]["multilora"]["seconds"] == [seconds]
    assert main(["demo", "--quick", "--steps", "2", "--limit", "2", "--out", str(out), "--overwrite"]) == 0


def test_demo_with_two_seeds_reports_mean_and_std(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTILORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--steps", "2", "--limit", "2", "--seeds", "2", "--out", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    assert all(len(study["methods"][m]["runs"]) == 2 for m in METHODS) and len(study["evals"]["lora"]) == 2
    report = (out / "report.md").read_text()
    assert "Mean ± standard deviation over seeds" in report
    alpaca = next(line for line in report.splitlines() if line.startswith("| alpaca"))
    assert alpaca.count("±") == 4  # base, lora, multilora, full
