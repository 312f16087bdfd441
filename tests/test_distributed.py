"""Sharded training: FSDP2 through accelerate on 2 CPU processes, and the DeepSpeed branch of train_step.

accelerate 1.15 turns FSDP on only for accelerator processes: `AcceleratorState.__init__`
(accelerate/state.py:986-1013) sets `DistributedType.FSDP` inside `elif self.distributed_type in
[MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]`, a list without MULTI_CPU, so `Accelerator(cpu=True)` under
torchrun stays MULTI_CPU (DDP) whatever ACCELERATE_USE_FSDP says. The launcher script below sets the
distributed type to FSDP after accelerate built its state, with the FSDP plugin accelerate made from
the same environment `accelerate launch --config_file recipes/accelerate/fsdp2.yaml` exports; from
there on everything is accelerate's own FSDP2 code (fully_shard per decoder layer, sharded
torch.distributed.checkpoint checkpoints, get_state_dict gathering the adapter), over gloo.
"""

from __future__ import annotations

import json
import math
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
from safetensors.torch import load_file

from multilora.errors import MultiLoRAError
from multilora.run import checkpoint_dirs, read_metrics

ROOT = Path(__file__).resolve().parents[1]
FSDP_RECIPE = ROOT / "recipes" / "accelerate" / "fsdp2.yaml"

LAUNCH = """
import runpy, sys, time
import torch
torch.set_num_threads(1)
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__

def init(self, *args, fsdp_plugin=None, **kwargs):  # accelerate/state.py:986 leaves MULTI_CPU out of FSDP
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later states copy it

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


def launcher_env(config_file: Path, processes: int) -> dict[str, str]:
    """The environment `accelerate launch --config_file F --num_processes N` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--num_processes",
                                               str(processes), "unused.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}


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


def fsdp_command(script: Path, args: list[str], slow: float = 0.0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(script), str(slow), *args]


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_and_resume_after_a_kill(tiny_dir, tmp_path):
    """2 CPU processes under accelerate's FSDP2 (batch 2 each) = 1 process (batch 4); a SIGKILLed
    FSDP run resumed from its sharded checkpoint continues the same loss curve to the same adapter."""
    steps = 6
    config = write_config(tiny_dir, tmp_path / "run.yaml", steps)
    script = tmp_path / "fsdp_cpu.py"
    script.write_text(textwrap.dedent(LAUNCH))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **launcher_env(FSDP_RECIPE, 2)}
    assert env["FSDP_VERSION"] == "2" and env["ACCELERATE_USE_FSDP"] == "true"

    one = tmp_path / "one"
    res = subprocess.run([sys.executable, "-m", "multilora.train", str(config), "--output_dir", str(one),
                          "--train.batch_size", "4"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    expected = losses(one)
    assert [s for s, _ in expected] == list(range(1, steps + 1))

    run = tmp_path / "fsdp"
    proc = subprocess.Popen(fsdp_command(script, [str(config), "--output_dir", str(run)], slow=0.3), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.time() + 240
    while len(losses(run)) < 3:  # a checkpoint at step 2; the kill lands in step 4 or later
        if proc.poll() is not None:
            raise AssertionError(f"the FSDP run ended early: {proc.stdout.read()}")
        assert time.time() < end, "timed out"
        time.sleep(0.05)
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)  # both workers (torchrun starts each in its own session) and torchrun
    proc.communicate(timeout=60)
    assert len(losses(run)) < steps and not (run / "adapter.safetensors").exists()
    killed_at, ck = checkpoint_dirs(run)[-1]
    assert killed_at in (2, 4)
    assert (ck / "pytorch_model_fsdp_0").is_dir()  # accelerate's sharded FSDP checkpoint, one file per process
    assert len(list((ck / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2

    res = subprocess.run(fsdp_command(script, ["--resume", str(run)]), env=env, capture_output=True, text=True,
                         timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert f"from step-{killed_at}" in out and "2 processes" in out
    got = losses(run)
    assert [s for s, _ in got] == list(range(1, steps + 1))
    assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(got, expected)), (got, expected)
    a, b = load_file(one / "adapter.safetensors"), load_file(run / "adapter.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:  # gathered from the shards by accelerator.get_state_dict
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    assert any(a[k].abs().max() > 0.01 for k in a if "lora_B" in k)  # trained, not the zero init


# ----------------------------------------------------------------------------- DeepSpeed's engine, stood in for
