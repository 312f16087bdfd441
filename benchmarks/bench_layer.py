#!/usr/bin/env python
"""Train-step benchmark: fused MultiLoRA vs PEFT LoRA vs a naive per-module loop vs no adapter.

One run measures, on a randomly initialised model with SmolLM2-135M's shapes (every one of the
seven linear projections q, k, v, o, gate, up, down adapted), batch 4 x 128 tokens, the median
train-step time (forward + causal-LM loss + backward + AdamW step on the trainable tensors) and
the peak memory of five configurations:

    base        no adapter parameters (the limit; see BASE_NOTE for what is trained)
    peft_r8     peft.get_peft_model, LoraConfig(r=8,  lora_alpha=16, 7 targets, lora_dropout=0)
    peft_r24    peft.get_peft_model, LoraConfig(r=24, lora_alpha=48, ...)  (same total rank as ours)
    loop_n3r8   MultiLoRA n=3 r=8 written as a Python loop over the modules (what we avoid)
    ours_n3r8   multilora.inject(model, MultiLoRAConfig(n=3, r=8, alpha=16, targets="all-linear"))

Each configuration runs in its own fresh subprocess (this script re-invoked with `--one NAME`),
so the configurations cannot disturb each other's memory and each peak is that process's own.
The parent builds and warms up each configuration in turn, keeps them all alive, and then
interleaves their timed steps round-robin (one step of each per round, order rotated each
round), so a burst of load from other programs on a shared machine slows every configuration
alike instead of biasing the ratios (`--sequential`: one configuration at a time, less memory).
Peak memory:

    CPU:  peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs just before
          the first step; ru_maxrss where that is unavailable) minus the RSS right after the
          imports, i.e. model weights + adapters + optimizer state + activations + gradients.
    CUDA: torch.cuda.max_memory_allocated() (which includes the weights too).

"train MB" is the same peak minus the memory held just before the first step (model and
adapters built), i.e. what training itself adds on top of the loaded model.

Time: the median wall time of the timed steps (the targets apply to it), and, as a cross-check,
the median process CPU time. On CPU each configuration uses ONE torch thread by default
(`--threads`): a single-threaded step's CPU time is its compute time even while other programs
share the cores, and no thread waits at a barrier for a descheduled sibling, which on a busy
2-core machine made 2-thread steps vary from 1.4 s to 80 s. Use `--threads 2` on a quiet machine.

Before timing, the parent asserts that the fused layer and the loop give the same output and
gradients for the same weights (layer level and whole tiny model), so a wrong "fast" layer cannot
win. Then it prints a table and the target ratios with PASS/MISS.

    .venv/bin/python benchmarks/bench_layer.py                       # CPU, float32, SmolLM2 shapes (~4 min)
    .venv/bin/python benchmarks/bench_layer.py --json bench.json     # also write the results
    python benchmarks/bench_layer.py --shapes llama2-7b --layers 4   # on a GPU: bf16
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N, R, ALPHA = 3, 8, 16.0  # ours and the loop: n modules of rank r, alpha (PEFT uses lora_alpha = 2 r)

CONFIGS = ["base", "peft_r8", "peft_r24", "loop_n3r8", "ours_n3r8"]
DESCRIPTIONS = {
    "base": "base, no adapter (limit)",
    "peft_r8": "PEFT LoRA r=8",
    "peft_r24": "PEFT LoRA r=24",
    "loop_n3r8": "loop MultiLoRA n=3 r=8",
    "ours_n3r8": "ours MultiLoRA n=3 r=8",
}
BASE_NOTE = (
    "base = every weight frozen, no adapter; the input embeddings are a leaf tensor that requires grad, "
    "so backward still runs through every layer (activation gradients, as with any adapter), and AdamW "
    "steps that (batch x seq x hidden) tensor; its size is not counted as trainable parameters"
)

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096),
}

# (name, numerator, denominator, metric, "<=" or ">=", target)
RATIOS = [
    ("ours / PEFT r=24   step time", "ours_n3r8", "peft_r24", "median_ms", "<=", 1.00),
    ("ours / PEFT r=8    step time", "ours_n3r8", "peft_r8", "median_ms", "<=", 1.05),
    ("loop / ours        step time", "loop_n3r8", "ours_n3r8", "median_ms", ">=", 1.30),
    ("ours / PEFT r=24   peak memory", "ours_n3r8", "peft_r24", "peak_mb", "<=", 1.05),
]


# --------------------------------------------------------------------------------------------
# The naive per-module loop (the thing the fused layer exists to avoid)
# --------------------------------------------------------------------------------------------
class LoopMultiLoRALinear(nn.Module):
    """MultiLoRA (docs/method.md §2) computed literally: one low-rank path per module, in a loop.

    y = W0 x + b + sum_i (alpha / r) s_i * (B_i (A_i x)); same parameter names and shapes as
    multilora.MultiLoRALinear, so weights can be copied across for the equivalence check.
    """

    def __init__(self, base: nn.Linear, n: int, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.n, self.r, self.scaling = n, r, alpha / r
        d_out, d_in = base.weight.shape
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(n, r, d_in, **kw))
        self.lora_B = nn.Parameter(torch.empty(n, d_out, r, **kw))
        self.lora_s = nn.Parameter(torch.zeros(n, d_out, **kw))  # s = 0: dW = 0 at step 0
        with torch.no_grad():
            for i in range(n):
                nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lora_B[i], a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for i in range(self.n):
            y = y + (self.scaling * self.lora_s[i]) * ((x @ self.lora_A[i].T) @ self.lora_B[i].T)
        return y


def inject_loop(model: nn.Module, n: int, r: int, alpha: float) -> int:
    """Freeze the model and replace the seven projections of every layer by the loop layer."""
    for p in model.parameters():
        p.requires_grad_(False)
    paths = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, leaf, LoopMultiLoRALinear(getattr(parent, leaf), n, r, alpha))
    return len(paths)


# --------------------------------------------------------------------------------------------
# Sanity check: fused == loop for the same weights
# --------------------------------------------------------------------------------------------
def sanity_check() -> str:
    """Assert the fused layer and the loop agree (output and all gradients; whole tiny model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import multilora as ml

    torch.manual_seed(0)
    # 1) one layer, SmolLM2's gate_proj shape, random non-zero scales, forward and gradients
    lin = nn.Linear(576, 1536, bias=True)
    ours = ml.MultiLoRALinear(lin, n=N, r=R, alpha=ALPHA)
    loop = LoopMultiLoRALinear(lin, N, R, ALPHA)
    with torch.no_grad():
        ours.lora_s.normal_()
        for p in ("lora_A", "lora_B", "lora_s"):
            getattr(loop, p).copy_(getattr(ours, p))
    x = torch.randn(2, 16, 576)
    xo, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yl = ours(xo), loop(xl)
    g = torch.randn_like(yo)
    (yo * g).sum().backward()
    (yl * g).sum().backward()
    worst = 0.0
    for what, a, b in [("output", yo, yl), ("grad x", xo.grad, xl.grad)] + [
            (f"grad {p}", getattr(ours, p).grad, getattr(loop, p).grad) for p in ("lora_A", "lora_B", "lora_s")]:
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, err)
        assert err < 1e-5, f"fused MultiLoRA and the loop disagree on {what}: max rel diff {err:.2e}"

    # 2) a tiny Llama with all seven projections adapted both ways, same weights: same logits
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(1)
    m_ours = LlamaForCausalLM(cfg).eval()
    m_loop = LlamaForCausalLM(cfg).eval()
    m_loop.load_state_dict(m_ours.state_dict())
    summary = ml.inject(m_ours, ml.MultiLoRAConfig(n=N, r=R, alpha=ALPHA, targets="all-linear"))
    n_loop = inject_loop(m_loop, N, R, ALPHA)
    assert len(summary.modules) == n_loop == 7 * cfg.num_hidden_layers, (summary.modules, n_loop)
    loop_mods = dict(m_loop.named_modules())
    with torch.no_grad():
        for path, mod in ml.adapter_modules(m_ours).items():
            mod.lora_s.normal_()
            for p in ("lora_A", "lora_B", "lora_s"):
                getattr(loop_mods[path], p).copy_(getattr(mod, p))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lo, ll = m_ours(ids).logits, m_loop(ids).logits
    err = ((lo - ll).abs().max() / ll.abs().max()).item()
    worst = max(worst, err)
    assert err < 1e-5, f"fused and loop models disagree: max rel logit diff {err:.2e}"
    assert ml.count_parameters(m_ours)[0] == sum(p.numel() for p in m_loop.parameters() if p.requires_grad)
    return f"fused == loop (layer output, grads of x/A/B/s; tiny-model logits): max rel diff {worst:.1e}"


