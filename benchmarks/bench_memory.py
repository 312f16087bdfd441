#!/usr/bin/env python
"""Memory benchmark: peak memory and step time of ours vs PEFT LoRA under five precision/memory settings.

One run, SmolLM2-135M's shapes (the embedded model's config, random weights, saved once to a temporary
folder so every arm loads the same checkpoint), all seven projections adapted, batch 4 x 512 tokens:

    setting          base weights                      ours (MultiLoRA n=3 r=8)       PEFT LoRA r=24
    float32          float32                           multilora.inject               peft.get_peft_model
    bf16             bfloat16 (adapters bf16 too)      "                              " (autocast_adapter_dtype=False)
    checkpointing    float32 + gradient checkpointing  models.enable_gradient_checkpointing   gradient_checkpointing_enable
    nf4              4-bit NF4 (bitsandbytes), bf16    models.load_model(quantization) +     BitsAndBytesConfig +
                     compute, double quant;            quant.prepare_kbit_training            prepare_model_for_kbit_training
                     adapters float32 in both arms                                            (adapters upcast: PEFT's default)
    nf4+checkpointing   both of the above

Each (setting, arm) runs in its own fresh process (this script re-invoked with `--one`), so each peak
is that process's own. One step = forward + causal-LM loss (labels = inputs) + backward + AdamW.

Peak CPU memory: the kernel's peak resident set of the fresh process (Linux VmHWM, reset through
/proc/self/clear_refs just before the first step, so loading transients do not count; bench_layer's
Memory; ru_maxrss, which cannot be reset, where that is unavailable: then loading counts too). "peak MB"
is that peak minus the resident set after the imports (weights + adapters + training); "train MB" the
peak minus the resident set just before the first step (activations, gradients, optimizer state).
The children run with a fixed glibc mmap threshold (MALLOC_ENV; `--glibc-default` to keep glibc's
dynamic one), so that peak measures live memory rather than heap fragmentation. Before that baseline a
no-grad forward reads every weight, so the pages of a memory-mapped checkpoint
are resident in every arm alike. tracemalloc is not used: it sees only Python's allocator, not torch's
tensors. On a GPU:
torch.cuda.max_memory_allocated instead. Weight memory ("weights MB") is counted from the
tensors (parameters, buffers and bitsandbytes' quantization state) after the model is prepared.

Printed as ratios measured in the same run (targets: ours <= 1.00x PEFT's peak memory in every setting
and <= 1.05x its step time; checkpointing cuts train memory; nf4 weights <= 0.35x float32's).

    .venv/bin/python benchmarks/bench_memory.py            # full size, quiet machine (~15 min on 2 CPU cores)
    .venv/bin/python benchmarks/bench_memory.py --small    # 2 layers, batch 1 x 64, 1 step: proves it runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer import Memory  # noqa: E402 - peak memory of this process (VmHWM reset / CUDA allocator)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = ["float32", "bf16", "checkpointing", "nf4", "nf4+checkpointing"]
ARMS = {"ours": "ours MultiLoRA n=3 r=8", "peft": "PEFT LoRA r=24"}
RESULT = "BENCH_MEMORY_RESULT "


def tensor_mb(model: torch.nn.Module) -> float:
    """Bytes held by the model's parameters, buffers and 4-bit quantization state, MB."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        while qs is not None:  # absmax (+ the nested state of double quantization)
            total += sum(x.numel() * x.element_size() for x in (qs.absmax, qs.code) if x is not None)
            qs = getattr(qs, "state2", None)
    return total / 2**20


def missing_for(setting: str) -> str | None:
    """What a setting needs that this installation lacks (the qlora keys, bitsandbytes), or None."""
    try:
        from multilora.models import enable_gradient_checkpointing  # noqa: F401 - presence check
    except ImportError:
        if "checkpointing" in setting:
            return "needs train.gradient_checkpointing (models.enable_gradient_checkpointing)"
    if setting.startswith("nf4"):
        try:
            from multilora.quant import prepare_kbit_training  # noqa: F401 - presence check
        except ImportError:
            return "needs model.quantization nf4 (multilora.quant)"
        try:
            import bitsandbytes  # noqa: F401 - presence check
        except ImportError:
            return "needs bitsandbytes (pip install 'multilora[qlora]')"
    return None


# ----------------------------------------------------------------------------- one (setting, arm)


