"""Faults during writes (issue 10): SIGKILL mid-save, a full disk, an output folder that is not writable.

Writers: the adapter folder (`save_adapter`), a training checkpoint (`Run.save_checkpoint`), the study
report (`write_report`), JSON/text files (`write_json_atomic` / `write_text_atomic`, which eval,
analyze, demo and train use) and the model cache (`models._cached_folder`, the writer behind
`tiny_model_path` and the embedded model's GGUF conversion, tried with the tiny model).

1. Kill loop: a child process rewrites the target over and over, alternating two known versions; the
   parent SIGKILLs it after a random (seeded) delay and checks that the target is exactly one
   complete version. A temporary file may be left, if readers ignore it and the next save removes it.
2. Crash at every step: the child is killed right after its k-th rename/unlink/rmdir, for k = 1, 2,
   ... until a save completes: every state between two file-system steps of a save is checked.
3. Disk full: OSError(ENOSPC) raised in the write path keeps the previous file / checkpoint and says so.
4. An output folder that cannot be written is refused before the model is loaded.

MULTILORA_KILL_TRIALS=N runs the long kill loop (`-m slow`) with N trials per writer; by default
only the short loop runs (KILL_TRIALS per writer, about a minute for the whole file).

The children are never forked from the pytest process: it runs torch with a thread pool, and a
fork copies only the calling thread, so a lock another thread held stays locked forever in the
child (the suite once hung ten minutes in a futex wait). They fork from multiprocessing's
"forkserver" instead: a server process started fresh (as "spawn" starts one) that only imports the
modules below and runs no torch operation, so it has one thread (each child checks that); a child
starts in ~0.1 s where a spawned one spends ~5 s importing torch. Each child builds its own writer
(same seeds, so the same two versions) and says when it is ready; the kill delay starts then.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny, randomize_adapters
from safetensors.torch import load_file

import multilora as ml
from multilora import checkpoint as ckpt
from multilora import models
from multilora.cli import main as cli_main
from multilora.errors import MultiLoRAError
from multilora.io import write_json_atomic, write_text_atomic
from multilora.run import CHECKPOINTS, SAMPLER_FILE, STATE_FILE, Run, checkpoint_dirs, read_metrics, register_state_hooks

CHILDREN = multiprocessing.get_context("forkserver")
CHILDREN.set_forkserver_preload(["torch", "transformers", "accelerate", "safetensors.torch", "matplotlib.figure",
                                 "pytest", "multilora.checkpoint", "multilora.cli", "multilora.data",
                                 "multilora.models", "multilora.report", "multilora.run"])
CHILD_START_S = 180  # the first child waits for the server to import torch & co. (slow on a busy machine)
KILL_TRIALS = 12  # per writer in the default run
LONG_TRIALS = int(os.environ.get("MULTILORA_KILL_TRIALS", "0") or 0)


# ----------------------------------------------------------------------------- the writers


class Writer:
    """One writer under test: `setup` makes the first complete version, `write(k)` (in the child)
    writes version k, `check` returns a description of what is broken (None: one complete version),
    `finish` saves once more in the parent and returns a problem if a temporary file survives it."""

    name = ""
    crash_ks: tuple[int, ...] = (1,)  # the saves the crash test interrupts at every step
    recipe: tuple[str, Path, Path] = ("", Path(), Path())  # `_writer`'s arguments, set by `_writer`

    def setup(self, d: Path) -> None: ...
    def write(self, d: Path, trial: int, k: int) -> None: ...
    def check(self, d: Path) -> str | None: ...
    def finish(self, d: Path) -> str | None: ...


def _temps(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name
                  or p.name.endswith(".next"))


class AdapterWriter(Writer):
    name = "adapter (save_adapter)"

    def __init__(self) -> None:
        self.model = make_tiny("llama")
        ml.inject(self.model, ml.MultiLoRAConfig(n=3, r=8, targets="all-linear"))
        self.versions = []
        for seed in (1, 2):
            randomize_adapters(self.model, seed=seed)
            self.versions.append({k: v.detach().clone() for k, v in ml.adapter_parameters(self.model).items()})

    def _set(self, v: int) -> None:
        with torch.no_grad():
            for k, p in ml.adapter_parameters(self.model).items():
                p.copy_(self.versions[v][k])

    def setup(self, d: Path) -> None:
        self._set(0)
        ml.save_adapter(self.model, d / "ad")

    def write(self, d: Path, trial: int, k: int) -> None:
        self._set(k % 2)
        ml.save_adapter(self.model, d / "ad")

    def check(self, d: Path) -> str | None:
        try:
            _, tensors = ckpt.read_adapter(d / "ad")
        except MultiLoRAError as e:
            return str(e)
        if not any(tensors.keys() == v.keys() and all(torch.equal(tensors[k], v[k]) for k in v) for v in self.versions):
            return "adapter tensors match neither version"
        return None

    def finish(self, d: Path) -> str | None:
        self.write(d, 0, 0)
        left = _temps(d / "ad")
        return f"temporary files left after the next save: {left}" if left else self.check(d)


class JsonTextWriter(Writer):
    name = "JSON + text (write_*_atomic)"

    def __init__(self) -> None:
        rows = [{"i": i, "text": "x" * 40} for i in range(20000)]  # ~1.4 MB: a write takes a while
        self.json = [{"version": v, "rows": rows} for v in (0, 1)]
        self.text = [f"version {v}\n" + "y" * 1_500_000 + "\n" for v in (0, 1)]
        self.json_text = [json.dumps(o, indent=2) + "\n" for o in self.json]

    def setup(self, d: Path) -> None:
        write_json_atomic(d / "out.json", self.json[0])
        write_text_atomic(d / "out.txt", self.text[0])

    def write(self, d: Path, trial: int, k: int) -> None:
        write_json_atomic(d / "out.json", self.json[k % 2])
        write_text_atomic(d / "out.txt", self.text[k % 2])

    def check(self, d: Path) -> str | None:
        if (d / "out.json").read_text() not in self.json_text:
            return "out.json is neither version"
        if (d / "out.txt").read_text() not in self.text:
            return "out.txt is neither version"
        return None

    def finish(self, d: Path) -> str | None:
        self.write(d, 0, 0)
        left = _temps(d)
        return f"temporary files left after the next save: {left}" if left else self.check(d)


def _study(model: str) -> dict[str, Any]:
    def result(acc: float) -> dict:
        return {"tasks": {"rte": {"kind": "choice", "acc": acc, "chance": 0.5, "n": 40},
                          "alpaca": {"kind": "perplexity", "perplexity": 9.0, "chance": 128, "n": 4}}}

    def run(name: str, eff: float, top1: float) -> dict:
        return {"name": name, "overall": {"effective_rank": eff, "energy_top1": top1, "energy_top8": 0.9,
                                          "stable_rank": 2.0, "rank_bound": 24}}

    methods = {m: {"trainable": 1000, "share": 0.01, "seconds": [3.0], "lr": 1e-3,
                   "train_loss": [[2.0 - 0.1 * i for i in range(8)]]} for m in ("lora", "multilora")}
    return {"model": model, "tasks": ["rte", "alpaca"], "eval_tasks": ["rte", "alpaca"], "seeds": [0], "steps": 8,
            "batch_size": 4, "max_len": 64, "mixture": "proportional", "eval_limit": 40, "mmlu_per_subject": 1,
            "data_sizes": {"rte": {"train": 100, "eval": 40}}, "methods": methods,
            "timings": {"train": 1.0, "eval": 1.0, "analyze": 1.0, "total": 3.0},
            "evals": {"base": [result(0.5)], "lora": [result(0.6)], "multilora": [result(0.7)]},
            "analysis": {"top_k": [1, 8], "runs": [run("lora", 8.0, 0.7), run("multilora", 20.0, 0.2)]}}


class ReportWriter(Writer):
    name = "report (write_report)"

    def __init__(self, tmp: Path) -> None:
        from multilora.report import write_report

        self.write_report = write_report
        self.studies = [_study("model-A"), _study("model-B")]
        self.tmp = tmp
        self.md, self.png = [], []

    def setup(self, d: Path) -> None:  # in the parent only: the children need no known versions
        for v, study in enumerate(self.studies[len(self.md):], start=len(self.md)):  # the two versions, byte for byte
            out = self.tmp / f"known-{v}"
            self.write_report(study, out)
            self.md.append((out / "report.md").read_bytes())
            self.png.append((out / "loss_curves.png").read_bytes())
        self.write_report(self.studies[0], d)

    def write(self, d: Path, trial: int, k: int) -> None:
        self.write_report(self.studies[k % 2], d)

    def check(self, d: Path) -> str | None:
        if (d / "report.md").read_bytes() not in self.md:
            return "report.md is neither version"
        if (d / "loss_curves.png").read_bytes() not in self.png:
            return "loss_curves.png is neither version"
        return None

    def finish(self, d: Path) -> str | None:
        self.write(d, 0, 0)
        left = _temps(d)
        return f"temporary files left after the next save: {left}" if left else self.check(d)


class CheckpointWriter(Writer):
    """`Run.save_checkpoint` on a real accelerator (keep_last 2): version k saves step N = k // 2 with every
    trainable tensor filled with N (k even) or N + 0.5 (k odd: the same step saved again, as Ctrl-C
    right after a periodic save does)."""

    name = "training checkpoint (Run.save_checkpoint)"
    crash_ks = (1, 2)  # the same step saved again; a new step that deletes the oldest checkpoint

    def __init__(self) -> None:
        from accelerate import Accelerator

        from multilora.data import MixtureSampler

        self.acc = Accelerator(cpu=True)
        model = make_tiny("llama")
        ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets=["q_proj", "v_proj"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        self.model, self.opt = self.acc.prepare(model, opt)
        self.unwrapped = self.acc.unwrap_model(self.model)
        register_state_hooks(self.acc, self.unwrapped)
        sum(p.sum() for p in self.model.parameters() if p.requires_grad).backward()
        self.opt.step()  # optimizer state to save
        self.sampler = MixtureSampler({"a": 5, "b": 7}, seed=3)
        self.start = 0

    def _save(self, d: Path, step: int, value: float) -> None:
        with torch.no_grad():
            for p in self.unwrapped.parameters():
                if p.requires_grad:
                    p.fill_(value)
        Run(d / "run").save_checkpoint(self.acc, step, self.sampler.state_dict(), 2,
                                       {"total_steps": 10**6, "value": value})

    def setup(self, d: Path) -> None:
        self._save(d, 1, 1.0)

    def write(self, d: Path, trial: int, k: int) -> None:
        if k == 0:  # continue after the newest step (as a resumed run does)
            done = checkpoint_dirs(d / "run")
            self.start = (done[-1][0] if done else 0) + 1
        step = self.start + k // 2
        self._save(d, step, step + 0.5 * (k % 2))

    def check(self, d: Path) -> str | None:
        done = checkpoint_dirs(d / "run")
        if not done:
            return "no complete checkpoint left"
        for step, folder in done:  # every checkpoint resume could pick, not only the newest
            try:
                state = json.loads((folder / STATE_FILE).read_text())
                json.loads((folder / SAMPLER_FILE).read_text())
                tensors = load_file(str(folder / "model.safetensors"))
                torch.load(folder / "optimizer.bin", weights_only=False)
            except Exception as e:  # noqa: BLE001 -- anything unreadable is a partial checkpoint
                return f"{folder.name}: {type(e).__name__}: {e}"
            names = {n for n, p in self.unwrapped.named_parameters() if p.requires_grad}
            values = {float(t.flatten()[0]) for t in tensors.values()}
            if tensors.keys() != names or state["step"] != step or len(values) != 1 \
                    or values.pop() not in (step, step + 0.5) or any(not torch.all(t == t.flatten()[0]) for t in tensors.values()):
                return f"{folder.name} holds tensors or state of another save"
        try:
            self.acc.load_state(str(done[-1][1]))  # what --resume does, with the key check of the load hook
        except Exception as e:  # noqa: BLE001
            return f"{done[-1][1].name} does not load: {e}"
        return None

    def finish(self, d: Path) -> str | None:
        done = checkpoint_dirs(d / "run")
        self._save(d, (done[-1][0] if done else 0) + 1, (done[-1][0] if done else 0) + 1)
        left = _temps(d / "run")
        return f"temporary folders left after the next save: {left}" if left else self.check(d)


class CacheWriter(Writer):
    """`models._cached_folder` building the tiny-model cache (as `tiny_model_path` does), version = seed;
    each write goes to a new cache root (a complete cache is never rebuilt)."""

    name = "model cache (_cached_folder)"

    def __init__(self, tiny_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
        self.models = [make_tiny("llama", seed=s) for s in (0, 1)]
        self.weights = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.models]

    def _build(self, v: int) -> Callable[[Path], None]:
        def build(folder: Path) -> None:
            self.models[v].save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
        return build

    def _root(self, d: Path, trial: int, k: int) -> Path:
        return d / f"t{trial}" / f"c{k}"

    def _make(self, root: Path, v: int) -> Path:
        old = os.environ.get("MULTILORA_CACHE")
        os.environ["MULTILORA_CACHE"] = str(root)
        try:
            return models._cached_folder(models.TINY_MODEL, models._TINY_FILES, self._build(v))
        finally:
            if old is None:
                os.environ.pop("MULTILORA_CACHE", None)
            else:
                os.environ["MULTILORA_CACHE"] = old

    def setup(self, d: Path) -> None:
        (d / "t-1").mkdir()

    def write(self, d: Path, trial: int, k: int) -> None:
        self._make(self._root(d, trial, k), k % 2)

    def check(self, d: Path) -> str | None:
        for root in sorted(d.glob("t*/c*")):
            final = root / models.TINY_MODEL
            if not final.exists():
                continue  # not built yet: the next use builds it
            if not models._is_complete(final, models._TINY_FILES):
                return f"{final} exists but is incomplete"
            try:
                json.loads((final / "config.json").read_text())
                json.loads((final / "tokenizer.json").read_text())
                tensors = load_file(str(final / "model.safetensors"))
            except Exception as e:  # noqa: BLE001
                return f"{final}: {type(e).__name__}: {e}"
            v = int(root.name[1:]) % 2
            if any(not torch.equal(t, self.weights[v][k]) for k, t in tensors.items()):
                return f"{final} holds weights of neither version"
        return None

    def finish(self, d: Path) -> str | None:
        roots = sorted(d.glob("t*/c*"), key=lambda p: int(p.name[1:]))
        if not roots:
            return None
        root = roots[-1]  # the one the kill interrupted
        final = self._make(root, int(root.name[1:]) % 2)
        model, _ = models.load_model(final)  # loads like any local model folder
        left = [str(p) for p in root.iterdir() if p.name.endswith(".tmp")]
        if left:
            return f"temporary folders left after the next build: {left}"
        if not torch.equal(model.state_dict()["model.embed_tokens.weight"],
                           self.weights[int(root.name[1:]) % 2]["model.embed_tokens.weight"]):
            return "the rebuilt cache holds the wrong weights"
        return None


# ----------------------------------------------------------------------------- the child and the loops


def _child(recipe: tuple[str, Path, Path], d: Path, trial: int, counter: Any, server_threads: Any, ready: Any,
           err: Path, kill_after: int | None, save: int) -> None:
    """Build the writer `_writer(*recipe)`, say so on the pipe `ready`, then rewrite the target forever (killed by the
    parent), or once with a SIGKILL after `kill_after` steps."""
    server = os.getppid()  # the fork server
    tasks = Path(f"/proc/{server}/task")
    server_threads.value = len(os.listdir(tasks)) if tasks.is_dir() else 1
    torch.set_num_threads(1)
    try:
        writer = _writer(*recipe)
        if kill_after is not None:
            _die_after(kill_after)
            ready.send_bytes(b"ready")
            writer.write(d, trial, save)
            return
        _slow_disk()
        ready.send_bytes(b"ready")
        k = 0
        while os.getppid() == server:  # the server exits with pytest: then so does an orphaned child
            writer.write(d, trial, k)
            counter.value += 1
            k += 1
    except BaseException:  # noqa: BLE001 -- the parent reports it
        err.write_text(traceback.format_exc())
        os._exit(1)


def _slow_disk(chunk: int = 1 << 16, pause: float = 0.0005) -> None:
    """Make this process's Path.write_text / write_bytes go out in 64 KiB pieces with a pause between
    them, like a slow disk: a file being written stays partial for longer, so kills land mid-file.
    Which file is written, and when it is renamed, stays the writer's own."""
    import pathlib

    def write_bytes(self, data):
        view = memoryview(data).cast("B")
        with open(self, "wb") as f:
            for i in range(0, len(view), chunk):
                f.write(view[i:i + chunk])
                f.flush()
                time.sleep(pause)
        return len(view)

    def write_text(self, data, encoding=None, errors=None, newline=None):
        return write_bytes(self, data.encode(encoding or "utf-8", errors or "strict"))

    pathlib.Path.write_bytes = write_bytes
    pathlib.Path.write_text = write_text


