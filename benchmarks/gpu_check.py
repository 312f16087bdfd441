#!/usr/bin/env python
"""GPU readiness check: one run on one GPU (under 8 minutes) that prints ratios measured in that run.

(a) The layer benchmark (bench_layer.py, unchanged) at Llama-2-7B shapes in bf16, cut to 8 layers:
    ours (MultiLoRA n=3 r=8) against PEFT LoRA r=24 and r=8, the per-module loop and the base,
    train-step time and peak GPU memory (torch.cuda.max_memory_allocated), batch 4 x 128.
(b) 30 steps of `multilora train` (train.train in a fresh process: accelerate, bf16 autocast, the
    run's own data, loss and loop) on a randomly initialised Llama-2-7B-shaped model (32 layers; the
    vocabulary is the embedded SmolLM2 tokenizer's, 49,152, so its ids fit) with nf4 + gradient
    checkpointing, against PEFT QLoRA r=24 under the same settings (transformers' BitsAndBytesConfig nf4,
    peft.prepare_model_for_kbit_training with non-reentrant checkpointing, bf16 autocast, the same
    batches from multilora's sampler, the same loss function, AdamW at the same lr) in another fresh
    process: tokens/s over steps 6-30 and peak GPU memory. The model is built on the GPU from a
    config (no download) and saved once to a temporary folder with the embedded tokenizer.

    bash benchmarks/gpu_check.sh                          # on a machine with one GPU
    .venv/bin/python benchmarks/gpu_check.py --smoke      # CPU, tiny shapes, 3 steps: proves it runs

--smoke runs the same code on CPU with tiny shapes (hidden 64, 2 layers), float32 autocast off, and
judges nothing. (b) needs the config keys model.quantization and train.gradient_checkpointing; where
this multilora lacks them (or bitsandbytes is missing) it prints why and skips (b).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_layer  # noqa: E402 - the layer benchmark lives next to this script

TARGETS = bench_layer.TARGETS
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False, max_position_embeddings=1024)
RESULT = "GPU_CHECK_RESULT "  # the line a child process reports on


# ----------------------------------------------------------------------------- (a) the layer benchmark


def part_a(args, tmp: Path) -> list[str]:
    """Run bench_layer.py; the ratios of ours to each other configuration (time and peak memory)."""
    out = tmp / "layer.json"
    if args.smoke:
        argv = ["--shapes", "smollm2", "--layers", "1", "--batch", "1", "--seq", "16", "--warmup", "1",
                "--steps", "2", "--device", "cpu", "--json", str(out)]
    else:
        argv = ["--shapes", "llama2-7b", "--layers", "8", "--batch", "4", "--seq", "128", "--warmup", "3",
                "--steps", "15", "--device", "cuda", "--dtype", "bfloat16", "--json", str(out)]
    print(f"(a) bench_layer.py {' '.join(argv[:-2])}", flush=True)
    bench_layer.main(argv)
    res = json.loads(out.read_text())["results"]
    ours = res["ours_n3r8"]
    lines = []
    for other in ("peft_r24", "peft_r8", "loop_n3r8", "base"):
        o = res[other]
        lines.append(f"(a) ours / {bench_layer.DESCRIPTIONS[other]:<26} step time {ours['median_ms'] / o['median_ms']:.3f}x"
                     f"   peak memory {ours['peak_mb'] / o['peak_mb']:.3f}x")
    return lines


# ----------------------------------------------------------------------------- (b) QLoRA training


def qlora_missing() -> str | None:
    """Why (b) cannot run with this multilora, or None."""
    from multilora.config import load_config
    from multilora.errors import MultiLoRAError

    try:
        load_config(None, ["--model.quantization", "nf4", "--train.gradient_checkpointing", "true"])
    except (MultiLoRAError, SystemExit) as e:
        return f"this multilora has no model.quantization nf4 / train.gradient_checkpointing ({e})"
    try:
        import bitsandbytes  # noqa: F401 - only checks that it is installed
    except ImportError:
        return "bitsandbytes is not installed (pip install 'multilora[qlora]')"
    return None


def build_model_dir(args, folder: Path) -> None:
    """A random Llama-2-7B-shaped (or tiny) model + the embedded tokenizer, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from multilora.models import embedded_tokenizer

    tok = embedded_tokenizer()
    shape = dict(TINY if args.smoke else bench_layer.SHAPES["llama2-7b"])
    shape["vocab_size"] = len(tok)  # the tokenizer's ids must fit the embedding
    cfg = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(args.device):  # a 7B init on the GPU takes seconds, on the CPU minutes
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model


def write_run_config(args, model_dir: Path, path: Path, out: Path) -> Path:
    """The training config both arms use (ours trains it with multilora train; PEFT reads data/optim from it)."""
    path.write_text(textwrap.dedent(f"""
        model: {{name: {model_dir}, quantization: nf4, compute_dtype: bfloat16, double_quant: true}}
        method: multilora
        output_dir: {out}
        adapter: {{n: 3, r: 8, alpha: 16, targets: all-linear}}
        data: {{tasks: [rte, wic], max_len: {args.max_len}, eval_examples: 0}}
        optim: {{lr: 1.0e-4, grad_clip: 1.0}}
        train: {{max_steps: {args.steps}, batch_size: {args.batch}, grad_accum: 1, save_every: 0, eval_every: 0,
                 mixed_precision: {"'no'" if args.smoke else "bf16"}, gradient_checkpointing: true,
                 cpu: {str(args.smoke).lower()}}}
    """))
    return path