# --------------------------------------------------------------------------------------------
# One configuration, in its own process
# --------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Memory:
    """Peak memory of this process: CUDA allocator on GPU, resident set size on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM"
        self.start = self.now()

    def now(self) -> float:  # MB
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        kb = _status_kb("VmRSS")
        return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif not _reset_hwm():
            self.method = "ru_maxrss (VmHWM reset unavailable: includes model build)"

    def peak(self) -> float:  # MB
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        kb = _status_kb("VmHWM") if self.method == "VmHWM" else None
        return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def model_config(args):
    from transformers import LlamaConfig

    shape = dict(SHAPES[args.shapes])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    return LlamaConfig(**shape, use_cache=False, attention_dropout=0.0)


def run_one(args):
    """Build one configuration and warm it up; return (info, step function, memory function)."""
    import peft  # imported by every configuration so that the post-import baseline is the same
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    import multilora as ml

    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    gc.collect()
    mem = Memory(device)

    cfg = model_config(args)
    torch.manual_seed(args.seed)  # same base weights in every configuration
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.train()
    n_layers = cfg.num_hidden_layers

    name = args.one
    if name == "base":
        for p in model.parameters():
            p.requires_grad_(False)
    elif name.startswith("peft_r"):
        r = int(name[len("peft_r"):])
        lcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), lora_dropout=0.0)
        # autocast_adapter_dtype=False: keep PEFT's adapters in the model dtype, as ours are
        # (PEFT would otherwise upcast bf16 adapters to float32; a no-op in float32)
        model = peft.get_peft_model(model, lcfg, autocast_adapter_dtype=False)
        n_adapted = sum(1 for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
        assert n_adapted == 7 * n_layers, n_adapted
    elif name == "loop_n3r8":
        assert inject_loop(model, N, R, ALPHA) == 7 * n_layers
    elif name == "ours_n3r8":
        summary = ml.inject(model, ml.MultiLoRAConfig(n=N, r=R, alpha=ALPHA, targets="all-linear"))
        assert len(summary.modules) == 7 * n_layers, len(summary.modules)
    else:
        raise SystemExit(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")

    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(args.seed + 1)  # same input in every configuration
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)

    if name == "base":
        embed = model.get_input_embeddings()
        leaf = embed(ids).detach().requires_grad_()  # backward reaches every layer
        opt = torch.optim.AdamW([leaf], lr=1e-4)

        def loss_fn():
            return model(inputs_embeds=leaf, labels=ids).loss
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> tuple[float, float]:  # (wall seconds, process CPU seconds)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        sync()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{name}: non-finite loss")
        return dt, dc

    gc.collect()
    ready = mem.now()
    mem.reset_peak()
    for _ in range(args.warmup):
        step()
    info = {"config": name, "description": DESCRIPTIONS[name], "trainable": trainable}
    return info, step, lambda: {"peak_mb": mem.peak() - mem.start, "train_mb": mem.peak() - ready,
                                "model_mb": ready - mem.start, "memory_method": mem.method,
                                "threads": torch.get_num_threads()}


def serve(args) -> int:
    """Child process: build and warm up one configuration, then run one timed step per 'step' line.

    Protocol on stdin/stdout (one JSON object per line): -> {"ready": info} after the warm-up;
    "step" -> {"ms": wall, "cpu_ms": cpu}; "done" -> {"memory": {...}} and exit. Everything else the libraries
    print goes to stderr, so stdout carries only the protocol.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    info, step, memory = run_one(args)
    proto.write(json.dumps({"ready": info}) + "\n")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            wall, cpu = step()
            proto.write(json.dumps({"ms": 1000 * wall, "cpu_ms": 1000 * cpu}) + "\n")
        elif cmd == "done":
            proto.write(json.dumps({"memory": memory()}) + "\n")
            return 0
    return 1


