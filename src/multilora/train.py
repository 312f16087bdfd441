"""`multilora train`: LoRA, MultiLoRA or full fine-tuning of a causal LM on a task mixture, on Accelerate.

    config = load_config("recipes/demo-multilora.yaml", ["--train.max_steps", "20"])
    run_dir = train(config)                       # runs/<name>/ as in DESIGN.md
    train(None, resume=run_dir)                   # continue from the newest complete checkpoint

One optimizer step draws one global batch of `batch_size * grad_accum * processes` examples from
the mixture sampler; every process sees the whole draw and trains on its own slice, so the loss is
the token-level mean over the global batch whatever the number of processes (each process's loss
is scaled by the global label-token count, accelerate averages gradients over processes and
divides by `grad_accum`). Gradient accumulation, clipping, mixed precision, DDP/FSDP/DeepSpeed and
checkpoint state (optimizer, scheduler, RNG) are accelerate's; a checkpoint also holds the
sampler position, so a resumed run sees exactly the batches the uninterrupted run would.

Run folder:
    config.yaml                  the resolved config
    adapter.safetensors + adapter_config.json     (lora, multilora; via checkpoint.save_adapter)
    model.safetensors + config.json + tokenizer   (full: a save_pretrained folder) + full_model.json
    checkpoints/step-N/          accelerate save_state (model.safetensors holds the trainable tensors only,
                                 optimizer, scheduler, RNG) + sampler.json + trainer_state.json (written last)
    metrics.jsonl                one JSON object per logged step (and per evaluation)
"""

from __future__ import annotations

import argparse
import inspect
import fcntl
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig, config_from_flat, flatten, help_text, load_config, valid_keys
from .data import IGNORE, Example, MixtureSampler, collate, tokenize_example
from .errors import MultiLoRAError
from .io import (WriteError, check_writable_dir, failed_write, fsync_dir, fsync_tree, read_json_object, write_error,
                 write_json_atomic, write_text_atomic)

if TYPE_CHECKING:
    from .inject import MultiLoRAConfig

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
FULL_INFO = "full_model.json"
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: marks it complete
SAMPLER_FILE = "sampler.json"
# keys a resumed run may change (how long, how often); everything else must match the saved config
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs", "train.eval_every", "train.save_every",
                     "train.keep_last", "train.log_every", "train.log_tensorboard")

EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class Plan:
    """Everything a run needs before the loop starts: model, data, sampler, parameter groups, length."""

    config: TrainConfig
    model: nn.Module
    tokenizer: Any
    tasks: list[str]
    train_examples: dict[str, list[Example]]
    eval_examples: dict[str, list[Example]]
    sampler: MixtureSampler
    param_groups: list[dict]
    total_steps: int
    global_batch: int
    num_processes: int
    counts: dict[str, int] = field(default_factory=dict)  # trainable / frozen / per group

    def describe(self) -> str:
        """A few lines: method, parameters, data, schedule."""
        c = self.config
        groups = ", ".join(f"{g['name']}: {sum(p.numel() for p in g['params']):,} "
                           f"(lr {g['lr']:g}, wd {g['weight_decay']})" for g in self.param_groups)
        sizes = ", ".join(f"{t} {len(v):,}" for t, v in self.train_examples.items())
        return (f"{c.method} on {c.model}: trainable {self.counts['trainable']:,} / frozen {self.counts['frozen']:,} "
                f"parameters ({100 * self.counts['trainable'] / max(1, self.counts['total']):.3f}%); groups {groups}\n"
                f"tasks: {sizes} ({c.data.mixture} mixture)\n"
                f"{self.total_steps} steps x global batch {self.global_batch} "
                f"({c.train.batch_size} x {c.train.grad_accum} accum x {self.num_processes} processes), "
                f"lr {c.optim.lr:g} {c.optim.schedule}, warmup {c.optim.warmup_steps}")


# ----------------------------------------------------------------------------- plan