def _die_after(n: int) -> None:
    """Make this process SIGKILL itself right after its n-th rename, unlink or rmdir."""
    seen = {"n": 0}

    def wrap(fn: Callable) -> Callable:
        def op(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen["n"] += 1
            if seen["n"] >= n:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return op

    for name in ("replace", "rename", "unlink", "remove", "rmdir"):
        setattr(os, name, wrap(getattr(os, name)))


def _run_child(writer: Writer, d: Path, trial: int, delay: float | None, kill_after: int | None,
               err: Path, save: int = 1) -> tuple[int, int]:
    """(exit code, completed writes) of one child; `delay` counts from the moment it is ready to write."""
    counter, threads = CHILDREN.Value("i", 0, lock=False), CHILDREN.Value("i", 0, lock=False)
    ready_r, ready_w = CHILDREN.Pipe(duplex=False)  # a pipe, not an Event: no semaphore left by a killed child
    p = CHILDREN.Process(target=_child, daemon=True,
                         args=(writer.recipe, d, trial, counter, threads, ready_w, err, kill_after, save))
    p.start()
    ready_w.close()
    ready = _ready(ready_r, CHILD_START_S)
    if not ready and p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        pytest.fail(f"{writer.name}: the child was not ready to write after {CHILD_START_S} s")
    assert threads.value == 1, f"the fork server runs {threads.value} threads: forking it may deadlock a child"
    if delay is not None and ready:
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
    p.join(60)
    if p.exitcode is None:
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        pytest.fail(f"{writer.name}: the child hung")
    if p.exitcode not in (0, -signal.SIGKILL):
        pytest.fail(f"{writer.name}: the child failed (exit {p.exitcode}):\n"
                    + (err.read_text() if err.is_file() else ""))
    return p.exitcode, counter.value


def _ready(conn: Any, timeout: float) -> bool:
    """Whether the child said it is ready within `timeout` seconds (False if it died first)."""
    try:
        return conn.poll(timeout) and conn.recv_bytes() == b"ready"
    except EOFError:  # the child exited without a word: its exit code and error file tell why
        return False
    finally:
        conn.close()


def _writer(name: str, tmp_path: Path, tiny_dir: Path) -> Writer:
    """The writer `name`; `writer.recipe` builds the same one in a child process."""
    writer = {"adapter": lambda: AdapterWriter(), "json": lambda: JsonTextWriter(),
              "report": lambda: ReportWriter(tmp_path), "checkpoint": lambda: CheckpointWriter(),
              "cache": lambda: CacheWriter(tiny_dir)}[name]()
    writer.recipe = (name, tmp_path, tiny_dir)
    return writer


def kill_loop(writer: Writer, d: Path, trials: int, seed: int) -> tuple[int, int, list[str], int]:
    """SIGKILL the rewriting child `trials` times at random moments (stopping at the first broken target);
    (trials run, partial states seen, what they were, completed writes)."""
    rng = random.Random(seed)
    d.mkdir()
    writer.setup(d)
    writer.write(d, -1, 0)
    t0 = time.perf_counter()
    writer.write(d, -1, 1)  # one save, timed in the parent: the delays cover a few saves
    one = time.perf_counter() - t0
    partial, problems, completed, run = 0, [], 0, 0
    for trial in range(trials):
        run += 1
        delay = rng.uniform(0.0, min(1.5, 4 * one + 0.05))
        code, n = _run_child(writer, d, trial, delay, None, d.parent / "child-error.txt")
        assert code == -signal.SIGKILL, f"{writer.name}: trial {trial}: the child was not killed (exit {code})"
        completed += n
        problem = writer.check(d)
        if problem is None and trial == trials - 1:
            problem = writer.finish(d)
        if problem is not None:
            partial += 1
            problems.append(f"trial {trial} (killed after {delay * 1000:.0f} ms): {problem}")
            break  # the target is broken now; later trials would only repeat it
    return run, partial, problems, completed


WRITERS = ["adapter", "checkpoint", "report", "json", "cache"]
WRITER_PARAMS = list(WRITERS)


@pytest.mark.parametrize("name", WRITER_PARAMS)
def test_kill_during_write_leaves_old_or_new_version(name, tmp_path, tiny_dir, tally):
    writer = _writer(name, tmp_path, tiny_dir)
    run, partial, problems, completed = kill_loop(writer, tmp_path / "target", KILL_TRIALS, seed=WRITERS.index(name))
    tally("kill during write", writer.name, cases=run, failures=partial)
    assert partial == 0, problems
    assert completed > 0, "no child ever finished a save: the kills landed before any write"


@pytest.mark.slow
@pytest.mark.skipif(not LONG_TRIALS, reason="set MULTILORA_KILL_TRIALS=N for the long kill loop (N trials per writer)")
@pytest.mark.timeout(max(600, 10 * LONG_TRIALS))  # a trial takes up to ~2 s on a busy machine
@pytest.mark.parametrize("name", WRITER_PARAMS)
def test_kill_during_write_long(name, tmp_path, tiny_dir, tally):
    writer = _writer(name, tmp_path, tiny_dir)
    run, partial, problems, _ = kill_loop(writer, tmp_path / "target", LONG_TRIALS, seed=1000 + WRITERS.index(name))
    tally("kill during write (long)", writer.name, cases=run, failures=partial)
    assert partial == 0, problems


@pytest.mark.parametrize("name", ["adapter", "checkpoint", "report", "json", "cache"])
def test_crash_after_every_step_of_a_save(name, tmp_path, tiny_dir, tally):
    """Kill the child right after its k-th rename/unlink/rmdir, k = 1, 2, ..., each time from the same
    starting state: every state between two file-system steps of a save is checked."""
    writer = _writer(name, tmp_path, tiny_dir)
    d, pristine = tmp_path / "target", tmp_path / "pristine"
    pristine.mkdir()
    writer.setup(pristine)
    writer.write(pristine, -1, 0)  # a complete save first (the checkpoint: two steps kept)
    problems, points = [], 0
    for kk in writer.crash_ks:
        for k in range(1, 400):
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(pristine, d, symlinks=True)
            code, _ = _run_child(writer, d, k, None, k, tmp_path / "child-error.txt", save=kk)
            if code == 0:  # the save finished before its k-th step: every step was tried
                break
            points += 1
            problem = writer.check(d)
            if problem is None:
                problem = writer.finish(d)  # and the next save cleans up after the crash
            if problem is not None:
                problems.append(f"save {kk} killed after step {k}: {problem}")
                break
        else:
            pytest.fail("the save never completed")
        if problems:
            break
    tally("crash between write steps", writer.name, cases=points, failures=len(problems))
    assert not problems, problems
    assert points >= len(writer.crash_ks), "no save was interrupted: the test misses them"


# ----------------------------------------------------------------------------- disk full


def _tiny_train_args(tiny_dir: Path, out: Path, steps: int = 4) -> list[str]:
    args = {"model": str(tiny_dir), "method": "multilora", "output_dir": str(out), "data.tasks": "[rte, wic]",
            "data.max_len": 64, "data.eval_examples": 0, "adapter.targets": "[q_proj, v_proj]", "adapter.n": 2,
            "adapter.r": 4, "optim.lr": 1e-2, "train.max_steps": steps, "train.batch_size": 2, "train.save_every": 2,
            "train.eval_every": 0, "train.keep_last": 2, "train.cpu": "true"}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def _train_cli(tiny_dir: Path, out: Path, tmp: Path, steps: int = 4) -> list[str]:
    """`multilora train CONFIG --key value ...` of the tiny run (the CLI needs a config file)."""
    config = tmp / "tiny.yaml"
    config.write_text("method: multilora\n")
    return ["train", str(config), *_tiny_train_args(tiny_dir, out, steps), "--no-progress"]


def _enospc(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_second_checkpoint_keeps_the_first_and_resume_works(tiny_dir, tmp_path, monkeypatch,
                                                                               capsys, tally):
    from accelerate import Accelerator

    run = tmp_path / "run"
    real = Accelerator.save_state
    calls = {"n": 0}

    def save_state(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # step-4: write part of it, then the disk is full
            real(self, output_dir, **kwargs)
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)  # a torn file
            _enospc()
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    code = cli_main(_train_cli(tiny_dir, run, tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    msg = err[0]
    ck2 = run / CHECKPOINTS / "step-2"
    assert "no space left on device while saving checkpoint step-4" in msg, msg
    assert f"the previous checkpoint {ck2} is kept" in msg and f"--resume {run}" in msg, msg
    assert sorted(os.listdir(run / CHECKPOINTS)) == ["step-2"]  # no half-written step-4, no temp folder
    assert [s for s, _ in checkpoint_dirs(run)] == [2]
    assert not (run / ckpt.WEIGHTS_NAME).exists()
    monkeypatch.setattr(Accelerator, "save_state", real)
    assert cli_main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert [s for s, _ in checkpoint_dirs(run)] == [2, 4]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    ml.load_adapter(make_tiny_from(tiny_dir), run)
    tally("disk full during write", "train (2nd checkpoint)")


def make_tiny_from(tiny_dir: Path) -> torch.nn.Module:
    from multilora.models import load_model

    return load_model(tiny_dir)[0]


def test_disk_full_in_torch_save_of_a_checkpoint_is_named_too(tiny_dir, tmp_path, monkeypatch, tally):
    """torch.save's writer says only "file write failed": the free space decides, and it is named."""
    import shutil as _shutil

    from accelerate import Accelerator

    from multilora.config import load_config
    from multilora.train import train

    real = Accelerator.save_state
    calls = {"n": 0}

    def save_state(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            monkeypatch.setattr(_shutil, "disk_usage", lambda p: _shutil._ntuple_diskusage(10**9, 10**9, 1024))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed")
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    run = tmp_path / "run"
    with pytest.raises(MultiLoRAError, match=r"no space left on device while saving checkpoint step-4 .*/step-2 is kept"):
        train(load_config(None, _tiny_train_args(tiny_dir, run)), progress=False)
    assert [s for s, _ in checkpoint_dirs(run)] == [2] and sorted(os.listdir(run / CHECKPOINTS)) == ["step-2"]
    tally("disk full during write", "train (torch.save of a checkpoint)")


def test_disk_full_while_saving_final_adapter_says_resume_writes_it(tiny_dir, tmp_path, monkeypatch, tally):
    from multilora.config import load_config
    from multilora.train import train

    monkeypatch.setattr(ckpt, "save_file", _enospc)
    run = tmp_path / "run"
    with pytest.raises(MultiLoRAError) as e:
        train(load_config(None, _tiny_train_args(tiny_dir, run, steps=2)), progress=False)
    msg = str(e.value)
    assert "no space left on device while saving the adapter" in msg and "step-2 is kept" in msg, msg
    assert f"--resume {run}" in msg and "\n" not in msg
    assert not (run / ckpt.WEIGHTS_NAME).exists() and not [p for p in os.listdir(run) if p.endswith(".tmp")]
    monkeypatch.undo()
    train(None, resume=run, progress=False)  # only writes the adapter
    ml.load_adapter(make_tiny_from(tiny_dir), run)
    tally("disk full during write", "train (final adapter)")


@pytest.mark.parametrize("stage", ["tensors", "config"])
def test_disk_full_while_resaving_an_adapter_keeps_the_old_one(tmp_path, monkeypatch, stage, tally):
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets="all-linear"))
    randomize_adapters(model, seed=1)
    folder = tmp_path / "ad"
    ml.save_adapter(model, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    randomize_adapters(model, seed=2)
    if stage == "tensors":
        real = ckpt.save_file

        def save_file(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)  # half written, then the disk is full
            _enospc()

        monkeypatch.setattr(ckpt, "save_file", save_file)
    else:  # the tensors are written, the config is not
        real_write_text = Path.write_text

        def write_text(self, data, *args, **kwargs):
            if "adapter_config.json" in self.name:
                real_write_text(self, data[: len(data) // 2], *args, **kwargs)
                _enospc()
            return real_write_text(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(MultiLoRAError, match=r"No space left on device \(the disk is full\)") as e:
        ml.save_adapter(model, folder)
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC  # callers catching OSError still do
    assert "is unchanged" in str(e.value) and str(folder) in str(e.value)
    monkeypatch.undo()
    reloaded = ml.load_adapter(make_tiny("llama"), folder)  # the old adapter, complete
    randomize_adapters(model, seed=1)
    assert all(torch.equal(p, ml.adapter_parameters(model)[k]) for k, p in ml.adapter_parameters(reloaded).items())
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")} == before
    tally("disk full during write", f"save_adapter ({stage})")


@pytest.mark.parametrize("target", ["report.md", "json"])
def test_disk_full_while_rewriting_a_report_or_json_keeps_the_old_file(tmp_path, monkeypatch, target, tally):
    from multilora.report import write_report

    real_write_text = Path.write_text

    def write_text(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 3], *args, **kwargs)
        _enospc()

    if target == "report.md":
        write_report(_study("model-A"), tmp_path)
        path, before = tmp_path / "report.md", (tmp_path / "report.md").read_bytes()
        monkeypatch.setattr(Path, "write_text", write_text)
        with pytest.raises(MultiLoRAError, match="disk is full") as e:
            write_report(_study("model-B"), tmp_path)
    else:
        path = tmp_path / "eval.json"
        write_json_atomic(path, {"old": list(range(1000))})
        before = path.read_bytes()
        monkeypatch.setattr(Path, "write_text", write_text)
        with pytest.raises(MultiLoRAError, match="disk is full") as e:
            write_json_atomic(path, {"new": list(range(1000))})
    monkeypatch.undo()
    assert str(path) in str(e.value) and f"the previous {path.name} is unchanged" in str(e.value)
    assert path.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    tally("disk full during write", "write_report" if target == "report.md" else "write_json_atomic")


def test_disk_full_while_appending_metrics_names_the_checkpoint_to_resume(tmp_path, monkeypatch, tally):
    run = tmp_path / "run"
    (run / CHECKPOINTS / "step-2").mkdir(parents=True)
    (run / CHECKPOINTS / "step-2" / STATE_FILE).write_text('{"step": 2}')
    Run(run).append_metrics({"step": 1, "loss": 1.0})
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(MultiLoRAError, match="disk is full") as e:
        Run(run).append_metrics({"step": 3, "loss": 0.5})
    monkeypatch.undo()
    assert f"the checkpoint {run / CHECKPOINTS / 'step-2'} is kept; free space and --resume {run}" in str(e.value)
    assert read_metrics(run)[0] == {"step": 1, "loss": 1.0}
    tally("disk full during write", "metrics.jsonl (Run.append_metrics)")


def test_disk_full_while_building_the_model_cache_is_one_line(tmp_path, monkeypatch, tiny_dir, tally):
    monkeypatch.setenv("MULTILORA_CACHE", str(tmp_path / "cache"))
    model = make_tiny("llama")

    def build(folder: Path) -> None:
        model.save_pretrained(folder)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(MultiLoRAError, match="no space left on device while writing the model cache") as e:
        models._cached_folder(models.TINY_MODEL, models._TINY_FILES, build)
    assert "MULTILORA_CACHE" in str(e.value)
    assert os.listdir(tmp_path / "cache") == [f"{models.TINY_MODEL}.lock"]  # no temp folder, no partial cache
    tally("disk full during write", "model cache")


# ----------------------------------------------------------------------------- unwritable output folders


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded or a training plan built."""
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("the model was loaded before the unwritable output folder was reported")

    monkeypatch.setattr("multilora.models.load_model", refuse)
    monkeypatch.setattr("multilora.train.build_plan", refuse)
    monkeypatch.setattr("multilora.evaluate.resolve_target", refuse)


@pytest.fixture
def immutable(tmp_path):
    """A folder that even root cannot write into (chattr +i), removed again afterwards."""
    d = tmp_path / "immutable"
    d.mkdir()
    if subprocess.run(["chattr", "+i", str(d)], check=False, capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


def _one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("where", ["under a file", "immutable folder", "inside an immutable folder"])
def test_train_refuses_an_unwritable_output_dir_before_loading_the_model(where, tiny_dir, tmp_path, capsys,
                                                                       no_model_load, request, tally):
    if where == "under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "runs" / "x"
    else:
        imm = request.getfixturevalue("immutable")
        out = imm if where == "immutable folder" else imm / "x"
    code = cli_main(_train_cli(tiny_dir, out, tmp_path))
    msg = _one_line_error(capsys)
    assert code == 2, msg
    assert msg.startswith("multilora train: error: ") and str(out) in msg and "output_dir" in msg, msg
    assert "choose another path" in msg
    tally("unwritable output folder", f"train ({where})")


def test_resume_into_an_unwritable_run_is_refused_before_loading(tiny_dir, tmp_path, capsys, monkeypatch, tally):
    from multilora.config import load_config
    from multilora.train import train

    run = tmp_path / "run"
    train(load_config(None, _tiny_train_args(tiny_dir, run, steps=2)), progress=False)
    monkeypatch.setattr("multilora.train.build_plan", lambda *a, **k: pytest.fail("build_plan ran"))
    subprocess.run(["chattr", "+i", str(run)], check=True)
    try:
        code = cli_main(["train", "--resume", str(run), "--train.max_steps", "4", "--no-progress"])
    finally:
        subprocess.run(["chattr", "-i", str(run)], check=True)
    msg = _one_line_error(capsys)
    assert code == 2 and str(run) in msg and "Operation not permitted" in msg, msg
    tally("unwritable output folder", "train --resume")


def test_other_commands_report_an_unwritable_out_in_one_line(tiny_dir, tmp_path, capsys, tally):
    """eval, analyze, export (peft, merged), import-peft and demo: exit 2 and one line naming --out.
    (Whether they fail before the work is done is the next test.)"""
    from multilora.config import load_config
    from multilora.train import train

    run = tmp_path / "run"
    train(load_config(None, _tiny_train_args(tiny_dir, run, steps=2)), progress=False)
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "out"
    peft = tmp_path / "peft"
    assert cli_main(["export", str(run), "--out", str(peft)]) == 0
    capsys.readouterr()
    commands = {
        "eval": ["eval", str(run), "--tasks", "rte", "--limit", "2", "--out", str(bad / "eval.json")],
        "analyze": ["analyze", str(run), "--out", str(bad)],
        "export peft": ["export", str(run), "--out", str(bad)],
        "export merged": ["export", str(run), "--format", "merged", "--model", str(tiny_dir), "--out", str(bad)],
        "import-peft": ["import-peft", str(peft), "--out", str(bad)],
        "demo": ["demo", "--quick", "--steps", "2", "--limit", "1", "--out", str(bad)],
    }
    failures = {}
    for name, argv in commands.items():
        try:
            code = cli_main(argv)
        except Exception as e:  # noqa: BLE001 -- a traceback is what this test catches
            failures[name] = f"traceback: {type(e).__name__}: {e}"
            tally("unwritable output folder", f"{name} --out", failures=1)
            continue
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        if code != 2 or len(err) != 1 or str(tmp_path / "file") not in err[0]:
            failures[name] = f"exit {code}, {err}"
        tally("unwritable output folder", f"{name} --out", failures=int(name in failures))
    assert not failures, failures


@pytest.mark.parametrize("command", ["eval", "analyze", "export merged", "demo"])
def test_other_commands_refuse_an_unwritable_out_before_the_work(command, tiny_dir, tmp_path, capsys, monkeypatch, tally):
    """The work (loading the model, evaluating, training) must not start when --out cannot be written.
    Each command checks its --out (io.check_writable_dir) before any work."""
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "out"
    calls = []
    for target in ("multilora.models.load_model", "multilora.evaluate.resolve_target", "multilora.analyze.analyze_run",
                   "multilora.train.train", "multilora.models.tiny_model_path"):
        monkeypatch.setattr(target, lambda *a, _t=target, **k: calls.append(_t) or pytest.fail(f"{_t} ran before --out was checked"))
    adapter = tmp_path / "ad"
    model = make_tiny("llama")
    ml.inject(model, ml.MultiLoRAConfig(n=2, r=4, targets=["q_proj"]))
    ml.save_adapter(model, adapter)
    argv = {"eval": ["eval", str(tiny_dir), "--tasks", "rte", "--limit", "2", "--out", str(bad / "eval.json")],
            "analyze": ["analyze", str(adapter), "--out", str(bad)],
            "export merged": ["export", str(adapter), "--format", "merged", "--model", str(tiny_dir), "--out", str(bad)],
            "demo": ["demo", "--quick", "--out", str(bad)]}[command]
    code = cli_main(argv)
    msg = _one_line_error(capsys)
    assert code == 2 and not calls and str(tmp_path / "file") in msg, msg
    tally("unwritable output folder", f"{command} --out (before the work)")
