"""`multilora train`: LoRA, MultiLoRA or full fine-tuning of a causal LM on a task mixture, on Accelerate.

    config = load_config("recipes/demo-multilora.yaml", ["--train.max_steps", "20"])
    run_dir = train(config)                       # runs/<name>/ (see run.py for what it holds)
    train(None, resume=run_dir)                   # continue from the newest complete checkpoint

The torchtune shape: `build_plan` (model, method, data, length), `setup` (accelerate, optimizer,
schedule, the run folder, resume), `train_step` (one optimizer step: accumulation, reduction, the
non-finite guard) and `train` (the loop: when to evaluate, save and log).

One optimizer step draws one global batch of `batch_size * grad_accum * processes` examples from
the mixture sampler; every process sees the whole draw and trains on its own slice, so the loss is
the token-level mean over the global batch whatever the number of processes (each process's loss
is scaled by the global label-token count, accelerate averages gradients over processes and
divides by `grad_accum`). Gradient accumulation, clipping, mixed precision, DDP/FSDP/DeepSpeed and
checkpoint state (optimizer, scheduler, RNG) are accelerate's; a checkpoint also holds the
sampler position, so a resumed run sees exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from .config import TrainConfig, config_from_flat, flatten, help_text, load_config, valid_keys
from .data import IGNORE, Example, MixtureSampler, collate, tokenize_example
from .errors import MultiLoRAError
from .inject import count_parameters, inject
from .io import check_writable_dir, read_json_object
from .loss import token_losses
from .models import load_model
from .run import SAMPLER_FILE, STATE_FILE, Run, register_state_hooks
from .tasks import get_task, load_examples

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
    set_seed(config.train.seed)  # before injection: adapter init draws from the RNG
    model, tokenizer = load_model(config.model)
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        inject(model, config.adapter)
    trainable, total = count_parameters(model)
    o = config.optim
    groups = param_groups(model, o.lr, o.weight_decay, s_lr_mult=o.s_lr_mult, b_lr_mult=o.b_lr_mult)

    tasks = list(config.data.tasks)
    train_examples = {t: load_examples(t) for t in tasks}
    for t in tasks:  # fail now, not mid-run, on a template or tokenizer problem
        tokenize(train_examples[t][0], tokenizer, config)
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
    make = get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, num_warmup_steps=warmup, num_training_steps=total)


def continue_schedule(scheduler: Any, step: int) -> None:
    """Set every group's lr to the schedule's value at `step` (after a resume that changed the run's length).

    A checkpoint restores the optimizer's lrs and the scheduler's last lr as the old schedule left
    them; the schedule itself is rebuilt from the current config, so without this the first resumed
    step would run at the old schedule's lr (0 at its end) and the next one jump onto the new curve.
    """
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps it
    lrs = [base * fn(step) for base, fn in zip(inner.base_lrs, inner.lr_lambdas)]
    for group, lr in zip(inner.optimizer.param_groups, lrs):
        group["lr"] = lr
    inner._last_lr = lrs  # what get_last_lr() reports until the next scheduler.step()


def tokenize(ex: Example, tokenizer: Any, config: TrainConfig) -> dict:
    """One training row; a response longer than data.max_len is cut (keeping up to half the window of prompt)."""
    return tokenize_example(ex, tokenizer, config.data.max_len, config.data.chat, truncate=True)


class HeldoutLoss:
    """The default evaluation: response-token loss per task on the plan's fixed held-out examples.

    Each process scores its share of the examples and the sums are added across processes; every
    process runs the same number of forward passes (FSDP and DeepSpeed need that).
    """

    def __init__(self, plan: Plan, accelerator: Any) -> None:
        self.rows = [tokenize(ex, plan.tokenizer, plan.config) for t in plan.tasks for ex in plan.eval_examples.get(t, [])]
        self.accelerator, self.tasks, self.pad = accelerator, plan.tasks, plan.tokenizer.pad_token_id
        self.batch_size = plan.config.train.batch_size

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        acc, bs, n_tasks = self.accelerator, self.batch_size, len(self.tasks)
        mine = self.rows[acc.process_index::acc.num_processes]
        n_batches = -(-len(self.rows) // (acc.num_processes * bs))  # the same on every process
        sums = torch.zeros(n_tasks, dtype=torch.float64, device=acc.device)
        counts = torch.zeros(n_tasks, dtype=torch.float64, device=acc.device)
        for i in range(n_batches):
            part, weight = mine[i * bs:(i + 1) * bs], 1.0
            if not part:  # this process ran out: a dummy batch that counts for nothing
                part, weight = self.rows[:1], 0.0
            batch = {k: v.to(acc.device) for k, v in collate(part, self.pad, self.tasks).items()}
            s, c = token_losses(model, batch, n_tasks)
            sums += s.double() * weight
            counts += c.double() * weight
        total = acc.reduce(torch.cat([sums, counts]), "sum").cpu()
        sums, counts = total[:n_tasks], total[n_tasks:]
        out = {"loss": float(sums.sum() / counts.sum().clamp(min=1))}
        out |= {f"loss/{t}": float(sums[i] / counts[i]) for i, t in enumerate(self.tasks) if counts[i] > 0}
        return out


# ----------------------------------------------------------------------------- setup


class StopRequest:
    """Ctrl-C and SIGTERM (what torchrun, accelerate launch and batch schedulers send) ask the loop to
    save and stop; a second Ctrl-C stops at once."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.requested, self.say, self.previous = False, say, {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread: no handler, signals behave as usual
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame: Any) -> None:
        """The signal handler."""
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.say(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                 "(Ctrl-C again to quit at once)")