# --------------------------------------------------------------------------------------------
# Parent: header, sanity check, one subprocess per configuration, table, ratios
# --------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return f"{platform.machine()} {cpu or 'unknown CPU'}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def header(args) -> list[str]:
    import peft
    import transformers

    import multilora as ml

    cfg = model_config(args)
    lines = [
        f"date:      {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"software:  python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, multilora {ml.__version__}",
        f"machine:   {machine()}",
    ]
    if args.device == "cuda":
        lines.append(f"device:    cuda: {torch.cuda.get_device_name()}")
    else:
        lines.append(f"device:    cpu, torch threads {args.threads or torch.get_num_threads()}")
    lines += [
        f"model:     random LlamaForCausalLM, {args.shapes} shapes: hidden {cfg.hidden_size}, "
        f"intermediate {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads "
        f"({cfg.num_key_value_heads} kv), vocab {cfg.vocab_size}, tied embeddings {cfg.tie_word_embeddings}; "
        f"{args.dtype}",
        f"adapted:   {', '.join(TARGETS)} in every layer ({7 * cfg.num_hidden_layers} modules)",
        f"step:      batch {args.batch} x {args.seq} tokens; forward + causal-LM loss (labels = input ids) + "
        f"backward + AdamW(lr 1e-4) step; {args.warmup} warm-up, median of {args.steps} steps "
        f"({'one configuration at a time' if args.sequential else 'interleaved round-robin across configurations'}); "
        f"seed {args.seed}",
        f"note:      {BASE_NOTE}",
    ]
    return lines


