"""`multilora sweep` on a tiny random Llama: grid parsing, validation before any training, a 2 x 2 sweep whose
sweep.csv holds each run folder's numbers, skipping / resuming runs (also folders of the old version, marked
finished by sweep_run.json), refusing a changed config, CLI errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

import multilora.analyze
from multilora import sweep, sweep_report
from multilora.cli import main
from multilora.errors import MultiLoRAError
from multilora.run import FINISHED, Run, checkpoint_dirs, read_metrics
from multilora.sweep import run_sweep
from multilora.sweep_grid import combination_label, expand_grid, short_names, split_values
from multilora.sweep_report import summarize

GRID = [["adapter.n=1,2", "adapter.init=multilora,lora"]]
NAMES = ["n=1__init=multilora__seed=0", "n=1__init=lora__seed=0", "n=2__init=multilora__seed=0",
         "n=2__init=lora__seed=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_base(path: Path, model: Path, lr: float = 0.01, heldout: bool = True, n: str = "n: 2, ") -> Path:
    """A small, fast base config: 4 steps, held-out loss every 2 steps (unless `heldout` is off)."""
    every, examples = (2, 4) if heldout else (0, 0)
    path.write_text(f"model: {model}\nmethod: multilora\n"
                    f"adapter: {{{n}r: 2, alpha: 4, targets: [q_proj, v_proj]}}\n"
                    f"data: {{tasks: [rte, wic], max_len: 64, eval_examples: {examples}}}\n"
                    f"optim: {{lr: {lr}}}\n"
                    f"train: {{batch_size: 2, max_steps: 4, eval_every: {every}, save_every: 0, cpu: true}}\n")
    return path


def count_calls(monkeypatch, name: str, real: bool = True) -> list[dict]:
    """Replace sweep.<name> by a spy recording each call's arguments (and calling the real one if `real`)."""
    calls, original = [], getattr(sweep, name)

    def spy(*args, **kwargs):
        calls.append({"args": args, **kwargs})
        if not real:
            raise AssertionError(f"{name} must not be called")
        return original(*args, **kwargs)

    monkeypatch.setattr(sweep, name, spy)
    return calls


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def done(tiny_dir, tmp_path_factory):
    """A finished 2 x 2 sweep (adapter.n x adapter.init), 1 seed, evaluated on 2 items of rte and wic."""
    root = tmp_path_factory.mktemp("sweep")
    base = write_base(root / "base.yaml", tiny_dir)
    out = root / "out"
    md = run_sweep(base, GRID, out_dir=out, limit=2, progress=False)
    return base, out, md


# ----------------------------------------------------------------------------- the grid


def test_grid_is_a_product_per_group_and_a_union_over_groups():
    combos = expand_grid([["adapter.n=1,2", "adapter.init=multilora,lora"],
                          ["method=lora", "adapter.targets=[q_proj,v_proj],all-linear", "optim.lr=3e-4"],
                          ["adapter.n=2", "adapter.init=lora"]])  # already in the first product: dropped
    assert combos[:4] == [{"adapter.n": 1, "adapter.init": "multilora"}, {"adapter.n": 1, "adapter.init": "lora"},
                          {"adapter.n": 2, "adapter.init": "multilora"}, {"adapter.n": 2, "adapter.init": "lora"}]
    assert combos[4:] == [{"method": "lora", "adapter.targets": ["q_proj", "v_proj"], "optim.lr": "3e-4"},
                          {"method": "lora", "adapter.targets": "all-linear", "optim.lr": "3e-4"}]
    assert expand_grid([["train.cpu=true,false", "optim.lr=0.001"]]) == [
        {"train.cpu": True, "optim.lr": 0.001}, {"train.cpu": False, "optim.lr": 0.001}]
    assert expand_grid([]) == [{}]
    assert split_values("[a,b],{x: 1, y: 2},c") == ["[a,b]", "{x: 1, y: 2}", "c"]