@dataclass
class Session:
    """A set-up run: what `train_step` and the loop work on."""

    plan: Plan
    accelerator: Any
    run: Run
    model: nn.Module  # as prepared by accelerate (possibly wrapped)
    optimizer: Any
    scheduler: Any
    evaluate: EvalFn | None  # None: no evaluation (no held-out examples, no eval_fn)
    step: int = 0
    elapsed_before: float = 0.0  # training seconds of the run before this process resumed it
    tokenized: dict[tuple[str, int], dict] = field(default_factory=dict)  # each training row tokenized once

    @property
    def unwrapped(self) -> nn.Module:
        """The model without accelerate's wrappers."""
        return self.accelerator.unwrap_model(self.model)

    def say(self, text: str) -> None:
        """Print on the main process only."""
        self.accelerator.print(text)


def make_accelerator(config: TrainConfig) -> Any:
    """The Accelerator of a run (mixed precision, accumulation, TensorBoard), or a one-line error."""
    try:
        return Accelerator(
            mixed_precision=config.train.mixed_precision, cpu=config.train.cpu,
            gradient_accumulation_steps=config.train.grad_accum,
            dataloader_config=DataLoaderConfiguration(split_batches=True),  # scheduler steps once per step
            log_with="tensorboard" if config.train.log_tensorboard else None, project_dir=str(config.output_dir),
        )
    except ValueError as e:
        raise MultiLoRAError(f"cannot set up accelerate with train.mixed_precision = "
                             f"{config.train.mixed_precision!r} ({e}); use 'no' or 'bf16' on CPU") from None


def setup(config: TrainConfig, accelerator: Any, run: Run, resume: bool, eval_fn: EvalFn | None) -> Session:
    """Build the plan, prepare model/optimizer/schedule, then restore the newest checkpoint or start the folder."""
    with accelerator.main_process_first():
        plan = build_plan(config, accelerator.num_processes)
    cfg = plan.config
    optimizer = make_optimizer(plan)
    scheduler = make_scheduler(optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, plan.total_steps)
    plan.model.train()
    model, optimizer, scheduler = accelerator.prepare(plan.model, optimizer, scheduler)
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        register_state_hooks(accelerator, accelerator.unwrap_model(model))
    evaluate = eval_fn or (HeldoutLoss(plan, accelerator) if plan.eval_examples else None)
    session = Session(plan, accelerator, run, model, optimizer, scheduler, evaluate)
    if resume:
        session.step, session.elapsed_before = restore(session)
        session.say(f"resuming {run.path} from step-{session.step}")
    elif accelerator.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg)
    accelerator.wait_for_everyone()
    if cfg.train.log_tensorboard:
        accelerator.init_trackers("tensorboard")
    session.say(plan.describe())
    return session


