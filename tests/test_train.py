"""The training loop on a tiny random Llama with the embedded tokenizer: each method learns, only the
right weights move, resume after SIGKILL is exact, Ctrl-C saves, NaN stops, runs are never
overwritten, the GPU recipe builds its plan on CPU, and 2 processes match 1.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multilora.config import load_config
from multilora.errors import MultiLoRAError
from multilora.loss import token_losses
from multilora.run import Run, checkpoint_dirs, read_metrics
from multilora.cli import add_train_arguments, run_train_cli
from multilora.train import build_plan, train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def overrides(tiny_dir: Path, out: Path, method: str = "multilora", steps: int = 6, **extra) -> list[str]:
    """Command-line overrides of a small, fast run."""
    args = {"model": str(tiny_dir), "method": method, "output_dir": str(out), "data.tasks": "[rte, wic]",
            "data.max_len": 64, "data.eval_examples": 8, "adapter.targets": "all-linear",
            "optim.lr": 1e-2 if method != "full" else 1e-3, "train.max_steps": steps, "train.batch_size": 4,
            "train.save_every": 2, "train.eval_every": 0, "train.keep_last": 2,
            "train.cpu": "true"}  # CPU even where a GPU exists: exact resume equality needs deterministic kernels
    if method == "lora":
        args["adapter.r"] = 24
    args.update(extra)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def evals(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "eval" in r]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


# ----------------------------------------------------------------------------- learning and invariants


@pytest.mark.parametrize("method", ["multilora", "lora", "full"])
def test_method_lowers_heldout_loss_and_moves_only_its_weights(tiny_dir, tmp_path, method):
    from multilora.models import load_model

    out = tmp_path / method
    config = load_config(None, overrides(tiny_dir, out, method, steps=16, **{"train.eval_every": 16}))
    captured = {}
    run = train(config, on_step=lambda step, model, record: captured.update(model=model), progress=False)

    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 17))
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= records[0].keys()
    assert all(k in ("loss/rte", "loss/wic") for r in records for k in r if k.startswith("loss/"))
    assert records[0]["lr"] > records[-1]["lr"] > 0  # cosine decay
    first, last = evals(run)[0], evals(run)[-1]
    assert first["step"] == 0 and last["step"] == 16
    for task in ("rte", "wic"):  # a real decrease on the fixed held-out examples, for every task
        assert last["eval"][f"loss/{task}"] < first["eval"][f"loss/{task}"] - 0.1, (task, first, last)

    base, _ = load_model(tiny_dir)
    before = dict(base.named_parameters())
    after = {k.replace(".base.", "."): p for k, p in captured["model"].named_parameters()}
    adapter = {k for k in after if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_s")}
    if method == "full":
        assert not adapter
        changed = [k for k in before if not torch.equal(before[k], after[k].detach())]
        assert changed == list(before), f"unchanged: {set(before) - set(changed)}"
        assert (run / "model.safetensors").is_file() and (run / "full_model.json").is_file()
        reloaded, _ = load_model(run)  # the run folder is a loadable model folder
        assert all(torch.equal(p, after[k].detach()) for k, p in reloaded.named_parameters())
    else:
        for k, p in before.items():  # the base is bit-identical
            assert torch.equal(p, after[k].detach()), k
        initial = {k.replace(".base.", "."): p for k, p in build_plan(config).model.named_parameters()}  # same seed
        assert adapter and all(not torch.equal(after[k], initial[k]) for k in adapter)  # every adapter tensor moved
        meta = json.loads((run / "adapter_config.json").read_text())
        assert meta["method"] == method and meta["r"] == (24 if method == "lora" else 8)
        saved = load_file(run / "adapter.safetensors")
        assert set(saved) == adapter
        params = dict(captured["model"].named_parameters())
        assert all(torch.equal(saved[k], params[k].detach()) for k in saved)
        assert meta["base_model"]["name_or_path"] == str(tiny_dir)
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == method
    assert [s for s, _ in checkpoint_dirs(run)] == [14, 16]  # keep_last 2


def test_token_losses_match_full_logits(tiny_dir):
    """Computing logits only where labels follow gives the same per-task losses as the full logits."""
    import torch.nn.functional as F

    from multilora.data import Example, collate, tokenize_example
    from multilora.models import load_model

    model, tok = load_model(tiny_dir)
    rows = [tokenize_example(Example(t, p, r), tok, 64) for t, p, r in
            [("a", "Is it? Answer:", " yes"), ("b", "Longer prompt here, really. Answer:", " no way"),
             ("a", "Q:", " maybe so")]]
    batch = collate(rows, tok.pad_token_id, ["a", "b"])
    sums, counts = token_losses(model, batch, 2)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")  # (B, T-1)
    mask = batch["labels"][:, 1:] != -100
    for t in range(2):
        rows_t = batch["task_ids"] == t
        assert torch.allclose(sums[t], per_tok[rows_t][mask[rows_t]].sum(), atol=1e-4)
        assert counts[t] == mask[rows_t].sum()


def test_gradient_accumulation_matches_one_big_batch(tiny_dir, tmp_path):
    """batch 4 x accum 1 and batch 2 x accum 2 see the same examples and give the same weights."""
    runs = {}
    for bs, accum in ((4, 1), (2, 2)):
        out = tmp_path / f"b{bs}"
        runs[bs] = train(load_config(None, overrides(tiny_dir, out, steps=3, **{
            "train.batch_size": bs, "train.grad_accum": accum, "data.eval_examples": 0})), progress=False)
    a, b = load_file(runs[4] / "adapter.safetensors"), load_file(runs[2] / "adapter.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(losses(runs[4]), losses(runs[2])))


def test_eval_fn_hook_results_go_to_metrics(tiny_dir, tmp_path):
    seen = []

    def score(model):
        seen.append(model.training)
        return {"accuracy": 0.5}

    run = train(load_config(None, overrides(tiny_dir, tmp_path / "run", steps=2, **{"train.eval_every": 1})),
                eval_fn=score, progress=False)
    assert [(r["step"], r["eval"]) for r in evals(run)] == [(0, {"accuracy": 0.5}), (1, {"accuracy": 0.5}),
                                                            (2, {"accuracy": 0.5})]
    assert seen == [False, False, False]  # evaluated in eval mode


def test_long_responses_are_cut_to_max_len(tiny_dir):
    from multilora.data import IGNORE, Example
    from multilora.models import load_model
    from multilora.plan import tokenize

    _, tok = load_model(tiny_dir)
    config = load_config(None, ["--data.max_len", "32"])
    row = tokenize(Example("alpaca", "Write a long story. " * 5, " once upon a time" * 40), tok, config)
    assert len(row["input_ids"]) == len(row["labels"]) == 32
    assert row["labels"][:16] == [IGNORE] * 16 and IGNORE not in row["labels"][16:]  # half prompt, half response


@pytest.mark.parametrize("method", ["multilora", "lora"])
def test_bf16_run_stores_the_frozen_base_in_bf16_with_the_same_numbers(tiny_dir, tmp_path, monkeypatch, method):
    """Under bf16 autocast the frozen base weights are stored in bf16 once (autocast would cast them
    at every call): the losses, held-out losses and adapter are bit for bit those of a run without it."""
    import multilora.train as train_module

    def run(name: str) -> tuple[list, dict, dict]:
        seen = {}

        def look(step, model, record):
            if step == 1:
                seen.update({n: p.dtype for n, p in model.named_parameters()})
        config = load_config(None, overrides(tiny_dir, tmp_path / name, method, steps=4, **{
            "train.mixed_precision": "bf16", "train.eval_every": 2}))
        out = train(config, on_step=look, progress=False)
        return read_metrics(out), load_file(out / "adapter.safetensors"), seen

    metrics, adapter, dtypes = run("stored")
    monkeypatch.setattr(train_module, "store_frozen_in", lambda model, dtype: 0)
    metrics_cast, adapter_cast, dtypes_cast = run("cast-every-call")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(metrics) == strip(metrics_cast) and len([r for r in metrics if "eval" in r]) == 3
    assert adapter.keys() == adapter_cast.keys() and all(torch.equal(adapter[k], adapter_cast[k]) for k in adapter)
    base = [n for n in dtypes if n.endswith("base.weight")]
    assert len(base) == 14 and {dtypes[n] for n in base} == {torch.bfloat16}  # 2 layers x 7 projections
    assert {dtypes_cast[n] for n in base} == {torch.float32}
    kept = {n: t for n, t in dtypes.items() if n not in base}  # adapters, norms, embedding and head
    assert "lm_head.weight" in kept or "model.embed_tokens.weight" in kept
    assert set(kept.values()) == {torch.float32}


def test_store_frozen_in_leaves_the_head_tied_and_trainable_weights():
    from torch import nn

    from multilora.models import store_frozen_in, tiny_model

    model = tiny_model("llama", tie_word_embeddings=False)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.layers
    layers[0].mlp.up_proj.weight.requires_grad_(True)  # trainable: autocast caches its cast itself
    layers[1].mlp.up_proj.weight = model.model.embed_tokens.weight  # shared: the embedding must stay float32
    layers[1].mlp.up_proj.in_features, layers[1].mlp.up_proj.out_features = model.model.embed_tokens.weight.shape[::-1]
    assert store_frozen_in(model, torch.bfloat16) == 14 - 2
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert store_frozen_in(model, torch.bfloat16) == 0  # nothing left to change
    assert isinstance(model.lm_head, nn.Linear)


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


# ----------------------------------------------------------------------------- resume, interrupt, failure


SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
import multilora.train as T
from multilora.config import load_config
slow = float(sys.argv[1])
if slow:
    fwd = T.token_losses
    def slow_losses(*a, **k):
        time.sleep(slow)  # inside the step, so a kill lands mid-step
        return fwd(*a, **k)
    T.token_losses = slow_losses
resume = sys.argv[2] if sys.argv[2] != "-" else None
try:
    T.train(load_config(None, sys.argv[3:]) if resume is None else None, resume=resume, progress=False)
except KeyboardInterrupt:
    sys.exit(130)
"""


