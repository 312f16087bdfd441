"""`multilora generate`: a run's, adapter's or model's outputs for your prompts, optionally beside its base model's.

    prompts = collect_prompts(["Name three primes."], file="prompts.jsonl", task="rte", n=3)
    rows = generate("runs/demo/multilora", prompts, compare_base=True, max_new_tokens=32)
    print_rows(rows)                     # a table: prompt | target output | base output
    write_rows("samples.jsonl", rows)    # one JSON object per (prompt, model)

TARGET is what `multilora eval` takes (`targets.resolve_target`). With `compare_base` each prompt
also gets the base model's output: an adapter (multilora or PEFT) is switched off on the same loaded
model; a merged or fully fine-tuned model folder loads the base model its run records (or `model`).
Generation itself is `scoring.generate_texts` (greedy by default; seeded sampling).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from .errors import MultiLoRAError
from .inject import adapter_modules, unload
from .io import check_writable_dir, write_text_atomic
from .models import DEFAULT_MODEL, load_model
from .run import Run
from .scoring import generate_texts
from .targets import resolve_target
from .tasks import get_task, load_examples
from .tasks.custom import need, read_rows

PROMPT_CHARS = 240  # the table shows at most the last this many characters of a prompt


@dataclass(frozen=True)
class Prompt:
    """One prompt to continue, where it came from ("--prompt 2", "p.jsonl:3", "rte val 0") and a task's gold answer."""

    text: str
    source: str
    reference: str | None = None


