"""Alpaca instruction following: instruction (+ input) -> output.

Prompt (no preamble; the "### Input" block only when the row has input):

    ### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n

The response is the output text. The file has no split: a row goes to "val" when
`split_bucket(instruction + "\\n" + input) < 10` (SHA-256 of the prompt fields, about 10% of the
rows, stable whatever the file order; repeated prompts land on the same side), else to "train".
Evaluation is response-token perplexity, so there are no multiple-choice items.
"""

from __future__ import annotations

from pathlib import Path

from ..data import Example, data_file, split_bucket
from .custom import check_split, need, read_rows

FILE = "alpaca/alpaca_5000.json"
SPLITS = ("train", "val")
VAL_PERCENT = 10


def prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style prompt for one instruction and optional input."""
    if input_text.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def examples(split: str = "train", root: str | Path | None = None, path: str | Path | None = None,
             task: str = "alpaca") -> list[Example]:
    """Examples of one split, from the bundled file or `path` (a JSON list or JSONL of instruction/input/output)."""
    check_split(task, split, SPLITS)
    rows = read_rows(path if path is not None else data_file(FILE, root))
    out = []
    for where, row in rows:
        instruction = need(row, "instruction", where)
        input_text = need(row, "input", where) if "input" in row else ""
        in_val = split_bucket(instruction + "\n" + input_text) < VAL_PERCENT
        if in_val == (split == "val"):
            out.append(Example(task, prompt(instruction, input_text), need(row, "output", where)))
    return out
