"""Reliability, bad input: malformed data rows, configs and CLI values at every entry point (issue 10).

Every task loader (alpaca, mmlu, each SuperGLUE task) and the user's JSONL/JSON/CSV loader gets
hypothesis-generated malformed rows (wrong types, missing/extra fields, empty/huge strings, invalid
UTF-8, lone surrogates, NaN/inf, deep nesting, non-object rows): the valid rows load, or a
MultiLoRAError names the file and the problem; any other exception is a failure.

`multilora train` gets malformed YAML configs and `--section.key value` overrides, and `eval`,
`analyze`, `export`, `demo` get bad paths and numbers: each must return exit code 2 with ONE line on
stderr (`multilora CMD: error: ...`; argparse's own usage errors, SystemExit(2), also count), no
traceback, no hang (SIGALRM guard), and no model loading or training (sentinels) before refusing.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import math
import shutil
import signal
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multilora.config as mlconfig
from multilora.cli import main
from multilora.data import STRATEGIES
from multilora.errors import MultiLoRAError
from multilora.layers import INITS, SCALES
from multilora.quant import COMPUTE_DTYPES, QUANTIZATIONS
from multilora.tasks import (
    TASKS,
    alpaca,
    load_custom,
    load_custom_items,
    load_examples,
    load_items,
    mmlu,
    superglue,
)

GUARD_S = 20  # seconds one in-process call may take before it counts as a hang
MAX_MESSAGE = 1000  # characters: a data error names file, row and problem, not the whole row

FAST = {"deadline": None, "print_blob": True,
        "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                  HealthCheck.data_too_large, HealthCheck.large_base_example,
                                  HealthCheck.filter_too_much]}


# ----------------------------------------------------------------------------- guards


@contextlib.contextmanager
def no_hang(seconds: int = GUARD_S):
    """Fail (instead of hanging) when the block runs longer than `seconds`."""
    def timeout(signum, frame):
        pytest.fail(f"hang: the call did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class WorkStarted(Exception):
    """Raised by the sentinels: bad input got past validation into model loading or training."""


@pytest.fixture
def no_work(monkeypatch):
    """Model loading, training and the demo's model conversion raise WorkStarted."""
    demo, models, train = (importlib.import_module(f"multilora.{m}") for m in ("demo", "models", "train"))

    def started(what):
        def sentinel(*args, **kwargs):
            raise WorkStarted(f"{what} started before the bad input was refused: {args[:2]!r}")
        return sentinel

    sweep, targets, plan = (importlib.import_module(f"multilora.{m}") for m in ("sweep", "targets", "plan"))
    monkeypatch.setattr(train, "train", started("training"))
    monkeypatch.setattr(sweep, "train", started("training"))  # the sweep and the demo train through sweep.train_run
    monkeypatch.setattr(train, "build_plan", started("build_plan (model loading)"))
    for module in (models, plan, targets):  # every module that calls load_model under its own name
        monkeypatch.setattr(module, "load_model", started("model loading"))
    original_prepare = demo._prepare_model
    monkeypatch.setattr(demo, "_prepare_model", lambda name, console: (
        started("the embedded model's conversion")(name) if name == models.DEFAULT_MODEL
        else original_prepare(name, console)))
    analyze = importlib.import_module("multilora.analyze")
    monkeypatch.setattr(analyze, "write_plots", lambda *a, **k: [])  # speed only: plots are not input checks


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `multilora ARGV` in-process; argparse's SystemExit gives its code."""
    capsys.readouterr()
    with no_hang():
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, command: str) -> None:
    """Exit code 2 and one `multilora COMMAND: error:` line (argparse: usage lines, then that line)."""
    assert "Traceback" not in err, err
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    lines = err.rstrip("\n").split("\n")
    assert lines[-1].startswith((f"multilora {command}: error:", "multilora: error:")), err
    if not lines[0].startswith("usage:"):  # not argparse's own error: exactly one line
        assert len(lines) == 1, f"{len(lines)} lines on stderr: {err!r}"


# ----------------------------------------------------------------------------- malformed values

NASTY_TEXT = st.one_of(
    st.sampled_from(["", " ", "\n", "\r\n", "\t", "\x00", "\x07", "\ud800", "a\udfffb", "\u2028", "\ufeff",
                     "ÿ", "😀", "-1", "1", "２", "²", "--1", "NaN", "Infinity", "true", "null", "[]", "{}",
                     "1" * 5000]),
    st.integers(100_000, 300_000).map(lambda n: "x" * n),  # huge
    st.text(max_size=20),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10**30),
                    st.floats(),  # NaN and +-inf included
                    NASTY_TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def mutate(draw, value, depth: int = 0):
    """`value` with one malformation somewhere inside: a field deleted, renamed, retyped or added."""
    if isinstance(value, dict) and value and depth < 4 and draw(st.integers(0, 4)):
        key = draw(st.sampled_from(sorted(value)))
        op = draw(st.sampled_from(["descend", "descend", "delete", "replace", "extra", "rename"]))
        new = dict(value)
        if op == "descend":
            new[key] = mutate(draw, value[key], depth + 1)
        elif op == "delete":
            del new[key]
        elif op == "replace":
            new[key] = draw(JSON_VALUES)
        elif op == "extra":
            new[draw(st.text(max_size=10))] = draw(JSON_VALUES)
        else:
            new[key.upper() + "_"] = new.pop(key)
        return new
    if isinstance(value, list) and value and depth < 4 and draw(st.integers(0, 4)):
        i = draw(st.integers(0, len(value) - 1))
        new = list(value)
        op = draw(st.sampled_from(["descend", "descend", "delete", "replace", "append"]))
        if op == "descend":
            new[i] = mutate(draw, value[i], depth + 1)
        elif op == "delete":
            del new[i]
        elif op == "replace":
            new[i] = draw(JSON_VALUES)
        else:
            new.append(draw(JSON_VALUES))
        return new
    return draw(JSON_VALUES)


def draw_rows(draw, valid: list[dict]) -> list:
    """1-4 rows from the valid templates, at least one of them malformed (sometimes not even an object)."""
    rows = [dict(draw(st.sampled_from(valid))) for _ in range(draw(st.integers(1, 4)))]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(rows) - 1))
        rows[i] = mutate(draw, rows[i])
    return rows