def test_run_names_use_leaves_unless_they_collide_and_only_safe_characters():
    assert short_names(["a.x", "b.x", "adapter.n"]) == {"a.x": "a.x", "b.x": "b.x", "adapter.n": "n"}
    keys = ["adapter.n", "adapter.targets", "data.max_len"]
    assert combination_label({"adapter.n": 3, "adapter.targets": ["q_proj", "v_proj"], "data.max_len": 64},
                             keys) == "n=3__targets=-q_proj-v_proj-__max_len=64"
    assert combination_label({}, keys) == "base"


@pytest.mark.parametrize("token, match", [
    ("adapter.nn=1,2", "unknown config key 'adapter.nn'; did you mean 'adapter.n'"),
    ("optim.learning_rate=1e-3", "did you mean 'optim.lr'"),
    ("train.seed=1,2", "train.seed cannot be swept; use --seeds"),
    ("output_dir=a,b", "output_dir cannot be swept; use --out"),
    ("adapter.n", "is not KEY=V1,V2"),
    ("adapter.n=1,,2", "empty value"),
])
def test_bad_grid_tokens_are_named_with_the_fix(token, match):
    with pytest.raises(MultiLoRAError, match=match):
        expand_grid([[token]])


def test_a_key_twice_in_one_group_is_refused():
    with pytest.raises(MultiLoRAError, match="names adapter.n twice"):
        expand_grid([["adapter.n=1", "adapter.n=2"]])


# ----------------------------------------------------------------------------- validation before training


def test_invalid_combinations_are_all_refused_before_any_training(tiny_dir, tmp_path, monkeypatch):
    calls = count_calls(monkeypatch, "train", real=False)
    base = write_base(tmp_path / "base.yaml", tiny_dir)
    out = tmp_path / "out"
    with pytest.raises(MultiLoRAError) as e:
        run_sweep(base, [["method=lora,multilora", "adapter.n=1,3"], ["adapter.r=0"]], out_dir=out, progress=False)
    msg = str(e.value)
    assert msg.startswith("2 of 5 grid combination(s) are invalid, nothing was trained")
    assert "[method=lora__n=3]" in msg and "method lora uses adapter.n = 1, got 3" in msg
    assert "[r=0]" in msg and "adapter.r = 0 must be an integer >= 1" in msg  # the adapter's own check's wording
    assert "method=multilora__n=3" not in msg  # the valid ones are not listed
    with pytest.raises(MultiLoRAError, match="unknown task 'nope'"):
        run_sweep(base, GRID, out_dir=out, tasks="rte,nope", progress=False)
    assert calls == [] and not (out / "runs").exists()


# ----------------------------------------------------------------------------- the 2 x 2 sweep


def test_sweep_csv_holds_one_row_per_run_with_each_run_folders_numbers(done):
    _, out, md = done
    assert md == out / "sweep.md"
    assert sorted(p.name for p in (out / "runs").iterdir() if p.is_dir()) == sorted(NAMES)
    rows = read_csv(out / "sweep.csv")
    assert [r["run"] for r in rows] == NAMES
    analysis = {r["name"]: r["overall"] for r in json.loads((out / "analysis" / "analysis.json").read_text())["runs"]}
    for row in rows:
        run = out / "runs" / row["run"]
        n, init = row["run"].split("__")[:2]
        assert (row["adapter.n"], row["adapter.init"], row["seed"]) == (n[2:], init[5:], "0")
        config = (run / "config.yaml").read_text()
        assert f"n: {n[2:]}" in config and f"init: {init[5:]}" in config
        metrics = read_metrics(run)
        train_losses = [r["loss"] for r in metrics if "loss" in r]
        heldout = [r for r in metrics if "eval" in r]
        assert len(train_losses) == 4 and [r["step"] for r in heldout] == [0, 2, 4]
        assert int(row["steps"]) == 4
        assert float(row["train_loss"]) == train_losses[-1]  # last 10% of 4 steps: the last one
        assert float(row["heldout_loss"]) == heldout[-1]["eval"]["loss"]
        ev = json.loads((run / "eval.json").read_text())
        assert ev["tasks"]["rte"]["n"] == 2
        for task in ("rte", "wic"):
            assert float(row[task]) == ev["tasks"][task]["acc"]
        assert float(row["mean_acc"]) == pytest.approx((ev["tasks"]["rte"]["acc"] + ev["tasks"]["wic"]["acc"]) / 2)
        assert float(row["effective_rank"]) == analysis[row["run"]]["effective_rank"]
        assert float(row["top1_share"]) == analysis[row["run"]]["energy_top1"]
        assert int(row["trainable_params"]) == sum(t.numel() for t in load_file(run / "adapter.safetensors").values())
        marker = Run(run).finished()  # train's finished.json
        assert float(row["train_seconds"]) == marker["seconds"] > 0
    n1, n2 = int(rows[0]["trainable_params"]), int(rows[2]["trainable_params"])
    assert n2 == 2 * n1  # n = 2 modules of the same rank: twice the adapter


