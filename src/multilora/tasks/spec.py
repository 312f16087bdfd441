"""The user's own tasks, described in YAML: one task spec, checked, and its rows as examples.

    - name: recipes
      path: data/recipes.jsonl        # .jsonl/.json/.csv/.parquet, or a local datasets (save_to_disk) folder
      format: instruction             # instruction | completion | chat | choice | classification
      fields: {instruction: instruction, input: input, output: output}   # format field -> column
      template: "{instruction}\\n\\n{input}"   # optional; or chat: true for the tokenizer's chat template
      eval: {split: 0.1}              # or {path: data/recipes_val.jsonl}, or none (default: split 0.1)
      weight: 2.0                     # for data.mixture: weights
      metric: exact_match             # optional, instruction/completion: greedy output vs the response

Formats and what they become (prompt -> response, the loss on the response only):

    instruction     template, else the Alpaca prompt ("### Instruction:" [+ "### Input:"] + "### Response:\\n")
                    -> output; evaluated by response perplexity (and exact match with metric: exact_match)
    completion      prompt (or template) -> response; evaluated like instruction
    chat            messages [{role, content}, ...] rendered by the tokenizer's chat template; the loss
                    covers every assistant turn; evaluated by assistant-token perplexity
    choice          template, else "{question}\\nA. ..\\nB. ..\\nAnswer:" -> " A" | " B" ..; accuracy by
                    log-likelihood of each letter (as MMLU)
    classification  template, else "{text}\\nAnswer:" -> " <label>" from `labels`; accuracy by
                    log-likelihood of each label word

A template names format fields or any column of the file in braces. After a template (and for
completion) `separator` (default "\\n") joins prompt and response unless one of them already has
whitespace there. Labels (choice, classification) are an index or a label text: `label_type: index
| text`, inferred only when every row reads one way; booleans are refused, as is a label outside the
set (with its row). The eval split: `eval: {split: f}` puts a row in "val" when
`split_bucket(its prompt) < 100 f` (stable, whatever the file order), or `eval: {path: ...}`.

`parse_spec` checks one spec (every problem at once) and `load_spec` reads its rows as examples;
`tasks.entries` checks a whole `data.tasks` list (task files included) and registers the own tasks.
"""

from __future__ import annotations

import difflib
import json
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..data import Example, MCItem, split_bucket
from ..errors import MultiLoRAError
from . import alpaca
from .custom import _choices, _show, custom_rows, gold_indices, need

FORMATS = ("instruction", "completion", "chat", "choice", "classification")
ROLES = {  # format -> its fields (the columns they read by default have the same names)
    "instruction": ("instruction", "input", "output"),
    "completion": ("prompt", "response"),
    "chat": ("messages",),
    "choice": ("question", "choices", "label"),
    "classification": ("text", "label"),
}
OPTIONAL_ROLES = {"input"}
KEYS = ("name", "path", "format", "fields", "template", "chat", "separator", "eval", "weight", "label_type",
        "labels", "metric")
LABEL_TYPES = ("index", "text")
METRICS = ("exact_match",)
CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_TEMPLATES = {"choice": "{question}\n{choices}\nAnswer:", "classification": "{text}\nAnswer:"}
DEFAULT_SPLIT = 0.1
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Spec:
    """One checked task spec (absolute paths)."""

    name: str
    path: str
    format: str
    fields: dict[str, str]
    template: str | None = None
    chat: bool = False
    separator: str = "\n"
    eval_split: float | None = DEFAULT_SPLIT  # share of rows held out; None: eval_path or no eval split
    eval_path: str | None = None
    weight: float | None = None
    label_type: str | None = None
    labels: tuple[str, ...] = ()
    metric: str | None = None
    mapped: tuple[str, ...] = ()  # the fields the spec maps explicitly (an optional one must then exist)


@dataclass
class Loaded:
    """A spec's rows as training examples and (choice, classification) items, per split."""

    spec: Spec
    examples: dict[str, list[Example]] = field(default_factory=dict)
    items: dict[str, list[MCItem]] = field(default_factory=dict)
    label_set: list[str] = field(default_factory=list)  # the labels (classification) or the letters (choice)



# ----------------------------------------------------------------------------- checking a spec


