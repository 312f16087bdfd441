"""`multilora demo`: an end-to-end run on the embedded SmolLM2-135M, on a CPU, in minutes.

Loads the model, injects MultiLoRA (n = 3, r = 8) into the attention projections, trains a few
steps on a mixture of bundled Alpaca (instruction following) and RTE (NLU) examples, compares
held-out loss per task before and after, then checks what a user relies on afterwards: merged
logits equal unmerged ones, the saved adapter reloads bit-exactly, and the PEFT export
reproduces the logits under `peft`.
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .checkpoint import load_adapter, save_adapter
from .data import MixtureSampler, collate, tokenize_example
from .export import export_peft
from .inject import MultiLoRAConfig, adapter_parameters, inject, merge, unmerge
from .io import write_json_atomic
from .models import DEFAULT_MODEL, load_model
from .tasks import get_task, load_examples

TASKS = ("alpaca", "rte")
MAX_LEN = 128
BATCH = 4
EVAL_PER_TASK = 16


def fitting(examples: list, tokenizer, limit: int) -> list[dict]:
    """The first `limit` examples tokenized, skipping those whose response needs more than MAX_LEN tokens."""
    rows = []
    for ex in examples:
        if len(rows) == limit:
            break
        if len(tokenizer(ex.response, add_special_tokens=False)["input_ids"]) < MAX_LEN // 2:
            rows.append(tokenize_example(ex, tokenizer, MAX_LEN))
    return rows


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, batches: list[dict], n_tasks: int) -> list[float]:
    """Mean response-token loss per task over fixed held-out batches."""
    total, count = torch.zeros(n_tasks), torch.zeros(n_tasks)
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
        labels = b["labels"][:, 1:]  # (B, T-1): token t predicts label t+1
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")  # (B, T-1)
        mask = (labels != -100).float()
        total.index_add_(0, b["task_ids"], (nll * mask).sum(1))
        count.index_add_(0, b["task_ids"], mask.sum(1))
    return (total / count.clamp(min=1)).tolist()


def run_demo(out_dir: str | None = None, steps: int = 30, model_name: str = DEFAULT_MODEL, lr: float = 1e-3,
             seed: int = 0) -> Path:
    """Run the end-to-end example and write adapter, PEFT export and summary.json to `out_dir`."""
    console = Console()
    out = Path(out_dir or f"runs/demo-{datetime.date.today().isoformat()}")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    console.print(f"[bold]1/5[/] loading {model_name}")
    model, tokenizer = load_model(model_name)
    t_load = time.perf_counter() - t0

    # examples whose response does not fit MAX_LEN are skipped here (never truncated)
    train = {t: fitting(load_examples(t, "train"), tokenizer, 256) for t in TASKS}
    held = {t: fitting(load_examples(t, get_task(t).eval_split), tokenizer, EVAL_PER_TASK) for t in TASKS}
    pad = tokenizer.pad_token_id
    eval_rows = [row for t in TASKS for row in held[t]]
    eval_batches = [collate(eval_rows[i:i + 8], pad, TASKS) for i in range(0, len(eval_rows), 8)]
    before = heldout_loss(model, eval_batches, len(TASKS))

    config = MultiLoRAConfig(n=3, r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    summary = inject(model, config)
    console.print(f"[bold]2/5[/] {summary}")
    sampler = MixtureSampler({t: len(v) for t, v in train.items()}, strategy="uniform", seed=seed)
    params = list(adapter_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, tokens, t_train = [], 0, time.perf_counter()
    for step in range(steps):
        batch = collate([train[t][i] for t, i in (next(sampler) for _ in range(BATCH))], pad, TASKS)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        console.print(f"  step {step + 1:>3}/{steps}  loss {loss.item():.3f}  "
                      f"{tokens / (time.perf_counter() - t_train):.0f} tok/s", highlight=False)
    t_train = time.perf_counter() - t_train
    model.eval()
    after = heldout_loss(model, eval_batches, len(TASKS))

    console.print("[bold]3/5[/] merge, save, reload, export")
    probe = eval_batches[0]["input_ids"][:2]
    with torch.no_grad():
        unmerged = model(probe).logits
        merge(model)
        merged = model(probe).logits
        unmerge(model)
    merge_err = ((merged - unmerged).abs().max() / unmerged.abs().max()).item()
    save_adapter(model, out / "adapter")
    reloaded = load_adapter(load_model(model_name)[0], out / "adapter")
    with torch.no_grad():
        reload_exact = torch.equal(reloaded(probe).logits, unmerged)
    export_peft(model, out / "peft", base_model_name_or_path=model_name)
    peft_err = _peft_error(model_name, out / "peft", probe, unmerged)

    result = {
        "model": model_name, "tasks": list(TASKS), "steps": steps, "batch": BATCH, "max_len": MAX_LEN, "lr": lr,
        "adapter": {**config.layer_options(), "targets": config.targets, "modules": len(summary.modules),
                    "trainable": summary.trainable, "share": summary.share},
        "heldout_loss_before": dict(zip(TASKS, before)), "heldout_loss_after": dict(zip(TASKS, after)),
        "train_loss": losses, "train_seconds": t_train, "tokens_per_second": tokens / t_train,
        "load_seconds": t_load, "merge_rel_error": merge_err, "reload_bit_exact": reload_exact,
        "peft_rel_error": peft_err,
    }
    write_json_atomic(out / "summary.json", result)
    _print_summary(console, result, out)
    return out


def _peft_error(model_name: str, folder: Path, probe: torch.Tensor, reference: torch.Tensor) -> float | None:
    try:
        import peft
    except ImportError:
        return None
    model = peft.PeftModel.from_pretrained(load_model(model_name)[0], str(folder)).eval()
    with torch.no_grad():
        return ((model(probe).logits - reference).abs().max() / reference.abs().max()).item()


def _print_summary(console: Console, r: dict, out: Path) -> None:
    table = Table(title=f"MultiLoRA n=3 r=8 on {r['model']}: {r['steps']} steps, {r['train_seconds']:.0f} s")
    table.add_column("task")
    table.add_column("held-out loss before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("perplexity after", justify="right")
    for t in r["tasks"]:
        b, a = r["heldout_loss_before"][t], r["heldout_loss_after"][t]
        table.add_row(t, f"{b:.3f}", f"[{'green' if a < b else 'red'}]{a:.3f}[/]", f"{math.exp(a):.2f}")
    console.print(table)
    peft = "peft not installed" if r["peft_rel_error"] is None else f"{r['peft_rel_error']:.1e}"
    console.print(f"merged vs unmerged logits (max rel. diff): {r['merge_rel_error']:.1e}   "
                  f"reload bit-exact: {r['reload_bit_exact']}   PEFT export vs ours: {peft}")
    console.print(f"trainable parameters: {r['adapter']['trainable']:,} ({100 * r['adapter']['share']:.2f}% of the model)")
    console.print(f"training throughput: {r['tokens_per_second']:.0f} tokens/s; model load {r['load_seconds']:.1f} s")
    console.print(f"[bold]wrote[/] {out}/adapter, {out}/peft, {out}/summary.json")
