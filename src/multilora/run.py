"""A run folder: what `multilora train` writes and every other command (eval, analyze, export, demo, sweep) reads.

    runs/<name>/
      config.yaml                  the resolved config (loads back to the same TrainConfig)
      adapter.safetensors + adapter_config.json     (lora, multilora; checkpoint.write_adapter_folder)
      model.safetensors + config.json + tokenizer   (full: a save_pretrained folder) + full_model.json
      checkpoints/step-N/          accelerate save_state (model.safetensors holds the trainable tensors only,
                                   optimizer, scheduler, RNG) + sampler.json + trainer_state.json (written last,
                                   with the sha256 of every file: a checkpoint without it is incomplete)
      metrics.jsonl                one JSON object per logged step (and per evaluation)
      finished.json                written by train last of all: the run is complete (steps, seconds, time)

    run = Run("runs/multilora")
    run.finished()                 # {"step": 64, "seconds": 301.2, "finished": 1764...} or None
    run.read_config()              # the TrainConfig it was trained with
    run.base_model()               # the base model as the user named it ('smollm2-135m' or a folder)

`Run` owns the folder's paths and formats: the config (read, write, diff), metrics, checkpoints
(save, verify, prune, newest complete), the lock, the final artifacts and the finished record.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, base_model_info, save_adapter, sha256_file
from .config import TrainConfig, flatten, load_config
from .errors import MultiLoRAError
from .inject import adapter_parameters, inject
from .io import (WriteError, failed_write, fsync_dir, fsync_tree, read_json_object, write_error, write_json_atomic,
                 write_text_atomic)

CONFIG_FILE = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FULL_INFO = "full_model.json"
FINISHED = "finished.json"
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: marks it complete
SAMPLER_FILE = "sampler.json"
# what demo and sweep wrote into a finished run before train wrote finished.json itself (still read)
LEGACY_FINISHED = ("demo_run.json", "sweep_run.json")


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    out = []
    for d in root.glob("step-*") if root.is_dir() else []:
        step = d.name.removeprefix("step-")
        if step.isdigit() and (d / STATE_FILE).is_file():
            out.append((int(step), d))
    return sorted(out)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl (a torn last line from a killed run is skipped)."""
    path = Path(run_dir) / METRICS
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