def dump(value, ascii_only: bool) -> bytes:
    """JSON bytes; with ascii_only=False a lone surrogate becomes invalid UTF-8 (CESU-8 bytes)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


LINE_DAMAGE = ["none", "none", "garbage", "truncate", "blank", "crlf", "bom", "deep", "non_object", "latin1"]


def damage_lines(draw, lines: list[bytes]) -> list[bytes]:
    """Byte-level damage to a JSONL/CSV file's lines: garbage, truncation, BOM, CRLF, deep nesting, ..."""
    kind = draw(st.sampled_from(LINE_DAMAGE))
    i = draw(st.integers(0, len(lines) - 1))
    lines = list(lines)
    if kind == "garbage":
        lines.insert(i, draw(st.binary(min_size=1, max_size=40)).replace(b"\n", b""))
    elif kind == "truncate":
        lines[i] = lines[i][: draw(st.integers(0, max(0, len(lines[i]) - 1)))]
    elif kind == "blank":
        lines.insert(i, b"   ")
    elif kind == "crlf":
        lines = [line + b"\r" for line in lines]
    elif kind == "bom":
        lines[0] = b"\xef\xbb\xbf" + lines[0]
    elif kind == "deep":
        lines.insert(i, b"[" * 50_000 + b"]" * 50_000)
    elif kind == "non_object":
        lines.insert(i, draw(st.sampled_from([b"[1, 2]", b'"row"', b"null", b"3.5", b"NaN", b"true"])))
    elif kind == "latin1":
        lines.insert(i, '{"text": "café"}'.encode("latin-1"))
    return lines


def check_loader(call, path: Path, tally, entry: str) -> str:
    """The rows load (a non-empty list of clean examples/items) or a one-line MultiLoRAError names `path`."""
    tally("bad input", entry)
    with no_hang():
        try:
            out = call()
        except MultiLoRAError as e:
            message = str(e)
            assert str(path) in message, f"the message does not name {path}: {message[:300]!r}"
            assert "\n" not in message and "\r" not in message, f"multi-line message: {message[:300]!r}"
            assert len(message) < MAX_MESSAGE + len(str(path)), f"{len(message)}-character message"
            return "refused"
    assert isinstance(out, list) and out
    for x in out:  # what loads must be text a tokenizer can take
        for text in (x.prompt, *(getattr(x, "choices", None) or [x.response])):
            assert isinstance(text, str)
            text.encode("utf-8")
    return "loaded"


# ----------------------------------------------------------------------------- task loaders