def run_script(tmp_path: Path, args: list[str], slow: float = 0.0, resume: str = "-",
               wait: bool = True) -> subprocess.Popen:
    script = tmp_path / "run_train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.Popen([sys.executable, str(script), str(slow), resume, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    return proc


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stdout.read()}")
        if time.time() > end:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_losses(tiny_dir, tmp_path):
    steps = 10
    ref = tmp_path / "ref"
    run_script(tmp_path, overrides(tiny_dir, ref, steps=steps))
    expected = losses(ref)
    assert [s for s, _ in expected] == list(range(1, steps + 1))

    run = tmp_path / "killed"
    proc = run_script(tmp_path, overrides(tiny_dir, run, steps=steps), slow=0.15, wait=False)
    wait_for(lambda: len(losses(run)) >= 5, proc)  # checkpoints at 2 and 4; the kill lands in step 6 or 7
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(losses(run))
    assert killed_at < steps and not (run / "adapter.safetensors").exists()
    assert checkpoint_dirs(run)[-1][0] in (4, 6)

    run_script(tmp_path, [], resume=str(run))
    assert losses(run) == expected  # bit-identical, step by step
    ref_w, run_w = load_file(ref / "adapter.safetensors"), load_file(run / "adapter.safetensors")
    assert all(torch.equal(ref_w[k], run_w[k]) for k in ref_w)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_dir, tmp_path, sig):
    run = tmp_path / "run"
    proc = run_script(tmp_path, overrides(tiny_dir, run, steps=40, **{"train.save_every": 0}), slow=0.1, wait=False)
    wait_for(lambda: len(losses(run)) >= 3, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted at step" in out and "--resume" in out
    (step, ck), = checkpoint_dirs(run)
    assert 3 <= step < 40 and step == losses(run)[-1][0]
    assert json.loads((ck / "sampler.json").read_text())["draws"] == 4 * step


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dir, tmp_path, monkeypatch):
    import multilora.train as T

    calls = {"n": 0}
    real = T.token_losses

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        sums, counts = real(*args, **kwargs)
        return (sums * float("nan") if calls["n"] == 5 else sums), counts

    monkeypatch.setattr(T, "token_losses", poisoned)
    run = tmp_path / "run"
    with pytest.raises(MultiLoRAError, match=r"non-finite loss at step 5 .*last good checkpoint is .*step-4"):
        train(load_config(None, overrides(tiny_dir, run, steps=8)), progress=False)
    assert [s for s, _ in checkpoint_dirs(run)] == [2, 4]
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]
    assert not (run / "adapter.safetensors").exists()