def parse_spec(raw: Any, columns: Sequence[str] | None = None) -> tuple[Spec | None, list[str]]:
    """A Spec from one mapping, and every problem of its keys and values (each one line)."""
    if not isinstance(raw, dict):
        return None, [f"a task must be a name or a mapping (name, path, format, fields, ...), got {_show(raw)}"]
    who = f"task {raw['name']!r}" if isinstance(raw.get("name"), str) else "a task spec"
    p: list[str] = []
    for key in raw:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            p.append(f"{who}: unknown key {_show(key)}{hint}; keys: {', '.join(KEYS)}")
    name, path, fmt = raw.get("name"), raw.get("path"), raw.get("format")
    if not (isinstance(name, str) and name and all(c.isalnum() or c in "_-." for c in name)):
        p.append(f"{who}: name must be a word of letters, digits, '_', '-' or '.', got {_show(name)}")
    else:
        from . import TASKS  # the bundled registry (this module is imported by it)

        if name in TASKS:
            p.append(f"{who}: {name!r} is a bundled task; give your task another name")
    if not isinstance(path, str) or not path:
        p.append(f"{who}: path must name a data file (.jsonl, .json, .csv, .parquet) or a datasets folder")
    elif not Path(path).exists():
        p.append(f"{who}: data file {path} not found; check the path (relative paths start at the YAML file)")
    if fmt not in FORMATS:
        close = difflib.get_close_matches(str(fmt), FORMATS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        p.append(f"{who}: format {_show(fmt)} is not valid{hint}; use one of {', '.join(FORMATS)}")
        return None, p
    roles = ROLES[fmt]
    fields = raw.get("fields") or {}
    if not isinstance(fields, dict) or not all(isinstance(v, str) and v for v in fields.values()):
        p.append(f"{who}: fields must map format fields to column names, e.g. {{{roles[0]}: my_column}}")
        fields = {}
    for role in fields:
        if role not in roles:
            close = difflib.get_close_matches(str(role), roles, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            p.append(f"{who}: fields: {_show(role)} is not a field of format {fmt}{hint}; its fields: {', '.join(roles)}")
    mapping = {role: fields.get(role, role) for role in roles}
    template = raw.get("template")
    if template is not None:
        if fmt == "chat":
            p.append(f"{who}: format chat takes no template (the tokenizer's chat template renders it)")
        elif not isinstance(template, str) or not template.strip():
            p.append(f"{who}: template must be text naming fields in braces, e.g. \"{{{roles[0]}}}\"")
        else:
            p += [f"{who}: {x}" for x in _template_problems(template, fmt, roles, columns)]
    chat = raw.get("chat", False)
    if not isinstance(chat, bool):
        p.append(f"{who}: chat must be true or false, got {_show(chat)}")
    elif chat and fmt not in ("instruction", "completion"):
        p.append(f"{who}: chat: true applies to the instruction and completion formats"
                 + (" (chat is already chat)" if fmt == "chat" else ""))
    separator = raw.get("separator", "\n")
    if not isinstance(separator, str):
        p.append(f"{who}: separator must be text (\"\" joins prompt and response as they are), got {_show(separator)}")
    eval_split, eval_path = DEFAULT_SPLIT, None
    ev = raw.get("eval", {"split": DEFAULT_SPLIT})
    if ev is None or ev is False or ev == "none":
        eval_split = None
    elif isinstance(ev, dict) and set(ev) == {"split"}:
        eval_split = ev["split"]
        if isinstance(eval_split, bool) or not isinstance(eval_split, (int, float)) or not 0.01 <= eval_split <= 0.99:
            p.append(f"{who}: eval: split must be a share of the rows in 0.01..0.99, got {_show(eval_split)}")
    elif isinstance(ev, dict) and set(ev) == {"path"} and isinstance(ev["path"], str):
        eval_split, eval_path = None, ev["path"]
        if not Path(eval_path).exists():
            p.append(f"{who}: eval data file {eval_path} not found; check eval: path")
    else:
        p.append(f"{who}: eval must be {{split: 0.1}}, {{path: FILE}} or none, got {_show(ev)}")
    weight = raw.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or not (math.isfinite(weight) and weight > 0)):
        p.append(f"{who}: weight must be a positive number, got {_show(weight)}")
    label_type = raw.get("label_type")
    if label_type is not None and label_type not in LABEL_TYPES:
        p.append(f"{who}: label_type must be index or text, got {_show(label_type)}")
    if label_type is not None and fmt not in ("choice", "classification"):
        p.append(f"{who}: label_type applies to the choice and classification formats")
    labels = raw.get("labels")
    if fmt == "classification":
        if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) and x.strip() for x in labels)
                and len(set(labels)) == len(labels)):
            p.append(f"{who}: format classification needs labels: a list of at least 2 distinct label words, "
                     "e.g. labels: [negative, positive]")
            labels = []
    elif labels is not None:
        p.append(f"{who}: labels applies to the classification format (choice rows carry their own choices)")
    metric = raw.get("metric")
    if metric is not None and (metric not in METRICS or fmt not in ("instruction", "completion")):
        p.append(f"{who}: metric {_show(metric)} is not valid here; metric: exact_match applies to the "
                 "instruction and completion formats")
    if p:
        return None, p
    return Spec(name, path, fmt, mapping, template, chat, separator,
                None if eval_split is None else float(eval_split), eval_path,
                None if weight is None else float(weight), label_type, tuple(labels or ()), metric,
                tuple(fields)), []