SUPERGLUE_VALID = {
    "boolq": [{"question": "is it", "passage": "It is.", "label": True, "idx": 0},
              {"question": "is it not", "passage": "Another passage.", "label": False, "idx": 1}],
    "cb": [{"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0},
           {"premise": "p2", "hypothesis": "h2", "label": "entailment", "idx": 1}],
    "copa": [{"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": 0, "idx": 0},
             {"premise": "p", "choice1": "a", "choice2": "b", "question": "effect", "label": 1, "idx": 1}],
    "rte": [{"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 0},
            {"premise": "p", "hypothesis": "h", "label": "not_entailment", "idx": 1}],
    "wic": [{"word": "bank", "sentence1": "a bank", "sentence2": "river bank", "start1": 2, "end1": 6,
             "start2": 6, "end2": 10, "label": False, "idx": 0}],
    "wsc": [{"text": "Ann met Bo; she smiled.", "target": {"span1_text": "Ann", "span2_text": "she",
                                                           "span1_index": 0, "span2_index": 3},
             "label": True, "idx": 0}],
    "multirc": [{"idx": 0, "passage": {"text": "Some text.", "questions": [
        {"question": "What?", "idx": 0, "answers": [{"text": "this", "label": 1, "idx": 0},
                                                    {"text": "that", "label": 0, "idx": 1}]}]}}],
}


def test_every_superglue_task_has_a_generator():
    assert set(SUPERGLUE_VALID) == set(superglue.TASKS)


@pytest.mark.parametrize("task", sorted(superglue.TASKS))
@settings(max_examples=60, **FAST)
@given(data=st.data())
def test_superglue_loader_malformed_rows(task, data, tmp_path, tally):
    split = data.draw(st.sampled_from(superglue.SPLITS))
    lines = [dump(row, data.draw(st.booleans())) for row in draw_rows(data.draw, SUPERGLUE_VALID[task])]
    lines = damage_lines(data.draw, lines)
    with tempfile.TemporaryDirectory(dir=tmp_path) as root:
        path = Path(root) / superglue.source(task, split)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"\n".join(lines) + b"\n")
        call = data.draw(st.sampled_from([load_items, load_examples]))
        check_loader(lambda: call(task, split, root=root), path, tally, f"task loader: {task}")


ALPACA_VALID = [{"instruction": "Say hi.", "input": "", "output": "Hi."},
                {"instruction": "Add.", "input": "1 + 1", "output": "2"},
                {"instruction": "Name a color.", "output": "Red."}]


@settings(max_examples=100, **FAST)
@given(data=st.data())
def test_alpaca_loader_malformed_rows(data, tmp_path, tally):
    rows = draw_rows(data.draw, ALPACA_VALID)
    ascii_only = data.draw(st.booleans())
    layout = data.draw(st.sampled_from(["json list", "json lines", "user .json", "user .jsonl", "not a list"]))
    if layout in ("json list", "user .json"):
        damage = data.draw(st.sampled_from(["none", "truncate", "garbage", "bom", "deep", "trailing comma"]))
        text = dump(rows, ascii_only)
        if damage == "truncate":
            text = text[: data.draw(st.integers(0, len(text) - 1))]
        elif damage == "garbage":
            at = data.draw(st.integers(0, len(text)))
            text = text[:at] + data.draw(st.binary(min_size=1, max_size=20)) + text[at:]
        elif damage == "bom":
            text = b"\xef\xbb\xbf" + text
        elif damage == "deep":
            text = b"[" * 50_000 + b"]" * 50_000
        elif damage == "trailing comma":
            text = text[:-1] + b",]"
    elif layout == "not a list":
        text = dump(data.draw(JSON_VALUES.filter(lambda v: not isinstance(v, list))), ascii_only)
    else:
        text = b"\n".join(damage_lines(data.draw, [dump(r, ascii_only) for r in rows])) + b"\n"
    split = data.draw(st.sampled_from(alpaca.SPLITS))
    with tempfile.TemporaryDirectory(dir=tmp_path) as root:
        if layout.startswith("user"):
            path = Path(root) / f"mine{layout[5:]}"
            path.write_bytes(text)
            check_loader(lambda: load_examples("alpaca", split, path=path), path, tally, "task loader: alpaca")
        else:
            path = Path(root) / alpaca.FILE
            path.parent.mkdir(parents=True)
            path.write_bytes(text)
            check_loader(lambda: load_examples("alpaca", split, root=root), path, tally, "task loader: alpaca")


MMLU_ROW = ["What is 1 + 1?", "1", "2", "3", "4", "B"]
CSV_CELLS = st.one_of(st.sampled_from(["A", "B", "C", "D", "E", "a", " A", "", "AB", "1", "\x00", "\"", "a,b",
                                       "line\nbreak", "\ufeffA", "\ud800"]),
                      NASTY_TEXT)


def mmlu_csv(draw) -> bytes:
    rows = [list(MMLU_ROW) for _ in range(draw(st.integers(1, 4)))]
    for _ in range(draw(st.integers(1, 3))):
        row = rows[draw(st.integers(0, len(rows) - 1))]
        op = draw(st.sampled_from(["cell", "cell", "drop", "add"]))
        if op == "cell":
            row[draw(st.integers(0, len(row) - 1))] = draw(CSV_CELLS)
        elif op == "drop" and row:
            row.pop(draw(st.integers(0, len(row) - 1)))
        else:
            row.append(draw(CSV_CELLS))
    buf = io.StringIO()
    csv_writer = csv.writer(buf, lineterminator="\n")
    csv_writer.writerows(rows)
    lines = buf.getvalue().encode("utf-8", "surrogatepass").split(b"\n")[:-1]
    lines = damage_lines(draw, lines)
    if draw(st.integers(0, 5)) == 0:  # an unterminated quote swallows the rest of the file
        lines.insert(draw(st.integers(0, len(lines))), b'"open quote,1,2,3,4,A')
    return b"\n".join(lines) + b"\n"


@settings(max_examples=100, **FAST)
@given(data=st.data())
def test_mmlu_loader_malformed_rows(data, tmp_path, tally):
    subject = data.draw(st.sampled_from(mmlu.SUBJECTS))
    split = data.draw(st.sampled_from(["val", "test"]))
    k = data.draw(st.integers(0, mmlu.MAX_SHOTS))
    with tempfile.TemporaryDirectory(dir=tmp_path) as root:
        paths = {}
        for s in ("dev", split):
            paths[s] = Path(root) / "mmlu" / s / f"{subject}_{s}.csv"
            paths[s].parent.mkdir(parents=True, exist_ok=True)
            paths[s].write_bytes(mmlu_csv(data.draw) if data.draw(st.booleans()) or s == split
                                 else b",".join(x.encode() for x in MMLU_ROW) + b"\n")
        name = f"mmlu_{subject}"
        call = data.draw(st.sampled_from([lambda: load_items(name, split, root=root, k=k),
                                          lambda: load_examples(name, split, root=root, k=k)]))
        tally("bad input", "task loader: mmlu")
        with no_hang():
            try:
                out = call()
            except MultiLoRAError as e:
                message = str(e)
                assert str(paths["dev"]) in message or str(paths[split]) in message, message[:300]
                assert "\n" not in message and len(message) < MAX_MESSAGE + 100, message[:300]
                return
        assert out and all(isinstance(x.prompt, str) for x in out)


USER_VALID = [{"prompt": "Q: 1+1?", "response": " 2", "choices": [" 1", " 2"], "label": 1},
              {"prompt": "Q: yes?", "response": " yes", "choices": [" no", " yes"], "label": " yes"},
              {"prompt": "Q: idx", "response": " a", "choices": [" a", " b", " c"], "label": "0"}]


def user_file(draw, root: Path) -> Path:
    fmt = draw(st.sampled_from([".jsonl", ".json", ".csv"]))
    rows = draw_rows(draw, USER_VALID)
    path = root / f"mine{fmt}"
    ascii_only = draw(st.booleans())
    if fmt == ".jsonl":
        data = b"\n".join(damage_lines(draw, [dump(r, ascii_only) for r in rows])) + b"\n"
    elif fmt == ".json":
        data = dump(rows, ascii_only)
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
    else:  # a header row, then cells as text (choices as a JSON list in one cell)
        header = draw(st.sampled_from([["prompt", "response", "choices", "label"], ["prompt", "label"],
                                       ["prompt", "response", "choices", "label", "prompt"], [""], []]))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            cells = [r.get(h, "") if isinstance(r, dict) else r for h in header] or [r]
            w.writerow([c if isinstance(c, str) else json.dumps(c) for c in cells][: draw(st.integers(0, 6))])
        data = b"\n".join(damage_lines(draw, buf.getvalue().encode("utf-8", "surrogatepass").split(b"\n")))
    path.write_bytes(data)
    return path


@settings(max_examples=200, **FAST)
@given(data=st.data())
def test_user_file_loader_malformed_rows(data, tmp_path, tally):
    with tempfile.TemporaryDirectory(dir=tmp_path) as root:
        path = user_file(data.draw, Path(root))
        kind = data.draw(st.sampled_from(["response", "choices", "items"]))
        if kind == "response":
            call = lambda: load_custom(path, "prompt", "response")
        elif kind == "choices":
            call = lambda: load_custom(path, "prompt", choices_field="choices", label_field="label")
        else:
            call = lambda: load_custom_items(path, "prompt", "choices", "label")
        check_loader(call, path, tally, "user JSONL/JSON/CSV")


# byte-level cases every loader must survive, each once (the ones hypothesis finds only sometimes)
NAMED_BYTES = {
    "invalid UTF-8": b'{"premise": "caf\xe9", "hypothesis": "h", "label": "entailment"}\n',
    "lone surrogate escape": b'{"premise": "\\ud800", "hypothesis": "h", "label": "entailment"}\n',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "integer too long to convert": b'{"premise": "p", "hypothesis": "h", "label": ' + b"9" * 5000 + b"}\n",
    "NaN label": b'{"premise": "p", "hypothesis": "h", "label": NaN}\n',
    "Infinity text": b'{"premise": Infinity, "hypothesis": "h", "label": "entailment"}\n',
    "non-object row": b'["premise", "hypothesis"]\n',
    "huge field": b'{"premise": "' + b"x" * 300_000 + b'", "hypothesis": 7, "label": "entailment"}\n',
    "key with a newline": b'{"prem\\nise": "p", "hypothesis": "h", "label": "entailment"}\n',
}


@pytest.mark.parametrize("case", sorted(NAMED_BYTES))
def test_named_bad_bytes_in_a_task_file(case, tmp_path, tally):
    path = tmp_path / "superglue" / "RTE" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(NAMED_BYTES[case])
    assert check_loader(lambda: load_examples("rte", "train", root=tmp_path), path, tally,
                        "task loader: rte") == "refused"


MULTIRC = SUPERGLUE_VALID["multirc"][0]
NAMED_ROWS = {  # (task, row): nested rows of the wrong shape, labels of the wrong type
    "multirc question not an object": ("multirc", {"passage": {"text": "t", "questions": ["What?"]}}),
    "multirc question the field name": ("multirc", {"passage": {"text": "t", "questions": ["question"]}}),
    "multirc question a number": ("multirc", {"passage": {"text": "t", "questions": [5]}}),
    "multirc answer null": ("multirc", {"passage": {"text": "t", "questions": [{"question": "q", "answers": [None]}]}}),
    "multirc answers not a list": ("multirc", {"passage": {"text": "t", "questions": [{"question": "q",
                                                                                          "answers": "yes"}]}}),
    "multirc passage a string": ("multirc", {"passage": "text"}),
    "wsc target a string": ("wsc", {"text": "t", "target": "she", "label": True}),
    "wsc span a number": ("wsc", {"text": "t", "target": {"span1_text": 1, "span2_text": "she"}, "label": True}),
    "copa question other": ("copa", {"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0}),
    "copa label text": ("copa", {"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": "0"}),
    "copa label bool": ("copa", {"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": True}),
    "boolq label int": ("boolq", {"question": "q", "passage": "p", "label": 1}),
    "boolq passage null": ("boolq", {"question": "q", "passage": None, "label": True}),
    "cb label index": ("cb", {"premise": "p", "hypothesis": "h", "label": 0}),
    "wic word list": ("wic", {"word": ["w"], "sentence1": "a", "sentence2": "b", "label": False}),
    "rte label NaN": ("rte", {"premise": "p", "hypothesis": "h", "label": math.nan}),
}


@pytest.mark.parametrize("case", sorted(NAMED_ROWS))
def test_named_bad_rows(case, tmp_path, tally):
    task, row = NAMED_ROWS[case]
    split = "val"
    path = tmp_path / superglue.source(task, split)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(SUPERGLUE_VALID[task][0]) + "\n" + json.dumps(row) + "\n")
    assert check_loader(lambda: load_items(task, split, root=tmp_path), path, tally,
                        f"task loader: {task}") == "refused"


@pytest.mark.parametrize("case", ["invalid UTF-8", "huge cell", "NUL byte", "superscript digit label",
                                  "double minus label", "deep choices", "surrogate choice"])
def test_named_bad_cells_in_a_user_csv(case, tmp_path, tally):
    path = tmp_path / "mine.csv"
    head = b"prompt,choices,label\n"
    body = {"invalid UTF-8": b'caf\xe9,"[""a"", ""b""]",0\n',
            "huge cell": b'"' + b"x" * 300_000 + b'","[""a"", ""b""]",0\n',
            "NUL byte": b'a\x00b,"[""a"", ""b""]",1\n',
            "superscript digit label": '"q","[""a"", ""b""]",²\n'.encode(),
            "double minus label": b'"q","[""a"", ""b""]",--1\n',
            "deep choices": b'"q","' + b"[" * 50_000 + b'",0\n',
            "surrogate choice": b'"q","[""\\ud800"", ""b""]",0\n'}[case]
    path.write_bytes(head + body)
    outcome = check_loader(lambda: load_custom_items(path, "prompt", "choices", "label"), path, tally,
                           "user JSONL/JSON/CSV")
    assert outcome == ("loaded" if case in ("huge cell", "NUL byte") else "refused")


def test_bad_loader_arguments(tmp_path, tally):
    """Wrong split, task name, k-shot and root are refused by name, whatever their type."""
    cases = [lambda: load_examples("rte", "test", root=tmp_path), lambda: load_examples("rte", ["val"]),
             lambda: load_items("mmlu_anatomy", root=tmp_path, k=-1), lambda: load_items("mmlu", k="5"),
             lambda: load_examples(["rte"]), lambda: load_examples("rtee"), lambda: load_items("alpaca"),
             lambda: load_examples("rte", root=tmp_path / "missing"), lambda: load_custom(tmp_path / "nope", "p", "r"),
             lambda: load_custom(str(tmp_path / "x.parquet"), "p", "r"), lambda: load_custom(tmp_path / "x.tsv", "p")]
    (tmp_path / "x.tsv").write_text("p\tr\n")
    for call in cases:
        tally("bad input", "task loader: arguments")
        with no_hang(), pytest.raises(MultiLoRAError) as e:
            call()
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- train: YAML configs

NOT_FLOAT_TEXT = st.text(max_size=12).filter(lambda s: not _parses_as_float(s))
NON_INT_FLOAT = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())
NAN_INF = st.sampled_from([math.nan, math.inf, -math.inf])
CONTAINERS = st.sampled_from([[], [1], {"a": 1}, [[]], {"x": [1, 2]}])


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def bad_int(low: int, allow_none: bool = False):
    """Values an int key (>= low) must refuse."""
    out = [st.integers(max_value=low - 1), NON_INT_FLOAT, NAN_INF, st.text(max_size=10), st.booleans(), CONTAINERS]
    return st.one_of(*out, *([] if allow_none else [st.none()]))


def bad_float(zero_ok: bool):
    """Values a float key (> 0, or >= 0) must refuse."""
    low = st.floats(max_value=0.0, exclude_max=zero_ok, allow_nan=False)  # includes -inf
    return st.one_of(low, NAN_INF, st.integers(max_value=-1 if zero_ok else 0), NOT_FLOAT_TEXT, st.booleans(),
                     CONTAINERS, st.none())


def bad_choice(allowed):
    return st.one_of(st.text(max_size=12).filter(lambda s: s not in allowed), st.integers(), st.booleans(),
                     st.none(), CONTAINERS, st.floats())


NOT_BOOL = st.one_of(st.integers(), st.text(max_size=8), st.none(), st.floats(), CONTAINERS)
NOT_TASK = st.text(max_size=12).filter(lambda s: s.strip() not in TASKS)

# dotted key -> values that key must refuse, given the base config below (max_steps 2, mixture proportional)
BAD_VALUES = {
    "model": st.one_of(st.text(max_size=12).map(lambda s: f"/nonexistent-multilora/{s}"),
                       st.integers(), st.none(), CONTAINERS, st.just("<tmp folder without config.json>")),
    "method": bad_choice(mlconfig.METHODS),
    "output_dir": st.one_of(st.just(""), st.integers(), st.none(), CONTAINERS, st.booleans()),
    "adapter.n": bad_int(1), "adapter.r": bad_int(1),
    "adapter.alpha": bad_float(zero_ok=False),
    "adapter.dropout": st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9), NAN_INF, NOT_FLOAT_TEXT,
                                 st.none(), CONTAINERS),
    "adapter.init": bad_choice(INITS), "adapter.scale": bad_choice(SCALES),
    "adapter.targets": st.one_of(st.just([]), st.just(""), st.lists(st.integers(), min_size=1, max_size=3),
                                 st.integers(), st.none(), st.just({"q_proj": 1})),
    "data.tasks": st.one_of(st.just([]), st.lists(NOT_TASK, min_size=1, max_size=3), st.just(["rte", "rte"]),
                            st.just("rte"), st.lists(st.integers(), min_size=1, max_size=2), st.none()),
    "data.mixture": bad_choice(STRATEGIES),
    "data.temperature": bad_float(zero_ok=False),
    "data.weights": st.one_of(st.dictionaries(st.text(max_size=6), st.floats(min_value=0.1, max_value=9), max_size=3),
                              st.integers(), st.text(max_size=6), st.lists(st.integers(), max_size=2)),
    "data.max_len": bad_int(8),
    "data.chat": NOT_BOOL,
    "data.eval_examples": bad_int(0),
    "optim.lr": bad_float(zero_ok=False), "optim.eps": bad_float(zero_ok=False),
    "optim.weight_decay": bad_float(zero_ok=True), "optim.grad_clip": bad_float(zero_ok=True),
    "optim.betas": st.one_of(st.lists(st.floats(0, 0.99), max_size=5).filter(lambda b: len(b) != 2),
                             st.tuples(st.floats(min_value=1.0), st.floats(0, 0.99)).map(list),
                             st.tuples(st.floats(0, 0.99), NAN_INF).map(list), st.just(["a", 0.9]),
                             st.floats(0, 0.99), st.none()),
    "optim.warmup_steps": st.one_of(st.integers(max_value=-1), st.integers(min_value=2), NON_INT_FLOAT,
                                    st.text(max_size=6), st.booleans(), st.none()),
    "optim.schedule": bad_choice(mlconfig.SCHEDULES),
    "train.batch_size": bad_int(1), "train.grad_accum": bad_int(1), "train.keep_last": bad_int(1),
    "train.log_every": bad_int(1), "train.eval_every": bad_int(0), "train.save_every": bad_int(0),
    "train.max_steps": bad_int(1, allow_none=True),
    "train.epochs": st.one_of(st.floats(allow_nan=False), st.integers(), st.text(max_size=6), CONTAINERS),
    "train.seed": st.one_of(NON_INT_FLOAT, NAN_INF, st.text(max_size=6), st.booleans(), st.none(), CONTAINERS),
    "train.mixed_precision": bad_choice(mlconfig.MIXED_PRECISION),
    "train.log_tensorboard": NOT_BOOL, "train.cpu": NOT_BOOL, "train.save_last": NOT_BOOL, "optim.fused": NOT_BOOL,
    "train.gradient_checkpointing": NOT_BOOL,
    "model.quantization": bad_choice(QUANTIZATIONS), "model.compute_dtype": bad_choice(COMPUTE_DTYPES),
    "model.double_quant": NOT_BOOL,
}
BASE_CONFIG = {"model": "smollm2-135m", "method": "multilora", "adapter": {"n": 2, "r": 4},
               "data": {"tasks": ["rte"], "max_len": 64, "eval_examples": 0},
               "train": {"max_steps": 2, "batch_size": 1}}