def test_sweep_writes_the_summary_plots_and_the_analysis(done):
    _, out, md = done
    text = md.read_text()
    assert "| adapter.n | adapter.init | seeds | train loss | held-out loss | rte acc % | wic acc % |" in text
    rows = read_csv(out / "sweep.csv")
    assert f"| 2 | lora | 1 | {float(rows[3]['train_loss']):.4f} | {float(rows[3]['heldout_loss']):.4f} |" in text
    assert "`--grid adapter.n=1,2 adapter.init=multilora,lora`" in text and "eval_examples: 4" in text
    for png in ("sweep-scores.png", "sweep-heldout.png", "sweep-spectrum.png", "analysis/spectra.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"({png})" in text or png.startswith("analysis")
    assert (out / "analysis" / "summary.md").is_file()


def test_a_second_call_skips_finished_runs_and_cached_evaluations(done, monkeypatch):
    base, out, _ = done
    before = {f: (out / f).read_bytes() for f in ("sweep.csv", "sweep.md")}
    trains = count_calls(monkeypatch, "train", real=False)
    evals = count_calls(monkeypatch, "evaluate", real=False)
    analyses = count_calls(monkeypatch, "analyze", real=False)
    assert run_sweep(base, GRID, out_dir=out, limit=2, progress=False) == out / "sweep.md"
    assert trains == [] and evals == [] and analyses == []
    assert {f: (out / f).read_bytes() for f in before} == before


def test_summarize_rebuilds_the_outputs_from_the_folders(done, tmp_path):
    _, out, _ = done
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for f in ("sweep.csv", "sweep.md", "sweep-scores.png"):
        (copy / f).unlink()
    assert main(["sweep", "--summarize-only", str(copy)]) == 0
    assert (copy / "sweep.csv").read_bytes() == (out / "sweep.csv").read_bytes()
    assert (copy / "sweep.md").read_text() == (out / "sweep.md").read_text()
    assert (copy / "sweep-scores.png").is_file()


def test_unfinished_runs_are_resumed_restarted_or_trained_and_reevaluated(done, tmp_path, monkeypatch):
    base, out, _ = done
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    resumed, restarted, missing, kept = (copy / "runs" / n for n in NAMES)
    (resumed / FINISHED).unlink()  # killed after its last checkpoint
    assert checkpoint_dirs(resumed)
    (restarted / FINISHED).unlink()
    shutil.rmtree(restarted / "checkpoints")  # killed before its first checkpoint
    shutil.rmtree(missing)
    kept_eval = (kept / "eval.json").stat().st_mtime_ns
    resumed_eval = (resumed / "eval.json").read_text()
    trains = count_calls(monkeypatch, "train")
    run_sweep(base, GRID, out_dir=copy, limit=2, progress=False)
    by_folder = {Path(c.get("resume") or c["args"][0].output_dir).name: c for c in trains}
    assert set(by_folder) == {resumed.name, restarted.name, missing.name}
    assert by_folder[resumed.name]["args"][0] is None and Path(by_folder[resumed.name]["resume"]) == resumed
    assert by_folder[restarted.name]["overwrite"] is True and by_folder[restarted.name].get("resume") is None
    assert by_folder[missing.name]["overwrite"] is False
    assert all((copy / "runs" / n / FINISHED).is_file() for n in NAMES)
    assert (kept / "eval.json").stat().st_mtime_ns == kept_eval  # untouched run: cached evaluation
    assert json.loads((resumed / "eval.json").read_text())["sweep"] != json.loads(resumed_eval)["sweep"]
    assert len(read_csv(copy / "sweep.csv")) == 4


def test_runs_of_the_old_version_marked_by_sweep_run_json_are_reused(done, tmp_path, monkeypatch):
    """A sweep written before train wrote finished.json: its runs are finished by sweep_run.json."""
    base, out, _ = done
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in NAMES:
        run = copy / "runs" / name
        record = json.loads((run / FINISHED).read_text())
        (run / "sweep_run.json").write_text(json.dumps({"seconds": 1.5, "finished": record["finished"]}))
        (run / FINISHED).unlink()
    trains = count_calls(monkeypatch, "train", real=False)
    evals = count_calls(monkeypatch, "evaluate", real=False)
    run_sweep(base, GRID, out_dir=copy, limit=2, progress=False)
    assert trains == [] and evals == []  # same finished time: the eval.json files stay valid too
    assert [float(r["train_seconds"]) for r in read_csv(copy / "sweep.csv")] == [1.5] * 4
    assert not any((copy / "runs" / n / FINISHED).exists() for n in NAMES)


def test_a_changed_base_config_is_refused_naming_the_run_and_key(done, tiny_dir, tmp_path, monkeypatch):
    _, out, _ = done
    trains = count_calls(monkeypatch, "train", real=False)
    changed = write_base(tmp_path / "base.yaml", tiny_dir, lr=0.02)
    before = (out / "sweep.json").read_bytes()
    with pytest.raises(MultiLoRAError, match=r"run n=1__init=multilora__seed=0 in .* was trained with a different "
                       r"config: optim.lr is 0.01 there but 0.02 now; pass another --out"):
        run_sweep(changed, GRID, out_dir=out, limit=2, progress=False)
    assert trains == [] and (out / "sweep.json").read_bytes() == before


def test_a_failed_analysis_leaves_nan_and_a_note(done, tmp_path, monkeypatch):
    base, out, _ = done
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "analysis" / sweep_report.ANALYSIS_NOTES).unlink()  # analyze again
    real = multilora.analyze._analyze_multilora

    def broken(d, *args, **kwargs):
        if d.name == NAMES[1]:
            raise MultiLoRAError("adapter.safetensors is damaged")
        return real(d, *args, **kwargs)

    monkeypatch.setattr(multilora.analyze, "_analyze_multilora", broken)
    count_calls(monkeypatch, "train", real=False)
    md = run_sweep(base, GRID, out_dir=copy, limit=2, progress=False)
    rows = {r["run"]: r for r in read_csv(copy / "sweep.csv")}
    assert math.isnan(float(rows[NAMES[1]]["effective_rank"])) and "damaged" in rows[NAMES[1]]["note"]
    others = [rows[n] for n in NAMES if n != NAMES[1]]
    assert all(math.isfinite(float(r["effective_rank"])) and r["note"] == "" for r in others)
    assert f"{NAMES[1]}: analysis failed: MultiLoRAError: adapter.safetensors is damaged" in md.read_text()
    assert [r["name"] for r in json.loads((copy / "analysis" / "analysis.json").read_text())["runs"]] == \
        [n for n in NAMES if n != NAMES[1]]


