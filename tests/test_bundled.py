"""The public data shipped inside the package: complete, equal to its source, readable gzipped, and in the wheel."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from multilora.data import BUNDLED, data_file, data_root
from multilora.errors import MultiLoRAError
from multilora.tasks import TASKS, load_examples, load_items
from multilora.tasks.custom import read_rows

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # where the bundled copy was taken from (present in CI and development)
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (the source copy) is not here")


def digest_every_task(root: Path | None = None) -> dict[str, list]:
    """Per task: [rows of its train split, rows of its eval split, sha256 of every prompt and response]."""
    out = {}
    for name, info in TASKS.items():
        train = load_examples(name, info.train_split, root=root)
        held = (load_items(name, info.eval_split, root=root) if info.items is not None
                else load_examples(name, info.eval_split, root=root))
        h = hashlib.sha256()
        for row in train + held:
            h.update(json.dumps([row.prompt, getattr(row, "response", None), getattr(row, "choices", None),
                                 getattr(row, "gold", None)]).encode())
        out[name] = [len(train), len(held), h.hexdigest()]
    return out


# the same function, run in a fresh interpreter that imports multilora from the built wheel
CHILD = """
import json, os, sys
import multilora
from multilora.data import data_root
sys.path.insert(0, {tests!r})
from test_bundled import digest_every_task
print(json.dumps({{"file": multilora.__file__, "root": str(data_root()), "env": os.environ.get("MULTILORA_DATA"),
                  "tasks": digest_every_task()}}))
"""


def test_default_root_is_the_package_copy(monkeypatch):
    monkeypatch.delenv("MULTILORA_DATA", raising=False)
    assert data_root() == BUNDLED == REPO / "src" / "multilora" / "bundled"
    readme = (BUNDLED / "README.md").read_text()
    assert "CC BY-NC 4.0" in readme and "alpaca/DATA_LICENSE" in readme and "mmlu/LICENSE" in readme
    assert (BUNDLED / "alpaca" / "DATA_LICENSE").read_text().startswith("Attribution-NonCommercial 4.0")
    assert (BUNDLED / "mmlu" / "LICENSE").read_text().startswith("MIT License")
    assert data_file("superglue/RTE/train.jsonl") == BUNDLED / "superglue" / "RTE" / "train.jsonl.gz"


@needs_shared
def test_bundled_files_are_the_source_files_byte_for_byte():
    source = sorted(p.relative_to(SHARED) for p in SHARED.rglob("*") if p.is_file() and p.name != "README.md")
    bundled = sorted(p.relative_to(BUNDLED) for p in BUNDLED.rglob("*") if p.is_file() and p.name != "README.md")
    assert [str(p).removesuffix(".gz") for p in bundled] == [str(p) for p in source]
    assert len(source) == 187  # 171 MMLU CSVs, 13 SuperGLUE files, Alpaca's JSON, 2 license files
    for rel in source:
        packed = BUNDLED / rel
        data = gzip.decompress(packed.with_name(packed.name + ".gz").read_bytes()) if rel.suffix in (
            ".csv", ".json", ".jsonl") else packed.read_bytes()
        assert data == (SHARED / rel).read_bytes(), rel


@needs_shared
def test_tasks_read_the_same_rows_from_the_bundled_and_the_plain_copy(monkeypatch):
    monkeypatch.delenv("MULTILORA_DATA", raising=False)
    rte = load_examples("rte")
    assert len(rte) == 2490 and rte == load_examples("rte", root=SHARED)
    assert load_items("mmlu_anatomy", k=2) == load_items("mmlu_anatomy", root=SHARED, k=2)
    monkeypatch.setenv("MULTILORA_DATA", str(SHARED))  # the override still reads plain files
    assert data_file("alpaca/alpaca_5000.json") == SHARED / "alpaca" / "alpaca_5000.json"


def test_gzipped_rows_name_the_file_and_uncompressed_line(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"premise": "a"}\n\n{"premise": \n'))
    with pytest.raises(MultiLoRAError, match=re.escape(f"{path}:3: malformed JSON (")):
        read_rows(path)
    path.write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n'))
    assert read_rows(path) == [(f"{path}:1", {"a": 1}), (f"{path}:2", {"a": 2})]
    csv = tmp_path / "rows.csv.gz"
    csv.write_bytes(gzip.compress("q,a\nwhy,é\n".encode()))
    assert read_rows(csv) == [(f"{csv}:2", {"q": "why", "a": "é"})]
    broken = tmp_path / "cut.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"a": 1}\n' * 100)[:-20])  # truncated download
    with pytest.raises(MultiLoRAError, match=re.escape(f"{broken}: not a readable gzip file (")):
        read_rows(broken)
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text('{"a": 1}\n')  # named .gz but never compressed
    with pytest.raises(MultiLoRAError, match=re.escape(f"{plain}: not a readable gzip file (")):
        read_rows(plain)
    other = tmp_path / "notes.txt.gz"
    other.write_bytes(gzip.compress(b"text"))
    with pytest.raises(MultiLoRAError, match=r"unsupported file type '\.txt'; use .*gzipped"):
        read_rows(other)


def test_missing_data_file_names_the_plain_path(tmp_path):
    with pytest.raises(MultiLoRAError, match=re.escape(f"{tmp_path / 'superglue/RTE/train.jsonl'}: data file not "
                                                       "found (nor train.jsonl.gz)")):
        load_examples("rte", root=tmp_path)


@pytest.mark.slow
def test_wheel_ships_the_data_and_every_task_loads_from_it(tmp_path):
    """Build the wheel from a lone copy of the repository (no ../shared beside it), unpack it as pip would, and
    load every task's train and eval split in a fresh interpreter (MULTILORA_DATA unset, another directory)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(repo)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("multilora-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)  # a pure-Python wheel installs as this tree
    shipped = sorted(n.removeprefix("multilora/bundled/") for n in names if n.startswith("multilora/bundled/"))
    expected = sorted(str(p.relative_to(BUNDLED)) for p in BUNDLED.rglob("*") if p.is_file())
    assert shipped == expected and "README.md" in shipped and "alpaca/DATA_LICENSE" in shipped

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MULTILORA_DATA"}
    env["PYTHONPATH"] = str(site)  # ahead of the editable install's src/ on sys.path
    child = subprocess.run([sys.executable, "-c", CHILD.format(tests=str(Path(__file__).parent))], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    got = json.loads(child.stdout)
    assert Path(got["file"]).parent == site / "multilora" and got["env"] is None
    assert got["root"] == str(site / "multilora" / "bundled")
    tasks = got["tasks"]
    assert set(tasks) == set(TASKS) and len(tasks) == 9 + 57
    assert all(train > 0 and held > 0 for train, held, _ in tasks.values())
    assert tasks["rte"][:2] == [2490, 277] and tasks["alpaca"][:2] == [4487, 513]
    assert tasks["boolq"][:2] == [2602, 668] and tasks["wic"][:2] == [5428, 638]
    if SHARED.is_dir():  # the same rows, prompt for prompt, as the plain source copy gives
        assert tasks == digest_every_task(SHARED)