def build_plan(config: TrainConfig, num_processes: int = 1) -> Plan:
    """Load the model, apply the method, load the data and size the run; no training."""
    from accelerate.utils import set_seed

    from .inject import count_parameters, inject
    from .models import load_model
    from .tasks import get_task, load_examples

    set_seed(config.train.seed)  # before injection: adapter init draws from the RNG
    model, tokenizer = load_model(config.model)
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        inject(model, adapter_config(config))
    trainable, total = count_parameters(model)
    o = config.optim
    groups = param_groups(model, o.lr, o.weight_decay, s_lr_mult=o.s_lr_mult, b_lr_mult=o.b_lr_mult)

    tasks = list(config.data.tasks)
    train_examples = {t: load_examples(t) for t in tasks}
    for t in tasks:  # fail now, not mid-run, on a template or tokenizer problem
        _tokenize(train_examples[t][0], tokenizer, config)
    eval_examples = {}
    for t in tasks:
        if config.data.eval_examples <= 0:
            break
        pool = load_examples(t, get_task(t).eval_split)
        k = min(config.data.eval_examples, len(pool))
        eval_examples[t] = random.Random(f"eval:{t}").sample(pool, k)  # fixed, independent of the seed
    sampler = MixtureSampler({t: len(v) for t, v in train_examples.items()}, config.data.mixture,
                             config.data.temperature, config.data.weights, seed=config.train.seed)
    global_batch = config.train.batch_size * config.train.grad_accum * num_processes
    if config.train.max_steps is not None:
        total_steps = config.train.max_steps
    else:
        total_steps = max(1, math.ceil(config.train.epochs * sum(map(len, train_examples.values())) / global_batch))
    if config.optim.warmup_steps >= total_steps:
        raise MultiLoRAError(f"optim.warmup_steps = {config.optim.warmup_steps} must be below the run's "
                             f"{total_steps} steps; lower it or train longer")
    return Plan(config, model, tokenizer, tasks, train_examples, eval_examples, sampler, groups, total_steps,
                global_batch, num_processes, {"trainable": trainable, "total": total, "frozen": total - trainable})


def adapter_config(config: TrainConfig) -> "MultiLoRAConfig":
    """The MultiLoRAConfig of a run's `adapter` section."""
    from .inject import MultiLoRAConfig

    a = config.adapter
    return MultiLoRAConfig(n=a.n, r=a.r, alpha=a.alpha, dropout=a.dropout, init=a.init, scale=a.scale,
                           scale_init=a.scale_init, targets=a.targets)


