"""The user's own data (JSONL, JSON, CSV, or a local Hugging Face `datasets` folder) as a task.

Also the readers every task module uses: each row comes with its location ("file:line") so
that any problem with it is reported where it is.

Prompt, response and choices are used verbatim (as in TRL's prompt-completion format): put the
separator you want between prompt and response into the data, e.g. a response " yes".
`gold_indices` reads labels (an index or a choice text; ambiguous and boolean labels are refused);
YAML task specs (`tasks.spec`) build on these readers.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from pathlib import Path
from typing import Any, Sequence

from ..data import Example, MCItem
from ..errors import MultiLoRAError

Row = tuple[str, dict]  # (location such as "data.jsonl:12", the row's fields)


def read_rows(path: str | Path, fieldnames: Sequence[str] | None = None) -> list[Row]:
    """Rows of a .jsonl, .json (list of objects, or JSON lines) or .csv file (header row unless `fieldnames`).

    A gzipped file (`rows.jsonl.gz`) is read the same way; locations name the .gz file and count its
    uncompressed lines.
    """
    path = Path(path)
    if not path.is_file():
        raise MultiLoRAError(f"{path}: file not found; check the path")
    suffix = path.suffix.lower()
    if suffix == ".gz":  # rows.jsonl.gz: the type is the suffix before .gz
        suffix = Path(path.stem).suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".csv":
        rows = _read_csv(path, fieldnames)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise MultiLoRAError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet "
                             "(each also gzipped, as .jsonl.gz)")
    if not rows:
        raise MultiLoRAError(f"{path}: no rows, so the task would be empty; add data or drop the task")
    return rows


def _read_text(path: Path) -> str:
    """The file as text: UTF-8 (a leading byte-order mark is dropped), or a MultiLoRAError naming the line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MultiLoRAError(f"{path}: cannot read it ({e.strerror or e}); check the file's permissions") from None
    if path.suffix.lower() == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise MultiLoRAError(f"{path}: not a readable gzip file ({e}); re-compress it, or use the plain "
                                 "file without .gz") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise MultiLoRAError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                             "re-save the file as UTF-8") from None


def _loads(text: str, where: str) -> Any:
    """json.loads, with the errors it raises besides JSONDecodeError turned into a MultiLoRAError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise MultiLoRAError(f"{where}: JSON nested too deeply to read; flatten the data") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise MultiLoRAError(f"{where}: unreadable JSON value ({_short(str(e))}); fix the data") from None


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    for n, line in enumerate(io.StringIO(_read_text(path), newline=None), start=1):
        if not line.strip():
            continue
        try:
            row = _loads(line, f"{path}:{n}")
        except json.JSONDecodeError as e:
            raise MultiLoRAError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno}); "
                                 "fix or remove that line") from None
        if not isinstance(row, dict):
            raise MultiLoRAError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
        rows.append((f"{path}:{n}", row))
    return rows


def _read_json(path: Path) -> list[Row]:
    text = _read_text(path)
    try:
        data = _loads(text, str(path))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line under a .json name
            return _read_jsonl(path)
        raise MultiLoRAError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno}); fix the file") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise MultiLoRAError(f"{path}: expected a JSON list of objects (or one object per line)")
    return [(f"{path}[{i}]", row) for i, row in enumerate(data)]


def _read_csv(path: Path, fieldnames: Sequence[str] | None) -> list[Row]:
    rows = []
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    start = 1
    limit = csv.field_size_limit(2**31 - 1)  # a long cell is data, not an error (default limit: 128 KiB)
    try:
        for record in reader:
            where, start = f"{path}:{start}", reader.line_num + 1  # a quoted field may span lines
            if not record:  # a blank line
                continue
            if fieldnames is None:
                fieldnames = record  # the header row
                continue
            if len(record) != len(fieldnames):
                raise MultiLoRAError(f"{where}: expected {len(fieldnames)} columns "
                                     f"({_short(', '.join(_name(f) for f in fieldnames), 200)}), "
                                     f"got {len(record)}; fix the row's quoting or column count")
            rows.append((where, dict(zip(fieldnames, record))))
    except csv.Error as e:
        raise MultiLoRAError(f"{path}:{start}: malformed CSV ({e}); fix the row's quoting") from None
    finally:
        csv.field_size_limit(limit)
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq  # only for .parquet files: importing it is slow

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise MultiLoRAError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                             f"{_short(str(e).splitlines()[0] if str(e) else '')}); check the file") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _short(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters (with how long it was), so that a message stays short."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _show(value: Any, limit: int = 80) -> str:
    """A short one-line repr of a value from the data (newlines and odd characters escaped)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply>"
    return _short(text, limit)