@dataclass(frozen=True)
class Run:
    """One run folder (it need not exist yet)."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    # ------------------------------------------------------------------ config

    def has_config(self) -> bool:
        """Whether train has started this run (its config.yaml exists)."""
        return (self.path / CONFIG_FILE).is_file()

    def read_config(self, overrides: list[str] | None = None) -> TrainConfig:
        """The TrainConfig the run was trained with (+ `--section.key VALUE` overrides), validated."""
        if not self.has_config():
            raise MultiLoRAError(f"{self.path} is not a run folder (no {CONFIG_FILE}); pass the output_dir of an "
                                 "earlier run")
        return load_config(self.path / CONFIG_FILE, overrides)

    def saved_config(self) -> dict[str, Any]:
        """The {dotted key: value} of config.yaml as written (not validated); {} if there is none."""
        path = self.path / CONFIG_FILE
        if not path.is_file():
            return {}
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise MultiLoRAError(f"{path} is not valid YAML ({' '.join(str(e).split())}); fix it, or delete the "
                                 f"run folder {self.path} to train it again") from None
        return flatten(data) if isinstance(data, dict) else {}

    def write_config(self, config: TrainConfig) -> None:
        """Write the resolved config.yaml."""
        write_text_atomic(self.path / CONFIG_FILE, config.to_yaml())

    def saved_values(self) -> dict[str, Any]:
        """config.yaml's {dotted key: value}, a key it lacks (written by an older multilora) counting as its default."""
        return {**flatten(TrainConfig().to_dict()), **self.saved_config()}

    def config_diff(self, config: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
        """The dotted keys whose value in `config` differs from `saved_values()` (output_dir and `ignore` aside)."""
        saved, wanted = self.saved_values(), flatten(config.to_dict())
        return [k for k in wanted if k != "output_dir" and k not in ignore and saved.get(k) != wanted[k]]

    def base_model(self) -> str | None:
        """The base model as the user named it: config.yaml's `model`, else what the saved files record.

        Looked up in order: config.yaml `model` (or `base_model`, also as `{name_or_path: ...}`),
        full_model.json / adapter_config.json `base_model.name_or_path`, a PEFT adapter's
        `base_model_name_or_path`, a save_pretrained folder's config.json `_name_or_path` (never the
        folder itself).
        """
        try:
            saved = self.saved_config()
        except MultiLoRAError:  # an unreadable config only loses this hint; the files below may still name it
            saved = {}
        for key in ("model", "model.name", "model.name_or_path", "model.path", "base_model"):  # flatten splits a mapping
            value = saved.get(key)
            if isinstance(value, dict):
                value = value.get("name_or_path") or value.get("name") or value.get("path")
            if isinstance(value, str) and value:
                return value
        for name in (FULL_INFO, CONFIG_NAME, "config.json"):
            path = self.path / name
            if not path.is_file():
                continue
            try:
                data = read_json_object(path)
            except MultiLoRAError:
                continue
            base = data.get("base_model")
            base = base.get("name_or_path") if isinstance(base, dict) else base
            base = base or data.get("base_model_name_or_path") or data.get("_name_or_path")
            if isinstance(base, str) and base and Path(base).expanduser().resolve() != self.path.resolve():
                return base
        return None

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> list[dict]:
        """The records of metrics.jsonl."""
        return read_metrics(self.path)

    def append_metrics(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl and flush it to disk (one write: a killed run leaves whole lines).

        A failed write (disk full) raises a WriteError naming the run's newest checkpoint.
        """
        path = self.path / METRICS
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            error = self._write_error(e, f"saving {path}")
            if error is None:
                raise
            raise error from e

    def drop_metrics_after(self, step: int) -> None:
        """Remove the records past `step` (the last steps of a killed run, before it resumes from `step`)."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        write_text_atomic(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ checkpoints

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, folder), oldest first."""
        return checkpoint_dirs(self.path)

    def no_checkpoint_error(self) -> MultiLoRAError:
        """The error of a resume from a folder without a complete checkpoint."""
        why = " (it finished without one at its last step: train.save_last false)" if self.finished() else ""
        return MultiLoRAError(f"{self.path} has no complete checkpoint to resume from{why}; start again with --overwrite")

    def newest_checkpoint(self) -> tuple[int, Path]:
        """(step, folder) of the newest complete checkpoint, verified against its recorded checksums."""
        done = self.checkpoints()
        if not done:
            raise self.no_checkpoint_error()
        step, ck = done[-1]
        verify_checkpoint(ck)
        return step, ck

    def save_checkpoint(self, accelerator: Any, step: int, sampler_state: dict, keep_last: int,
                        extra: dict) -> Path:
        """accelerate save_state into checkpoints/.step-N.tmp, add sampler + trainer state, rename; keep the last K.

        A failed save (disk full, folder not writable) removes its temporary folder, leaves every finished
        checkpoint as it was and raises a WriteError naming the checkpoint that is kept. Old checkpoints
        are renamed aside before they are deleted, so a killed run never leaves a half-deleted step-N.
        Every process must call this.
        """
        root = self.path / CHECKPOINTS
        tmp, final = root / f".step-{step}.tmp", root / f"step-{step}"
        aside = root / f".step-{step}.old.tmp"
        moved_aside = False
        try:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_json_atomic(tmp / SAMPLER_FILE, sampler_state)
                files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}  # verified on resume
                write_json_atomic(tmp / STATE_FILE, {"step": step, **extra, "files": files})
                fsync_tree(tmp)  # accelerate does not flush its files: no empty file in a checkpoint after a crash
                if final.exists():  # the same step saved again (Ctrl-C right after a periodic save)
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(final, aside)
                    moved_aside = True
                os.replace(tmp, final)
                fsync_dir(root)
        except Exception as e:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial checkpoint took
                if moved_aside and not final.exists():
                    os.replace(aside, final)
            error = self._write_error(e, f"saving checkpoint step-{step} to {root}", previous="previous ")
            if error is None:  # not a write problem: a bug, keep its traceback
                raise
            raise error from e
        if accelerator.is_main_process:
            self._prune_checkpoints(keep_last)
        accelerator.wait_for_everyone()
        return final

    def _prune_checkpoints(self, keep_last: int) -> None:
        root = self.path / CHECKPOINTS
        for _, old in self.checkpoints()[:-keep_last]:
            doomed = root / f".{old.name}.old.tmp"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)  # gone from checkpoints() at once, then deleted
            shutil.rmtree(doomed, ignore_errors=True)
        for stale in root.glob(".step-*.tmp"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ lifecycle

    def prepare(self, overwrite: bool, is_main: bool) -> None:
        """Refuse an existing non-empty folder unless `overwrite` (then the main process deletes it)."""
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            if not overwrite:
                raise MultiLoRAError(f"run folder {self.path} already exists; pass --overwrite to replace it, "
                                     f"--resume {self.path} to continue it, or set another output_dir")
            if is_main:
                shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()

    def lock(self) -> Any:
        """Hold an exclusive lock for the folder (a file beside it, with our PID); refuse if another process holds it.

        The lock is an flock, so the kernel releases it when its process dies: a stale lock file from a
        killed run never blocks the next one. Release it with `unlock`.
        """
        path = self.path.parent / f".{self.path.name}.lock"
        earlier = _HELD_LOCKS.pop(str(path), None)  # left by an earlier train() of this process that raised
        if earlier is not None:
            earlier.close()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a+")  # noqa: SIM115 -- held until the run ends
        except OSError as e:  # train() checked the folder first: this is a race or an odd file system
            raise write_error(path, e, kept="the run did not start",
                              fix="make the folder writable or set another output_dir") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise MultiLoRAError(f"run folder {self.path} is in use by a training process (pid {owner}, lock {path}); "
                                 "wait for it to finish or choose another output_dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        _HELD_LOCKS[str(path)] = fh
        return fh

    @staticmethod
    def unlock(handle: Any) -> None:
        """Release a lock taken by `lock`."""
        _HELD_LOCKS.pop(handle.name, None)
        handle.close()

    def mark_finished(self, record: dict) -> None:
        """Write finished.json (train calls this after the final artifacts are saved)."""
        write_json_atomic(self.path / FINISHED, {**record, "finished": time.time()})

    def finished(self) -> dict | None:
        """The finished record ({"step", "seconds", "finished": unix time}), or None while the run is not complete."""
        for name in (FINISHED, *LEGACY_FINISHED):
            path = self.path / name
            if path.is_file():
                try:
                    return read_json_object(path)
                except MultiLoRAError:
                    return None
        return None

    # ------------------------------------------------------------------ final artifacts

    def save_final(self, accelerator: Any, model: nn.Module, config: TrainConfig, tokenizer: Any) -> None:
        """adapter.safetensors + adapter_config.json, or (full) a save_pretrained folder + full_model.json.

        The tensors come from `accelerator.get_state_dict`, which gathers the full tensors of an FSDP
        or DeepSpeed model on the main process; every process must call this.
        """
        state = accelerator.get_state_dict(model)  # {unwrapped name: full tensor} on the main process
        if not accelerator.is_main_process:
            return
        unwrapped = accelerator.unwrap_model(model)
        try:
            if config.method != "full":
                save_adapter_from_state(config, unwrapped.config, state, self.path)
                return
            tmp = self.path / ".full.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            for f in sorted(tmp.iterdir()):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(f, self.path / f.name)
            shutil.rmtree(tmp, ignore_errors=True)
            weights = sorted(p.name for p in self.path.glob("model*.safetensors"))
            write_json_atomic(self.path / FULL_INFO, {
                "format": "multilora-full", "method": "full", "weights": weights,
                "weights_sha256": {w: sha256_file(self.path / w) for w in weights},
                "base_model": {**base_model_info(unwrapped), "name_or_path": config.model},
                "load_with": "multilora.models.load_model(run_dir) or AutoModelForCausalLM.from_pretrained(run_dir)",
            })
        except Exception as e:  # a full disk or an unwritable folder: one line naming what is kept
            shutil.rmtree(self.path / ".full.tmp", ignore_errors=True)
            what = "model" if config.method == "full" else "adapter"
            error = self._write_error(e, f"saving the {what} of the finished run to {self.path}")
            if error is None:
                raise
            raise error from e

    def has_weights(self) -> bool:
        """Whether the folder holds a final adapter or model."""
        return (self.path / WEIGHTS_NAME).is_file() or (self.path / FULL_INFO).is_file()

    # ------------------------------------------------------------------ errors

    def _write_error(self, exc: BaseException, doing: str, previous: str = "") -> WriteError | None:
        """io.failed_write for a write in this folder (the newest checkpoint is kept, --resume the way on);
        None when `exc` is not a write problem (a bug keeps its traceback)."""
        done = self.checkpoints()
        kept, then = ((f"the {previous}checkpoint {done[-1][1]} is kept", f" and --resume {self.path}") if done else
                      ("no checkpoint was saved yet", " and start the run again with --overwrite"))
        return failed_write(exc, doing, self.path if self.path.is_dir() else self.path.parent, kept, then)


_HELD_LOCKS: dict[str, Any] = {}


def verify_checkpoint(ck: Path) -> None:
    """Every file the checkpoint recorded in trainer_state.json is there with its sha256 (else: name it)."""
    fix = f"delete {ck} to resume from the checkpoint before it"
    files = read_json_object(ck / STATE_FILE, fix=fix).get("files")
    if not isinstance(files, dict):  # written by an older multilora: check that the files exist
        files = {name: None for name in ("model.safetensors", SAMPLER_FILE)}
    for name, digest in files.items():
        path = ck / name
        if not path.is_file():
            raise MultiLoRAError(f"checkpoint {ck} is damaged: {name} is missing; {fix}")
        if digest is not None and sha256_file(path) != digest:
            raise MultiLoRAError(f"checkpoint {ck} is damaged: {name} does not match the checksum in {STATE_FILE} "
                                 f"(truncated or corrupt); {fix}")


def trainable_state(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Copy a checkpoint's model.safetensors into the model's trainable parameters, checking every key."""
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise MultiLoRAError(f"checkpoint {checkpoint} has no model.safetensors; it is incomplete or not ours")
    tensors = load_file(str(path))
    params = trainable_state(model)
    missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or extra:
        raise MultiLoRAError(
            f"checkpoint {checkpoint} does not fit this run's trainable parameters: "
            + (f"missing {missing[0]!r} ({len(missing)} missing) " if missing else "")
            + (f"unexpected {extra[0]!r} ({len(extra)} unexpected)" if extra else "")
            + "; resume with the same model and method")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])


