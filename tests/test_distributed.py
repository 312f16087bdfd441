"""Sharded training on 2 CPU processes (gloo): FSDP2 and DeepSpeed ZeRO-2 through accelerate; the
DeepSpeed branch of train_step with a stand-in engine.

accelerate 1.15 starts neither on CPU processes. FSDP: `AcceleratorState.__init__`
(accelerate/state.py:986-1013) sets `DistributedType.FSDP` only inside `elif self.distributed_type in
[MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]`, a list without MULTI_CPU, so `Accelerator(cpu=True)` under
torchrun stays MULTI_CPU (DDP) whatever ACCELERATE_USE_FSDP says. DeepSpeed: state.py:974 reads
`ACCELERATE_USE_DEEPSPEED == "true" and not cpu`, and without cpu=True a machine without an accelerator
gets no backend at all (state.py:769-798 know only accelerator devices). The launcher script below
sets the distributed type after accelerate built its state, with the plugin accelerate made from the
environment `accelerate launch --config_file recipes/accelerate/<recipe>` exports; from there on
everything is accelerate's own FSDP2 / DeepSpeed code (fully_shard per decoder layer or the ZeRO-2
engine, their sharded checkpoints, get_state_dict gathering the adapter), over gloo.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from multilora.errors import MultiLoRAError
from multilora.run import checkpoint_dirs, read_metrics

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "recipes" / "accelerate"

LAUNCH = """
import runpy, sys, time
import torch
torch.set_num_threads(1)
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__