class Child:
    """One configuration in its own process (this script with `--one NAME`), driven over pipes."""

    def __init__(self, args, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(child_argv(args, name), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.info = self._read("ready")
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def _read(self, key: str):
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"configuration {self.name!r} failed (exit code {code}); see its error above")
        return json.loads(line)[key]

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"configuration {self.name!r} failed (exit code {self.proc.wait()}); see its error above")
        d = json.loads(line)
        self.times.append(d["ms"])
        self.cpu_times.append(d["cpu_ms"])

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        memory = self._read("memory")
        self.proc.stdin.close()
        self.proc.wait()
        t = self.times
        return {**self.info, **memory, "median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t),
                "times_ms": [round(x, 2) for x in t],
                "median_cpu_ms": statistics.median(self.cpu_times), "cpu_times_ms": [round(x, 2) for x in self.cpu_times]}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def child_argv(args, name: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--one", name,
            "--shapes", args.shapes, "--batch", str(args.batch), "--seq", str(args.seq),
            "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed),
            "--device", args.device, "--dtype", args.dtype]
    if args.layers:
        argv += ["--layers", str(args.layers)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def report(r: dict, t_start: float) -> None:
    print(f"  ran {r['config']:<10} median {r['median_ms']:8.1f} ms, peak {r['peak_mb']:7.0f} MB "
          f"({time.perf_counter() - t_start:.0f} s)", flush=True)


def table(results: dict[str, dict]) -> list[str]:
    cols = ("config", "trainable params", "median step ms", "min..max ms", "CPU ms", "peak MB", "train MB")
    rows = []
    for name in CONFIGS:
        if name not in results:
            continue
        r = results[name]
        rows.append((r["description"], f"{r['trainable']:,}", f"{r['median_ms']:.1f}",
                     f"{r['min_ms']:.0f}..{r['max_ms']:.0f}", f"{r['median_cpu_ms']:.0f}", f"{r['peak_mb']:.0f}", f"{r['train_mb']:.0f}"))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    fmt = lambda row: "| " + " | ".join(  # noqa: E731
        (v.ljust(w) if i == 0 else v.rjust(w)) for i, (v, w) in enumerate(zip(row, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return [fmt(cols), sep] + [fmt(row) for row in rows]


def ratios(results: dict[str, dict]) -> tuple[list[str], list[dict]]:
    """The target ratios on median wall time (the target) and, as a cross-check, on median CPU time."""
    lines = [f"{'ratio':<31} {'target':>8}   {'median wall':>12}   {'median CPU':>12}", "-" * 72]
    out = []
    judge = lambda v, op, target: v <= target if op == "<=" else v >= target  # noqa: E731
    for label, num, den, metric, op, target in RATIOS:
        if num not in results or den not in results:
            continue
        value = results[num][metric] / results[den][metric]
        ok = judge(value, op, target)
        row = {"ratio": " ".join(label.split()), "numerator": num, "denominator": den, "metric": metric,
               "value": value, "target": f"{op} {target:.2f}", "pass": ok}
        cpu = ""
        if metric == "median_ms":
            cv = results[num]["median_cpu_ms"] / results[den]["median_cpu_ms"]
            row.update(cpu_value=cv, cpu_pass=judge(cv, op, target))
            cpu = f"{cv:6.3f} {'PASS' if row['cpu_pass'] else 'MISS'}"
        out.append(row)
        lines.append(f"{label:<31} {op + f' {target:.2f}':>8}   {value:6.3f} {'PASS' if ok else 'MISS'}   {cpu:>12}")
    return lines, out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2", help="model shapes (default smollm2)")
    p.add_argument("--layers", type=int, default=0, help="cut the model to this many layers (0: all)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2 on CPU, 5 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 7 on CPU, 30 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in each configuration (0: torch's default). Default 1 on CPU: with one "
                        "thread a step's CPU time is its compute time even when other programs share the cores, and "
                        "no thread waits at a barrier for a descheduled sibling; use --threads 2 on a quiet machine")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--no-check", action="store_true", help="skip the fused == loop equivalence check")
    p.add_argument("--json", metavar="OUT", help="also write header, results and ratios to this JSON file")
    p.add_argument("--sequential", action="store_true",
                   help="run the configurations one after another instead of interleaving their timed steps "
                        "(less memory: one model at a time; but load changes on a shared machine then bias the ratios)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: serve one configuration over stdin/stdout
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    if args.dtype is None:
        args.dtype = "bfloat16" if cuda else "float32"
    if args.warmup is None:
        args.warmup = 5 if cuda else 2
    if args.steps is None:
        args.steps = 30 if cuda else 7
    if args.threads is None:
        args.threads = 0 if cuda else 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        return serve(args)

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")

    t_start = time.perf_counter()
    head = header(args)
    print("\n".join(head), flush=True)
    if not args.no_check:
        print(f"check:     {sanity_check()}", flush=True)

    results: dict[str, dict] = {}
    children: list[Child] = []
    try:
        if args.sequential:  # one configuration at a time: lowest memory, but drift hits them unequally
            for name in names:
                child = Child(args, name)
                children.append(child)
                for _ in range(args.steps):
                    child.step()
                results[name] = child.finish()
                report(results[name], t_start)
        else:  # all alive at once, timed steps interleaved round-robin (rotating the order each round)
            for name in names:
                children.append(Child(args, name))
                print(f"  built {name:<10} ({time.perf_counter() - t_start:.0f} s)", flush=True)
            for k in range(args.steps):
                for child in children[k % len(children):] + children[:k % len(children)]:
                    child.step()
            for child in children:
                results[child.name] = child.finish()
                report(results[child.name], t_start)
    finally:
        for child in children:
            child.kill()

    print()
    print("\n".join(table(results)))
    mem_method = {r["memory_method"] for r in results.values()}
    print(f"\npeak MB = peak memory ({', '.join(sorted(mem_method))}) above the process's memory after imports "
          "(weights + adapters + optimizer state + activations); train MB = peak above the built model;\n"
          "CPU ms = median process CPU time per step, all threads (with 1 thread: the step's compute time, "
          "which load from other programs on a shared machine barely changes)\n")
    print("targets apply to the median wall time; the CPU-time column is a cross-check against machine load")
    ratio_lines, ratio_data = ratios(results)
    print("\n".join(ratio_lines))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": head, "args": {k: v for k, v in vars(args).items() if k != "one"},
                       "results": results, "ratios": ratio_data}, f, indent=2)
        print(f"wrote {args.json}")
    missing = [n for n in names if n not in results]
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
