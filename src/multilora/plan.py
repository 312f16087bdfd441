"""What a run needs before its loop starts: the model with its method applied, the data, the sampler,
the optimizer's parameter groups, the schedule and the held-out evaluation.

    plan = build_plan(load_config("recipes/demo-multilora.yaml"))
    print(plan.describe())              # method, parameters per group, data, schedule
    optimizer = make_optimizer(plan)    # AdamW, one group per kind of parameter (decay, lora_B, scales, ...)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from .config import TrainConfig
from .data import Example, MixtureSampler, collate, tokenize_example
from .errors import MultiLoRAError
from .inject import count_parameters, inject
from .loss import token_losses
from .models import check_gradient_checkpointing, enable_gradient_checkpointing, load_model
from .quant import prepare_kbit_training
from .tasks import get_task, load_examples, mixture_weights, use_tasks


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
        quant = f" ({c.quant.quantization} base)" if c.quant.quantized else ""
        return (f"{c.method} on {c.model}{quant}: trainable {self.counts['trainable']:,} / frozen {self.counts['frozen']:,} "
                f"parameters ({100 * self.counts['trainable'] / max(1, self.counts['total']):.3f}%); groups {groups}\n"
                f"tasks: {sizes} ({c.data.mixture} mixture)\n"
                f"{self.total_steps} steps x global batch {self.global_batch} "
                f"({c.train.batch_size} x {c.train.grad_accum} accum x {self.num_processes} processes), "
                f"lr {c.optim.lr:g} {c.optim.schedule}, warmup {c.optim.warmup_steps}, "
                f"AdamW{' (fused)' if c.optim.fused else ''}")


def build_plan(config: TrainConfig, num_processes: int = 1) -> Plan:
    """Load the model, apply the method, load the data and size the run; no training."""
    set_seed(config.train.seed)  # before injection: adapter init draws from the RNG
    if config.train.gradient_checkpointing:
        check_gradient_checkpointing(config.model)  # from config.json: refused before the weights load
    q = config.quant
    model, tokenizer = load_model(config.model, quantization=q.quantization, compute_dtype=q.compute_dtype,
                                  double_quant=q.double_quant)
    if q.quantized:
        prepare_kbit_training(model)  # once, before the adapters: norms / head in float32, base frozen
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        inject(model, config.adapter)
    trainable, total = count_parameters(model)
    o = config.optim
    groups = param_groups(model, o.lr, o.weight_decay, s_lr_mult=o.s_lr_mult, b_lr_mult=o.b_lr_mult)

    tasks = use_tasks(config.data.tasks)  # names; own tasks (specs) registered, their data checked
    train_examples = {t: load_examples(t) for t in tasks}
    for t in tasks:  # fail now, not mid-run, on a template or tokenizer problem
        tokenize(train_examples[t][0], tokenizer, config)
    eval_examples = {}
    for t in tasks:
        if config.data.eval_examples <= 0:
            break
        if get_task(t).eval_split not in get_task(t).splits:  # an own task with eval: none
            continue
        pool = load_examples(t, get_task(t).eval_split)
        k = min(config.data.eval_examples, len(pool))
        eval_examples[t] = random.Random(f"eval:{t}").sample(pool, k)  # fixed, independent of the seed
    sampler = MixtureSampler({t: len(v) for t, v in train_examples.items()}, config.data.mixture,
                             config.data.temperature, mixture_weights(config.data.tasks, config.data.weights),
                             seed=config.train.seed)
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
    """AdamW over the plan's parameter groups, each with its own lr and weight decay (fused per optim.fused).

    The fused kernel updates each parameter in one pass instead of a dozen elementwise ops over all of
    them: a full fine-tuning step of the demo took 0.50x and 0.68x the time of foreach AdamW's in two
    runs on 2 CPU cores (benchmarks/bench_train.py). The update is the same up to rounding.
    """
    o = plan.config.optim
    groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in plan.param_groups]
    try:
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=o.fused or None)
    except RuntimeError as e:  # a device or dtype without the fused kernel
        raise MultiLoRAError(f"the fused AdamW kernel cannot run here ({' '.join(str(e).split())[:200]}); "
                             "set optim.fused false") from None


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