# ----------------------------------------------------------------------------- CLI


def test_cli_unions_grids_sweeps_full_fine_tuning_and_skips_evaluation_with_limit_0(tiny_dir, tmp_path, capsys):
    base = write_base(tmp_path / "base.yaml", tiny_dir, heldout=False, n="")  # method lora: no adapter.n
    out = tmp_path / "out"
    assert main(["sweep", str(base), "--grid", "method=lora", "adapter.r=4", "--grid", "method=full",
                 "--grid", "method=lora", "adapter.r=4", "--limit", "0", "--out", str(out)]) == 0
    rows = read_csv(out / "sweep.csv")
    assert [r["run"] for r in rows] == ["method=lora__r=4__seed=0", "method=full__seed=0"]
    assert [r["adapter.r"] for r in rows] == ["4", "n/a"]
    assert "rte" not in rows[0] and not any((out / "runs" / r["run"] / "eval.json").exists() for r in rows)
    full = out / "runs" / "method=full__seed=0"
    assert int(rows[1]["trainable_params"]) == sum(t.numel() for t in load_file(full / "model.safetensors").values())
    assert all(math.isfinite(float(r["effective_rank"])) for r in rows)  # full fine-tuning: dense spectrum
    assert math.isnan(float(rows[0]["heldout_loss"]))
    text = (out / "sweep.md").read_text()
    assert "no held-out loss curves" in text and "none (--limit 0)" in text
    assert not (out / "sweep-heldout.png").exists() and (out / "sweep-spectrum.png").is_file()


