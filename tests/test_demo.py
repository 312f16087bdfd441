"""`multilora demo` (and `--preset study`) end to end on a tiny local model, its pairing, its training precision,
and its configs against recipes/demo-*.yaml."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multilora import demo
from multilora.cli import main
from multilora.config import load_config
from multilora.demo import METHODS, PRESETS, cpu_supports_bf16, demo_config, demo_runs, train_precision
from multilora.errors import MultiLoRAError
from multilora.evaluate import read_result
from multilora.models import tiny_model_path
from multilora.plan import build_plan
from multilora.run import FINISHED, Run
from multilora.train import train

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


# ----------------------------------------------------------------------------- --preset study, pairing, precision

STUDY_ARGS = ["demo", "--quick", "--preset", "study", "--seeds", "2", "--steps", "2", "--limit", "2"]
# the child runs the quick study and SIGKILLs itself at step 1 of the run named in argv[2] (after the earlier
# runs finished): a killed session, not a clean interrupt
KILLED_CHILD = """
import os, signal, sys
import multilora.demo as demo
real = demo.train_run
def train_run(run, progress, on_step=None):
    def step(n, model, record):
        on_step(n, model, record)
        if run["name"] == sys.argv[2] and n == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(run, progress, step)
demo.train_run = train_run
demo.run_demo(sys.argv[1], steps=2, seeds=2, quick=True, eval_limit=2, preset="study")
"""


def _files(folder: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (mtime_ns, sha256)} of every file below `folder`."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _correct(task: dict) -> dict[str, float]:
    return {it["id"]: float(it["pred"] == it["gold"]) for it in task["items"]}


def test_study_runs_every_arm_and_seed_resumes_after_a_kill_and_reports_the_files_numbers(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MULTILORA_CACHE", str(cache))
    out = tmp_path / "study"
    arms = [a.name for a in PRESETS["study"].arms]
    assert arms == ["lora", "multilora-paper", "multilora", "full"]
    env = {**os.environ, "MULTILORA_CACHE": str(cache)}
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(out), "multilora-seed1"], env=env,
                           capture_output=True, text=True, timeout=1200)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    order = [f"{a}-seed{s}" for s in range(2) for a in arms]
    done = order[:order.index("multilora-seed1")]
    assert all((out / name / FINISHED).is_file() for name in done)
    assert not (out / "multilora-seed1" / FINISHED).exists() and not (out / "full-seed1").exists()
    before = {name: _files(out / name) for name in done}

    assert main([*STUDY_ARGS, "--out", str(out)]) == 2  # neither --resume nor --overwrite: refused
    assert main([*STUDY_ARGS, "--out", str(out), "--resume"]) == 0
    for name in done:  # finished runs were not trained again: every file they had is untouched
        after = _files(out / name)
        assert {k: after[k] for k in before[name]} == before[name], name
    study = json.loads((out / "study.json").read_text())
    assert study["preset"] == "study" and study["seeds"] == [0, 1] and set(study["evals"]) == {"base", *arms}
    assert study["precision"] == train_precision("auto")[0] and study["shots"] == 5
    report = (out / "report.md").read_text()
    assert f"Training precision: {'bf16 autocast' if study['precision'] == 'bf16' else 'float32'}" in report
    assert study["methods"]["multilora-paper"]["s_lr_mult"] == 1.0
    assert study["methods"]["multilora"]["s_lr_mult"] == 30.0
    runs = {a: [Path(r) for r in study["methods"][a]["runs"]] for a in arms}
    assert all([r.name for r in runs[a]] == [f"{a}-seed0", f"{a}-seed1"] for a in arms)
    evals = {a: [json.loads((r / "eval.json").read_text()) for r in runs[a]] for a in arms}
    # evaluation runs at the training precision: every eval.json records it, and the report says it
    assert {e["settings"].get("precision", "no") for a in arms for e in evals[a]} == {study["precision"]}
    assert study["eval_precision"] == ("bf16" if study["precision"] == "bf16" else "float32")
    assert f"evaluation in {'bf16 autocast' if study['precision'] == 'bf16' else 'float32'}" in report
    for a in arms:
        for seed, run in enumerate(runs[a]):
            metrics = _metrics(run)
            # the report's numbers are the files' numbers: held-out curves and training loss from metrics.jsonl
            heldout = [{"step": r["step"], **r["eval"]} for r in metrics if "eval" in r]
            assert study["methods"][a]["heldout"][seed] == heldout
            assert study["methods"][a]["train_loss"][seed] == [r["loss"] for r in metrics if "loss" in r]
            assert [r["step"] for r in metrics if "eval" in r] == [0, 1, 2]  # held-out loss every step of 2
            assert evals[a][seed]["sweep"]["shots"] == 5 and all("items" in t for t in evals[a][seed]["tasks"].values())
        # paired design: every arm of a seed trained on the same batches (the same tokens per step and tasks)
        for seed in range(2):
            batches = [(r["tokens"], sorted(k for k in r if k.startswith("loss/"))) for r in _metrics(runs[a][seed])
                       if "tokens" in r]
            assert batches == [(r["tokens"], sorted(k for k in r if k.startswith("loss/")))
                               for r in _metrics(runs["lora"][seed]) if "tokens" in r]
    # the per-task table: mean ± std over the two seeds of each eval.json
    scores = report.split("## Scores per task")[1].split("## Paired")[0]
    lines = {line.split("|")[1].strip(): [c.strip().strip("*") for c in line.split("|")[4:-1]]
             for line in scores.splitlines() if line.startswith("| ")}
    header = lines["task"]
    for a in arms:
        for task in ("rte", "copa", "cb"):
            accs = [e["tasks"][task]["acc"] for e in evals[a]]
            cell = f"{100 * statistics.fmean(accs):.1f} ± {100 * statistics.stdev(accs):.1f}"
            assert lines[task][header.index(a)] == cell
    # a paired row: MultiLoRA - LoRA on RTE, recomputed from the items of the four eval.json files
    diffs = []
    for seed in range(2):
        ml, lo = _correct(evals["multilora"][seed]["tasks"]["rte"]), _correct(evals["lora"][seed]["tasks"]["rte"])
        diffs.append(statistics.fmean(ml[i] - lo[i] for i in lo))
    row = next(line for line in report.splitlines() if line.startswith("| multilora − lora | rte | acc |"))
    assert f"| {100 * statistics.fmean(diffs):+.1f} pp [" in row and "x 2 seeds" in row
    # a spectrum row: the mean over seeds and modules of each seed's analysis.json
    per_seed = [json.loads((out / d / "analysis.json").read_text()) for d in ("analysis", "analysis-seed1")]
    def ranks(name):
        return [[layer["effective_rank"] for layer in next(r for r in rep["runs"] if r["name"] == name)["layers"]]
                for rep in per_seed]
    spec = next(r for r in study["spectrum_comparisons"] if r["run"] == "multilora" and r["metric"] == "effective_rank")
    lora_r, ml_r = ranks("lora"), ranks("multilora")
    expected = statistics.fmean(b - a for ra, rb in zip(lora_r, ml_r) for a, b in zip(ra, rb))
    assert math.isclose(spec["diff"], expected, rel_tol=1e-9) and spec["n_seeds"] == 2
    for png in ("heldout_loss.png", "forest-vs-lora.png", "forest-vs-full.png", "analysis-seed1/spectra.png"):
        assert (out / png).stat().st_size > 1000, png
    # resuming a finished study redoes no evaluation
    stamps = {a: [(r / "eval.json").stat().st_mtime_ns for r in runs[a]] for a in arms}
    assert main([*STUDY_ARGS, "--out", str(out), "--resume"]) == 0
    assert stamps == {a: [(r / "eval.json").stat().st_mtime_ns for r in runs[a]] for a in arms}


def test_the_arms_of_a_seed_share_batches_and_init_and_seeds_differ(tmp_path, monkeypatch):
    """The sampler and the adapter init depend on train.seed only: every arm of a seed draws the same (task,
    example) sequence, the two MultiLoRA arms start from the same A, B; another seed draws another sequence."""
    monkeypatch.setenv("MULTILORA_CACHE", str(tmp_path / "cache"))
    runs = demo_runs(tmp_path, 4, 2, str(tiny_model_path()), PRESETS["study"].arms)
    draws, init = {}, {}
    for run in runs:
        plan = build_plan(run["config"])
        draws[run["name"]] = [next(plan.sampler) for _ in range(200)]
        init[run["name"]] = {k: v.clone() for k, v in plan.model.state_dict().items() if "lora_" in k}
    for seed in range(2):
        for arm in ("multilora-paper", "multilora", "full"):
            assert draws[f"{arm}-seed{seed}"] == draws[f"lora-seed{seed}"]
        paper, tuned = init[f"multilora-paper-seed{seed}"], init[f"multilora-seed{seed}"]
        assert paper.keys() == tuned.keys() and all(torch.equal(paper[k], tuned[k]) for k in paper)
    assert draws["lora-seed0"] != draws["lora-seed1"]
    assert not all(torch.equal(init["multilora-seed0"][k], init["multilora-seed1"][k]) for k in init["multilora-seed0"])


BF16_TOLERANCE = 1e-3  # relative, step by step (the tiny model differs by ~1e-5: a 100x margin)


def test_bf16_and_float32_training_give_the_same_losses_within_tolerance(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTILORA_CACHE", str(tmp_path / "cache"))
    losses = {}
    for precision in ("no", "bf16"):
        config = demo_config("multilora", tmp_path / precision, steps=4, model=str(tiny_model_path()),
                             mixed_precision=precision)
        train(config, progress=False)
        losses[precision] = [r["loss"] for r in Run(tmp_path / precision).metrics() if "loss" in r]
    assert len(losses["no"]) == len(losses["bf16"]) == 4
    assert losses["no"] != losses["bf16"]  # autocast did change the arithmetic
    for a, b in zip(losses["no"], losses["bf16"]):
        assert abs(a - b) <= BF16_TOLERANCE * a, (losses["no"], losses["bf16"])


def test_precision_follows_the_cpu_flags(tmp_path, monkeypatch):
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert not cpu_supports_bf16(flags)
    flags.write_text("processor : 0\nflags : fpu avx512f avx512_bf16 amx_tile\n")
    assert cpu_supports_bf16(flags)
    assert not cpu_supports_bf16(tmp_path / "missing")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(demo, "cpu_supports_bf16", lambda: True)
    assert train_precision("auto")[0] == "bf16"
    monkeypatch.setattr(demo, "cpu_supports_bf16", lambda: False)
    assert train_precision("auto") == ("no", "auto: this CPU lacks native bfloat16 (no avx512_bf16 / amx_bf16), "
                                             "so float32")
    assert train_precision("bf16")[0] == "bf16" and train_precision("no")[0] == "no"
    with pytest.raises(MultiLoRAError, match="--precision must be one of auto, bf16, no"):
        train_precision("fp8")