VALID_TOP = {f.partition(".")[0] for f in mlconfig.valid_keys()}
INVALID_YAML = ["key: [unclosed", "a: b: c", "\tindent: x", "{a: 1", "- a\nb: c", "*undefined", "a: &x 1\nb: *y",
                "? [a]\n: 1", "a: !!python/object:os.system x", "'unterminated", "a: {b: [c}", "---\n- 1\n---\n- 2",
                "%YAML 9.9\n---\na: 1", "a:\n  - b\n c: d", "@reserved", "`tick", "a: 'x'y'", "x\x00y: 1",
                "model: \x07", "train: {max_steps: 2}\n\x1b[31m"]


def test_bad_value_table_covers_the_schema():
    """Every key of the config schema has generated bad values (new keys must be added here)."""
    missing = set(mlconfig.valid_keys()) - set(BAD_VALUES) - {"adapter.scale_init", "optim.s_lr_mult",
                                                              "optim.b_lr_mult"}
    assert not missing, f"add bad values for {sorted(missing)}"
    assert set(BAD_VALUES) <= set(mlconfig.valid_keys())


def bad_setting(draw, folder: Path) -> tuple[str, object]:
    key = draw(st.sampled_from(sorted(BAD_VALUES)))
    value = draw(BAD_VALUES[key])
    if value == "<tmp folder without config.json>":
        value = str(folder)
    return key, value