def init(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):  # see the module docstring
    _init(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if fsdp_plugin is not None:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
    elif deepspeed_plugin is not None:  # what state.py:974-985 does for accelerator processes
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo")  # wraps the gloo group accelerate started
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.distributed_type, self.deepspeed_plugins = DistributedType.DEEPSPEED, deepspeed_plugin
    else:
        return
    PartialState._shared_state["distributed_type"] = self.distributed_type  # later states copy it

AcceleratorState.__init__ = init
slow = float(sys.argv[1])
if slow:
    import multilora.loss as L  # what the module run below imports its token_losses from
    fwd = L.token_losses
    def slow_losses(*a, **k):
        time.sleep(slow)  # inside the step, so a kill lands mid-step
        return fwd(*a, **k)
    L.token_losses = slow_losses
sys.argv = ["multilora.train", *sys.argv[2:]]
runpy.run_module("multilora.train", run_name="__main__")
"""


def launcher_env(config_file: Path, processes: int, everything: bool = False) -> dict[str, str]:
    """The FSDP/DeepSpeed settings `accelerate launch --config_file F --num_processes N` gives its processes
    (`everything`: all the variables it sets)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--num_processes",
                                               str(processes), "unused.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)  # as launch_command does
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    if everything:
        return {k: v for k, v in env.items() if os.environ.get(k) != v}
    return {k: v for k, v in env.items()
            if k.startswith(("FSDP_", "ACCELERATE_USE_", "ACCELERATE_DEEPSPEED_", "ACCELERATE_CONFIG_DS"))}


def write_config(tiny_dir: Path, path: Path, steps: int) -> Path:
    path.write_text(textwrap.dedent(f"""
        model: {tiny_dir}
        method: multilora
        data: {{tasks: [rte, wic], max_len: 64, eval_examples: 5}}
        adapter: {{targets: all-linear}}
        optim: {{lr: 0.01}}
        train: {{max_steps: {steps}, batch_size: 2, grad_accum: 2, save_every: 2, eval_every: 0, keep_last: 2,
                 cpu: true}}
    """))
    return path


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def torchrun_command(script: Path, args: list[str], slow: float = 0.0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(script), str(slow), *args]


SHARDED = {  # recipe, what its launcher sets, what its checkpoint holds (one model shard file per process)
    "fsdp2": ("fsdp2.yaml", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "pytorch_model_fsdp_0/*.distcp"),
    "deepspeed-zero2": ("deepspeed-zero2.yaml", {"ACCELERATE_USE_DEEPSPEED": "true",
                                                 "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
                        "pytorch_model/zero_pp_rank_*_optim_states.pt"),
}


@pytest.mark.parametrize("kind", list(SHARDED))
def test_sharded_recipes_give_accelerates_launch_settings(kind):
    """What `accelerate launch --config_file <recipe>` exports: the sharding mode, and for DeepSpeed no
    gradient_accumulation_steps / gradient_clipping (they would override train.grad_accum / optim.grad_clip)."""
    recipe, sets, _ = SHARDED[kind]
    env = launcher_env(ACCELERATE / recipe, 8, everything=True)
    assert all(env[k] == v for k, v in sets.items()), env
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env and "ACCELERATE_GRADIENT_CLIPPING" not in env


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SHARDED))
def test_sharded_two_processes_match_one_and_resume_after_a_kill(tiny_dir, tmp_path, kind):
    """2 CPU processes under accelerate's FSDP2 / DeepSpeed ZeRO-2 (batch 2 each) = 1 process (batch 4);
    a SIGKILLed run resumed from its sharded checkpoint continues the same loss curve to the same adapter."""
    recipe, sets, shard_files = SHARDED[kind]
    if kind.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    steps = 6
    config = write_config(tiny_dir, tmp_path / "run.yaml", steps)
    script = tmp_path / "sharded_cpu.py"
    script.write_text(textwrap.dedent(LAUNCH))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **launcher_env(ACCELERATE / recipe, 2)}
    assert all(env[k] == v for k, v in sets.items())

    one = tmp_path / "one"
    res = subprocess.run([sys.executable, "-m", "multilora.train", str(config), "--output_dir", str(one),
                          "--train.batch_size", "4"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    expected = losses(one)
    assert [s for s, _ in expected] == list(range(1, steps + 1))

    run = tmp_path / kind
    proc = subprocess.Popen(torchrun_command(script, [str(config), "--output_dir", str(run)], slow=0.3), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.time() + 240
    while len(losses(run)) < 3:  # a checkpoint at step 2; the kill lands in step 4 or later
        if proc.poll() is not None:
            raise AssertionError(f"the {kind} run ended early: {proc.stdout.read()}")
        assert time.time() < end, "timed out"
        time.sleep(0.05)
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)  # both workers (torchrun starts each in its own session) and torchrun
    proc.communicate(timeout=60)
    assert len(losses(run)) < steps and not (run / "adapter.safetensors").exists()
    killed_at, ck = checkpoint_dirs(run)[-1]
    assert killed_at in (2, 4)
    assert len(list(ck.glob(shard_files))) == 2  # accelerate's sharded FSDP / DeepSpeed checkpoint

    res = subprocess.run(torchrun_command(script, ["--resume", str(run)]), env=env, capture_output=True, text=True,
                         timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert f"from step-{killed_at}" in out and "2 processes" in out
    got = losses(run)
    assert [s for s, _ in got] == list(range(1, steps + 1))
    assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(got, expected)), (got, expected)
    a, b = load_file(one / "adapter.safetensors"), load_file(run / "adapter.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:  # gathered by accelerator.get_state_dict
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    assert any(a[k].abs().max() > 0.01 for k in a if "lora_B" in k)  # trained, not the zero init


# ----------------------------------------------------------------------------- DeepSpeed's engine, stood in for


class EngineAccelerator:
    """Stands in for accelerate under DeepSpeed: the engine clips and steps the optimizer inside the
    backward of the last micro-batch; clip_grad_norm_ returns the norm the engine computed (or None)."""

    distributed_type = DistributedType.DEEPSPEED
    num_processes, process_index, device, scaler, mixed_precision = 1, 0, torch.device("cpu"), None, "no"

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler, grad_accum: int, norm: float | None):
        self.engine_optimizer, self.engine_scheduler, self.k, self.norm = optimizer, scheduler, grad_accum, norm
        self.backwards = 0

    def accumulate(self, model):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.backwards += 1
        if self.backwards % self.k == 0:  # the accumulation boundary: DeepSpeed's engine.step()
            self.engine_optimizer.step()
            self.engine_scheduler.step()
            self.engine_optimizer.zero_grad()

    def reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return tensor

    def clip_grad_norm_(self, parameters, max_norm):
        return self.norm


def engine_session(tiny_dir: Path, out: Path, norm: float | None):
    """A train.Session on the tiny model whose accelerator is the stand-in DeepSpeed engine."""
    from multilora.config import load_config
    from multilora.plan import build_plan, make_optimizer, make_scheduler
    from multilora.run import Run
    from multilora.train import Session

    config = load_config(write_config(tiny_dir, out.with_suffix(".yaml"), 4), ["--output_dir", str(out)])
    plan = build_plan(config)
    optimizer = make_optimizer(plan)
    scheduler = make_scheduler(optimizer, config.optim.schedule, config.optim.warmup_steps, plan.total_steps)
    acc = EngineAccelerator(optimizer, scheduler, config.train.grad_accum, norm)
    wrapped = SimpleNamespace(step=lambda: None, zero_grad=lambda: None)  # accelerate's DeepSpeed wrappers
    wrapped_scheduler = SimpleNamespace(step=lambda: None, get_last_lr=scheduler.get_last_lr)
    out.mkdir()
    return Session(plan, acc, Run(out), plan.model, wrapped, wrapped_scheduler, None), optimizer


def adapter_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def test_deepspeed_step_reads_the_engines_norm_and_this_steps_lr(tiny_dir, tmp_path, one_thread):
    from multilora.train import next_rows, train_step

    s, optimizer = engine_session(tiny_dir, tmp_path / "run", norm=0.25)
    lr_before = optimizer.param_groups[0]["lr"]
    before = adapter_copy(s.model)
    record = train_step(s, next_rows(s, s.plan.global_batch))
    assert s.accelerator.backwards == 2 and record["step"] == 1
    assert record["grad_norm"] == 0.25  # what the engine computed, not a norm of the cleared gradients
    assert record["lr"] == lr_before != optimizer.param_groups[0]["lr"]  # the lr the step used, not the next one
    assert any(not torch.equal(before[k], p) for k, p in adapter_copy(s.model).items())

    s.accelerator.norm = None  # an engine without a norm: no grad_norm in the record, no false alarm
    assert "grad_norm" not in train_step(s, next_rows(s, s.plan.global_batch))


def test_deepspeed_nonfinite_loss_stops_before_the_engine_steps(tiny_dir, tmp_path, monkeypatch, one_thread):
    import multilora.train as T

    s, _ = engine_session(tiny_dir, tmp_path / "run", norm=0.25)
    real = T.token_losses
    calls = {"n": 0}

    def nan_on_second_micro_batch(*args, **kwargs):
        sums, counts = real(*args, **kwargs)
        calls["n"] += 1
        return (sums * float("nan") if calls["n"] == 2 else sums), counts

    monkeypatch.setattr(T, "token_losses", nan_on_second_micro_batch)
    before = adapter_copy(s.model)
    with pytest.raises(MultiLoRAError, match="non-finite loss at step 1.*before updating the weights"):
        T.train_step(s, T.next_rows(s, s.plan.global_batch))
    assert s.accelerator.backwards == 1  # the poisoned micro-batch (the one that would step) never ran backward
    assert all(torch.equal(before[k], p) for k, p in adapter_copy(s.model).items())


def test_deepspeed_nonfinite_grad_norm_says_the_engine_already_stepped(tiny_dir, tmp_path, one_thread):
    from multilora.train import next_rows, train_step

    s, _ = engine_session(tiny_dir, tmp_path / "run", norm=float("inf"))
    with pytest.raises(MultiLoRAError, match="non-finite gradient norm at step 1.*already updated the weights"):
        train_step(s, next_rows(s, s.plan.global_batch))
    assert s.accelerator.backwards == 2  # the engine stepped: the message must not claim the weights are untouched