def collect_prompts(prompts: Sequence[str] = (), file: str | Path | None = None, task: str | None = None,
                    n: int = 5) -> list[Prompt]:
    """The prompts of every source given, in this order: `prompts`, `file` (JSONL of {"prompt": ...}), `task`.

    `task` gives the first `n` examples of the task's held-out split (with their gold responses).
    Any problem is a MultiLoRAError naming it (the file's line), raised before a model is loaded.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    for i, text in enumerate(prompts, start=1):
        where = f"--prompt {i}" if len(prompts) > 1 else "--prompt"
        out.append(Prompt(_text(text, where), where))
    if file is not None:
        for where, row in read_rows(Path(file).expanduser()):  # names the line of a malformed one
            out.append(Prompt(_text(need(row, "prompt", where), where), where))
    if task is not None:
        if not (isinstance(n, int) and n >= 1):
            raise MultiLoRAError(f"-n must be a positive number of prompts, got {n!r}")
        info = get_task(task)  # an unknown name lists the known tasks
        for i, ex in enumerate(load_examples(task, info.eval_split)[:n]):
            out.append(Prompt(ex.prompt, f"{task} {info.eval_split} {i}", ex.response))
    if not out:
        raise MultiLoRAError("no prompts: give --prompt TEXT (repeatable), --file prompts.jsonl "
                             "(one {\"prompt\": ...} per line) or --task NAME")
    return out


def _text(text: Any, where: str) -> str:
    """`text` if it is a non-empty string that can be written as UTF-8, else a MultiLoRAError naming `where`."""
    if not isinstance(text, str) or not text.strip():
        raise MultiLoRAError(f"{where}: the prompt is empty; give it some text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MultiLoRAError(f"{where}: the prompt is not valid text (undecodable bytes); pass it as UTF-8") from None
    return text


def base_source(target: str, model: str | None = None) -> str | None:
    """What `compare_base` compares with, checked before any model loads.

    None: the target is an adapter, switched off on the loaded model; else the base model to load (`model`,
    or the one a merged / fully fine-tuned run records). A plain model is refused.
    """
    folder = Path(target).expanduser()
    if str(target) != DEFAULT_MODEL and folder.is_dir() and (folder / "adapter_config.json").is_file():
        return None
    plain = (f"--compare-base needs an adapter to switch off, or a merged / fine-tuned model whose base it "
             f"can load, but '{target}' is a plain model; generate from an adapter or run folder, or pass "
             "--model BASE to compare with")
    if str(target) == DEFAULT_MODEL:
        if model is None:
            raise MultiLoRAError(plain)
        base = model
    elif not folder.is_dir():
        return None  # resolve_target says what is wrong with it
    else:
        base = model or Run(folder).base_model()
        if not base:
            raise MultiLoRAError(plain)
    if base != DEFAULT_MODEL and not Path(base).expanduser().is_dir():
        raise MultiLoRAError(f"the base model to compare with, '{base}', is not '{DEFAULT_MODEL}' or a local "
                             "folder; pass --model BASE")
    if base != DEFAULT_MODEL and Path(base).expanduser().resolve() == folder.resolve():
        raise MultiLoRAError(f"the base model to compare with is '{target}' itself; pass --model BASE")
    return base


def generate(target: str, prompts: Sequence[Prompt | str], model: str | None = None, compare_base: bool = False,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             chat: bool = False) -> list[dict]:
    """Outputs of `target` for `prompts` (strings or `collect_prompts`' Prompts) and, with `compare_base`, of
    its base model: one row per (prompt, model).

    A row: index (of the prompt), source, prompt, model ("target" or "base"), name (the target or base
    model), output, new_tokens, stop ("eos" / "length"), and reference (a task's gold response) when known.
    `model` is the base model an adapter is loaded on (default: the one it records), and what a model
    folder is compared with.
    """
    prompts = [p if isinstance(p, Prompt) else Prompt(_text(p, f"prompt {i}"), f"prompt {i}")
               for i, p in enumerate(prompts)]
    base = base_source(target, model) if compare_base else None
    net, tokenizer, identity = resolve_target(target, model)
    settings = {"max_new_tokens": max_new_tokens, "chat": chat, "temperature": temperature, "top_p": top_p,
                "seed": seed}
    texts = [p.text for p in prompts]
    runs = [("target", str(target), generate_texts(net, tokenizer, texts, **settings))]
    if compare_base:
        if base is None and identity.get("kind") == "peft":
            with net.disable_adapter():
                runs.append(("base", identity["base_model"], generate_texts(net, tokenizer, texts, **settings)))
        elif base is None:  # a multilora adapter: unloading without merging leaves the base weights
            if not adapter_modules(net):
                raise MultiLoRAError(f"'{target}' loaded without adapter layers; nothing to compare with")
            unload(net, merge_first=False)
            runs.append(("base", identity["base_model"], generate_texts(net, tokenizer, texts, **settings)))
        else:
            del net
            base_net, base_tokenizer = load_model(base)
            runs.append(("base", base, generate_texts(base_net, base_tokenizer, texts, **settings)))
    rows = []
    for i, p in enumerate(prompts):
        for which, name, outputs in runs:
            got = outputs[i]
            rows.append({"index": i, "source": p.source, "prompt": p.text, "model": which, "name": name,
                         "output": got["output"], "new_tokens": got["new_tokens"], "stop": got["stop"],
                         **({"reference": p.reference} if p.reference is not None else {})})
    return rows


def rows_table(rows: Sequence[dict], title: str = "multilora generate") -> Table:
    """A rich Table: one line per prompt, with a column per model (target, base) and the reference if any."""
    names = list(dict.fromkeys((r["model"], r["name"]) for r in rows))
    has_reference = any("reference" in r for r in rows)
    table = Table(title=title, show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("prompt", ratio=2)
    for which, name in names:
        table.add_column(name if which == "target" else f"base: {name}", ratio=2)
    if has_reference:
        table.add_column("reference", ratio=1)
    by_index: dict[int, dict[tuple[str, str], dict]] = {}
    for r in rows:
        by_index.setdefault(r["index"], {})[(r["model"], r["name"])] = r
    for i, cells in by_index.items():
        first = next(iter(cells.values()))
        prompt = first["prompt"].strip()
        if len(prompt) > PROMPT_CHARS:
            prompt = "…" + prompt[-PROMPT_CHARS:]
        outputs = [cells[key]["output"].strip() + ("" if cells[key]["stop"] == "eos" else " …") for key in names]
        table.add_row(str(i), prompt, *outputs, *([first.get("reference", "").strip()] if has_reference else []))
    return table


def write_rows(path: str | Path, rows: Sequence[dict]) -> None:
    """Write `rows` as JSONL (one object per line, UTF-8), atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ----------------------------------------------------------------------------- CLI


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `multilora generate`."""
    p.add_argument("target", help="run or adapter folder, PEFT adapter folder, model folder, or 'smollm2-135m'")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--file", default=None, help='prompts from a JSONL file, one {"prompt": "..."} per line')
    p.add_argument("--task", default=None, help="prompts from a task's held-out split (`multilora tasks` lists them)")
    p.add_argument("-n", type=int, default=5, help="how many --task prompts (default: 5)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per output at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 (the default) is greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability "
                   "(default: 1.0, all); applies when --temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed + i; default: 0)")
    p.add_argument("--compare-base", action="store_true",
                   help="also generate with the base model: the adapter switched off, or the base a merged / "
                        "fine-tuned model records (or --model)")
    p.add_argument("--model", default=None,
                   help="base model for an adapter (default: the one it records); with --compare-base, the base "
                        "to compare a model folder with")
    p.add_argument("--out", default=None, help="also write the rows to this JSONL file")


def run_generate_cli(args: argparse.Namespace) -> None:
    """`multilora generate`: check everything, generate, print the table, write --out."""
    for name, value, ok, want in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"),
                                  ("--temperature", args.temperature, 0 <= args.temperature < math.inf,
                                   "a number, at least 0 (0: greedy)"),
                                  ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
                                  ("-n", args.n, args.n >= 1, "at least 1")):
        if not ok:
            raise MultiLoRAError(f"{name} must be {want}, got {value}")
    prompts = collect_prompts(args.prompt, args.file, args.task, args.n)
    if args.compare_base:
        base_source(args.target, args.model)
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.is_dir():
            raise MultiLoRAError(f"--out {out} is a folder; name a file such as {out / 'samples.jsonl'}")
        if out.parent.exists() and not out.parent.is_dir():
            raise MultiLoRAError(f"cannot write {out}: {out.parent} is a file, not a folder; choose another path")
        check_writable_dir(out.parent, "folder of --out")
    rows = generate(args.target, prompts, args.model, args.compare_base, args.max_new_tokens, args.temperature,
                    args.top_p, args.seed, args.chat)
    how = ("greedy" if args.temperature == 0 else
           f"temperature {args.temperature:g}, top-p {args.top_p:g}, seed {args.seed}")
    Console().print(rows_table(rows, f"multilora generate: {args.target} ({how}, at most {args.max_new_tokens} "
                                     "new tokens; … = cut at the limit)"))
    if out is not None:
        write_rows(out, rows)
        print(f"wrote {len(rows)} rows to {out}")