def set_dotted(config: dict, key: str, value) -> None:
    section, dot, leaf = key.partition(".")
    if dot and section == "model" and not isinstance(config.get("model"), dict):  # model.X: the mapping form
        config["model"] = {"name": config.get("model", "smollm2-135m")}
    if dot:
        config.setdefault(section, {})
        config[section][leaf] = value
    else:
        config[key] = value


def draw_bad_config(draw, folder: Path) -> bytes:
    """A YAML file that is invalid by construction (so no case can start a training)."""
    kind = draw(st.sampled_from(["bad values", "bad values", "bad values", "unknown key", "section not a mapping",
                                 "not a mapping", "invalid YAML", "control characters"]))
    config = json.loads(json.dumps(BASE_CONFIG))
    config["output_dir"] = str(folder / "run")
    if kind == "bad values":
        for _ in range(draw(st.integers(1, 3))):
            set_dotted(config, *bad_setting(draw, folder))
    elif kind == "unknown key":
        if draw(st.booleans()):
            config[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in VALID_TOP))] = draw(JSON_VALUES)
        else:
            section = draw(st.sampled_from(sorted(mlconfig.SECTIONS)))
            known = {f.name for f in mlconfig.fields(mlconfig.SECTIONS[section])}
            config.setdefault(section, {})[draw(st.text(min_size=1, max_size=12).filter(
                lambda k: k not in known))] = draw(JSON_VALUES)
    elif kind == "section not a mapping":
        config[draw(st.sampled_from(sorted(mlconfig.SECTIONS)))] = draw(
            JSON_VALUES.filter(lambda v: not isinstance(v, dict) and v is not None))
    elif kind == "not a mapping":
        config = draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict) and v is not None
                                         and not (isinstance(v, str) and not v.strip())))
    if kind == "invalid YAML":
        text = draw(st.sampled_from(INVALID_YAML)).encode()
    elif kind == "control characters":  # valid UTF-8 that YAML refuses to read
        text = draw(st.text(alphabet="\x00\x01\x02\x08\x0b\x0e\x1f\x7f\ufffe", min_size=1, max_size=20)).encode()
    else:
        text = yaml.safe_dump(config, allow_unicode=draw(st.booleans())).encode("utf-8", "surrogatepass")
    return text