def restore(s: Session) -> tuple[int, float]:
    """Load the newest checkpoint into the session (weights, optimizer, schedule, RNG, sampler); (step, seconds)."""
    step, ck = s.run.newest_checkpoint()
    try:
        s.accelerator.load_state(str(ck))
        state = read_json_object(ck / SAMPLER_FILE)
    except MultiLoRAError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors / torch / json errors of a damaged checkpoint
        raise MultiLoRAError(f"checkpoint {ck} cannot be loaded ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}); delete {ck} to resume from the "
                             "checkpoint before it") from None
    s.plan.sampler.load_state_dict(state)
    continue_schedule(s.scheduler, step)  # the run's length may have changed (RESUMABLE_CHANGES)
    if s.accelerator.is_main_process:  # drop records past the checkpoint (the killed run's last steps)
        s.run.drop_metrics_after(step)
    return step, float(read_json_object(ck / STATE_FILE).get("elapsed", 0.0))


# ----------------------------------------------------------------------------- one step


def next_rows(s: Session, n: int) -> list[dict]:
    """The next `n` draws of the mixture, tokenized (each example once, then cached)."""
    rows = []
    for _ in range(n):
        task, idx = next(s.plan.sampler)
        if (task, idx) not in s.tokenized:
            s.tokenized[(task, idx)] = tokenize(s.plan.train_examples[task][idx], s.plan.tokenizer, s.plan.config)
        rows.append(s.tokenized[(task, idx)])
    return rows


def train_step(s: Session, rows: list[dict]) -> dict:
    """One optimizer step on one global batch (every process gets all `rows` and trains on its slice).

    Returns the step's record (loss overall and per task, each group's lr, grad norm, tokens).
    A non-finite loss or gradient norm raises MultiLoRAError before the weights change.
    """
    acc, plan, cfg = s.accelerator, s.plan, s.plan.config
    t0 = time.perf_counter()
    n_tasks, bs, k = len(plan.tasks), cfg.train.batch_size, cfg.train.grad_accum
    world, rank = acc.num_processes, acc.process_index
    n_labels = sum(sum(1 for x in r["labels"][1:] if x != IGNORE) for r in rows)  # global label tokens
    sums = torch.zeros(n_tasks, dtype=torch.float64, device=acc.device)
    counts = torch.zeros(n_tasks, dtype=torch.float64, device=acc.device)
    tokens = 0
    for micro in range(k):
        lo = (micro * world + rank) * bs  # this process's slice of micro-batch `micro`
        mine = rows[lo:lo + bs]
        batch = {key: v.to(acc.device) for key, v in collate(mine, plan.tokenizer.pad_token_id, plan.tasks).items()}
        tokens += sum(len(r["input_ids"]) for r in mine)
        with acc.accumulate(s.model):
            part_sums, part_counts = token_losses(s.model, batch, n_tasks)
            # sum over my tokens / all tokens of the step, x world (DDP averages) x k (backward divides)
            acc.backward(part_sums.sum() * (world * k / n_labels))
        sums += part_sums.detach().double()
        counts += part_counts.detach().double()
    stats = acc.reduce(torch.cat([sums, counts, torch.tensor([float(tokens)], dtype=torch.float64,
                                                              device=acc.device)]), "sum")
    sums, counts, tokens = stats[:n_tasks], stats[n_tasks:2 * n_tasks], float(stats[-1])
    loss = float(sums.sum() / counts.sum())
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = float(acc.clip_grad_norm_(s.model.parameters(), clip))
    # fp16's grad scaler skips steps with overflowing gradients itself; anything else non-finite stops the run
    if not (math.isfinite(loss) and (math.isfinite(grad_norm) or acc.scaler is not None)):
        s.optimizer.zero_grad()
        bad = [t for i, t in enumerate(plan.tasks) if not math.isfinite(float(sums[i]))]
        raise nonfinite_error(s.run, s.step + 1, loss, grad_norm, bad)
    lrs = s.scheduler.get_last_lr()
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad()
    s.step += 1
    elapsed = time.perf_counter() - t0
    return {"step": s.step, "loss": loss,
            **{f"loss/{t}": float(sums[i] / counts[i]) for i, t in enumerate(plan.tasks) if counts[i] > 0},
            "lr": lrs[0], **{f"lr/{g['name']}": lr for g, lr in zip(plan.param_groups, lrs)},
            "grad_norm": grad_norm, "tokens": int(tokens), "tokens_per_s": tokens / elapsed}


