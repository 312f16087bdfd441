"""`multilora tasks --preview FILE`: what training will see of each task, with the tokenizer only.

    print(preview("examples/own-tasks.yaml", k=3))

Per task: its first k training rows as the model reads them (the tokenizer's text, special tokens
included), the part the loss covers between [[ and ]], token counts, how many rows `max_len`
would cut, and the label set of choice and classification tasks. FILE is a task file or a
training config (its model, data.max_len and data.chat are then the defaults).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..data import IGNORE, Example, tokenize_example
from ..errors import MultiLoRAError
from ..models import DEFAULT_MODEL, embedded_tokenizer
from . import get_task, load_examples, load_items
from .entries import read_task_file, use_tasks

DEFAULT_MAX_LEN = 256  # DataOptions.max_len's default
NO_LIMIT = 10**9


def load_tokenizer(model: str) -> Any:
    """The tokenizer of the embedded model or of a local model folder (no weights are loaded)."""
    if model == DEFAULT_MODEL:
        return embedded_tokenizer()
    from transformers import AutoTokenizer  # only for a model folder

    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise MultiLoRAError(f"--model {model} is not a model folder (no config.json); pass a save_pretrained "
                             f"folder or {DEFAULT_MODEL!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise MultiLoRAError(f"cannot load a tokenizer from {folder} ({type(e).__name__}); save one into it "
                             "with tokenizer.save_pretrained(folder)") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def marked(row: dict, tokenizer: Any) -> str:
    """A tokenized row as text, the tokens that carry loss between [[ and ]]."""
    out, run, trained = [], [], None
    for tid, label in [*zip(row["input_ids"], row["labels"]), (None, None)]:
        now = label is not None and label != IGNORE
        if tid is None or (trained is not None and now != trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"[[{text}]]" if trained else text)
            run = []
        if tid is not None:
            run.append(tid)
            trained = now
    return "".join(out)


def _defaults(path: Path) -> dict:
    """model, max_len and chat of a training config (empty for a plain task file)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    if not (isinstance(data, dict) and isinstance(data.get("data"), dict)):
        return {}
    return {"model": data.get("model"), "max_len": data["data"].get("max_len"), "chat": data["data"].get("chat")}


def label_set(name: str) -> list[str] | None:
    """The choices a choice/classification task's items are scored over (None for generation tasks)."""
    info = get_task(name)
    if info.items is None:
        return None
    items = load_items(name, info.train_split)
    seen = list(dict.fromkeys(c for item in items for c in item.choices))
    return seen


def preview(source: str | Path, model: str | None = None, k: int = 3, max_len: int | None = None,
            chat: bool | None = None) -> str:
    """The preview text of every task in the YAML file `source` (see the module docstring)."""
    if not (isinstance(k, int) and k >= 1):
        raise MultiLoRAError(f"-k must be at least 1, got {k!r}")
    path = Path(source)
    names = use_tasks(read_task_file(path))
    given = _defaults(path)
    model = model or given.get("model") or DEFAULT_MODEL
    max_len = max_len or given.get("max_len") or DEFAULT_MAX_LEN
    chat = bool(given.get("chat")) if chat is None else chat
    tokenizer = load_tokenizer(model)
    lines = [f"preview of {path} with the tokenizer of {model}; max_len {max_len}; [[...]]: the tokens the loss covers"]
    for name in names:
        info = get_task(name)
        train = load_examples(name, info.train_split)
        sizes = [len(_row(ex, tokenizer, NO_LIMIT, chat)["input_ids"]) for ex in train]
        over = sum(n > max_len for n in sizes)
        split_rows = ", ".join(f"{s} {len(load_examples(name, s)) if s != info.train_split else len(train)}"
                               for s in info.splits)
        lines += ["", f"== {name} ({info.note or info.family}; rows: {split_rows}) ==",
                  f"tokens per row: mean {sum(sizes) / len(sizes):.0f}, max {max(sizes)}; {over} of {len(sizes)} "
                  f"rows longer than max_len {max_len} (cut in training)"]
        labels = label_set(name)
        if labels is not None:
            lines.append(f"label set: {', '.join(repr(c) for c in labels)}")
        for i, ex in enumerate(train[:k], start=1):
            row = _row(ex, tokenizer, max_len, chat)
            trained = sum(label != IGNORE for label in row["labels"])
            lines += [f"-- example {i}: {len(row['input_ids'])} tokens, {trained} with loss --", marked(row, tokenizer)]
    return "\n".join(lines)


def _row(ex: Example, tokenizer: Any, max_len: int, chat: bool) -> dict:
    return tokenize_example(ex, tokenizer, max_len, chat, truncate=True)