def param_groups(model: nn.Module, lr: float, weight_decay: float, s_lr_mult: float = 1.0,
                 b_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups of the trainable parameters, each with its own lr and weight decay.

    "decay": matrices (lr, weight_decay); "lora_B": the B factors (lr x b_lr_mult, weight_decay);
    "scales": MultiLoRA's s (lr x s_lr_mult, no decay); "no_decay": other 1-D tensors (lr, no decay).
    """
    groups = {"decay": {"lr": lr, "weight_decay": weight_decay},
              "lora_B": {"lr": lr * b_lr_mult, "weight_decay": weight_decay},
              "scales": {"lr": lr * s_lr_mult, "weight_decay": 0.0},
              "no_decay": {"lr": lr, "weight_decay": 0.0}}
    members: dict[str, list[nn.Parameter]] = {name: [] for name in groups}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("lora_s"):
            members["scales"].append(p)
        elif name.endswith("lora_B"):
            members["lora_B"].append(p)
        else:
            members["decay" if p.ndim >= 2 else "no_decay"].append(p)
    return [{"name": name, "params": members[name], **opts} for name, opts in groups.items() if members[name]]


def make_optimizer(plan: Plan) -> torch.optim.AdamW:
    """AdamW over the plan's parameter groups, each with its own lr and weight decay."""
    o = plan.config.optim
    return torch.optim.AdamW(
        [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in plan.param_groups],
        lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int) -> Any:
    """Linear warmup to the peak lr, then linear or cosine decay to 0 at `total` steps."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, num_warmup_steps=warmup, num_training_steps=total)


# ----------------------------------------------------------------------------- loss


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor], n_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token losses per task (n_tasks,), response-token count per task (n_tasks,)).

    Logits are computed only where a label follows (`logits_to_keep`), which skips the output
    head on prompt tokens.
    """
    labels = batch["labels"]  # (B, T)
    keep = torch.zeros_like(labels, dtype=torch.bool)  # (B, T): position t predicts token t + 1
    keep[:, :-1] = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][keep[:, :-1]]  # (K,)
    if _accepts_logits_to_keep(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
        logits = out.logits.reshape(-1, out.logits.shape[-1])  # (K, V)
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[keep]  # (K, V)
    loss = F.cross_entropy(logits.float(), targets, reduction="none")  # (K,)
    task_of = batch["task_ids"][:, None].expand_as(keep)[keep]  # (K,)
    sums = torch.zeros(n_tasks, device=loss.device, dtype=loss.dtype).index_add(0, task_of, loss)  # (n_tasks,)
    counts = torch.bincount(task_of, minlength=n_tasks).to(loss.dtype)  # (n_tasks,)
    return sums, counts


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP wraps the model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def heldout_loss_fn(plan: Plan, accelerator: Any) -> EvalFn:
    """The default evaluation: response-token loss per task on the fixed held-out examples.

    Each process scores its share of the examples and the sums are added across processes; every
    process runs the same number of forward passes (FSDP and DeepSpeed need that).
    """
    rows = [_tokenize(ex, plan.tokenizer, plan.config) for t in plan.tasks for ex in plan.eval_examples.get(t, [])]
    bs, world, rank = plan.config.train.batch_size, accelerator.num_processes, accelerator.process_index
    mine = rows[rank::world]
    n_batches = -(-len(rows) // (world * bs))  # the same on every process
    pad, n_tasks = plan.tokenizer.pad_token_id, len(plan.tasks)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        sums = torch.zeros(n_tasks, dtype=torch.float64, device=accelerator.device)
        counts = torch.zeros(n_tasks, dtype=torch.float64, device=accelerator.device)
        for i in range(n_batches):
            part, weight = mine[i * bs:(i + 1) * bs], 1.0
            if not part:  # this process ran out: a dummy batch that counts for nothing
                part, weight = rows[:1], 0.0
            batch = {k: v.to(accelerator.device) for k, v in collate(part, pad, plan.tasks).items()}
            s, c = token_losses(model, batch, n_tasks)
            sums += s.double() * weight
            counts += c.double() * weight
        total = accelerator.reduce(torch.cat([sums, counts]), "sum").cpu()
        sums, counts = total[:n_tasks], total[n_tasks:]
        out = {"loss": float(sums.sum() / counts.sum().clamp(min=1))}
        out |= {f"loss/{t}": float(sums[i] / counts[i]) for i, t in enumerate(plan.tasks) if counts[i] > 0}
        return out

    return evaluate


def _tokenize(ex: Example, tokenizer: Any, config: TrainConfig) -> dict:
    """tokenize_example, but a response longer than max_len is cut (keeping up to half the window of prompt)."""
    max_len = config.data.max_len
    try:
        return tokenize_example(ex, tokenizer, max_len, config.data.chat)
    except MultiLoRAError:
        row = tokenize_example(ex, tokenizer, 10**9, config.data.chat)
        n_prompt = sum(1 for x in row["labels"] if x == IGNORE)
        start = n_prompt - min(n_prompt, max_len // 2)
        return {"input_ids": row["input_ids"][start:start + max_len], "labels": row["labels"][start:start + max_len],
                "task": row["task"]}


# ----------------------------------------------------------------------------- run folder


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    out = []
    for d in root.glob("step-*") if root.is_dir() else []:
        step = d.name.removeprefix("step-")
        if step.isdigit() and (d / STATE_FILE).is_file():
            out.append((int(step), d))
    return sorted(out)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl (a torn last line from a killed run is skipped)."""
    path = Path(run_dir) / METRICS
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk (one write: a killed run leaves whole lines).

    A failed write (disk full) raises a WriteError naming the run's newest checkpoint; a torn last
    line is skipped by read_metrics and dropped by --resume.
    """
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        error = _run_write_error(e, f"saving {path}", path.parent)
        if error is None:
            raise
        raise error from e


def _run_write_error(exc: BaseException, doing: str, run_dir: Path, previous: str = "") -> WriteError | None:
    """io.failed_write for a write in a run folder: the newest checkpoint is what is kept, --resume the way on."""
    done = checkpoint_dirs(run_dir)
    kept, then = ((f"the {previous}checkpoint {done[-1][1]} is kept", f" and --resume {run_dir}") if done else
                  ("no checkpoint was saved yet", " and start the run again with --overwrite"))
    return failed_write(exc, doing, run_dir if run_dir.is_dir() else run_dir.parent, kept, then)


def _save_checkpoint(accelerator: Any, run_dir: Path, step: int, sampler: MixtureSampler, keep_last: int,
                     extra: dict) -> Path:
    """accelerate save_state into checkpoints/.step-N.tmp, add sampler + trainer state, rename; keep the last K.

    A failed save (disk full, folder not writable) removes its temporary folder, leaves every finished
    checkpoint as it was and raises a WriteError naming the checkpoint that is kept. Old checkpoints
    are renamed aside before they are deleted, so a killed run never leaves a half-deleted step-N.
    """
    root = run_dir / CHECKPOINTS
    tmp, final = root / f".step-{step}.tmp", root / f"step-{step}"
    aside = root / f".step-{step}.old.tmp"
    moved_aside = False
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(tmp / SAMPLER_FILE, sampler.state_dict())
            from .checkpoint import sha256_file

            files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}  # verified on resume
            write_json_atomic(tmp / STATE_FILE, {"step": step, **extra, "files": files})
            fsync_tree(tmp)  # accelerate does not flush its files: no empty file in a checkpoint after a crash
            if final.exists():  # the same step saved again (Ctrl-C right after a periodic save)
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
                moved_aside = True
            os.replace(tmp, final)
            fsync_dir(root)
    except Exception as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial checkpoint took
            if moved_aside and not final.exists():
                os.replace(aside, final)
        error = _run_write_error(e, f"saving checkpoint step-{step} to {root}", run_dir, previous="previous ")
        if error is None:  # not a write problem: a bug, keep its traceback
            raise
        raise error from e
    if accelerator.is_main_process:
        for _, old in checkpoint_dirs(run_dir)[:-keep_last]:
            doomed = root / f".{old.name}.old.tmp"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)  # gone from checkpoint_dirs at once, then deleted
            shutil.rmtree(doomed, ignore_errors=True)
        for stale in root.glob(".step-*.tmp"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _verify_checkpoint(ck: Path) -> None:
    """Every file the checkpoint recorded in trainer_state.json is there with its sha256 (else: name it)."""
    from .checkpoint import sha256_file

    fix = f"delete {ck} to resume from the checkpoint before it"
    files = read_json_object(ck / STATE_FILE, fix=fix).get("files")
    if not isinstance(files, dict):  # written by an older multilora: check that the files exist
        files = {name: None for name in ("model.safetensors", SAMPLER_FILE)}
    for name, digest in files.items():
        path = ck / name
        if not path.is_file():
            raise MultiLoRAError(f"checkpoint {ck} is damaged: {name} is missing; {fix}")
        if digest is not None and sha256_file(path) != digest:
            raise MultiLoRAError(f"checkpoint {ck} is damaged: {name} does not match the checksum in {STATE_FILE} "
                                 f"(truncated or corrupt); {fix}")


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _register_state_hooks(accelerator: Any, model: nn.Module) -> None:
    """Checkpoints hold only the trainable tensors (by unwrapped name), and loading checks every key."""
    from safetensors.torch import load_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i in range(len(weights)):
            weights[i] = {k: p.detach() for k, p in _trainable(model).items()}

    def load_hook(models: list, input_dir: str) -> None:
        models.clear()  # loaded below, by name, with a check
        path = Path(input_dir) / "model.safetensors"
        if not path.is_file():
            raise MultiLoRAError(f"checkpoint {input_dir} has no model.safetensors; it is incomplete or not ours")
        tensors = load_file(str(path))
        params = _trainable(model)
        missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
        if missing or extra:
            raise MultiLoRAError(
                f"checkpoint {input_dir} does not fit this run's trainable parameters: "
                + (f"missing {missing[0]!r} ({len(missing)} missing) " if missing else "")
                + (f"unexpected {extra[0]!r} ({len(extra)} unexpected)" if extra else "")
                + "; resume with the same model and method")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[k])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _save_final(plan: Plan, accelerator: Any, model: nn.Module, run_dir: Path) -> None:
    """adapter.safetensors + adapter_config.json, or (full) a save_pretrained folder + full_model.json.

    The tensors come from `accelerator.get_state_dict`, which gathers the full tensors of an FSDP
    or DeepSpeed model on the main process; every process must call this.
    """
    from .checkpoint import base_model_info, sha256_file

    state = accelerator.get_state_dict(model)  # {unwrapped name: full tensor} on the main process
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    try:
        if plan.config.method != "full":
            save_adapter_from_state(plan.config, unwrapped.config, state, run_dir)
            return
        tmp = run_dir / ".full.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        plan.tokenizer.save_pretrained(tmp)
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(f, run_dir / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        weights = sorted(p.name for p in run_dir.glob("model*.safetensors"))
        write_json_atomic(run_dir / FULL_INFO, {
            "format": "multilora-full", "method": "full", "weights": weights,
            "weights_sha256": {w: sha256_file(run_dir / w) for w in weights},
            "base_model": {**base_model_info(unwrapped), "name_or_path": plan.config.model},
            "load_with": "multilora.models.load_model(run_dir) or AutoModelForCausalLM.from_pretrained(run_dir)",
        })
    except Exception as e:  # a full disk or an unwritable folder: one line naming what is kept
        shutil.rmtree(run_dir / ".full.tmp", ignore_errors=True)
        what = "model" if plan.config.method == "full" else "adapter"
        error = _run_write_error(e, f"saving the {what} of the finished run to {run_dir}", run_dir)
        if error is None:
            raise
        raise error from e


def save_adapter_from_state(config: TrainConfig, model_config: Any, state: dict[str, torch.Tensor],
                            out_dir: Path) -> Path:
    """Write adapter.safetensors + adapter_config.json from a full state dict (as gathered from FSDP/DeepSpeed).

    The adapter is injected into a weightless (meta-device) copy of the model built from
    `model_config`, its tensors are taken from `state`, and `checkpoint.save_adapter` writes it.
    """
    import copy

    from transformers import AutoModelForCausalLM

    from .checkpoint import save_adapter
    from .inject import adapter_parameters, inject

    with torch.device("meta"):
        shadow = AutoModelForCausalLM.from_config(copy.deepcopy(model_config))
    inject(shadow, adapter_config(config))
    keys = list(adapter_parameters(shadow))
    missing = [k for k in keys if k not in state]
    if missing:
        raise MultiLoRAError(f"the trained model's state has no {missing[0]!r} ({len(missing)} adapter tensors "
                             "missing); cannot save the adapter")
    shadow.load_state_dict({k: state[k].detach().to("cpu") for k in keys}, strict=False, assign=True)
    return save_adapter(shadow, out_dir)


def _lock_run_dir(run_dir: Path) -> Any:
    """Hold an exclusive lock for `run_dir` (a file beside it, with our PID); refuse if another process holds it.

    The lock is an flock, so the kernel releases it when its process dies: a stale lock file from a
    killed run never blocks the next one.
    """
    path = run_dir.parent / f".{run_dir.name}.lock"
    earlier = _HELD_LOCKS.pop(str(path), None)  # left by an earlier train() of this process that raised
    if earlier is not None:
        earlier.close()
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 -- held until the run ends
    except OSError as e:  # train() checked the folder first: this is a race or an odd file system
        raise write_error(path, e, kept="the run did not start",
                          fix="make the folder writable or set another output_dir") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        owner = fh.read().strip() or "another process"
        fh.close()
        raise MultiLoRAError(f"run folder {run_dir} is in use by a training process (pid {owner}, lock {path}); "
                             "wait for it to finish or choose another output_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    _HELD_LOCKS[str(path)] = fh
    return fh


_HELD_LOCKS: dict[str, Any] = {}


def _prepare_run_dir(config: TrainConfig, overwrite: bool, is_main: bool) -> Path:
    run_dir = Path(config.output_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not overwrite:
            raise MultiLoRAError(f"run folder {run_dir} already exists; pass --overwrite to replace it, "
                                 f"--resume {run_dir} to continue it, or set another output_dir")
        if is_main:
            shutil.rmtree(run_dir) if run_dir.is_dir() else run_dir.unlink()
    return run_dir


def resolve_resume(run_dir: str | os.PathLike, config: TrainConfig | None = None,
                   overrides: list[str] | None = None) -> TrainConfig:
    """The config of a run to resume: its saved config.yaml (+ overrides); `config`, if given, must agree with it."""
    run_dir = Path(run_dir)
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise MultiLoRAError(f"{run_dir} is not a run folder (no {CONFIG_FILE}); pass the output_dir of an earlier run")
    saved = load_config(saved_path, overrides)
    if config is not None:
        a, b = flatten(saved.to_dict()), flatten(config.to_dict())
        diff = [k for k in a if k not in RESUMABLE_CHANGES and k != "output_dir" and a[k] != b.get(k)]
        if diff:
            raise MultiLoRAError(
                f"the config differs from the one {run_dir} was trained with at {', '.join(diff)} "
                f"(e.g. {diff[0]}: saved {a[diff[0]]!r}, given {b.get(diff[0])!r}); resume with the same settings "
                f"(only {', '.join(RESUMABLE_CHANGES)} may change) or start a new run")
        saved = config
    flat = flatten(saved.to_dict())
    flat["output_dir"] = str(run_dir)
    return config_from_flat(flat)


# ----------------------------------------------------------------------------- the loop


def train(config: TrainConfig | None, *, resume: str | os.PathLike | None = None, overwrite: bool = False,
          eval_fn: EvalFn | None = None, on_step: Callable[[int, nn.Module, dict], None] | None = None,
          progress: bool = True) -> Path:
    """Train per `config` (or continue the run folder `resume`, with its saved config if `config` is None); returns the run folder.

    `eval_fn(model) -> {name: value}` replaces the held-out loss evaluation; `on_step(step, model,
    record)` is called after every optimizer step. Ctrl-C (or SIGTERM) saves a checkpoint and raises
    KeyboardInterrupt; a non-finite loss raises MultiLoRAError before the optimizer steps.
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType

    if resume is not None:
        config = resolve_resume(resume, config)
    elif config is None:
        raise MultiLoRAError("train() needs a config, or resume= the folder of a run to continue")
    if config.train.log_tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise MultiLoRAError("train.log_tensorboard is on but tensorboard is not installed: "
                                 "pip install tensorboard, or set train.log_tensorboard false") from None
    run_dir = Path(config.output_dir)
    check_writable_dir(run_dir, "output_dir")  # now, not after the model is loaded or at the first save
    try:
        accelerator = Accelerator(
            mixed_precision=config.train.mixed_precision, cpu=config.train.cpu,
            gradient_accumulation_steps=config.train.grad_accum,
            dataloader_config=DataLoaderConfiguration(split_batches=True),  # scheduler steps once per step
            log_with="tensorboard" if config.train.log_tensorboard else None, project_dir=str(run_dir),
        )
    except ValueError as e:
        raise MultiLoRAError(f"cannot set up accelerate with train.mixed_precision = "
                             f"{config.train.mixed_precision!r} ({e}); use 'no' or 'bf16' on CPU") from None
    lock = _lock_run_dir(run_dir) if accelerator.is_main_process else None  # held until this process exits
    if resume is None:
        _prepare_run_dir(config, overwrite, accelerator.is_main_process)
        accelerator.wait_for_everyone()
    else:
        if not checkpoint_dirs(run_dir):
            raise MultiLoRAError(f"{run_dir} has no complete checkpoint to resume from; start again with --overwrite")

    with accelerator.main_process_first():
        plan = build_plan(config, accelerator.num_processes)
    cfg = plan.config
    model = plan.model
    optimizer = make_optimizer(plan)
    scheduler = make_scheduler(optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, plan.total_steps)
    model.train()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        _register_state_hooks(accelerator, unwrapped)
    say = accelerator.print

    step = 0
    if resume is not None:
        step, ck = checkpoint_dirs(run_dir)[-1]
        _verify_checkpoint(ck)
        try:
            accelerator.load_state(str(ck))
            sampler_state = json.loads((ck / SAMPLER_FILE).read_text(encoding="utf-8"))
        except MultiLoRAError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors / torch / json errors of a damaged checkpoint
            raise MultiLoRAError(f"checkpoint {ck} cannot be loaded ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:200]}); delete {ck} to resume from the "
                                 "checkpoint before it") from None
        plan.sampler.load_state_dict(sampler_state)
        if accelerator.is_main_process:  # drop records past the checkpoint (the killed run's last steps)
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
            write_text_atomic(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        say(f"resuming {run_dir} from {ck.name}")
    elif accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / CONFIG_FILE, cfg.to_yaml())
    accelerator.wait_for_everyone()
    if cfg.train.log_tensorboard:
        accelerator.init_trackers("tensorboard")
    say(plan.describe())

    evaluate = eval_fn or heldout_loss_fn(plan, accelerator)
    tokenized: dict[tuple[str, int], dict] = {}
    n_tasks, bs, k = len(plan.tasks), cfg.train.batch_size, cfg.train.grad_accum
    world, rank = accelerator.num_processes, accelerator.process_index
    stop = {"requested": False}

    def on_signal(signum: int, frame: Any) -> None:
        if stop["requested"]:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        stop["requested"] = True
        say(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
            "(Ctrl-C again to quit at once)")

    # Ctrl-C, and SIGTERM (what torchrun / accelerate launch and batch schedulers send), save and stop
    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: no handler, signals behave as usual
            pass

    def run_eval(at: int) -> None:
        if not (plan.eval_examples or eval_fn):
            return
        model.eval()
        scores = evaluate(model)
        model.train()
        if accelerator.is_main_process:
            _append_jsonl(run_dir / METRICS, {"step": at, "eval": scores})
        if cfg.train.log_tensorboard:
            accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=at)
        say(f"step {at}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))

    def checkpoint(at: int) -> Path:
        return _save_checkpoint(accelerator, run_dir, at, plan.sampler, cfg.train.keep_last,
                                {"total_steps": plan.total_steps, "time": time.time()})

    bar = _progress(progress and accelerator.is_main_process, plan.total_steps, step)
    try:
        if resume is None and cfg.train.eval_every:
            run_eval(0)  # the baseline the later evaluations compare to
        while step < plan.total_steps:
            if _stop_requested(accelerator, stop["requested"]):
                ck = checkpoint(step)
                say(f"interrupted at step {step}: saved {ck}; continue with `multilora train --resume {run_dir}`")
                raise KeyboardInterrupt
            t0 = time.perf_counter()
            rows = _global_batch(plan, tokenized, bs * k * world)
            n_labels = sum(sum(1 for x in r["labels"][1:] if x != IGNORE) for r in rows)  # global label tokens
            sums = torch.zeros(n_tasks, dtype=torch.float64, device=accelerator.device)
            counts = torch.zeros(n_tasks, dtype=torch.float64, device=accelerator.device)
            tokens = 0
            for micro in range(k):
                lo = (micro * world + rank) * bs  # this process's slice of micro-batch `micro`
                mine = rows[lo:lo + bs]
                batch = {key: v.to(accelerator.device)
                         for key, v in collate(mine, plan.tokenizer.pad_token_id, plan.tasks).items()}
                tokens += sum(len(r["input_ids"]) for r in mine)
                with accelerator.accumulate(model):
                    s, c = token_losses(model, batch, n_tasks)
                    # sum over my tokens / all tokens of the step, x world (DDP averages) x k (backward divides)
                    accelerator.backward(s.sum() * (world * k / n_labels))
                sums += s.detach().double()
                counts += c.detach().double()
            stats = accelerator.reduce(torch.cat([sums, counts, torch.tensor([float(tokens)], dtype=torch.float64,
                                                                              device=accelerator.device)]), "sum")
            sums, counts, tokens = stats[:n_tasks], stats[n_tasks:2 * n_tasks], float(stats[-1])
            loss = float(sums.sum() / counts.sum())
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), clip))
            # fp16's grad scaler skips steps with overflowing gradients itself; anything else non-finite stops the run
            grads_ok = math.isfinite(grad_norm) or accelerator.scaler is not None
            if not (math.isfinite(loss) and grads_ok):
                optimizer.zero_grad()
                bad = [t for i, t in enumerate(plan.tasks) if not math.isfinite(float(sums[i]))]
                raise _nonfinite_error(run_dir, step + 1, loss, grad_norm, bad)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            elapsed = time.perf_counter() - t0
            record = {"step": step, "loss": loss,
                      **{f"loss/{t}": float(sums[i] / counts[i]) for i, t in enumerate(plan.tasks) if counts[i] > 0},
                      "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens), "tokens_per_s": tokens / elapsed}
            if accelerator.is_main_process and (step % cfg.train.log_every == 0 or step == plan.total_steps):
                _append_jsonl(run_dir / METRICS, record)
            if cfg.train.log_tensorboard:
                accelerator.log({k2: v for k2, v in record.items() if k2 != "step"}, step=step)
            if bar is not None:
                bar[0].update(bar[1], completed=step, loss=loss, tps=record["tokens_per_s"])
            if on_step is not None:
                on_step(step, unwrapped, record)
            last = step == plan.total_steps
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or last:
                run_eval(step)
            if (cfg.train.save_every and step % cfg.train.save_every == 0) or last:
                checkpoint(step)
        accelerator.wait_for_everyone()
        _save_final(plan, accelerator, model, run_dir)
        accelerator.wait_for_everyone()
        say(f"done: {run_dir}")
    finally:
        if bar is not None:
            bar[0].stop()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if cfg.train.log_tensorboard:
            accelerator.end_training()
        if lock is not None:
            _HELD_LOCKS.pop(lock.name, None)
            lock.close()
    return run_dir


def _global_batch(plan: Plan, cache: dict[tuple[str, int], dict], n: int) -> list[dict]:
    """The next `n` draws of the mixture, tokenized (each example once, then cached)."""
    rows = []
    for _ in range(n):
        task, idx = next(plan.sampler)
        if (task, idx) not in cache:
            cache[(task, idx)] = _tokenize(plan.train_examples[task][idx], plan.tokenizer, plan.config)
        rows.append(cache[(task, idx)])
    return rows


def _nonfinite_error(run_dir: Path, step: int, loss: float, grad_norm: float, tasks: list[str]) -> MultiLoRAError:
    """The message of a run stopped by a NaN/inf loss or gradient norm."""
    done = checkpoint_dirs(run_dir)
    keep = f"the last good checkpoint is {done[-1][1]}" if done else "no checkpoint was saved yet"
    return MultiLoRAError(
        f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step} "
        f"(loss {loss}, grad norm {grad_norm}{', tasks ' + ', '.join(tasks) if tasks else ''}); "
        f"the run stopped before updating the weights and {keep}. Lower optim.lr, set "
        f"optim.grad_clip, or use train.mixed_precision 'no', then --resume {run_dir}")


def _stop_requested(accelerator: Any, local: bool) -> bool:
    """Whether any process got Ctrl-C (agreed across processes, so all save the same step)."""
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)


def _progress(enabled: bool, total: int, start: int) -> tuple[Any, Any] | None:
    """A rich progress bar (step, loss, tokens/s, ETA), or None."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"),
                   TextColumn("ETA"), TimeRemainingColumn())
    task = bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
    bar.start()
    return bar, task


# ----------------------------------------------------------------------------- CLI


TRAIN_HELP = f"""Train LoRA, MultiLoRA or full fine-tuning from a YAML config.

Every key can be overridden on the command line as --section.key VALUE (values are YAML:
--adapter.n 4 --optim.lr 3e-4 --data.tasks [alpaca,rte]). Sections and defaults:
{help_text()}

Writes the run folder output_dir: config.yaml, adapter.safetensors + adapter_config.json (or the
full weights), checkpoints/step-N/, metrics.jsonl. Ctrl-C saves a checkpoint; --resume continues.
"""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Add `multilora train`'s arguments (overrides are the unknown --section.key VALUE pairs)."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = TRAIN_HELP
    p.allow_abbrev = False  # --train.max_step must be an unknown key (with a suggestion), not train.max_steps
    p.add_argument("config", nargs="?", default=None, help="YAML config (e.g. recipes/demo-multilora.yaml); "
                   "optional with --resume")
    p.add_argument("--resume", metavar="RUN", default=None, help="continue the run folder RUN from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--dry-run", action="store_true", help="validate the config, build the training plan, print it; no training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-to", choices=REPORT_TO, default=None,
                   help="also log loss (overall and per task), lr, grad norm, tokens/s and evaluations to "
                        "TensorBoard event files in the run folder (needs `pip install tensorboard`; the same "
                        "as --train.log_tensorboard true); 'none': metrics.jsonl only (the default)")
    for key in valid_keys():  # known so that their values are never taken for the CONFIG positional
        p.add_argument(f"--{key}", dest=f"{_OVERRIDE}{key}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


_OVERRIDE = "override:"
REPORT_TO = ("tensorboard", "none")  # --report-to X: train.log_tensorboard (metrics.jsonl is always written)


def _overrides_from(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The --section.key VALUE pairs argparse parsed, followed by the ones it left over."""
    known = [x for k, v in vars(args).items() if k.startswith(_OVERRIDE) for x in (f"--{k[len(_OVERRIDE):]}", v)]
    extra = list(extra)
    if args.config is not None and not Path(args.config).is_file():  # the value of an unknown --key, taken as CONFIG
        for i, tok in enumerate(extra):
            if tok.startswith("--") and "=" not in tok and (i + 1 == len(extra) or extra[i + 1].startswith("--")):
                extra.insert(i + 1, args.config)
                args.config = None
                break
    return known + extra


def run_train_cli(args: argparse.Namespace, overrides: list[str]) -> None:
    """The `multilora train` command: load + validate the config, then train (or resume, or dry-run)."""
    overrides = _overrides_from(args, overrides)
    report_to = getattr(args, "report_to", None)
    if report_to is not None:  # last, so it wins over a --train.log_tensorboard given too
        overrides += ["--train.log_tensorboard", "true" if report_to == "tensorboard" else "false"]
    if args.config is None and args.resume is None:
        raise MultiLoRAError("name a config file (multilora train recipes/demo-multilora.yaml) or --resume RUN")
    if args.resume is not None:
        given = load_config(args.config, overrides) if args.config is not None else None
        config = resolve_resume(args.resume, given, overrides if given is None else None)
    else:
        config = load_config(args.config, overrides)
    if getattr(args, "dry_run", False):
        plan = build_plan(config)
        print(plan.describe())
        return
    train(config, resume=args.resume, overwrite=args.overwrite, progress=not getattr(args, "no_progress", False))


def main(argv: list[str] | None = None) -> int:
    """`python -m multilora.train CONFIG [...]` (the same as `multilora train`); returns the exit code."""
    p = argparse.ArgumentParser(prog="multilora train")
    add_train_arguments(p)
    args, overrides = p.parse_known_args(argv)
    try:
        run_train_cli(args, overrides)
    except MultiLoRAError as e:
        print(f"multilora train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("multilora train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