@pytest.mark.parametrize("grid, match", [
    (["adapter.nn=1,2"], "did you mean 'adapter.n'"),
    (["train.seed=0,1"], "use --seeds N"),
])
def test_cli_reports_a_bad_grid_in_one_line_and_exits_2(tiny_dir, tmp_path, capsys, grid, match):
    base = write_base(tmp_path / "base.yaml", tiny_dir)
    assert main(["sweep", str(base), "--grid", *grid, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("multilora sweep: error: --grid") and match in err
    assert not (tmp_path / "out").exists()


def test_cli_needs_a_base_config_or_summarize_only(capsys):
    assert main(["sweep", "--grid", "adapter.n=1"]) == 2
    assert "name the base config" in capsys.readouterr().err


def test_summarize_needs_a_sweep_folder(tmp_path):
    with pytest.raises(MultiLoRAError, match="holds no sweep.json"):
        summarize(tmp_path)


def test_plot_panels_skip_keys_that_move_together():
    from multilora.sweep_report import independent_keys

    rows = [{"method": m, "adapter.r": r, "optim.s_lr_mult": s}
            for m, r, s in [("lora", "24", "1.0"), ("multilora", "8", "1.0"), ("multilora", "8", "30.0")]]
    assert independent_keys(rows, ["method", "adapter.r", "optim.s_lr_mult"]) == ["method", "optim.s_lr_mult"]
    rows.append({"method": "multilora", "adapter.r": "4", "optim.s_lr_mult": "1.0"})  # r now varies on its own
    assert independent_keys(rows, ["method", "adapter.r", "optim.s_lr_mult"]) == ["method", "adapter.r",
                                                                                 "optim.s_lr_mult"]


def test_each_trained_run_and_evaluation_gives_its_freed_memory_back(monkeypatch, tmp_path):
    """The sweep and the demo run jobs one after another in one process: each job's freed memory is released."""
    released = []
    monkeypatch.setattr(sweep, "release_freed_memory", lambda: released.append("released"))
    monkeypatch.setattr(sweep, "train", lambda *args, **kwargs: released.append("trained"))
    assert sweep.train_run({"config": SimpleNamespace(output_dir=str(tmp_path / "run"))}, progress=False)
    assert released == ["trained", "released"]

    def fake_evaluate(model, tokenizer, tasks, **kwargs):
        released.append("evaluated")
        return {"settings": {}, "seconds": 1.0, "tasks": {tasks[0]: {"accuracy": 0.5}}}

    monkeypatch.setattr(sweep, "resolve_target", lambda target: (object(), None, {}))
    monkeypatch.setattr(sweep, "evaluate", fake_evaluate)
    released.clear()
    result, evaluated = sweep.evaluate_target("m", tmp_path / "eval.json", ["rte", "wic"], 2, False)
    assert evaluated and set(result["tasks"]) == {"rte", "wic"}
    assert released == ["evaluated", "evaluated", "released"]
    released.clear()
    assert sweep.evaluate_target("m", tmp_path / "eval.json", ["rte", "wic"], 2, False)[1] is False  # cached
    assert released == []