@settings(max_examples=200, **FAST)
@given(data=st.data())
def test_train_refuses_malformed_yaml_configs(data, tmp_path, capsys, no_work, tally):
    tally("bad input", "train (YAML config)")
    path = tmp_path / "config.yaml"
    path.write_bytes(draw_bad_config(data.draw, tmp_path))
    argv = ["train", str(path)] + data.draw(st.sampled_from([[], ["--dry-run"], ["--overwrite"]]))
    assert_refused(*run_cli(argv, capsys), "train")


def override_text(value) -> str:
    """`value` as the text of one command-line override (YAML flow, one token)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True).strip()
    return text.removesuffix("\n...").strip()


TRAIN_OPTIONS = ["--resume", "--overwrite", "--dry-run", "--no-progress", "--report-to", "--help"]


def _abbreviates_an_option(key: str) -> bool:
    """argparse takes a unique prefix of an option as that option: `--train.max_step` is `--train.max_steps`."""
    options = [f"--{k}" for k in mlconfig.valid_keys()] + TRAIN_OPTIONS
    return any(o.startswith(f"--{key}") for o in options)


@settings(max_examples=200, **FAST)
@given(data=st.data())
def test_train_refuses_malformed_overrides(data, tmp_path, capsys, no_work, tally):
    tally("bad input", "train (overrides)")
    config = json.loads(json.dumps(BASE_CONFIG))
    config["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    tokens: list[str] = []
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["bad value", "bad value", "unknown key", "no value", "not an override",
                                          "unparsable value"]))
        if kind == "bad value":
            key, value = bad_setting(data.draw, tmp_path)
            text = override_text(value)
        elif kind == "unknown key":
            key = data.draw(st.text(alphabet=string.ascii_letters + "._-", min_size=1, max_size=14).filter(
                lambda k: k not in mlconfig.valid_keys() and not _abbreviates_an_option(k) and not k.startswith("-")))
            text = override_text(data.draw(SCALARS.filter(lambda v: not (isinstance(v, str) and len(v) > 1000))))
        elif kind == "unparsable value":
            key = data.draw(st.sampled_from(sorted(BAD_VALUES)))
            text = data.draw(st.sampled_from(["[unclosed", "{a: 1", "a: b: c", "*alias", "\x00", "'x", "@", "`"]))
        elif kind == "no value":
            tokens.append(f"--{data.draw(st.sampled_from(sorted(BAD_VALUES)))}")
            break  # at the end: nothing follows
        else:
            tokens.append(data.draw(st.sampled_from(["positional", "-x", "adapter.n=3", "5"])))
            continue
        if data.draw(st.booleans()):
            tokens.append(f"--{key}={text}")
        else:
            tokens += [f"--{key}", text]
    assert_refused(*run_cli(["train", str(path), *tokens], capsys), "train")


def test_train_other_bad_arguments(tmp_path, capsys, no_work, tally):
    """No config, missing files, folders for files, runs that are not runs: one line each."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("[1, 2]\n")
    for argv in (["train"], ["train", str(tmp_path / "nope.yaml")], ["train", str(tmp_path)],
                 ["train", str(tmp_path / "x\ny.yaml")], ["train", "--resume", str(tmp_path / "nope")],
                 ["train", "--resume", str(tmp_path / "afile")], ["train", "--resume", str(tmp_path / "run")],
                 ["train", "--report-to", "wandb", str(tmp_path / "nope.yaml")]):
        tally("bad input", "train (arguments)")
        assert_refused(*run_cli(argv, capsys), "train")


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x01garbage", b"model: caf\xe9\n", b"\x89PNG\r\n\x1a\n\x00\x00"],
                         ids=["binary", "latin-1", "png"])
def test_train_refuses_a_config_that_is_not_utf8(content, tmp_path, capsys, no_work, tally):
    tally("bad input", "train (YAML config)")
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    assert_refused(*run_cli(["train", str(path)], capsys), "train")


def test_train_refuses_a_deeply_nested_config(tmp_path, capsys, no_work, tally):
    tally("bad input", "train (YAML config)")
    path = tmp_path / "config.yaml"
    path.write_text("data: {tasks: " + "[" * 5000 + "]" * 5000 + "}\n")
    assert_refused(*run_cli(["train", str(path)], capsys), "train")


def test_train_resume_refuses_a_run_whose_config_is_not_utf8(tmp_path, capsys, no_work, tally):
    tally("bad input", "train (arguments)")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_bytes(b"\xff\xfe")
    assert_refused(*run_cli(["train", "--resume", str(tmp_path / "run")], capsys), "train")


@pytest.mark.parametrize("case", ["alias bomb", "huge string"])
def test_train_config_error_stays_short(case, tmp_path, capsys, no_work, tally):
    """A config error names the key and the problem; it does not echo megabytes of the value."""
    tally("bad input", "train (YAML config)")
    if case == "alias bomb":  # 10^6 strings through 6 levels of YAML aliases (5 MB as a repr)
        levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
            f"{b}: &{b} [{', '.join(['*' + a] * 10)}]" for a, b in zip("abcde", "bcdef")]
        text = "\n".join(levels) + "\ndata: {tasks: *f}\n"
    else:
        text = f"method: {'x' * 1_000_000}\n"
    (tmp_path / "c.yaml").write_text(text)
    code, err = run_cli(["train", str(tmp_path / "c.yaml")], capsys)
    assert_refused(code, err, "train")
    assert len(err) < 4000, f"{len(err):,}-character error line"


def test_train_refuses_an_invalid_target_regex_before_loading(tmp_path, capsys, no_work, tally):
    tally("bad input", "train (YAML config)")
    config = dict(BASE_CONFIG, output_dir=str(tmp_path / "run"), adapter={"targets": "q_proj("})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert_refused(*run_cli(["train", str(tmp_path / "c.yaml")], capsys), "train")


