"""The generic machinery of a typed YAML config: `--key value` overrides, values coerced to type hints.

    parse_overrides(["--adapter.n", "4", "--optim.lr=3e-4"])  # {"adapter.n": 4, "optim.lr": "3e-4"}
    coerce("3e-4", float)                                       # (True, 0.0003)
    type_name(Union[int, None])                                 # 'an integer or null'

Nothing here knows the schema: `config.py` holds TrainConfig, its keys and its rules.
"""

from __future__ import annotations

import reprlib
import types
import typing
from typing import Any, Union

import yaml

from .errors import MultiLoRAError

_REPR = reprlib.Repr()  # user values in error messages: a YAML alias bomb or a 1 MB string stays short
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxlevel = 60, 60, 6, 6, 6, 3


def show(value: Any) -> str:
    """A bounded repr of a user's value for an error message."""
    return _REPR.repr(value)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["--adapter.n", "4", "--optim.lr=3e-4"]` -> {"adapter.n": 4, "optim.lr": "3e-4"} (values via YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--") or len(token) <= 2:
            raise MultiLoRAError(f"unexpected argument {token!r}: overrides look like --section.key value "
                                 "(e.g. --adapter.n 4 --optim.lr 3e-4)")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(overrides) or (overrides[i + 1].startswith("--") and len(overrides[i + 1]) > 2
                                            and not _is_number(overrides[i + 1])):
                raise MultiLoRAError(f"override --{key} has no value: write --{key} VALUE")
            value = overrides[i + 1]
            i += 1
        try:
            out[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise MultiLoRAError(f"override --{key}: cannot parse value {value!r} ({str(e).splitlines()[0]})") from None
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def field_types(cls: type) -> dict[str, Any]:
    """{field name: its type hint} of a dataclass (string annotations resolved)."""
    return typing.get_type_hints(cls)


def type_name(hint: Any) -> str:
    """A type hint in words for an error message (`Union[int, None]` -> 'an integer or null')."""
    if hint is type(None):
        return "null"
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is list:
        return f"a list of {type_name(args[0])}"
    if origin is dict:
        return f"a mapping of {type_name(args[0])} to {type_name(args[1])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            Any: "any value"}.get(hint, str(hint))


def coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, value converted to `hint`): ints are accepted as floats, and number strings such as '3e-4' too."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for a in args:
            ok, v = coerce(value, a)
            if ok:
                return True, v
        return False, None
    if hint is type(None):
        return value is None, None
    if hint is Any:
        return True, value
    if origin is list:
        if isinstance(value, (list, tuple)):
            out = [coerce(v, args[0]) for v in value]
            return all(ok for ok, _ in out), [v for _, v in out]
        return False, None
    if origin is dict:
        if isinstance(value, dict):
            out = {str(k): coerce(v, args[1]) for k, v in value.items()}
            return all(ok for ok, _ in out.values()), {k: v for k, (_, v) in out.items()}
        return False, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, None
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        return isinstance(value, str), value
    return False, None