def nonfinite_error(run: Run, step: int, loss: float, grad_norm: float, tasks: list[str]) -> MultiLoRAError:
    """The message of a run stopped by a NaN/inf loss or gradient norm."""
    done = run.checkpoints()
    keep = f"the last good checkpoint is {done[-1][1]}" if done else "no checkpoint was saved yet"
    return MultiLoRAError(
        f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step} "
        f"(loss {loss}, grad norm {grad_norm}{', tasks ' + ', '.join(tasks) if tasks else ''}); "
        f"the run stopped before updating the weights and {keep}. Lower optim.lr, set "
        f"optim.grad_clip, or use train.mixed_precision 'no', then --resume {shlex.quote(str(run.path))}")


# ----------------------------------------------------------------------------- the loop


def run_eval(s: Session) -> None:
    """Evaluate the model at the current step; log the scores."""
    if s.evaluate is None:
        return
    s.model.eval()
    scores = s.evaluate(s.model)
    s.model.train()
    if s.accelerator.is_main_process:
        s.run.append_metrics({"step": s.step, "eval": scores})
    if s.plan.config.train.log_tensorboard:
        s.accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=s.step)
    s.say(f"step {s.step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def save_checkpoint(s: Session, started: float) -> Path:
    """A checkpoint of the session at its current step."""
    elapsed = s.elapsed_before + time.perf_counter() - started
    return s.run.save_checkpoint(s.accelerator, s.step, s.plan.sampler.state_dict(), s.plan.config.train.keep_last,
                                 {"total_steps": s.plan.total_steps, "time": time.time(), "elapsed": elapsed})


def log_step(s: Session, record: dict, bar: Any) -> None:
    """metrics.jsonl (every log_every steps and the last), TensorBoard, the progress bar."""
    cfg = s.plan.config.train
    if s.accelerator.is_main_process and (s.step % cfg.log_every == 0 or s.step == s.plan.total_steps):
        s.run.append_metrics(record)
    if cfg.log_tensorboard:
        s.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=s.step)
    if bar is not None:
        bar[0].update(bar[1], completed=s.step, loss=record["loss"], tps=record["tokens_per_s"])


