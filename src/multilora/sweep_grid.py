"""The grid of `multilora sweep`: parsing `--grid KEY=V1,V2` tokens, expanding them into combinations, and naming them.

    --grid adapter.n=1,2 adapter.init=multilora,lora --grid method=lora
      -> [{adapter.n: 1, adapter.init: multilora}, ..., {method: lora}]   (a product per --grid, a union over them)
      -> run folder names such as n=1__init=multilora__seed=0
"""

from __future__ import annotations

import difflib
import itertools
import re
from typing import Any, Sequence

import yaml

from .config import ALIASES, valid_keys
from .errors import MultiLoRAError

NOT_SWEPT = {"train.seed": "use --seeds N (runs use the base train.seed + 0..N-1)",
             "output_dir": "use --out DIR (runs go to DIR/runs/<name>)"}


def split_values(text: str) -> list[str]:
    """'1,2,[q_proj,v_proj]' -> ['1', '2', '[q_proj,v_proj]']: split on the commas outside [...] and {...}."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _check_key(key: str, token: str) -> None:
    """Refuse keys that --seeds / --out own, and unknown keys (naming the nearest valid one)."""
    if key in NOT_SWEPT:
        raise MultiLoRAError(f"--grid {token!r}: {key} cannot be swept; {NOT_SWEPT[key]}")
    keys = valid_keys()
    if key not in keys:
        section, _, leaf = key.rpartition(".")
        leaf = ALIASES.get(leaf, leaf)  # other tools' names for our keys (learning_rate -> lr)
        same = sorted((k.rpartition(".")[0] != section, k) for k in keys if k.rpartition(".")[2] == leaf)
        close = [k for _, k in same] or difflib.get_close_matches(key, keys, 1, 0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(keys)}"
        raise MultiLoRAError(f"--grid {token!r}: unknown config key {key!r}; {hint}")


def parse_token(token: str) -> tuple[str, list[Any]]:
    """'adapter.n=1,2' -> ('adapter.n', [1, 2]); each value is parsed as YAML."""
    key, eq, text = token.partition("=")
    key = key.strip().removeprefix("--")
    if not eq or not key:
        hint = "; put BASE.yaml before --grid" if token.endswith((".yaml", ".yml")) else ""
        raise MultiLoRAError(f"--grid token {token!r} is not KEY=V1,V2,...; write e.g. adapter.n=1,2,3{hint}")
    _check_key(key, token)
    values = []
    for part in split_values(text):
        if not part.strip():
            raise MultiLoRAError(f"--grid {token!r} has an empty value; write KEY=V1,V2 with no empty items")
        try:
            values.append(yaml.safe_load(part))
        except yaml.YAMLError as e:
            raise MultiLoRAError(f"--grid {token!r}: cannot parse value {part!r} as YAML "
                                 f"({str(e).splitlines()[0]})") from None
    return key, values


def expand_grid(groups: Sequence[Sequence[str] | str]) -> list[dict[str, Any]]:
    """The combinations of the grid: a product over the tokens of each group, unioned over groups (no duplicates).

    `[["adapter.n=1,2", "adapter.init=multilora,lora"], ["method=lora"]]` -> 5 override dicts;
    no groups -> [{}] (the base config alone).
    """
    combos: list[dict[str, Any]] = []
    for group in groups:
        tokens = group.split() if isinstance(group, str) else list(group)
        parsed = [parse_token(t) for t in tokens]
        keys = [k for k, _ in parsed]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise MultiLoRAError(f"--grid {' '.join(tokens)} names {twice[0]} twice; give each key once per "
                                 "--grid, its values comma-separated (KEY=V1,V2)")
        for values in itertools.product(*(v for _, v in parsed)):
            combo = dict(zip(keys, values))
            if combo not in combos:
                combos.append(combo)
    return combos or [{}]


def value_text(value: Any) -> str:
    """A config value as it reads in YAML flow style: 3, 0.0003, true, lora, [q_proj,v_proj]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each swept key's name in run folder names: its leaf, or the full dotted key where two leaves collide."""
    leaves = [k.rpartition(".")[2] for k in keys]
    return {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(keys, leaves)}


def combination_label(combo: dict[str, Any], keys: Sequence[str]) -> str:
    """'n=3__init=lora' (swept keys in grid order; characters outside [A-Za-z0-9_.+=-] become '-'), or 'base'."""
    names = short_names(keys)
    parts = [f"{names[k]}={value_text(combo[k])}" for k in keys if k in combo]
    return "__".join(re.sub(r"[^A-Za-z0-9_.+=\-]", "-", p) for p in parts) or "base"


def swept_keys(combos: Sequence[dict[str, Any]]) -> list[str]:
    """The keys the combinations set, in the order they first appear."""
    return list(dict.fromkeys(k for c in combos for k in c))