def register_state_hooks(accelerator: Any, model: nn.Module) -> None:
    """Make accelerate's checkpoints hold only the trainable tensors (by unwrapped name), checked key by key on load."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i in range(len(weights)):
            weights[i] = {k: p.detach() for k, p in trainable_state(model).items()}

    def load_hook(models: list, input_dir: str) -> None:
        models.clear()  # loaded here, by name, with a check
        load_trainable(model, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_adapter_from_state(config: TrainConfig, model_config: Any, state: dict[str, torch.Tensor],
                            out_dir: str | os.PathLike) -> Path:
    """Write adapter.safetensors + adapter_config.json from a full state dict (as gathered from FSDP/DeepSpeed).

    The adapter is injected into a weightless (meta-device) copy of the model built from
    `model_config`, its tensors are taken from `state`, and `checkpoint.save_adapter` writes it.
    """
    with torch.device("meta"):
        shadow = AutoModelForCausalLM.from_config(copy.deepcopy(model_config))
    inject(shadow, config.adapter)
    keys = list(adapter_parameters(shadow))
    missing = [k for k in keys if k not in state]
    if missing:
        raise MultiLoRAError(f"the trained model's state has no {missing[0]!r} ({len(missing)} adapter tensors "
                             "missing); cannot save the adapter")
    shadow.load_state_dict({k: state[k].detach().to("cpu") for k in keys}, strict=False, assign=True)
    return save_adapter(shadow, out_dir)


__all__ = ["Run", "checkpoint_dirs", "read_metrics", "verify_checkpoint", "register_state_hooks", "save_adapter_from_state"]