def child_ours(config_path: str) -> dict:
    """`multilora train` of the config in this process; tokens/s and peak memory."""
    from multilora.config import load_config
    from multilora.run import read_metrics
    from multilora.train import train

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run_dir = train(load_config(config_path), progress=False)
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    return {"steps": [(r["tokens"], r["tokens"] / r["tokens_per_s"], r["loss"]) for r in steps],
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def child_peft(config_path: str) -> dict:
    """PEFT QLoRA r=24 on the same batches, loss and optimizer; tokens/s and peak memory."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from multilora.config import load_config
    from multilora.data import MixtureSampler, collate
    from multilora.loss import token_losses
    from multilora.plan import tokenize
    from multilora.tasks import load_examples, mixture_weights, use_tasks

    cfg = load_config(config_path)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(cfg.train.seed)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                             bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": device.index or 0} if cuda else {"": "cpu"})
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=24, lora_alpha=48, target_modules=list(TARGETS),
                                                       lora_dropout=0.0))
    model.train()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    tasks = use_tasks(cfg.data.tasks)  # the draws multilora's plan makes for this config (same seed)
    examples = {t: load_examples(t) for t in tasks}
    sampler = MixtureSampler({t: len(v) for t, v in examples.items()}, cfg.data.mixture, cfg.data.temperature,
                             mixture_weights(cfg.data.tasks, cfg.data.weights), seed=cfg.train.seed)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    steps = []
    for _ in range(cfg.train.max_steps):
        rows = [tokenize(examples[t][i], tok, cfg) for t, i in (next(sampler) for _ in range(cfg.train.batch_size))]
        batch = {k: v.to(device) for k, v in collate(rows, tok.pad_token_id, tasks).items()}
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            sums, counts = token_losses(model, batch, len(tasks))
        loss = sums.sum() / counts.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())  # waits for the step, as multilora's record does
        if cuda:
            torch.cuda.synchronize()
        steps.append((sum(len(r["input_ids"]) for r in rows), time.perf_counter() - t0, value))
    return {"steps": steps, "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def run_child(which: str, config: Path) -> dict:
    """One arm of (b) in a fresh process (its own peak memory); its result."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", which, "--config", str(config)],
                          stdout=subprocess.PIPE, text=True)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not found:
        raise SystemExit(f"(b) the {which} run failed (exit code {proc.returncode}); see its error above")
    return json.loads(found[-1][len(RESULT):])


def part_b(args, tmp: Path) -> list[str]:
    """Train ours and PEFT QLoRA on the same 7B-shaped nf4 model; tokens/s and peak memory ratios."""
    missing = qlora_missing()
    if missing:
        return [f"(b) skipped: {missing}"]
    t0 = time.perf_counter()
    model_dir = tmp / "model"
    build_model_dir(args, model_dir)
    print(f"(b) random {'tiny' if args.smoke else 'Llama-2-7B-shaped'} model saved to {model_dir} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    config = write_run_config(args, model_dir, tmp / "run.yaml", tmp / "run_ours")
    skip = 1 if args.smoke else 5  # warm-up steps left out of tokens/s
    out = {}
    for which in ("ours", "peft"):
        r = run_child(which, config)
        timed = r["steps"][skip:]
        out[which] = {"tokens_per_s": sum(n for n, _, _ in timed) / sum(t for _, t, _ in timed), "peak_mb": r["peak_mb"],
                      "first_loss": r["steps"][0][2], "last_loss": r["steps"][-1][2]}
        print(f"(b) {which}: {out[which]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    o, q = out["ours"], out["peft"]
    lines = [f"(b) nf4 + gradient checkpointing, batch {args.batch}, max_len {args.max_len}, {args.steps} steps "
             f"(tokens/s over steps {skip + 1}-{args.steps}); ours = multilora train (MultiLoRA n=3 r=8), "
             "PEFT = QLoRA r=24",
             f"(b) ours / PEFT QLoRA tokens/s     {o['tokens_per_s'] / q['tokens_per_s']:.3f}x "
             f"({o['tokens_per_s']:.0f} vs {q['tokens_per_s']:.0f})",
             f"(b) first/last loss: ours {o['first_loss']:.3f} -> {o['last_loss']:.3f}, "
             f"PEFT {q['first_loss']:.3f} -> {q['last_loss']:.3f}"]
    if o["peak_mb"] is not None:
        lines.append(f"(b) ours / PEFT QLoRA peak memory {o['peak_mb'] / q['peak_mb']:.3f}x "
                     f"({o['peak_mb']:.0f} vs {q['peak_mb']:.0f} MB, torch.cuda.max_memory_allocated)")
    else:
        lines.append("(b) peak GPU memory: n/a on CPU")
    return lines


def run(args) -> int:
    """Both parts, then the summary."""
    t0 = time.perf_counter()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke: judges nothing)"
    print(f"gpu_check on {device}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as d:
        tmp = Path(d)
        lines = [] if args.skip_layer else part_a(args, tmp)
        lines += part_b(args, tmp)
    print("\n=== gpu_check summary ===")
    print("\n".join(lines))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 3 steps: proves the script runs")
    p.add_argument("--skip-layer", action="store_true", help="skip (a), the layer benchmark")
    p.add_argument("--steps", type=int, default=None, help="training steps of (b) (default 30; smoke 3)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--child", choices=["ours", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = (child_ours if args.child == "ours" else child_peft)(args.config)
        print(RESULT + json.dumps(result), flush=True)
        return 0
    args.device = "cpu" if args.smoke else "cuda"
    if args.steps is None:
        args.steps = 3 if args.smoke else 30
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no GPU visible (torch.cuda.is_available() is False); use --smoke on a CPU")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
