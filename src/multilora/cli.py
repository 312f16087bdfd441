"""The `multilora` command line: one sub-command per job, each a thin shell over the library.

Problems a user can fix (MultiLoRAError, bad arguments) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import train as training  # looked up at call time: tests stub training.train / build_plan
from ._version import __version__
from .allocator import keep_freed_memory
from .analyze import add_analyze_arguments, run_analyze_cli
from .config import help_text, load_config, valid_keys
from .demo import DEFAULT_STEPS, EVAL_LIMIT, PRECISIONS, PRESETS, QUICK_EVAL_LIMIT, QUICK_STEPS, run_demo
from .errors import MultiLoRAError
from .evaluate import add_eval_arguments, run_eval_cli
from .export import OVERWRITE_HELP, add_export_serving_arguments, export_merged, run_export_peft_cli
from .generate import add_generate_arguments, run_generate_cli
from .peft_import import add_import_peft_arguments, run_import_peft_cli
from .sweep import add_sweep_arguments, run_sweep_cli
from .tasks import list_tasks


TRAIN_HELP = f"""Train LoRA, MultiLoRA or full fine-tuning from a YAML config.

Every key can be overridden on the command line as --section.key VALUE (values are YAML:
--adapter.n 4 --optim.lr 3e-4 --data.tasks [alpaca,rte]). data.tasks also takes specs of your own
data files, or a YAML file of them (--data.tasks my_tasks.yaml; README: "Training on your own
tasks"; `multilora tasks --preview FILE` shows what training will see). Sections and defaults:
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
        config = training.resolve_resume(args.resume, given, overrides if given is None else None)
    else:
        config = load_config(args.config, overrides)
    if getattr(args, "dry_run", False):
        plan = training.build_plan(config)
        print(plan.describe())
        return
    training.train(config, resume=args.resume, overwrite=args.overwrite,
                   progress=not getattr(args, "no_progress", False))


def cmd_export(args: argparse.Namespace) -> None:
    """Export an adapter folder as a PEFT LoRA adapter or as a merged full model."""
    if args.format == "peft":
        run_export_peft_cli(args)
        return
    if args.pad_to is not None or args.server is not None:
        raise MultiLoRAError("--pad-to and --server apply to --format peft only")
    out = export_merged(args.adapter, args.out, model=args.model, overwrite=args.overwrite)
    print(f"wrote merged model to {out} (load it with AutoModelForCausalLM.from_pretrained)")


def cmd_demo(args: argparse.Namespace) -> None:
    """Run the paper's study at small scale on the embedded model."""
    run_demo(out_dir=args.out, steps=args.steps, seeds=args.seeds, quick=args.quick, model_name=args.model,
             eval_limit=args.limit, resume=args.resume, overwrite=args.overwrite, preset=args.preset,
             precision=args.precision)


def cmd_tasks(args: argparse.Namespace) -> None:
    """Print the task registry: name, family, rows per split, source; or --preview a task file."""
    if args.preview is not None:
        from .tasks.preview import preview  # loads a tokenizer: only for --preview

        print(preview(args.preview, model=args.model, k=args.k, max_len=args.max_len))
        return
    table = Table(title="multilora tasks (data: $MULTILORA_DATA, else the copy bundled with the package)")
    for col in ("task", "family", "rows per split", "source", "note"):
        table.add_column(col)
    for row in list_tasks(subjects=args.subjects):
        splits = ", ".join(f"{k} {v:,}" for k, v in row["rows"].items())
        table.add_row(row["name"], row["family"], splits, row["source"], row["note"])
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `multilora` command."""
    parser = argparse.ArgumentParser(
        prog="multilora",
        description="Multi-task fine-tuning of Hugging Face causal LMs with MultiLoRA "
        "(fused layer, merge, safetensors adapters, PEFT export).",
    )
    parser.add_argument("--version", action="version", version=f"multilora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the paper's study at small scale: LoRA vs MultiLoRA vs full fine-tuning, "
                       "on the embedded SmolLM2-135M, CPU, minutes",
                       description="Train LoRA (r=24), MultiLoRA (n=3, r=8) and full fine-tuning on the paper's "
                       "task mixture (Alpaca + MMLU + BoolQ/RTE/WiC) with the same data and budget, evaluate them "
                       "and the base model on every task, analyze the spectra of the updates, and write report.md.")
    p.add_argument("--preset", choices=list(PRESETS), default="demo",
                   help="demo: 3 arms, 1 seed, 40 items per task, minutes (default); study: 4 arms (LoRA, MultiLoRA "
                   "at the paper's s_lr_mult 1 and at 30, full), 3 seeds, 96 steps, full held-out splits and held-out "
                   "loss curves, about 1.5-2 hours on 2 cores; both judge the claims from paired 95%% intervals")
    p.add_argument("--out", default=None, help="output folder (default: runs/demo-<date>, runs/demo-study-<date>)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per arm (default: {DEFAULT_STEPS}, study {PRESETS['study'].steps}; "
                   f"{QUICK_STEPS} with --quick)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm, each pairing all arms on the same init "
                   f"seed and batches (default: 1, study {PRESETS['study'].seeds})")
    p.add_argument("--limit", type=int, default=None,
                   help=f"evaluation items per task (default: {EVAL_LIMIT}, study: whole splits or a fixed sample, "
                   f"see report; {QUICK_EVAL_LIMIT} with --quick)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="precision of training and evaluation: bf16 autocast or float32 ('no'); auto: bf16 where "
                   "the CPU computes bfloat16 natively (avx512_bf16 / amx) or the GPU supports it, else float32 "
                   "(default: auto)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of the whole pipeline on a tiny random model: few steps and items, seconds")
    p.add_argument("--model", default=None,
                   help="base model: 'smollm2-135m' (default) or a local folder; --quick: a tiny random model")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out, reusing finished runs")
    p.add_argument("--overwrite", action="store_true", help="delete --out first if it exists")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tasks", help="list the bundled tasks with their splits and sizes; --preview your own",
                       description="List the bundled tasks (Alpaca, MMLU, SuperGLUE) with rows per split; or, "
                       "with --preview FILE, show the tasks of a YAML task file or training config as training "
                       "will see them (tokenizer only, no model).")
    p.add_argument("--subjects", action="store_true", help="also list the 57 MMLU subjects as tasks")
    p.add_argument("--preview", metavar="FILE", default=None,
                   help="show the first training rows of each task in a YAML task file or training config as the "
                        "model sees them (loss part in [[ ]]), token counts, rows cut by max_len, label sets")
    p.add_argument("--model", default=None, help="--preview: the tokenizer's model (default: the config's, "
                   "else smollm2-135m)")
    p.add_argument("-k", type=int, default=3, help="--preview: rows shown per task (default: 3)")
    p.add_argument("--max-len", type=int, default=None, help="--preview: max_len (default: the config's, else 256)")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("train", help="train LoRA / MultiLoRA / full fine-tuning from a YAML config")
    add_train_arguments(p)
    p.set_defaults(func=run_train_cli)

    p = sub.add_parser("eval", help="per-task scores of a run, adapter, PEFT adapter or model",
                       description="Evaluate a run folder, adapter folder, PEFT adapter, model folder or "
                       "'smollm2-135m': multiple choice by log-likelihood (MMLU, SuperGLUE), Alpaca "
                       "response perplexity; prints a table with chance levels and writes eval.json.")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval_cli)

    p = sub.add_parser("generate", help="outputs of a run, adapter or model for your prompts, optionally beside "
                       "its base model's",
                       description="Generate from a run folder, adapter folder, PEFT adapter, model folder or "
                       "'smollm2-135m' for prompts from --prompt, --file or a task's held-out split; greedy by "
                       "default, seeded sampling with --temperature; --compare-base puts the base model's "
                       "outputs beside them. Prints a table; --out also writes JSONL.")
    add_generate_arguments(p)
    p.set_defaults(func=run_generate_cli)

    p = sub.add_parser("analyze", help="singular-value spectra of the learned updates dW, with plots",
                       description="Singular values of each adapted layer's update dW (exact, via QR for "
                       "LoRA/MultiLoRA; dense for full fine-tuning), metrics, plots and summary.md.")
    add_analyze_arguments(p)
    p.set_defaults(func=run_analyze_cli)

    p = sub.add_parser("sweep", help="train, evaluate and analyze a grid of configs x seeds, with a summary",
                       description="Run every combination of --grid (x --seeds) as a normal run folder "
                       "(resumable: finished runs are skipped), evaluate and analyze them, and write sweep.md, "
                       "sweep.csv and plots (scores vs each swept key, held-out loss curves, spectra).")
    add_sweep_arguments(p)
    p.set_defaults(func=run_sweep_cli)

    p = sub.add_parser("export", help="export an adapter folder to PEFT LoRA or to a merged model",
                       description="Export an adapter folder (adapter.safetensors + adapter_config.json). "
                       "--format peft writes a rank n*r PEFT LoRA adapter (lossless; --pad-to / --server "
                       "pad the rank with zeros for a LoRA server and warn about what it would reject); "
                       "--format merged writes a full model folder with the update merged into the weights.")
    p.add_argument("adapter", help="adapter folder written by multilora")
    p.add_argument("--format", choices=["peft", "merged"], default="peft", help="output format (default: peft)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None,
                   help="base model (default: the one the adapter's run records, as it was named)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_export_serving_arguments(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-peft", help="turn a PEFT LoRA adapter into a multilora adapter (n = 1)",
                       description="Import a PEFT LoRA adapter folder (adapter_config.json + "
                       "adapter_model.safetensors) as a multilora LoRA adapter (n = 1, LoRA init), so it can "
                       "be evaluated, analyzed, exported or trained further.")
    add_import_peft_arguments(p)
    p.set_defaults(func=run_import_peft_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `multilora` console script; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":  # only `train` takes --section.key overrides
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    keep_freed_memory()  # large tensors reused, not page-faulted in again at every step (allocator.py)
    try:
        if args.command == "train":
            args.func(args, extra)
        else:
            args.func(args)
    except MultiLoRAError as e:
        message = " ".join(str(e).splitlines())  # one line, even when a path or value holds a newline
        print(f"multilora {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"multilora {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