def _template_problems(template: str, fmt: str, roles: Sequence[str], columns: Sequence[str] | None) -> list[str]:
    """What is wrong with a template: bad braces, or a name that is neither a format field nor a column."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        return [f"template {_show(template)} has unbalanced braces ({e}); write {{{{ and }}}} for literal braces"]
    problems = []
    known = set(roles) | set(columns or ())
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            problems.append(f"template field {{{name}}} must be a plain name such as {{{roles[0]}}}")
        elif name not in known and columns is not None:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {{{close[0]}}}?)" if close else ""
            present = ", ".join(_column(c) for c in columns) or "none"
            problems.append(f"template names {{{name}}}, which is neither a field of format {fmt} "
                            f"({', '.join(roles)}) nor a column of the file{hint}; columns: {present}")
    return problems


def _column(name: Any) -> str:
    return name if isinstance(name, str) and name.isprintable() and len(name) <= 40 else _show(name, 40)


# ----------------------------------------------------------------------------- rows -> examples


def _join(prompt: str, response: str, separator: str) -> str:
    """The prompt with `separator` appended unless prompt or response already has whitespace at the seam."""
    if not separator or prompt[-1:].isspace() or response[:1].isspace():
        return prompt
    return prompt + separator


def _fill(template: str, values: dict[str, Any], row: dict, where: str) -> str:
    """`template` with each {name} replaced: a format field's value, else the row's column (as text)."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        value = values[name] if name in values else need(row, name, where, (str, int, float))
        out.append(value if isinstance(value, str) else str(value))
    return "".join(out)


def column_names(rows: list[tuple[str, dict]]) -> list[str]:
    """The column names of rows read by `custom_rows` (those of the first row)."""
    return list(rows[0][1]) if rows else []