def build(setting: str, arm: str, folder: str, device: torch.device):
    """The model of one (setting, arm), ready to train."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    import multilora as ml
    from multilora.models import enable_gradient_checkpointing, load_model

    nf4, ckpt = setting.startswith("nf4"), "checkpointing" in setting
    dtype = torch.bfloat16 if setting == "bf16" else torch.float32
    if arm == "ours":
        if nf4:
            from multilora.quant import prepare_kbit_training

            model, _ = load_model(folder, quantization="nf4", compute_dtype="bfloat16", double_quant=True)
            prepare_kbit_training(model)
        else:
            model, _ = load_model(folder, dtype=dtype)
        model.to(device)
        if ckpt:
            enable_gradient_checkpointing(model)
        ml.inject(model, ml.MultiLoRAConfig(n=3, r=8, alpha=16, targets="all-linear"))
    else:
        AutoTokenizer.from_pretrained(folder)  # held as load_model's tokenizer is in ours: the same baseline
        if nf4:
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb,
                                                         device_map={"": str(device) if device.type == "cpu" else 0})
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                                         gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lcfg = peft.LoraConfig(r=24, lora_alpha=48, target_modules=list(TARGETS), lora_dropout=0.0)
        # adapters in ours' dtype: the model's in float32/bf16 (autocast_adapter_dtype=False), float32 over an nf4
        # base (PEFT's default upcast; without it PEFT's nf4 adapters and their optimizer state are bf16)
        model = peft.get_peft_model(model, lcfg, autocast_adapter_dtype=nf4)
    model.train()
    return model


def run_one(args) -> dict:
    """Build one (setting, arm) in this fresh process, train `steps` steps, measure."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import peft  # noqa: F401 - imported before the baseline in every arm
    import multilora  # noqa: F401

    cuda = args.device == "cuda"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gc.collect()
    mem = Memory(device)  # its start: the memory after the imports
    model = build(args.setting, args.arm, args.model_dir, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.setting.startswith("nf4")
                else torch.autocast(device.type, enabled=False))
    with torch.no_grad(), autocast:  # reads every weight: memory-mapped checkpoint pages become resident now
        model(input_ids=ids[:1, :8])
    gc.collect()
    before_step = mem.now()
    weights = tensor_mb(model)
    mem.reset_peak()
    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        if value != value:
            raise SystemExit(f"{args.setting}/{args.arm}: NaN loss")
    peak = mem.peak()
    return {"setting": args.setting, "arm": args.arm, "trainable": sum(p.numel() for p in params),
            "weights_mb": weights, "peak_mb": peak - mem.start, "train_mb": peak - before_step,
            "memory_method": mem.method,
            "step_s": statistics.median(times), "times_s": times}


# ----------------------------------------------------------------------------- the parent