def _name(key: Any) -> str:
    """A field name as written, or its repr if it is empty, long or holds odd characters."""
    return key if isinstance(key, str) and key and key.isprintable() and len(key) <= 40 else _show(key, 40)


def _check_text(value: str, where: str, field: str) -> None:
    """A MultiLoRAError if `value` cannot be written as UTF-8 (a lone surrogate from a JSON \\ud800 escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MultiLoRAError(f"{where}: field {_show(field, 40)} holds a lone UTF-16 surrogate "
                             f"{value[e.start]!r} at position {e.start}, which is not text; fix the row") from None


def need(row: dict, field: str, where: str, types: tuple[type, ...] = (str,)) -> Any:
    """`row[field]`, or a MultiLoRAError naming the field and the fields present (or the wrong type)."""
    if not isinstance(row, dict):
        raise MultiLoRAError(f"{where}: expected an object with field {field!r}, got {type(row).__name__} "
                             f"{_show(row)}; fix the data")
    if field not in row:
        present = _short(", ".join(map(_name, row)), 200) or "none"
        raise MultiLoRAError(f"{where}: missing field {field!r} (fields present: {present}); "
                             "fix the data or map the right field")
    value = row[field]
    if not isinstance(value, types):
        want = " or ".join(t.__name__ for t in types)
        raise MultiLoRAError(f"{where}: field {field!r} must be {want}, got {type(value).__name__} {_show(value)}")
    if isinstance(value, str):
        _check_text(value, where, field)
    return value


def label_index(value: Any, labels: Sequence[Any], where: str, field: str = "label") -> int:
    """Index of `value` in the label set `labels`, or a MultiLoRAError listing the allowed labels."""
    for i, label in enumerate(labels):
        if value == label and type(value) is type(label):
            return i
    allowed = ", ".join(json.dumps(label) for label in labels)
    try:
        shown = _short(json.dumps(value))
    except (TypeError, ValueError, RecursionError):  # not JSON data (a `datasets` folder's row)
        shown = _show(value)
    raise MultiLoRAError(f"{where}: {field} {shown} is not in the label set ({allowed}); fix the row")


def _as_text(value: Any, texts: Sequence[str]) -> int | None:
    text = value if isinstance(value, str) else str(value) if isinstance(value, int) else None
    return texts.index(text) if text is not None and text in texts else None


def _as_index(value: Any, n: int) -> int | None:
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]{1,18}\s*", value):  # digits in a CSV cell
        value = int(value)
    return value if isinstance(value, int) and 0 <= value < n else None


def gold_indices(labels: Sequence[tuple[str, Any, Sequence[str]]], label_type: str | None,
                 field_name: str = "label") -> list[int]:
    """The gold index of each (where, label value, label texts): by `label_type`, else the one reading every row fits.

    A value is read as a text (a label text, or a number whose digits are one) or as an index
    (an integer, or digits in a CSV cell). Booleans are refused; so is a value that fits no reading.
    """
    for where, value, texts in labels:
        if isinstance(value, bool):
            raise MultiLoRAError(f"{where}: {field_name} {json.dumps(value)} is a boolean, which would silently "
                                 f"count as {int(value)}; write the label text (one of {_show(list(texts), 120)}) or "
                                 "its index")
        if not isinstance(value, (str, int)):
            raise MultiLoRAError(f"{where}: {field_name} {_show(value)} must be a label text or an index; fix the row")
    as_text = [_as_text(v, texts) for _, v, texts in labels]
    as_index = [_as_index(v, len(texts)) for _, v, texts in labels]

    def refuse(i: int, reading: str) -> MultiLoRAError:
        where, value, texts = labels[i]
        allowed = (f"an index 0..{len(texts) - 1}" if reading == "index" else
                   f"one of {_show(list(texts), 160)}" if reading == "text" else
                   f"an index 0..{len(texts) - 1} or one of {_show(list(texts), 160)}")
        return MultiLoRAError(f"{where}: {field_name} {_show(value)} is outside the label set ({allowed}); fix the row")

    if label_type is not None:
        chosen = as_index if label_type == "index" else as_text
        for i, gold in enumerate(chosen):
            if gold is None:
                raise refuse(i, label_type)
        return chosen  # type: ignore[return-value]
    text_ok, index_ok = None not in as_text, None not in as_index
    if text_ok and index_ok:
        differ = [i for i in range(len(labels)) if as_text[i] != as_index[i]]
        if differ:
            where, value, texts = labels[differ[0]]
            raise MultiLoRAError(f"{where}: {field_name} {_show(value)} is ambiguous: the text of choice "
                                 f"{as_text[differ[0]]} ({_show(texts[as_text[differ[0]]])}) or index {as_index[differ[0]]}; "
                                 "set label_type: index or label_type: text in the task spec")
        return as_text  # type: ignore[return-value]
    if text_ok:
        return as_text  # type: ignore[return-value]
    if index_ok:
        return as_index  # type: ignore[return-value]
    for i in range(len(labels)):
        if as_text[i] is None and as_index[i] is None:
            raise refuse(i, "either")
    t = next(i for i in range(len(labels)) if as_index[i] is None)
    x = next(i for i in range(len(labels)) if as_text[i] is None)
    raise MultiLoRAError(f"the {field_name} column mixes label texts ({labels[t][0]}: {_show(labels[t][1])}) and "
                         f"indices ({labels[x][0]}: {_show(labels[x][1])}); set label_type and write every row that way")


def check_split(task: str, split: str, splits: Sequence[str]) -> None:
    """A MultiLoRAError unless `split` is one of the task's splits."""
    if not isinstance(split, str) or split not in splits:
        raise MultiLoRAError(f"task {task!r} has splits {', '.join(splits)}; got {_show(split)}")