def _field(row: dict, spec: Spec, role: str, where: str, types: tuple[type, ...] = (str,)) -> Any:
    """The value of format field `role`, or a MultiLoRAError naming the column and the columns present."""
    column = spec.fields[role]
    if column not in row:
        present = ", ".join(_column(c) for c in row) or "none"
        close = difflib.get_close_matches(column, [c for c in row if isinstance(c, str)], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        mapped = "" if column == role else f" (fields: {role}: {column})"
        raise MultiLoRAError(f"{where}: no column {column!r} for the {role} field{mapped}; {hint}columns present: "
                             f"{present}; map it with fields: {{{role}: COLUMN}}")
    return need(row, column, where, types)


def _messages(row: dict, spec: Spec, where: str) -> tuple[tuple[str, str], ...]:
    value = _field(row, spec, "messages", where, (list, str))
    if isinstance(value, str):  # CSV: a JSON list in one cell
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            value = None
    if not isinstance(value, list) or not value:
        raise MultiLoRAError(f"{where}: {spec.fields['messages']} must be a list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        at = f"{where} {spec.fields['messages']}[{i}]"
        role = need(m, "role", at)
        if role not in CHAT_ROLES:
            raise MultiLoRAError(f"{at}: role {_show(role)} is not one of {', '.join(CHAT_ROLES)}; fix the row")
        out.append((role, need(m, "content", at)))
    if out[0][0] == "assistant":
        raise MultiLoRAError(f"{where}: the conversation starts with an assistant message; put a user (or system) "
                             "message first")
    if not any(role == "assistant" for role, _ in out):
        raise MultiLoRAError(f"{where}: the conversation has no assistant message, so nothing to train on; "
                             "add one or drop the row")
    return tuple(out)


def _chat_example(row: dict, spec: Spec, where: str) -> Example:
    """A conversation as an Example: `messages` is what is trained; prompt/response describe its last turn."""
    messages = _messages(row, spec, where)
    last = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
    return Example(spec.name, "\n".join(content for _, content in messages[:last]), messages[last][1], messages)


def _text_example(row: dict, spec: Spec, where: str) -> Example:
    """An instruction or completion row as an Example (with messages when chat: true)."""
    if spec.format == "instruction":
        values = {"instruction": _field(row, spec, "instruction", where)}
        values["input"] = _field(row, spec, "input", where) if spec.fields["input"] in row else ""  # optional
        values["output"] = response = _field(row, spec, "output", where)
        if spec.template is None:
            prompt = alpaca.prompt(values["instruction"], values["input"])
            user = values["instruction"] + (f"\n\n{values['input']}" if values["input"].strip() else "")
        else:
            prompt = user = _fill(spec.template, values, row, where)
    else:
        values = {"prompt": _field(row, spec, "prompt", where), "response": _field(row, spec, "response", where)}
        response = values["response"]
        prompt = user = values["prompt"] if spec.template is None else _fill(spec.template, values, row, where)
    if not prompt.strip():
        raise MultiLoRAError(f"{where}: the prompt is empty; every row needs prompt text")
    if spec.chat:  # the tokenizer's chat template renders the user turn; no separator is needed
        return Example(spec.name, user, response, (("user", user), ("assistant", response)))
    return Example(spec.name, _join(prompt, response, spec.separator), response)


def _item(row: dict, spec: Spec, where: str) -> tuple[MCItem, Any, list[str]]:
    """A choice or classification row as an MCItem (gold still -1), its label value and the label texts."""
    if spec.format == "choice":
        question = _field(row, spec, "question", where)
        choices = _choices(row, spec.fields["choices"], where) if spec.fields["choices"] in row else \
            _field(row, spec, "choices", where, (list,))
        if len(choices) > len(LETTERS):
            raise MultiLoRAError(f"{where}: {len(choices)} choices; at most {len(LETTERS)} (A..Z) are supported")
        block = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        values = {"question": question, "choices": block}
        prompt = _fill(spec.template or DEFAULT_TEMPLATES["choice"], values, row, where)
        targets, texts = [f" {LETTERS[i]}" for i in range(len(choices))], choices
    else:
        values = {"text": _field(row, spec, "text", where)}
        prompt = _fill(spec.template or DEFAULT_TEMPLATES["classification"], values, row, where)
        targets, texts = [f" {label}" for label in spec.labels], list(spec.labels)
    label = _field(row, spec, "label", where, (object,))
    return MCItem(spec.name, prompt, targets, -1), label, texts


def _split_of(key: str, share: float) -> str:
    return "val" if split_bucket(key) < round(share * 100) else "train"


def load_spec(spec: Spec) -> Loaded:
    """Every row of a spec's data as examples (and items) per split; the first bad row raises, naming it."""
    sources = [(None, spec.path)] if spec.eval_path is None else [("train", spec.path), ("val", spec.eval_path)]
    out = Loaded(spec, {"train": [], "val": []}, {"train": [], "val": []})
    for fixed, path in sources:
        rows = custom_rows(path, "train")
        if spec.template is not None:
            problems = _template_problems(spec.template, spec.format, ROLES[spec.format], column_names(rows))
            if problems:
                raise MultiLoRAError(f"task {spec.name!r}: {problems[0]}")
        if spec.format in ("choice", "classification"):
            built = [(where, *_item(row, spec, where)) for where, row in rows]
            golds = gold_indices([(where, label, texts) for where, _, label, texts in built], spec.label_type,
                                 spec.fields["label"])
            for (where, item, _, _), gold in zip(built, golds):
                item = MCItem(item.task, item.prompt, item.choices, gold)
                split = fixed or _split_of(item.prompt + "\n" + "\n".join(item.choices), spec.eval_split or 0)
                out.items[split].append(item)
                out.examples[split].append(item.example())
        else:
            for role in OPTIONAL_ROLES & set(spec.mapped):  # mapped, so no row lacking it is a typo
                if not any(spec.fields[role] in row for _, row in rows):
                    _field(rows[0][1], spec, role, rows[0][0])
            for where, row in rows:
                ex = _chat_example(row, spec, where) if spec.format == "chat" else _text_example(row, spec, where)
                key = json.dumps(ex.messages) if spec.format == "chat" else ex.prompt
                out.examples[fixed or _split_of(key, spec.eval_split or 0)].append(ex)
    out.label_set = list(spec.labels) if spec.format == "classification" else []
    if not out.examples["train"]:
        raise MultiLoRAError(f"task {spec.name!r}: the train split is empty ({spec.path}); add rows or lower eval: split")
    if (spec.eval_split is not None or spec.eval_path is not None) and not out.examples["val"]:
        n = len(out.examples["train"])
        raise MultiLoRAError(f"task {spec.name!r}: eval split {spec.eval_split} puts none of the {n} rows in val; "
                             "raise eval: split, give eval: {path: FILE}, or eval: none")
    return out
