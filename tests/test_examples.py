"""The README's own-tasks example (examples/own-tasks.yaml) runs end to end from the CLI on the tiny model:
preview, train, evaluate and generate, as the README shows them."""

from __future__ import annotations

import json
from pathlib import Path

from multilora.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own-tasks.yaml"
TASKS = ["recipes", "trivia", "reviews", "rte"]


def test_the_own_tasks_example_previews_trains_evaluates_and_generates(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example's paths resolve against its own folder, not the cwd
    assert main(["tasks", "--preview", str(EXAMPLE), "--model", str(tiny_dir), "-k", "1"]) == 0
    preview = capsys.readouterr().out
    assert all(f"== {t} " in preview for t in TASKS) and "label set: ' negative', ' positive'" in preview

    run = tmp_path / "run"
    assert main(["train", str(EXAMPLE), "--model", str(tiny_dir), "--train.max_steps", "4", "--optim.warmup_steps", "1",
                 "--data.eval_examples", "4", "--output_dir", str(run), "--no-progress"]) == 0
    assert json.loads((run / "finished.json").read_text())["step"] == 4
    heldout = [r["eval"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    assert {f"loss/{t}" for t in TASKS} <= heldout[-1].keys()

    assert main(["eval", str(run), "--tasks", ",".join(TASKS), "--limit", "4"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert list(result["tasks"]) == TASKS
    assert result["tasks"]["recipes"]["kind"] == "perplexity" and result["tasks"]["recipes"]["perplexity"] > 1
    for task in ("trivia", "reviews", "rte"):
        assert result["tasks"][task]["n"] == 4 and 0.0 <= result["tasks"][task]["acc"] <= 1.0

    out = tmp_path / "samples.jsonl"
    assert main(["generate", str(run), "--task", "recipes", "-n", "2", "--max-new-tokens", "4", "--compare-base",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["model"] for r in rows] == ["target", "base", "target", "base"] and all(r["reference"] for r in rows)