def test_train_refuses_an_output_dir_below_a_file(tmp_path, capsys, monkeypatch, tally):
    """output_dir inside a file: refused (one line) before the model loads."""
    train = importlib.import_module("multilora.train")

    monkeypatch.setattr(train, "build_plan", lambda *a, **k: (_ for _ in ()).throw(WorkStarted("build_plan")))
    tally("bad input", "train (YAML config)")
    (tmp_path / "afile").write_text("x")
    config = dict(BASE_CONFIG, output_dir=str(tmp_path / "afile" / "run"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert_refused(*run_cli(["train", str(tmp_path / "c.yaml")], capsys), "train")


# ----------------------------------------------------------------------------- eval, analyze, export, demo


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Bad targets: a missing path, a file, an empty folder, folders with broken JSON; plus a real adapter."""
    import torch
    from conftest import make_tiny

    import multilora as ml

    d = tmp_path_factory.mktemp("places")
    (d / "afile").write_text("not a folder")
    (d / "empty").mkdir()
    for name, content in {"garbage": b"\xff\xfe{", "list": b"[1, 2]", "peft": b'{"peft_type": "LORA"}',
                          "half": b'{"format": "multilora-adapter"}', "nan": b'{"format": NaN}',
                          "deep": b"[" * 100_000 + b"]" * 100_000}.items():
        (d / name).mkdir()
        (d / name / "adapter_config.json").write_bytes(content)
    (d / "badmodel").mkdir()
    (d / "badmodel" / "config.json").write_text("{not json")
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in ml.adapter_parameters(model).values():
            p.normal_(std=0.05)
    ml.save_adapter(model, d / "adapter")
    (d / "evaljson").mkdir()
    return d


BAD_TARGETS = ["missing", "afile", "empty", "garbage", "list", "peft", "half", "nan"]  # "deep": see below


def _parses_as_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


NOT_INT_TEXT = st.one_of(st.sampled_from(["x", "1.5", "1e3", "", " ", "0x10", "--1", "NaN", "inf", "1,000", "2²"]),
                         st.text(max_size=6)).filter(lambda s: not _parses_as_int(s) and s != "--")
# (argparse's type=int refuses these; "--opt=--" is the one exception: argparse drops a "--" value, leaving the default)
INT_TEXT = st.one_of(st.integers(-10**6, 0).map(str), NOT_INT_TEXT)  # refused by a >= 1 check or by argparse


def target_path(places: Path, name: str) -> str:
    return str(places / ("does-not-exist" if name == "missing" else name))


@settings(max_examples=100, **FAST)
@given(data=st.data())
def test_eval_refuses_bad_values(data, places, capsys, no_work, tally):
    tally("bad input", "eval")
    mode = data.draw(st.sampled_from(["bad target", "bad number", "unknown task", "compare"]))
    target = str(places / "adapter") if mode != "bad target" else target_path(places, data.draw(
        st.sampled_from(BAD_TARGETS)))
    argv = ["eval", target]
    if mode != "bad target":  # the valid adapter would go on to load this model
        argv += ["--model", str(places / "base")]
    if mode == "bad number":  # the ones refused before any model loads
        option, low = data.draw(st.sampled_from([("--generate", 0), ("--max-new-tokens", 1), ("--batch-size", 1),
                                                 ("--shots", 0), ("--limit", None)]))
        if low is None or data.draw(st.booleans()):
            value = data.draw(NOT_INT_TEXT)  # argparse refuses
        else:
            value = str(data.draw(st.integers(max_value=low - 1)))
        argv += [f"{option}={value}"]
    elif mode == "unknown task":
        names = data.draw(st.lists(NOT_TASK.filter(lambda s: s.strip() and "," not in s), min_size=1, max_size=3))
        argv += ["--tasks", ",".join(names + data.draw(st.sampled_from([[], ["rte"]])))]
    elif mode == "compare":
        folder = places / "evaljson"
        content = data.draw(st.one_of(st.binary(max_size=30), JSON_VALUES.filter(
            lambda v: not (isinstance(v, dict) and "tasks" in v)).map(lambda v: dump(v, True)),
                                      st.just(b'{"tasks": [], "settings": {}}')))
        (folder / "eval.json").write_bytes(content)
        argv = ["eval", "--compare", str(folder), *data.draw(st.sampled_from([[], [target_path(places, "missing")],
                                                                            ["--tasks", "rte"]]))]
        if data.draw(st.booleans()):
            argv.insert(1, str(places / "adapter"))  # TARGET and --compare together
    assert_refused(*run_cli(argv, capsys), "eval")


@pytest.mark.parametrize("extra", [["--limit", "0"], ["--limit", "-3"], ["--tasks", "mmlu_anatomy", "--shots", "9"],
                                   ["--tasks", ","], ["--out", "afile/eval.json"]],
                         ids=["limit0", "limit-3", "shots9", "no-tasks", "out-below-a-file"])
def test_eval_refuses_bad_values_before_loading_the_model(extra, places, capsys, no_work, tally):
    tally("bad input", "eval")
    extra = [str(places / x) if x.startswith("afile/") else x for x in extra]
    argv = ["eval", str(places / "adapter"), "--model", str(places / "base"), *extra]
    assert_refused(*run_cli(argv, capsys), "eval")


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_deeply_nested_adapter_config(command, places, tmp_path, capsys, no_work, tally):
    tally("bad input", command)
    argv = {"eval": ["eval", str(places / "deep")], "analyze": ["analyze", str(places / "deep"), "--out",
                                                                 str(tmp_path / "out")]}[command]
    assert_refused(*run_cli(argv, capsys), command)


@pytest.mark.parametrize("content", ['{"tasks": {"rte": 5}, "settings": {}}',
                                     '{"tasks": {"rte": {"kind": "multiple_choice"}}, "settings": {}}'])
def test_eval_compare_refuses_a_malformed_result(content, places, tmp_path, capsys, no_work, tally):
    tally("bad input", "eval")
    (tmp_path / "eval.json").write_text(content)
    assert_refused(*run_cli(["eval", "--compare", str(tmp_path / "eval.json")], capsys), "eval")


@settings(max_examples=80, **FAST)
@given(data=st.data())
def test_analyze_refuses_bad_values(data, places, tmp_path, capsys, no_work, tally):
    tally("bad input", "analyze")
    mode = data.draw(st.sampled_from(["bad run", "bad top-k", "bad names", "out is a file"]))
    runs = [str(places / "adapter")]
    if mode == "bad run":
        runs = [target_path(places, data.draw(st.sampled_from(BAD_TARGETS)))] + data.draw(
            st.sampled_from([[], [str(places / "adapter")]]))
    argv = ["analyze", *runs, "--out", str(places / "afile") if mode == "out is a file" else str(tmp_path / "out")]
    if mode == "bad top-k":
        bad = data.draw(st.one_of(st.integers(max_value=0).map(str),
                                  NOT_INT_TEXT.filter(lambda s: s.strip() and "," not in s)))
        argv += [f"--top-k={','.join(data.draw(st.sampled_from([[], ['1'], ['4', '8']])) + [bad])}"]
    elif mode == "bad names":
        argv += ["--names", data.draw(st.sampled_from(["a,b", ",", "a,a", ""]))]
        if argv[-1] in ("a,a",):
            argv[1:1] = [str(places / "adapter")]  # two runs, the same name twice
        elif argv[-1] == "":
            argv += ["--top-k", "0"]  # no names means the default names: make it invalid otherwise
    assert_refused(*run_cli(argv, capsys), "analyze")


@settings(max_examples=80, **FAST)
@given(data=st.data())
def test_export_refuses_bad_values(data, places, tmp_path, capsys, no_work, tally):
    tally("bad input", "export")
    mode = data.draw(st.sampled_from(["bad adapter", "bad pad-to", "bad server", "merged with peft flags",
                                      "out is the adapter"]))
    adapter = str(places / "adapter")
    if mode == "bad adapter":
        adapter = target_path(places, data.draw(st.sampled_from(BAD_TARGETS)))
    argv = ["export", adapter, "--out", adapter if mode == "out is the adapter" else str(tmp_path / "out")]
    argv += data.draw(st.sampled_from([[], ["--format", "peft"], ["--format", "merged"]])) if mode in (
        "bad adapter", "bad server") else []
    if mode == "bad pad-to":
        argv += [f"--pad-to={data.draw(st.one_of(INT_TEXT, st.integers(max_value=3).map(str)))}"]
    elif mode == "bad server":
        argv += ["--server", data.draw(st.text(max_size=8).filter(lambda s: s != "vllm"))]
    elif mode == "merged with peft flags":
        argv += ["--format", "merged", *data.draw(st.sampled_from([["--pad-to", "8"], ["--server", "vllm"]]))]
    assert_refused(*run_cli(argv, capsys), "export")


@settings(max_examples=120, **FAST)
@given(data=st.data())
def test_mutated_adapter_folders(data, places, tmp_path, capsys, no_work, tally):
    """A real adapter with a damaged adapter_config.json or tensor file: refused with one line, or used."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as work:
        folder = Path(work) / "adapter"
        shutil.copytree(places / "adapter", folder)
        cfg_path, weights = folder / "adapter_config.json", folder / "adapter.safetensors"
        mutated = {}
        if data.draw(st.booleans()):
            mutated = mutate(data.draw, json.loads(cfg_path.read_text()))
            cfg_path.write_bytes(dump(mutated, data.draw(st.booleans())))
            damaged = False  # a mutation may leave it valid (an extra key)
        else:
            blob = weights.read_bytes()
            at = data.draw(st.integers(0, len(blob) - 1))
            blob = blob[:at] if data.draw(st.booleans()) else blob[:at] + bytes([blob[at] ^ 0xFF]) + blob[at + 1:]
            weights.write_bytes(blob)
            damaged = True  # the checksum no longer matches
        command = data.draw(st.sampled_from(["eval", "analyze", "export"]))
        tally("bad input", f"{command} (damaged adapter)")
        argv = {"eval": ["eval", str(folder), "--tasks", "rte", "--model", str(places / "base")],
                "analyze": ["analyze", str(folder), "--out", str(Path(work) / "an")],
                "export": ["export", str(folder), "--out", str(Path(work) / "ex")]}[command]
        try:
            code, err = run_cli(argv, capsys)
        except WorkStarted:  # a still-valid adapter got as far as loading its base model: fine
            assert not damaged
            return
        if code == 0:
            assert not damaged, "a damaged tensor file was accepted"
        else:
            assert_refused(code, err, command)


@pytest.mark.parametrize("method", [None, 3, ["lora"]], ids=["null", "int", "list"])
def test_analyze_refuses_an_adapter_whose_method_is_not_text(method, places, tmp_path, capsys, no_work, tally):
    tally("bad input", "analyze (damaged adapter)")
    folder = tmp_path / "adapter"
    shutil.copytree(places / "adapter", folder)
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["method"] = method
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    assert_refused(*run_cli(["analyze", str(folder), "--out", str(tmp_path / "out")], capsys), "analyze")


@settings(max_examples=80, **FAST)
@given(data=st.data())
def test_demo_refuses_bad_values(data, places, tmp_path, capsys, no_work, tally):
    tally("bad input", "demo")
    mode = data.draw(st.sampled_from(["steps", "seeds", "non-numeric", "out is a file", "out not empty",
                                      "resume and overwrite", "bad model"]))
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--quick"]
    if mode == "steps":
        argv += ["--steps", str(data.draw(st.integers(max_value=-1)))]
    elif mode == "seeds":
        argv += ["--seeds", str(data.draw(st.integers(max_value=0)))]
    elif mode == "non-numeric":
        option = data.draw(st.sampled_from(["--steps", "--seeds", "--limit"]))
        argv += [f"{option}={data.draw(NOT_INT_TEXT)}"]
    elif mode == "out is a file":
        argv[2] = str(places / "afile")
    elif mode == "out not empty":
        argv[2] = str(places)
    elif mode == "resume and overwrite":
        argv += ["--resume", "--overwrite"]
    else:
        argv += ["--model", data.draw(st.sampled_from([target_path(places, t) for t in ("missing", "afile", "empty")]))]
    assert_refused(*run_cli(argv, capsys), "demo")


@pytest.mark.parametrize("extra", [["--limit", "-3"], ["--limit", "0"], ["--steps", "0"],
                                   ["--out", "afile/demo"]], ids=["limit-3", "limit0", "steps0", "out-below-a-file"])
def test_demo_refuses_bad_values_before_training(extra, places, tmp_path, capsys, no_work, tally):
    tally("bad input", "demo")
    argv = ["demo", "--quick", "--out", str(tmp_path / "demo")]
    argv += [str(places / x) if x.startswith("afile/") else x for x in extra]
    assert_refused(*run_cli(argv, capsys), "demo")


def test_unknown_commands_and_flags(capsys, tally):
    for argv in (["bogus"], ["tasks", "--bogus"], ["eval", "--bogus", "x"], ["export"], ["analyze"],
                 ["demo", "--steps"], ["import-peft"]):
        tally("bad input", "cli (arguments)")
        code, err = run_cli(argv, capsys)
        assert code == 2 and "Traceback" not in err and err.rstrip().split("\n")[-1].startswith("multilora"), err