def test_existing_run_folder_is_not_overwritten(tiny_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    config = load_config(None, overrides(tiny_dir, run, steps=1))
    with pytest.raises(MultiLoRAError, match=r"already exists; pass --overwrite"):
        train(config, progress=False)
    assert (run / "precious.txt").read_text() == "keep me"
    train(config, overwrite=True, progress=False)
    assert not (run / "precious.txt").exists() and (run / "adapter.safetensors").is_file()


def test_a_second_trainer_on_the_same_run_folder_is_refused(tiny_dir, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(  # another process holding the run folder, as a running `multilora train` does
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from multilora.run import Run; "
         "Run(Path(sys.argv[1])).lock(); print('locked', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = load_config(None, overrides(tiny_dir, run, steps=1))
        with pytest.raises(MultiLoRAError, match=rf"in use by a training process \(pid {holder.pid},"):
            train(config, progress=False)
        assert not run.exists()  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()
    train(config, progress=False)  # the dead holder's lock file does not block (the kernel released the lock)
    assert (run / "adapter.safetensors").is_file()
    train(load_config(None, overrides(tiny_dir, run, steps=1)), overwrite=True, progress=False)  # same process again


def test_resume_refuses_a_changed_config_and_a_folder_without_checkpoints(tiny_dir, tmp_path):
    import argparse

    run = tmp_path / "run"
    train(load_config(None, overrides(tiny_dir, run, steps=2)), progress=False)
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    args, extra = p.parse_known_args(["--resume", str(run), "--train.max_steps", "3", "--no-progress"])
    run_train_cli(args, extra)  # longer runs may continue
    assert [s for s, _ in losses(run)] == [1, 2, 3]
    with pytest.raises(MultiLoRAError, match=r"differs .* at optim\.lr"):
        train(load_config(None, overrides(tiny_dir, run, steps=4, **{"optim.lr": 0.5})), resume=run)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(MultiLoRAError, match="no complete checkpoint"):
        train(load_config(empty / "config.yaml"), resume=empty)


def test_save_last_false_keeps_no_checkpoint_at_the_end_but_ctrl_c_still_saves(tiny_dir, tmp_path):
    run = train(load_config(None, overrides(tiny_dir, tmp_path / "run", steps=3, **{
        "train.save_every": 0, "train.save_last": "false"})), progress=False)
    assert Run(run).finished() is not None and (run / "adapter.safetensors").is_file()
    assert checkpoint_dirs(run) == []
    with pytest.raises(MultiLoRAError, match=r"no complete checkpoint .*finished without one .*save_last false"):
        train(None, resume=run, progress=False)
    same = train(load_config(None, overrides(tiny_dir, tmp_path / "same", steps=3, **{"train.save_every": 0})),
                 progress=False)
    assert [d.name for _, d in checkpoint_dirs(same)] == ["step-3"] and losses(same) == losses(run)

    def interrupt(step, model, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides(tiny_dir, tmp_path / "stopped", steps=3, **{
            "train.save_every": 0, "train.save_last": "false"})), on_step=interrupt, progress=False)
    assert [d.name for _, d in checkpoint_dirs(tmp_path / "stopped")] == ["step-2"]


# ----------------------------------------------------------------------------- recipes


def test_demo_recipes_compare_like_with_like():
    configs = {m: load_config(RECIPES / f"demo-{m}.yaml") for m in ("lora", "multilora", "full")}
    for c in configs.values():
        assert c.model == "smollm2-135m"
        assert (c.data, c.train, c.optim.schedule, c.optim.warmup_steps) == (
            configs["multilora"].data, configs["multilora"].train, "cosine", configs["multilora"].optim.warmup_steps)
    m, lo = configs["multilora"].adapter, configs["lora"].adapter
    assert (m.n, m.r) == (3, 8) and (lo.n, lo.r) == (1, m.n * m.r) and lo.targets == m.targets
    assert {c.output_dir for c in configs.values()} == {"runs/demo-lora", "runs/demo-multilora", "runs/demo-full"}


def test_gpu_recipe_builds_its_plan_on_cpu(tiny_dir):
    path = RECIPES / "llama2-7b-multilora.yaml"
    with pytest.raises(MultiLoRAError, match="is not a local folder"):
        load_config(path)  # the placeholder path does not exist here
    config = load_config(path, ["--model", str(tiny_dir)])
    assert (config.method, config.adapter.n, config.optim.lr, config.data.max_len, config.train.epochs) == (
        "multilora", 3, 3e-4, 512, 3.0)
    plan = build_plan(config, num_processes=8)
    adapted = {k.rsplit(".", 1)[0] for k in plan.model.state_dict() if k.endswith("lora_A")}
    assert {a.rsplit(".", 1)[1] for a in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(adapted) == 4 * 2  # 2 layers in the tiny model
    n_train = sum(map(len, plan.train_examples.values()))
    assert plan.global_batch == config.train.batch_size * config.train.grad_accum * 8
    assert plan.total_steps == -(-3 * n_train // plan.global_batch)
    assert "multilora" in plan.describe()


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    ddp = ClusterConfig.from_yaml_file(RECIPES / "accelerate" / "ddp.yaml")
    assert str(ddp.distributed_type).endswith("MULTI_GPU") and ddp.num_processes >= 2
    fsdp = ClusterConfig.from_yaml_file(RECIPES / "accelerate" / "fsdp.yaml")
    assert str(fsdp.distributed_type).endswith("FSDP") and fsdp.fsdp_config


def test_cli_help_lists_the_sections(capsys):
    import argparse

    p = argparse.ArgumentParser(prog="multilora train")
    add_train_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = capsys.readouterr().out
    for section in ("adapter:", "data:", "optim:", "train:", "output_dir:", "--resume", "--overwrite"):
        assert section in out


def test_cli_dry_run_and_override_values(tiny_dir, tmp_path, capsys):
    import argparse

    p = argparse.ArgumentParser(prog="multilora train")
    add_train_arguments(p)
    argv = [str(RECIPES / "demo-multilora.yaml"), "--dry-run", "--model", str(tiny_dir), "--adapter.n", "2",
            "--data.tasks", "[rte]", "--output_dir", str(tmp_path / "never")]
    args, extra = p.parse_known_args(argv)
    run_train_cli(args, extra)
    out = capsys.readouterr().out
    assert "multilora on" in out and "tasks: rte" in out and not (tmp_path / "never").exists()
    args, extra = p.parse_known_args(["--resume", str(tmp_path), "--adapter.rank", "4"])
    with pytest.raises(MultiLoRAError, match="is not a run folder"):
        run_train_cli(args, extra)
    args, extra = p.parse_known_args([str(RECIPES / "demo-multilora.yaml"), "--adapter.rank", "4"])
    with pytest.raises(MultiLoRAError, match=r"unknown key 'adapter\.rank'; did you mean 'adapter\.r'"):
        run_train_cli(args, extra)


# ----------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_processes_match_one(tiny_dir, tmp_path):
    """2 CPU processes (gloo, DDP through accelerate) with batch 2 each = 1 process with batch 4."""
    script = tmp_path / "run_train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    common = overrides(tiny_dir, tmp_path / "x", steps=4, **{"data.eval_examples": 5, "train.grad_accum": 2})
    one = tmp_path / "one"
    run_script(tmp_path, common + ["--output_dir", str(one), "--train.batch_size", "4"])
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # accelerate launch --cpu runs several CPU processes only through MPI; torchrun sets up the same
    # environment accelerate's own multi-process launcher would, and Accelerator(cpu=True) picks gloo.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # a free port
           str(script), "0", "-", *common, "--output_dir", str(two), "--train.batch_size", "2"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 processes" in res.stdout + res.stderr
    a, b = load_file(one / "adapter.safetensors"), load_file(two / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    la, lb = losses(one), losses(two)
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3, 4]
    assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(la, lb))
    (ea,), (eb,) = evals(one), evals(two)  # held-out loss: 10 examples, split 5 / 5 over the processes and summed
    assert ea["eval"].keys() == eb["eval"].keys() == {"loss", "loss/rte", "loss/wic"}
    assert all(abs(ea["eval"][k] - eb["eval"][k]) < 1e-4 for k in ea["eval"])


# ----------------------------------------------------------------------------- learning-dynamics options


def test_optimizer_groups_carry_the_lr_multipliers(tiny_dir, tmp_path):
    from multilora.plan import make_optimizer

    config = load_config(None, overrides(tiny_dir, tmp_path / "r", **{"optim.lr": 1e-3, "optim.weight_decay": 0.1,
                                                                      "optim.s_lr_mult": 10, "optim.b_lr_mult": 4}))
    plan = build_plan(config)
    groups = {g["name"]: g for g in plan.param_groups}
    names = {id(p): n for n, p in plan.model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in groups["scales"]["params"]} == {"lora_s"}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in groups["lora_B"]["params"]} == {"lora_B"}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in groups["decay"]["params"]} == {"lora_A"}
    optimizer = make_optimizer(plan)
    got = {(len(g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    layers = len(groups["scales"]["params"])
    assert got == {(layers, 1e-3, 0.1), (layers, 4e-3, 0.1), (layers, 1e-2, 0.0)}


def _first_step_change(tiny_dir: Path, out: Path, method: str, name: str, **extra) -> torch.Tensor:
    """|p_1 - p_0| of every adapter tensor called `name`, concatenated, after one optimizer step."""
    from multilora.inject import adapter_parameters

    config = load_config(None, overrides(tiny_dir, out, method, steps=1, **{"optim.lr": 1e-3, "optim.grad_clip": 0,
                                                                            "optim.warmup_steps": 0, **extra}))
    plan_model = build_plan(config).model  # the same seed gives the same init as the run below
    before = {k: v.detach().clone() for k, v in adapter_parameters(plan_model).items() if k.endswith(name)}
    after = {}
    train(config, on_step=lambda step, model, record: after.update(
        {k: v.detach().clone() for k, v in adapter_parameters(model).items() if k.endswith(name)}), progress=False)
    return torch.cat([(after[k] - before[k]).abs().flatten() for k in before])


@pytest.mark.parametrize("method,name,key", [("multilora", "lora_s", "optim.s_lr_mult"),
                                             ("lora", "lora_B", "optim.b_lr_mult")])
def test_lr_multiplier_scales_the_first_step(tiny_dir, tmp_path, method, name, key):
    # Adam's first step moves each parameter by lr * |g| / (|g| + eps) ~ lr: so the change of s (or B)
    # after one step is the group's lr, and its ratio between two runs from the same init and batch is
    # exactly the multiplier.
    plain = _first_step_change(tiny_dir, tmp_path / "x1", method, name)
    fast = _first_step_change(tiny_dir, tmp_path / "x10", method, name, **{key: 10})
    moved = plain > 0
    assert moved.float().mean() > 0.9
    assert abs(float(plain[moved].median()) - 1e-3) < 1e-6  # (smaller only where |g| is near Adam's eps)
    ratio = fast[moved] / plain[moved]
    assert torch.allclose(ratio, torch.full_like(ratio, 10.0), rtol=1e-3), ratio


@pytest.mark.parametrize("method", ["multilora", "full"])
def test_fused_adamw_is_the_default_and_takes_the_foreach_steps_up_to_rounding(tiny_dir, tmp_path, method):
    from multilora.plan import make_optimizer

    runs = {}
    for fused in (True, False):
        config = load_config(None, overrides(tiny_dir, tmp_path / str(fused), method, steps=5,
                                             **({} if fused else {"optim.fused": "false"})))
        assert config.optim.fused is fused
        assert bool(make_optimizer(build_plan(config)).defaults["fused"]) is fused
        runs[fused] = train(config, progress=False)
    fused, foreach = losses(runs[True]), losses(runs[False])
    assert [s for s, _ in fused] == [1, 2, 3, 4, 5] and fused[0] == foreach[0]  # the same first batch
    assert fused[-1][1] < fused[0][1] - 0.01  # it learns
    assert all(abs(a - b) <= 1e-5 * abs(b) for (_, a), (_, b) in zip(fused, foreach)), (fused, foreach)


def test_scale_init_sets_s_and_is_refused_where_it_does_not_apply(tiny_dir, tmp_path):
    plan = build_plan(load_config(None, overrides(tiny_dir, tmp_path / "r", **{"adapter.scale_init": 0.25})))
    scales = [p for n, p in plan.model.named_parameters() if n.endswith("lora_s")]
    assert scales and all(torch.equal(s, torch.full_like(s, 0.25)) for s in scales)
    with pytest.raises(MultiLoRAError, match="method lora has no scales"):
        load_config(None, overrides(tiny_dir, tmp_path / "r", "lora", **{"adapter.scale_init": 0.5}))
    with pytest.raises(MultiLoRAError, match="scale_init = nan must be a finite number"):
        load_config(None, overrides(tiny_dir, tmp_path / "r", **{"adapter.scale_init": ".nan"}))
    with pytest.raises(MultiLoRAError, match="optim.s_lr_mult = 0.0 must be > 0"):
        load_config(None, overrides(tiny_dir, tmp_path / "r", **{"optim.s_lr_mult": 0}))


def test_cli_refuses_an_abbreviated_key_instead_of_guessing(tiny_dir, tmp_path, capsys):
    from multilora.cli import main

    args = overrides(tiny_dir, tmp_path / "r")
    i = args.index("--train.max_steps")
    args[i] = "--train.max_step"  # argparse would otherwise take it for --train.max_steps
    (tmp_path / "c.yaml").write_text(f"model: {tiny_dir}\n")
    assert main(["train", str(tmp_path / "c.yaml"), *args, "--dry-run"]) == 2
    assert "unknown key 'train.max_step'; did you mean 'train.max_steps'?" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run folder records (issue 16)


def test_resume_with_a_longer_run_continues_on_the_new_schedule(tiny_dir, tmp_path):
    """Resuming a finished 6-step run with max_steps 8: steps 7 and 8 get the lrs of a fresh 8-step run."""
    fresh = train(load_config(None, overrides(tiny_dir, tmp_path / "fresh", steps=8)), progress=False)
    run = train(load_config(None, overrides(tiny_dir, tmp_path / "run", steps=6)), progress=False)
    assert [s for s, _ in checkpoint_dirs(run)] == [4, 6]
    train(load_config(None, overrides(tiny_dir, run, steps=8)), resume=run, progress=False)

    def lrs(folder: Path) -> dict[int, float]:
        return {r["step"]: r["lr"] for r in read_metrics(folder) if "lr" in r}

    want, got = lrs(fresh), lrs(run)
    assert got[6] < want[6]  # step 6 ran near the end of the 6-step cosine (whose next value is 0)
    assert got[7] == pytest.approx(want[7], rel=1e-12) and got[8] == pytest.approx(want[8], rel=1e-12)
    assert Run(run).finished()["step"] == 8


def test_every_parameter_group_logs_its_lr(tiny_dir, tmp_path):
    config = load_config(None, overrides(tiny_dir, tmp_path / "run", steps=2, **{"optim.s_lr_mult": 30,
                                                                                  "optim.b_lr_mult": 4}))
    run = train(config, progress=False)
    first = next(r for r in read_metrics(run) if "loss" in r)
    assert first["lr/scales"] == pytest.approx(30 * first["lr/decay"])
    assert first["lr/lora_B"] == pytest.approx(4 * first["lr/decay"])
    assert first["lr"] == first["lr/decay"] > 0


def test_train_writes_the_finished_record_last(tiny_dir, tmp_path, monkeypatch):
    run = train(load_config(None, overrides(tiny_dir, tmp_path / "done", steps=2)), progress=False)
    record = Run(run).finished()
    assert record["step"] == 2 and record["seconds"] > 0 and record["finished"] > 0
    assert (run / "adapter.safetensors").stat().st_mtime <= (run / "finished.json").stat().st_mtime

    import multilora.run as R

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(R, "save_adapter_from_state", refuse)
    failed = tmp_path / "failed"
    with pytest.raises(MultiLoRAError, match="disk is full"):
        train(load_config(None, overrides(tiny_dir, failed, steps=2)), progress=False)
    assert Run(failed).finished() is None  # a run whose final save failed is not finished


def test_the_resume_hint_is_shell_quoted(tiny_dir, tmp_path, capsys):
    run = tmp_path / "my run ünï ✓"

    def interrupt(step, model, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides(tiny_dir, run, steps=6)), on_step=interrupt, progress=False)
    out = capsys.readouterr().out
    hint = f"multilora train --resume {shlex.quote(str(run))}"
    assert hint in out and "'" in hint
    assert shlex.split(hint)[-1] == str(run)  # pasted into a shell, it names the folder
    assert [s for s, _ in checkpoint_dirs(run)] == [2]