def make_model_dir(folder: Path, layers: int) -> None:
    """SmolLM2-135M's config (from the embedded model), random weights, saved once; + its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from multilora.models import embedded_model_path, embedded_tokenizer

    cfg = AutoConfig.from_pretrained(embedded_model_path(), local_files_only=True)
    if layers:
        cfg.num_hidden_layers = layers
    cfg.use_cache = False
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    embedded_tokenizer().save_pretrained(folder)


# glibc raises its mmap threshold each time a large block is freed, after which large tensors come from the heap,
# whose high-water mark then depends on the order of earlier allocations, not only on what is alive at once. A
# fixed threshold returns every freed large block to the kernel, so the peak resident set measures live memory,
# as torch.cuda.max_memory_allocated does on a GPU. (Measured, nf4 + checkpointing, 4 layers: ours 1537-1576 vs
# PEFT 1469 train MB with glibc's defaults, 1250 vs 1249 with the fixed threshold.)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def child(args, setting: str, arm: str, model_dir: Path) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--one", setting, arm, str(model_dir),
            "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
            "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads)]
    env = os.environ if args.glibc_default else {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=env)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{setting}/{arm} failed (exit code {proc.returncode}); see its error above")
    return json.loads(found[-1][len(RESULT):])


def report(results: dict, skipped: dict, args) -> list[str]:
    """The table and the ratios."""
    lines = [f"{'setting':<18} {'arm':<24} {'weights MB':>10} {'peak MB':>9} {'train MB':>9} {'step s':>8}"]
    for s in SETTINGS:
        if s in skipped:
            lines.append(f"{s:<18} n/a ({skipped[s]})")
            continue
        for a in ARMS:
            r = results[s][a]
            lines.append(f"{s:<18} {ARMS[a]:<24} {r['weights_mb']:>10.0f} {r['peak_mb']:>9.0f} {r['train_mb']:>9.0f} "
                         f"{r['step_s']:>8.2f}")
    lines += ["", f"{'ratio':<58} {'target':>8} {'value':>8}"]

    def ratio(label: str, value: float, op: str, target: float) -> None:
        ok = value <= target if op == "<=" else value >= target
        lines.append(f"{label:<58} {op + f' {target:.2f}':>8} {value:>7.3f}x {'PASS' if ok else 'MISS'}")

    for s in SETTINGS:
        if s in skipped:
            lines.append(f"{s + ': ours / PEFT':<58} n/a ({skipped[s]})")
            continue
        o, p = results[s]["ours"], results[s]["peft"]
        ratio(f"{s}: ours / PEFT peak memory", o["peak_mb"] / p["peak_mb"], "<=", 1.00)
        ratio(f"{s}: ours / PEFT step time", o["step_s"] / p["step_s"], "<=", 1.05)
    for plain, ckpt in (("float32", "checkpointing"), ("nf4", "nf4+checkpointing")):
        if plain in skipped or ckpt in skipped:
            lines.append(f"{ckpt + ' / ' + plain + ': train memory':<58} n/a ({skipped.get(ckpt) or skipped[plain]})")
            continue
        for a in ARMS:
            cut = results[ckpt][a]["train_mb"] / results[plain][a]["train_mb"]
            ratio(f"{ckpt} / {plain} train memory, {a} (cut {1 - cut:.0%})", cut, "<=", 1.00)
    if "nf4" in skipped:
        lines.append(f"{'nf4 / float32 weight memory':<58} n/a ({skipped['nf4']})")
    else:
        for a in ARMS:
            ratio(f"nf4 / float32 weight memory, {a}",
                  results["nf4"][a]["weights_mb"] / results["float32"][a]["weights_mb"], "<=", 0.35)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="2 layers, batch 1 x 64, 1 step: proves the script runs")
    p.add_argument("--batch", type=int, default=None, help="default 4 (small: 1)")
    p.add_argument("--seq", type=int, default=None, help="default 512 (small: 64)")
    p.add_argument("--layers", type=int, default=None, help="cut the model to this many layers (default all 30; small 2)")
    p.add_argument("--warmup", type=int, default=None, help="default 1 (small: 0)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median taken (default 3; small 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {','.join(SETTINGS)}")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--glibc-default", action="store_true",
                   help="keep glibc's dynamic mmap threshold (CPU peaks then include heap fragmentation; see MALLOC_ENV)")
    p.add_argument("--one", nargs=3, metavar=("SETTING", "ARM", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    small = dict(batch=1, seq=64, layers=2, warmup=0, steps=1)
    full = dict(batch=4, seq=512, layers=0, warmup=1, steps=3)
    for k, v in (small if args.small else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.one:
        args.setting, args.arm, args.model_dir = args.one
        print(RESULT + json.dumps(run_one(args)), flush=True)
        return 0

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    t0 = time.perf_counter()
    print(f"bench_memory: SmolLM2-135M shapes ({args.layers or 'all'} layers), random weights, 7 projections, "
          f"batch {args.batch} x {args.seq}, {args.warmup} warm-up + median of {args.steps} steps, {args.device}; "
          f"peak = {'torch.cuda.max_memory_allocated' if args.device == 'cuda' else 'VmHWM of a fresh process, reset before the first step'} "
          "above the memory after imports", flush=True)
    results: dict[str, dict] = {}
    skipped = {s: "not asked for" for s in SETTINGS if s not in settings}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as d:
        model_dir = Path(d) / "model"
        make_model_dir(model_dir, args.layers)
        for s in settings:
            why = missing_for(s)
            if why:
                skipped[s] = why
                continue
            results[s] = {}
            for a in ARMS:
                results[s][a] = r = child(args, s, a, model_dir)
                print(f"  {s:<18} {a:<5} peak {r['peak_mb']:7.0f} MB  train {r['train_mb']:7.0f} MB  "
                      f"step {r['step_s']:.2f} s  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print()
    print("\n".join(report(results, skipped, args)))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "one"},
                                               "results": results, "skipped": skipped}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
