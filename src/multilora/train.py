"""`multilora train`: LoRA, MultiLoRA or full fine-tuning of a causal LM on a task mixture, on Accelerate.

    config = load_config("recipes/demo-multilora.yaml", ["--train.max_steps", "20"])
    run_dir = train(config)                       # runs/<name>/ (see run.py for what it holds)
    train(None, resume=run_dir)                   # continue from the newest complete checkpoint

The torchtune shape: `plan.build_plan` (model, method, data, length), `setup` (accelerate, optimizer,
schedule, the run folder, resume), `train_step` (one optimizer step: accumulation, reduction, the
non-finite guard) and `train` (the loop: when to evaluate, save and log).

One optimizer step draws one global batch of `batch_size * grad_accum * processes` examples from
the mixture sampler; every process sees the whole draw and trains on its own slice, so the loss is
the token-level mean over the global batch whatever the number of processes (each process's loss
is scaled by the global label-token count, accelerate averages gradients over processes and
divides by `grad_accum`). Gradient accumulation, clipping, mixed precision, DDP/FSDP/DeepSpeed and
checkpoint state (optimizer, scheduler, RNG) are accelerate's; a checkpoint also holds the
sampler position, so a resumed run sees exactly the batches the uninterrupted run would.
DDP, FSDP2 (recipes/accelerate/fsdp2.yaml) and DeepSpeed ZeRO-2 (deepspeed-zero2.yaml) were run on 2 CPU
processes, matching 1 process and resuming after a kill (tests/test_distributed.py); not yet on GPUs.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from .config import TrainConfig, config_from_flat, flatten
from .data import IGNORE, collate
from .errors import MultiLoRAError
from .io import check_writable_dir, read_json_object
from .loss import token_losses
from .models import store_frozen_in
from .plan import HeldoutLoss, Plan, build_plan, continue_schedule, make_optimizer, make_scheduler, tokenize
from .run import SAMPLER_FILE, STATE_FILE, Run, register_state_hooks

# keys a resumed run may change (how long, how often); everything else must match the saved config
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs", "train.eval_every", "train.save_every",
                     "train.keep_last", "train.save_last", "train.log_every", "train.log_tensorboard")

EvalFn = Callable[[nn.Module], dict[str, float]]


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
    """The Accelerator of a run (mixed precision, accumulation, TensorBoard), or a one-line error.

    accelerate keeps one mixed-precision setting per process; a single-process caller that trains
    runs with different settings one after another (a sweep over train.mixed_precision) gets a
    fresh accelerator state for each.
    """
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, config.train.mixed_precision) \
            and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    try:
        return Accelerator(
            mixed_precision=config.train.mixed_precision, cpu=config.train.cpu,
            gradient_accumulation_steps=config.train.grad_accum,
            dataloader_config=DataLoaderConfiguration(split_batches=True),  # scheduler steps once per step
            log_with="tensorboard" if config.train.log_tensorboard else None, project_dir=str(config.output_dir),
        )
    except ValueError as e:
        detail = " ".join(str(e).split())[:300]
        if "mixed_precision" in str(e) or "bf16" in str(e) or "fp16" in str(e):
            raise MultiLoRAError(f"cannot set up accelerate with train.mixed_precision = "
                                 f"{config.train.mixed_precision!r} ({detail}); use 'no' or 'bf16' on CPU") from None
        raise MultiLoRAError(f"cannot set up accelerate ({detail}); check the launch config or the ACCELERATE_* "
                             "environment variables of this process") from None


def setup(config: TrainConfig, accelerator: Any, run: Run, resume: bool, eval_fn: EvalFn | None) -> Session:
    """Build the plan, prepare model/optimizer/schedule, then restore the newest checkpoint or start the folder."""
    with accelerator.main_process_first():
        plan = build_plan(config, accelerator.num_processes)
    cfg = plan.config
    optimizer = make_optimizer(plan)
    scheduler = make_scheduler(optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, plan.total_steps)
    plan.model.train()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, cfg)
    model, optimizer, scheduler = accelerator.prepare(plan.model, optimizer, scheduler)
    if accelerator.mixed_precision == "bf16" and accelerator.distributed_type == DistributedType.NO:
        store_frozen_in(plan.model, torch.bfloat16)  # every forward runs under accelerate's autocast: same numbers
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


def configure_deepspeed(accelerator: Any, config: TrainConfig) -> None:
    """Give DeepSpeed's engine the run's micro-batch and optim.grad_clip (it clips inside its step).

    accelerate would otherwise fill a config's 'auto' clipping with 1.0 whatever optim.grad_clip says;
    a different number written in the DeepSpeed config is refused.
    """
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # no dataloader to take it from
        ds_config["train_micro_batch_size_per_gpu"] = config.train.batch_size
    given, grad_clip = ds_config.get("gradient_clipping", "auto"), config.optim.grad_clip
    if given == "auto":
        ds_config["gradient_clipping"] = float(grad_clip)  # 0: no clipping, as in optim.grad_clip
    elif float(given) != float(grad_clip):
        raise MultiLoRAError(f"the DeepSpeed config clips gradients at {given} but optim.grad_clip is {grad_clip}; "
                             f"set optim.grad_clip {given} or leave gradient_clipping out of the DeepSpeed config")


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
    A non-finite loss or gradient norm raises MultiLoRAError before the weights change. Under
    DeepSpeed the engine clips and steps inside the last micro-batch's backward: the loss is checked
    (agreed over processes) before each backward, so a non-finite loss still stops the run before the
    weights change; a non-finite gradient norm with a finite loss is seen only after the engine's step
    (the error says so), and with fp16 the engine's loss scaler skips such steps itself.
    """
    acc, plan, cfg = s.accelerator, s.plan, s.plan.config
    t0 = time.perf_counter()
    engine_steps = acc.distributed_type == DistributedType.DEEPSPEED  # clips and steps inside backward
    lrs = s.scheduler.get_last_lr()  # this step's lrs: read before DeepSpeed's backward steps the schedule
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
            if engine_steps:
                check_loss_before_engine_step(s, part_sums)
            # sum over my tokens / all tokens of the step, x world (DDP averages) x k (backward divides)
            acc.backward(part_sums.sum() * (world * k / n_labels))
        sums += part_sums.detach().double()
        counts += part_counts.detach().double()
    stats = acc.reduce(torch.cat([sums, counts, torch.tensor([float(tokens)], dtype=torch.float64,
                                                              device=acc.device)]), "sum")
    sums, counts, tokens = stats[:n_tasks], stats[n_tasks:2 * n_tasks], float(stats[-1])
    loss = float(sums.sum() / counts.sum())
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    # DeepSpeed: the norm its engine computed at the step it already took (accelerator.clip_grad_norm_
    # returns engine.get_global_grad_norm()), None where the engine has none
    norm = acc.clip_grad_norm_(s.model.parameters(), clip)
    grad_norm = float(norm) if norm is not None else None
    # fp16's grad scaler (or DeepSpeed's loss scaler) skips steps with overflowing gradients itself;
    # anything else non-finite stops the run
    skips_overflow = acc.scaler is not None or (engine_steps and acc.mixed_precision == "fp16")
    if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm) or skips_overflow)):
        s.optimizer.zero_grad()
        bad = [t for i, t in enumerate(plan.tasks) if not math.isfinite(float(sums[i]))]
        raise nonfinite_error(s.run, s.step + 1, loss, grad_norm, bad, updated=engine_steps)
    s.optimizer.step()  # under DeepSpeed accelerate's optimizer and scheduler wrappers do nothing here
    s.scheduler.step()
    s.optimizer.zero_grad()
    s.step += 1
    elapsed = time.perf_counter() - t0
    return {"step": s.step, "loss": loss,
            **{f"loss/{t}": float(sums[i] / counts[i]) for i, t in enumerate(plan.tasks) if counts[i] > 0},
            "lr": lrs[0], **{f"lr/{g['name']}": lr for g, lr in zip(plan.param_groups, lrs)},
            **({"grad_norm": grad_norm} if grad_norm is not None else {}),
            "tokens": int(tokens), "tokens_per_s": tokens / elapsed}


