"""`multilora train --report-to tensorboard`: TensorBoard event files through accelerate's trackers,
beside the usual metrics.jsonl (which stays the only log by default)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from multilora.run import read_metrics
from multilora.cli import add_train_arguments, run_train_cli

pytest.importorskip("tensorboard")


def cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="multilora train")
    add_train_arguments(p)
    args, rest = p.parse_known_args(argv)
    run_train_cli(args, rest)


def argv(tiny_dir: Path, out: Path, *extra: str, **config: object) -> list[str]:
    """A config file of a 3-step run on the tiny model, then the command-line flags."""
    import yaml

    conf = {"model": str(tiny_dir), "method": "multilora", "output_dir": str(out),
            "adapter": {"targets": "all-linear"}, "data": {"tasks": ["rte", "wic"], "max_len": 64, "eval_examples": 0},
            "train": {"max_steps": 3, "batch_size": 4, "save_every": 0, "eval_every": 0, "cpu": True, **config}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(conf))
    return [str(path), "--no-progress", *extra]


def event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("events.out.tfevents.*"))


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's event files -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for folder in sorted({f.parent for f in event_files(run_dir)}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_report_to_tensorboard_writes_loss_per_task_lr_and_throughput(tiny_dir, tmp_path):
    run = tmp_path / "tb"
    cli(argv(tiny_dir, run, "--report-to", "tensorboard"))

    assert event_files(run), f"no TensorBoard event files under {run}"
    assert all(f.is_relative_to(run) for f in event_files(run))
    tags = scalars(run)
    for tag in ("loss", "loss/rte", "loss/wic", "lr", "tokens_per_s", "grad_norm"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    for tag in ("loss", "lr", "tokens_per_s"):
        assert [s for s, _ in tags[tag]] == [1, 2, 3]
    # the same numbers as metrics.jsonl, which is still written
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for tag in ("loss", "lr", "tokens_per_s"):
        assert [v for _, v in tags[tag]] == pytest.approx([r[tag] for r in records], rel=1e-5)
    assert all(v > 0 for _, v in tags["tokens_per_s"])
    # the saved config records the choice, so --resume keeps logging to TensorBoard
    assert "log_tensorboard: true" in (run / "config.yaml").read_text()


def test_default_writes_metrics_jsonl_only(tiny_dir, tmp_path):
    run = tmp_path / "plain"
    cli(argv(tiny_dir, run))
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]
    assert event_files(run) == []


def test_report_to_none_overrides_the_config_key(tiny_dir, tmp_path):
    run = tmp_path / "none"
    cli(argv(tiny_dir, run, "--report-to", "none", log_tensorboard=True))
    assert event_files(run) == []


def test_report_to_rejects_unknown_trackers():
    p = argparse.ArgumentParser(prog="multilora train")
    add_train_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_known_args(["cfg.yaml", "--report-to", "wandb"])