def train(config: TrainConfig | None, *, resume: str | os.PathLike | None = None, overwrite: bool = False,
          eval_fn: EvalFn | None = None, on_step: Callable[[int, nn.Module, dict], None] | None = None,
          progress: bool = True) -> Path:
    """Train per `config` (or continue the run folder `resume`, with its saved config if `config` is None); returns the run folder.

    `eval_fn(model) -> {name: value}` replaces the held-out loss evaluation; `on_step(step, model,
    record)` is called after every optimizer step. Ctrl-C (or SIGTERM) saves a checkpoint and raises
    KeyboardInterrupt; a non-finite loss raises MultiLoRAError before the optimizer steps. The last
    thing a run writes is finished.json (`Run(folder).finished()`).
    """
    started = time.perf_counter()
    config, run = check_start(config, resume)
    accelerator = make_accelerator(config)
    lock = run.lock() if accelerator.is_main_process else None  # held until the run ends
    try:
        if resume is None:
            run.prepare(overwrite, accelerator.is_main_process)
            accelerator.wait_for_everyone()
        s = setup(config, accelerator, run, resume is not None, eval_fn)
        cfg = s.plan.config.train
        bar = _progress(progress and accelerator.is_main_process, s.plan.total_steps, s.step)
        with StopRequest(s.say) as stop:
            try:
                if resume is None and cfg.eval_every:
                    run_eval(s)  # the baseline the later evaluations compare to
                while s.step < s.plan.total_steps:
                    if _stop_requested(accelerator, stop.requested):
                        ck = save_checkpoint(s, started)
                        s.say(f"interrupted at step {s.step}: saved {ck}; continue with "
                              f"`multilora train --resume {shlex.quote(str(run.path))}`")
                        raise KeyboardInterrupt
                    record = train_step(s, next_rows(s, s.plan.global_batch))
                    log_step(s, record, bar)
                    if on_step is not None:
                        on_step(s.step, s.unwrapped, record)
                    last = s.step == s.plan.total_steps
                    if (cfg.eval_every and s.step % cfg.eval_every == 0) or last:
                        run_eval(s)
                    if (cfg.save_every and s.step % cfg.save_every == 0) or last:
                        save_checkpoint(s, started)
                accelerator.wait_for_everyone()
                run.save_final(accelerator, s.model, s.plan.config, s.plan.tokenizer)
                if accelerator.is_main_process:
                    run.mark_finished({"step": s.step, "seconds": s.elapsed_before + time.perf_counter() - started})
                accelerator.wait_for_everyone()
                s.say(f"done: {run.path}")
            finally:
                if bar is not None:
                    bar[0].stop()
                if cfg.log_tensorboard:
                    accelerator.end_training()
    finally:
        if lock is not None:
            Run.unlock(lock)
    return run.path


def check_start(config: TrainConfig | None, resume: str | os.PathLike | None) -> tuple[TrainConfig, Run]:
    """The run's config and folder, checked before anything loads (tensorboard there, folder writable, resumable)."""
    if resume is not None:
        config = resolve_resume(resume, config)
    elif config is None:
        raise MultiLoRAError("train() needs a config, or resume= the folder of a run to continue")
    if config.train.log_tensorboard:
        try:
            import tensorboard  # noqa: F401 - only checks that it is installed (accelerate imports it)
        except ImportError:
            raise MultiLoRAError("train.log_tensorboard is on but tensorboard is not installed: "
                                 "pip install tensorboard, or set train.log_tensorboard false") from None
    run = Run(config.output_dir)
    check_writable_dir(run.path, "output_dir")  # now, not after the model is loaded or at the first save
    if resume is not None and not run.checkpoints():
        raise MultiLoRAError(f"{run.path} has no complete checkpoint to resume from; start again with --overwrite")
    return config, run


def resolve_resume(run_dir: str | os.PathLike, config: TrainConfig | None = None,
                   overrides: list[str] | None = None) -> TrainConfig:
    """The config of a run to resume: its saved config.yaml (+ overrides); `config`, if given, must agree with it."""
    run = Run(run_dir)
    saved = run.read_config(overrides)
    if config is not None:
        diff = run.config_diff(config, ignore=RESUMABLE_CHANGES)
        if diff:
            a, b = {**flatten(TrainConfig().to_dict()), **run.saved_config()}, flatten(config.to_dict())
            raise MultiLoRAError(
                f"the config differs from the one {run_dir} was trained with at {', '.join(diff)} "
                f"(e.g. {diff[0]}: saved {a[diff[0]]!r}, given {b.get(diff[0])!r}); resume with the same settings "
                f"(only {', '.join(RESUMABLE_CHANGES)} may change) or start a new run")
        saved = config
    flat = flatten(saved.to_dict())
    flat["output_dir"] = str(run_dir)
    return config_from_flat(flat)


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