# ----------------------------------------------------------------------------- user tasks


def custom_rows(source: str | Path, split: str = "train") -> list[Row]:
    """Rows of a data file, or of `split` of a local `datasets` folder (save_to_disk or data files)."""
    path = Path(source).expanduser()
    if path.is_file():
        return read_rows(path)
    if not path.is_dir():
        raise MultiLoRAError(
            f"{source!r} is not a local file or folder, and this machine is offline so Hugging Face hub "
            "datasets cannot be downloaded; pass a .jsonl/.json/.csv file or a folder saved with "
            "datasets' save_to_disk")
    import datasets  # only for folders: importing it is slow

    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(str(path))
    except Exception as e:  # datasets raises many types for an unreadable folder
        raise MultiLoRAError(f"{path}: could not load it with datasets ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); check the folder's files") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise MultiLoRAError(f"{path}: no split {split!r}; it has {', '.join(data)}")
        data = data[split]
    rows = [(f"{path}[{split}] row {i}", dict(row)) for i, row in enumerate(data)]
    if not rows:
        raise MultiLoRAError(f"{path}[{split}]: no rows, so the task would be empty; add data or drop the task")
    return rows


def _choices(row: dict, field: str, where: str) -> list[str]:
    value = need(row, field, where, (list, str))
    if isinstance(value, str):  # CSV: a JSON list in one cell
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # malformed, too deeply nested, or a too long integer
            value = None
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
        raise MultiLoRAError(f"{where}: field {field!r} must be a list of at least 2 strings "
                             '(in a CSV cell: a JSON list such as ["yes", "no"])')
    for i, choice in enumerate(value):
        _check_text(choice, where, f"{field}[{i}]")
    return value


def load_custom_items(source: str | Path, prompt_field: str, choices_field: str, label_field: str,
                      task_name: str | None = None, split: str = "train",
                      label_type: str | None = None) -> list[MCItem]:
    """Multiple-choice items from the user's data: label = index into the choices, or the choice text.

    `label_type` ("index" or "text") says which; without it each row's label must read one way only
    (a label "0" among choices ["2", "0"] is refused as ambiguous). Booleans are refused.
    """
    task = task_name or Path(source).stem
    items = []
    for where, row in custom_rows(source, split):
        choices = _choices(row, choices_field, where)
        prompt = need(row, prompt_field, where)
        gold = gold_indices([(where, need(row, label_field, where, (object,)), choices)], label_type, label_field)[0]
        items.append(MCItem(task, prompt, choices, gold))
    return items


def load_custom(source: str | Path, prompt_field: str, response_field: str | None = None,
                choices_field: str | None = None, label_field: str | None = None,
                task_name: str | None = None, split: str = "train", label_type: str | None = None) -> list[Example]:
    """Training examples from the user's data: prompt -> response, or prompt -> the gold choice."""
    task = task_name or Path(source).stem
    if response_field is not None:
        return [Example(task, need(row, prompt_field, where), need(row, response_field, where))
                for where, row in custom_rows(source, split)]
    if choices_field is None or label_field is None:
        raise MultiLoRAError(f"custom task {task!r}: give response_field, or choices_field and label_field")
    return [item.example() for item in
            load_custom_items(source, prompt_field, choices_field, label_field, task, split, label_type)]