def check_loss_before_engine_step(s: Session, part_sums: torch.Tensor) -> None:
    """Under DeepSpeed (which steps inside backward): raise if any process's micro-batch loss is non-finite.

    Every process takes part in the same reduction, so all of them stop at the same micro-batch.
    """
    sums = s.accelerator.reduce(part_sums.detach().double(), "sum")  # NaN/inf anywhere stays NaN/inf
    total = float(sums.sum())
    if not math.isfinite(total):
        bad = [t for i, t in enumerate(s.plan.tasks) if not math.isfinite(float(sums[i]))]
        raise nonfinite_error(s.run, s.step + 1, total, None, bad)


def nonfinite_error(run: Run, step: int, loss: float, grad_norm: float | None, tasks: list[str],
                    updated: bool = False) -> MultiLoRAError:
    """The message of a run stopped by a NaN/inf loss or gradient norm (`updated`: DeepSpeed already stepped)."""
    done = run.checkpoints()
    keep = f"the last good checkpoint is {done[-1][1]}" if done else "no checkpoint was saved yet"
    stopped = ("DeepSpeed's engine had already updated the weights of this step (it steps inside backward), "
               "nothing was saved after it, and " if updated else "the run stopped before updating the weights and ")
    norm = f", grad norm {grad_norm}" if grad_norm is not None else ""
    return MultiLoRAError(
        f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step} "
        f"(loss {loss}{norm}{', tasks ' + ', '.join(tasks) if tasks else ''}); "
        f"{stopped}{keep}. Lower optim.lr, set "
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
                    if (cfg.save_every and s.step % cfg.save_every == 0) or (last and cfg.save_last):
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
        raise run.no_checkpoint_error()
    return config, run


def resolve_resume(run_dir: str | os.PathLike, config: TrainConfig | None = None,
                   overrides: list[str] | None = None) -> TrainConfig:
    """The config of a run to resume: its saved config.yaml (+ overrides); `config`, if given, must agree with it."""
    run = Run(run_dir)
    saved = run.read_config(overrides)
    if config is not None:
        diff = run.config_diff(config, ignore=RESUMABLE_CHANGES)
        if diff:
            a, b = run.saved_values(), flatten(config.to_dict())
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


if __name__ == "__main__":  # python -m multilora.train CONFIG [...] (what accelerate launch -m runs)
    from .cli import main  # deferred: cli imports this module

    sys.exit(main(["train", *sys.argv[1:]]))
