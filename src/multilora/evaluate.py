"""Evaluation: multiple choice by log-likelihood, Alpaca response perplexity, a per-task table, eval.json.

    model, tokenizer, identity = resolve_target("runs/demo")       # run/adapter/PEFT/model folder
    result = evaluate(model, tokenizer, ["mmlu", "boolq", "rte"], shots=5, limit=20, identity=identity)
    write_json_atomic("runs/demo/eval.json", result);  rich.print(result_table(result))
    compare(["runs/a", "runs/b"])                                   # eval.json files side by side

Multiple choice (MULTILORA.md §7). For a prompt p and a choice c = (c_1 .. c_m) (tokenized
separately, as in training):

    ll(c)      = sum_k log P(c_k | p, c_<k)          the choice's log-likelihood  -> `acc`
    ll_norm(c) = ll(c) / m                           per-token mean               -> `acc_norm`

The fast scorer feeds, per question, the rows p + c_j[:-1] (the last choice token is never an
input), dropping any row that is a prefix of another: choices that are one token (MMLU's " A" ..
" D", yes/no) share the single row p. Rows of several questions are right-padded into one batch
(padding comes after every real token, so causal attention never sees it and positions are
unchanged), and the LM head runs only at the positions that predict choice tokens.

Metrics: accuracy (and acc_norm) with the chance level mean(1 / choices); MultiRC adds F1a over all
answers and exact match per question; MMLU reports each subject, the four Hendrycks categories and
the overall micro (per question) and macro (per subject) accuracy; `alpaca` is scored by the
perplexity of its held-out responses (prompt tokens carry no loss, as in training).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .data import IGNORE, MCItem, collate, encode_prompt, render, tokenize_example
from ._version import __version__
from .errors import MultiLoRAError
from .io import check_writable_dir, read_json_object, write_json_atomic

DEFAULT_TASKS = "mmlu,boolq,rte,wic"
EVAL_NAME = "eval.json"

# Hendrycks et al.'s subject -> category mapping (their categories.py, subcategories folded in).
_CATEGORY_SUBJECTS = {
    "STEM": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
    "social sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}
MMLU_CATEGORY: dict[str, str] = {s: cat for cat, subjects in _CATEGORY_SUBJECTS.items() for s in subjects}


# ----------------------------------------------------------------------------- scoring


def max_length(model: nn.Module, cap: int = 4096) -> int:
    """The longest sequence the model takes (its position limit), capped at `cap`."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or cap
    return int(min(limit, cap))


def _pad_id(tokenizer: Any) -> int:
    """The id used for right padding (never attended to, never scored)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def _plan(item: MCItem, tokenizer: Any, chat: bool, max_len: int, bos: int | None) -> dict:
    """Token rows for one question: the inputs to run and, per choice, its row, first position and tokens."""
    if not item.choices:
        raise MultiLoRAError(f"task {item.task!r}: an item has no choices; every item needs at least one")
    prompt = encode_prompt(item.prompt, tokenizer, chat)
    choices = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in item.choices]
    empty = [item.choices[j] for j, c in enumerate(choices) if not c]
    if empty or not prompt:
        raise MultiLoRAError(f"task {item.task!r}: choice {empty[0]!r} has no tokens; choices need text"
                             if empty else f"task {item.task!r}: empty prompt; every item needs prompt text")
    keep_bos = 1 if bos is not None and prompt[:1] == [bos] else 0
    longest = max(len(c) for c in choices)
    over = len(prompt) + longest - 1 - max_len
    if over > 0:  # drop the oldest prompt tokens (after BOS), as training does
        if len(prompt) - over < keep_bos + 1:
            raise MultiLoRAError(f"task {item.task!r}: a choice has {longest} tokens, more than the model's "
                                 f"{max_len} positions allow; shorten the choices")
        prompt = prompt[:keep_bos] + prompt[keep_bos + over:]
    rows: list[list[int]] = []
    where: list[int] = [0] * len(choices)
    for j in sorted(range(len(choices)), key=lambda j: -len(choices[j])):  # longest first: prefixes reuse rows
        ids = prompt + choices[j][:-1]
        for r, row in enumerate(rows):
            if row[: len(ids)] == ids:
                where[j] = r
                break
        else:
            rows.append(ids)
            where[j] = len(rows) - 1
    return {"rows": rows, "start": len(prompt) - 1, "choice_row": where, "choices": choices}


def _forward_positions(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
    """Logits (R, P, V) at `positions` (R, P) of each row; the LM head runs only there when the model allows."""
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions).logits
        if logits.dim() == 3 and logits.shape[:2] == positions.shape:  # older transformers index differently
            return logits
    except TypeError:  # a model without `logits_to_keep`: compute every position, then pick
        pass
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (R, T, V)
    return torch.take_along_dim(logits, positions[..., None], dim=1)


def _progress(total: int, description: str, enabled: bool) -> Any:
    """A rich progress bar on stderr when `enabled` and stderr is a terminal, else a no-op."""
    if not (enabled and sys.stderr.isatty()):
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    bar.add_task(description, total=total)
    return bar


def score_choices(model: nn.Module, tokenizer: Any, items: Sequence[MCItem], batch_size: int = 8,
                  chat: bool = False, progress: bool = False) -> list[dict]:
    """Per item (in order): ll and ll_norm per choice, pred and pred_norm (argmax), gold, n_tokens, task, group.

    `batch_size` is the number of questions per forward pass (each brings its rows, see the module
    docstring); results do not depend on it beyond float rounding.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise MultiLoRAError(f"batch size must be a positive integer, got {batch_size!r}")
    if not items:
        return []
    max_len = max_length(model)
    bos = tokenizer.bos_token_id
    plans = [_plan(item, tokenizer, chat, max_len, bos) for item in items]
    order = sorted(range(len(plans)), key=lambda i: -max(len(r) for r in plans[i]["rows"]))  # less padding
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    out: list[dict | None] = [None] * len(items)
    was_training = model.training
    model.eval()
    try:
        with _progress(len(items), items[0].task, progress) as bar, torch.inference_mode():
            for b0 in range(0, len(order), batch_size):
                batch = order[b0:b0 + batch_size]
                rows = [(i, row) for i in batch for row in plans[i]["rows"]]  # R rows
                width = max(len(row) for _, row in rows)
                # each row is scored from its question's last prompt token to its own last token
                spans = [len(row) - plans[i]["start"] for i, row in rows]
                input_ids = torch.full((len(rows), width), pad, dtype=torch.long)        # (R, T)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)       # (R, T)
                positions = torch.zeros((len(rows), max(spans)), dtype=torch.long)       # (R, P)
                for r, (i, row) in enumerate(rows):
                    input_ids[r, : len(row)] = torch.tensor(row)
                    attention_mask[r, : len(row)] = 1
                    span = torch.arange(plans[i]["start"], len(row))
                    positions[r] = torch.cat([span, span[-1:].expand(positions.shape[1] - len(span))])
                logits = _forward_positions(model, input_ids.to(device), attention_mask.to(device),
                                            positions.to(device))                        # (R, P, V)
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()                   # (R, P, V)
                first_row = 0
                for i in batch:
                    plan, item = plans[i], items[i]
                    ll = []
                    for j, tokens in enumerate(plan["choices"]):
                        r = first_row + plan["choice_row"][j]
                        picked = logp[r, torch.arange(len(tokens)), torch.tensor(tokens)]  # (m,)
                        ll.append(float(picked.double().sum()))
                    first_row += len(plan["rows"])
                    n_tokens = [len(t) for t in plan["choices"]]
                    ll_norm = [v / n for v, n in zip(ll, n_tokens)]
                    out[i] = {"task": item.task, "group": item.group, "gold": item.gold, "ll": ll,
                              "ll_norm": ll_norm, "n_tokens": n_tokens,
                              "pred": max(range(len(ll)), key=ll.__getitem__),
                              "pred_norm": max(range(len(ll_norm)), key=ll_norm.__getitem__)}
                if bar is not None:
                    bar.advance(bar.task_ids[0], len(batch))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def response_nll(model: nn.Module, tokenizer: Any, examples: Sequence, batch_size: int = 8,
                 chat: bool = False, progress: bool = False) -> dict:
    """Summed negative log-likelihood of the response tokens (+ EOS) of `examples`, their count and perplexity."""
    max_len = max_length(model, cap=2048)
    rows = [tokenize_example(ex, tokenizer, max_len, chat) for ex in examples]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with _progress(len(rows), f"{rows[0]['task']} perplexity", progress) as bar, torch.inference_mode():
            for b0 in range(0, len(order), batch_size):
                chunk = [rows[i] for i in order[b0:b0 + batch_size]]
                batch = collate(chunk, _pad_id(tokenizer), sorted({row["task"] for row in chunk}), multiple_of=1)
                labels = batch["labels"]                                         # (B, T)
                keep = torch.zeros_like(labels, dtype=torch.bool)                # (B, T)
                keep[:, :-1] = labels[:, 1:] != IGNORE                          # position t predicts token t+1
                targets = labels[:, 1:][labels[:, 1:] != IGNORE]                 # (N,)
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                try:
                    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep.to(device)).logits
                    if logits.dim() != 2:
                        raise TypeError
                except TypeError:
                    logits = model(input_ids=ids, attention_mask=mask).logits[keep.to(device)]
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()           # (N, V)
                nll -= float(logp[torch.arange(len(targets)), targets].double().sum())
                count += len(targets)
                if bar is not None:
                    bar.advance(bar.task_ids[0], labels.shape[0])
    finally:
        model.train(was_training)
    return {"nll": nll, "tokens": count, "nll_per_token": nll / max(count, 1),
            "perplexity": math.exp(nll / count) if count else float("nan")}


def generate_samples(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64,
                     chat: bool = False) -> list[dict]:
    """Greedy continuations of `prompts` (one at a time, no padding): [{"prompt", "output"}]."""
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for prompt in prompts:
                ids = torch.tensor([encode_prompt(prompt, tokenizer, chat)], device=device)  # (1, T)
                new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad)[0, ids.shape[1]:]
                out.append({"prompt": prompt, "output": tokenizer.decode(new, skip_special_tokens=True)})
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- metrics


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def accuracy(scores: Sequence[dict]) -> dict:
    """acc (sum log-likelihood), acc_norm (per-token mean), chance (mean of 1/choices), n."""
    return {"acc": _mean(s["pred"] == s["gold"] for s in scores),
            "acc_norm": _mean(s["pred_norm"] == s["gold"] for s in scores),
            "chance": _mean(1.0 / len(s["ll"]) for s in scores), "n": len(scores)}


def multirc_metrics(scores: Sequence[dict], key: str = "pred") -> dict:
    """MultiRC: F1a over all answers (positive = choice 1, " yes") and EM per question (group)."""
    tp = sum(1 for s in scores if s[key] == 1 and s["gold"] == 1)
    fp = sum(1 for s in scores if s[key] == 1 and s["gold"] != 1)
    fn = sum(1 for s in scores if s[key] != 1 and s["gold"] == 1)
    f1a = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    groups: dict[Any, list[dict]] = {}
    for s in scores:
        groups.setdefault(s["group"], []).append(s)
    em = _mean(all(s[key] == s["gold"] for s in g) for g in groups.values())
    positive = sum(s["gold"] == 1 for s in scores) / len(scores) if scores else 0.0  # share of true answers
    return {
        "f1a": f1a, "em": em, "questions": len(groups),
        # always answering "yes": precision = share of true answers, recall = 1
        "f1a_chance": 2 * positive / (1 + positive),
        # guessing each answer at random: a question is exact with probability prod 1/choices
        "em_chance": _mean(math.prod(1.0 / len(s["ll"]) for s in g) for g in groups.values()),
    }


def mmlu_metrics(scores: Sequence[dict]) -> dict:
    """MMLU: per subject, per category (micro within it, macro over its subjects) and overall macro/micro."""
    by_subject: dict[str, list[dict]] = {}
    for s in scores:
        by_subject.setdefault(s["task"].removeprefix("mmlu_"), []).append(s)
    subjects = {name: {**accuracy(ss), "category": MMLU_CATEGORY.get(name, "other")}
                for name, ss in by_subject.items()}
    categories = {}
    for cat in _CATEGORY_SUBJECTS:
        names = [n for n in subjects if subjects[n]["category"] == cat]
        if names:
            inside = [s for n in names for s in by_subject[n]]
            categories[cat] = {**accuracy(inside), "acc_macro": _mean(subjects[n]["acc"] for n in names),
                               "subjects": len(names)}
    overall = accuracy(scores)
    return {**overall, "acc_macro": _mean(v["acc"] for v in subjects.values()),
            "acc_norm_macro": _mean(v["acc_norm"] for v in subjects.values()),
            "categories": categories, "subjects": subjects}


def task_metrics(task: str, scores: Sequence[dict]) -> dict:
    """The metrics of one multiple-choice task: accuracy for all, plus MultiRC's and MMLU's own."""
    if task == "mmlu":
        return mmlu_metrics(scores)
    out = accuracy(scores)
    if task == "multirc":
        out.update(multirc_metrics(scores))
        out["f1a_norm"] = multirc_metrics(scores, "pred_norm")["f1a"]
    return out


# ----------------------------------------------------------------------------- evaluate


def _items(task: str, shots: int, limit: int | None, root: Any) -> list[MCItem]:
    """The evaluation items of a task; `limit` counts per MMLU subject, per MultiRC question, else items."""
    from .tasks import load_items
    from .tasks.mmlu import SUBJECTS

    if task == "mmlu":
        return [it for s in SUBJECTS for it in _items(f"mmlu_{s}", shots, limit, root)]
    items = load_items(task, root=root, **({"k": shots} if task.startswith("mmlu_") else {}))
    if limit is None:
        return items
    if task == "multirc":  # whole questions, so exact match stays meaningful
        keep = set(list(dict.fromkeys(it.group for it in items))[:limit])
        return [it for it in items if it.group in keep]
    return items[:limit]


def model_identity(model: nn.Module) -> dict:
    """What is being evaluated, from the model alone: class, name/path, adapter options if injected."""
    from .inject import adapter_modules

    cfg = getattr(model, "config", None)
    ident = {"model_class": type(model).__name__, "base_model": getattr(cfg, "_name_or_path", "") or "",
             "parameters": sum(p.numel() for p in model.parameters())}
    config = getattr(model, "multilora_config", None)
    if config is not None and adapter_modules(model):
        ident["adapter"] = {"method": config.method, **config.layer_options(),
                            "modules": len(adapter_modules(model))}
    return ident


def evaluate(model: nn.Module, tokenizer: Any, tasks: Sequence[str], shots: int = 0, limit: int | None = None,
             batch_size: int = 8, chat: bool = False, identity: dict | None = None, root: Any = None,
             progress: bool = False, generate: int = 0, max_new_tokens: int = 64,
             save_items: bool = False) -> dict:
    """Evaluate `tasks` (multiple choice, or `alpaca` perplexity); a JSON-ready dict, no printing.

    `shots` applies to MMLU (dev examples); `limit` caps items (per MMLU subject, per MultiRC question);
    `generate` > 0 adds greedy outputs for that many held-out Alpaca prompts (compare them across runs);
    `save_items` keeps every item's scores (ll, ll_norm, pred, pred_norm, gold, task, group).
    """
    from .tasks import get_task, load_examples

    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise MultiLoRAError("no tasks to evaluate; name at least one, e.g. --tasks mmlu,boolq,rte,wic")
    for task in tasks:
        get_task(task)  # unknown names fail before any work, listing the known tasks
    if limit is not None and not (isinstance(limit, int) and limit >= 1):
        raise MultiLoRAError(f"limit must be a positive integer, got {limit!r}")
    started = time.time()
    results: dict[str, dict] = {}
    for task in tasks:
        t0 = time.time()
        if get_task(task).items is None:  # evaluated by response perplexity
            examples = load_examples(task, split=get_task(task).eval_split, root=root)[:limit]
            res = {"kind": "perplexity", "split": get_task(task).eval_split, "n": len(examples),
                   **response_nll(model, tokenizer, examples, batch_size, chat, progress),
                   "chance": float(len(tokenizer)),  # a uniform guess over the vocabulary
                   "prompt_example": render(examples[0].prompt, tokenizer, chat)}
        else:
            items = _items(task, shots, limit, root)
            scores = score_choices(model, tokenizer, items, batch_size, chat, progress)
            res = {"kind": "multiple_choice", "split": get_task(task).eval_split,
                   "shots": shots if task.startswith("mmlu") else 0, **task_metrics(task, scores),
                   "prompt_example": render(items[0].prompt, tokenizer, chat), "choices": items[0].choices}
            if save_items:
                res["items"] = scores
        res["seconds"] = round(time.time() - t0, 3)
        results[task] = res
    generations = []
    if generate:
        prompts = [ex.prompt for ex in load_examples("alpaca", split=get_task("alpaca").eval_split, root=root)]
        generations = generate_samples(model, tokenizer, prompts[:generate], max_new_tokens, chat)
    return {
        "multilora_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "identity": identity if identity is not None else model_identity(model),
        "settings": {"tasks": list(tasks), "shots": shots, "limit": limit, "batch_size": batch_size, "chat": chat,
                     "generate": generate, "max_new_tokens": max_new_tokens,
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
        "seconds": round(time.time() - started, 3),
        "tasks": results,
        **({"generations": generations} if generations else {}),
    }


def flat_metrics(result: dict) -> dict[str, float]:
    """The headline numbers of an evaluate() result as {"task/metric": value} (for logging)."""
    return {f"{task}/{metric}".replace(" ", "_"): float(value)
            for task, metric, value, _, _ in summary_rows(result)}


def make_eval_fn(tokenizer: Any, tasks: Sequence[str], shots: int = 0, limit: int | None = 50,
                 batch_size: int = 8, chat: bool = False) -> Callable[[nn.Module], dict[str, float]]:
    """An `eval_fn(model) -> {"task/metric": value}` for the trainer's periodic evaluation."""
    from .tasks import get_task

    for task in tasks:
        get_task(task)  # fail at start-up, not at the first evaluation

    def eval_fn(model: nn.Module) -> dict[str, float]:
        return flat_metrics(evaluate(model, tokenizer, tasks, shots, limit, batch_size, chat))

    return eval_fn


# ----------------------------------------------------------------------------- targets


def _run_config_model(folder: Path) -> str | None:
    """The base model named in a run folder's config.yaml (`model: NAME` or `model: {name: ...}`), if any."""
    path = folder / "config.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - an unreadable config only loses a hint; the caller asks for --model
        return None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if isinstance(model, dict):
        model = model.get("name_or_path") or model.get("name")
    return model if isinstance(model, str) and model else None


def resolve_target(target: str, model: str | None = None) -> tuple[nn.Module, Any, dict]:
    """(model, tokenizer, identity) for a run/adapter folder, PEFT folder, model folder or 'smollm2-135m'.

    `model` overrides the base model an adapter records.
    """
    from .models import DEFAULT_MODEL, load_model

    if str(target) == DEFAULT_MODEL:
        from .models import SOURCE_FILE, embedded_model_path

        m, tok = load_model(DEFAULT_MODEL)
        source = embedded_model_path() / SOURCE_FILE
        return m, tok, {"target": DEFAULT_MODEL, "kind": "model", "base_model": DEFAULT_MODEL,
                        "source": read_json_object(source) if source.is_file() else None}
    folder = Path(target).expanduser()
    what = ("pass a run or adapter folder (adapter_config.json), a PEFT adapter folder, a model folder "
            f"(config.json) or '{DEFAULT_MODEL}'")
    if not folder.is_dir():
        raise MultiLoRAError(f"eval target '{target}' is {'a file' if folder.exists() else 'not a folder'}; {what}")
    ident: dict[str, Any] = {"target": str(target), "path": str(folder.resolve())}
    if (folder / "adapter_config.json").is_file():
        meta = read_json_object(folder / "adapter_config.json")
        if meta.get("format") == "multilora-adapter":
            from .checkpoint import load_adapter, read_adapter

            read_adapter(folder)  # validate (checksum, keys) before loading a base model
            # the run's config names the model as the user gave it ('smollm2-135m'), the adapter its resolved path
            base = model or _run_config_model(folder) or (meta.get("base_model") or {}).get("name_or_path")
            if not base:
                raise MultiLoRAError(f"{folder}/adapter_config.json does not record its base model; pass --model BASE")
            m, tok = load_model(base)
            load_adapter(m, folder)
            ident.update(kind="adapter", base_model=str(base), adapter_sha256=meta.get("weights_sha256"),
                         adapter={k: meta.get(k) for k in ("method", "n", "r", "alpha", "scale", "init", "targets")})
            return m.eval(), tok, ident
        if "peft_type" in meta:
            from .export import check_peft_for_model, refuse_pickled_peft

            refuse_pickled_peft(folder)  # adapter_model.bin is a pickle: never opened
            try:
                from peft import PeftModel
                from peft.utils import get_peft_model_state_dict
            except ImportError:
                raise MultiLoRAError(f"{folder} is a PEFT adapter and evaluating it needs the package peft: "
                                     "pip install peft") from None
            base = model or meta.get("base_model_name_or_path")
            if not base:
                raise MultiLoRAError(f"{folder}/adapter_config.json does not name its base model; pass --model BASE")
            m, tok = load_model(base)
            tensors = check_peft_for_model(folder, meta, m)
            try:
                m = PeftModel.from_pretrained(m, str(folder)).eval()
            except (ValueError, TypeError, KeyError, RuntimeError, OSError) as e:
                detail = " ".join(str(e).split())[:300]
                raise MultiLoRAError(f"{folder}: peft cannot load this adapter into {base} "
                                     f"({type(e).__name__}: {detail})") from None
            loaded = set(get_peft_model_state_dict(m))
            unused = sorted(k for k in tensors if k not in loaded)
            if unused:
                raise MultiLoRAError(f"{folder}/adapter_model.safetensors: tensor {unused[0]!r} ({len(unused)} in all) "
                                     "was not loaded: target_modules in adapter_config.json does not select its "
                                     "module; fix target_modules or re-save the adapter")
            absent = sorted(k for k in loaded if ".lora_" in k and k not in tensors)
            if absent:
                raise MultiLoRAError(f"{folder}/adapter_model.safetensors lacks tensor {absent[0]!r} ({len(absent)} "
                                     "in all) that target_modules in adapter_config.json selects; the adapter is "
                                     "incomplete: re-save it")
            keys = ("peft_type", "r", "lora_alpha", "target_modules")
            ident.update(kind="peft", base_model=str(base), adapter={k: meta.get(k) for k in keys})
            return m, tok, ident
        raise MultiLoRAError(f"{folder}/adapter_config.json is neither a multilora adapter (format "
                             f"'multilora-adapter') nor a PEFT adapter (peft_type); {what}")
    if (folder / "config.json").is_file():
        m, tok = load_model(folder)
        ident.update(kind="model", base_model=str(folder))
        if (folder / "full_model.json").is_file():  # a full fine-tuning run folder
            full = read_json_object(folder / "full_model.json")
            ident.update(kind="full", base_model=str((full.get("base_model") or {}).get("name_or_path") or folder),
                         weights_sha256=full.get("weights_sha256"))
        return m, tok, ident
    if (folder / "checkpoints").is_dir() and (folder / "config.yaml").is_file():
        raise MultiLoRAError(f"run folder {folder} has checkpoints but no final adapter or model yet; let the "
                             "run finish (or continue it with `multilora train --resume RUN`) before evaluating it")
    if any(folder.glob("model*.safetensors")):
        raise MultiLoRAError(f"{folder} holds model weights but no config.json; save the model with "
                             "save_pretrained (config.json, *.safetensors, tokenizer files)")
    raise MultiLoRAError(f"eval target '{target}' holds neither adapter_config.json nor config.json; {what}")


# ----------------------------------------------------------------------------- tables


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return "" if value is None else str(value)


def summary_rows(result: dict) -> list[tuple[str, str, Any, Any, Any]]:
    """(task, metric, value, chance, n) rows of an evaluate() result, as shown in the terminal table."""
    rows = []
    for task, r in result["tasks"].items():
        if r["kind"] == "perplexity":
            rows.append((task, "perplexity", r["perplexity"], r["chance"], r["n"]))
            rows.append((task, "nll/token", r["nll_per_token"], math.log(r["chance"]), r["tokens"]))
            continue
        if task == "mmlu":
            rows.append((task, "acc (micro)", r["acc"], r["chance"], r["n"]))
            rows.append((task, "acc (macro)", r["acc_macro"], r["chance"], len(r["subjects"])))
            rows.append((task, "acc_norm", r["acc_norm"], r["chance"], r["n"]))
            for cat, c in r["categories"].items():
                rows.append((f"mmlu/{cat}", "acc", c["acc"], c["chance"], c["n"]))
            continue
        rows.append((task, "acc", r["acc"], r["chance"], r["n"]))
        rows.append((task, "acc_norm", r["acc_norm"], r["chance"], r["n"]))
        if task == "multirc":
            rows.append((task, "f1a", r["f1a"], r["f1a_chance"], r["n"]))
            rows.append((task, "em", r["em"], r["em_chance"], r["questions"]))
    return rows


def result_table(result: dict, title: str | None = None) -> Any:
    """A rich Table of one result: task, metric, value, chance, n."""
    from rich.table import Table

    ident = result.get("identity", {})
    name = ident.get("target") or ident.get("base_model") or ident.get("model_class", "model")
    shots = f" ({result['settings']['shots']}-shot MMLU)" if any(t.startswith("mmlu") for t in result["tasks"]) else ""
    table = Table(title=title or f"eval: {name}{shots}")
    for name, justify in (("task", "left"), ("metric", "left"), ("value", "right"), ("chance", "right"),
                          ("n", "right")):
        table.add_column(name, justify=justify)
    for task, metric, value, chance, n in summary_rows(result):
        table.add_row(task, metric, _fmt(value), _fmt(chance), _fmt(n))
    return table


def read_result(path: str | Path) -> dict:
    """An eval.json (or a folder holding one), checked to be an evaluate() result."""
    path = Path(path)
    file = path / EVAL_NAME if path.is_dir() else path
    if not file.is_file():
        raise MultiLoRAError(f"{file} not found; run `multilora eval {path}` first, or pass an eval.json file")
    data = read_json_object(file)
    if not isinstance(data.get("tasks"), dict) or "settings" not in data:
        raise MultiLoRAError(f"{file} is not a multilora eval result (no 'tasks'/'settings'); pass an eval.json")
    bad = [task for task, r in data["tasks"].items() if not (isinstance(r, dict) and isinstance(r.get("kind"), str))]
    if bad:
        raise MultiLoRAError(f"{file}: tasks {', '.join(map(repr, bad[:5]))} are not results with a 'kind'; "
                             "re-run multilora eval")
    try:
        summary_rows(data)
    except (KeyError, TypeError) as e:
        raise MultiLoRAError(f"{file} is not a complete multilora eval result ({e!r}); re-run multilora eval") from None
    return data


def compare(paths: Sequence[str | Path]) -> Any:
    """A rich Table with one column per eval.json (or folder holding one), rows (task, metric), plus chance."""
    from rich.table import Table

    if not paths:
        raise MultiLoRAError("--compare needs at least one run folder or eval.json")
    results = [read_result(p) for p in paths]
    table = Table(title="eval comparison")
    table.add_column("task")
    table.add_column("metric")
    labels = _labels(paths)
    for label in labels:
        table.add_column(label, justify="right")
    table.add_column("chance", justify="right")
    cells: dict[tuple[str, str], list[Any]] = {}
    chance: dict[tuple[str, str], Any] = {}
    for k, res in enumerate(results):
        for task, metric, value, ch, _ in summary_rows(res):
            cells.setdefault((task, metric), [None] * len(results))[k] = value
            chance.setdefault((task, metric), ch)
    for (task, metric), values in cells.items():
        table.add_row(task, metric, *["-" if v is None else _fmt(v) for v in values], _fmt(chance[(task, metric)]))
    return table


def generations_table(results: Sequence[dict], labels: Sequence[str]) -> Any:
    """A rich Table of greedy outputs side by side (one column per result) for the prompts all share; None if none."""
    from rich.table import Table

    outputs = [{g["prompt"]: g["output"] for g in r.get("generations", [])} for r in results]
    prompts = [g["prompt"] for g in results[0].get("generations", []) if all(g["prompt"] in o for o in outputs)]
    if not prompts:
        return None
    table = Table(title="greedy generations (held-out Alpaca prompts)", show_lines=True)
    table.add_column("prompt", ratio=1)
    for label in labels:
        table.add_column(label, ratio=1)
    for prompt in prompts:
        table.add_row(prompt.strip(), *[o[prompt].strip() for o in outputs])
    return table


def _labels(paths: Sequence[str | Path]) -> list[str]:
    """Column labels for eval results: the run folder's name, or the file's."""
    return [Path(p).parent.name if Path(p).name == EVAL_NAME else Path(p).name for p in paths]


# ----------------------------------------------------------------------------- CLI


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `multilora eval` (TARGET or --compare)."""
    p.add_argument("target", nargs="?", default=None,
                   help="run or adapter folder, PEFT adapter folder, model folder, or 'smollm2-135m'")
    p.add_argument("--tasks", default=DEFAULT_TASKS,
                   help=f"comma-separated tasks (default: {DEFAULT_TASKS}); `multilora tasks` lists them")
    p.add_argument("--shots", type=int, default=0, help="MMLU k-shot from the dev split, 0..5 (default: 0)")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N items per task (per MMLU subject, per MultiRC question)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (default: 8)")
    p.add_argument("--model", default=None, help="base model for an adapter (default: the one it records)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--out", default=None, help="where to write eval.json (default: TARGET/eval.json, "
                   "or ./eval.json for a model name)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also record greedy outputs for N held-out Alpaca prompts (shown by --compare side by side)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generated output (default: 64)")
    p.add_argument("--save-items", action="store_true", help="keep every item's scores in eval.json")
    p.add_argument("--compare", nargs="+", metavar="RUN", default=None,
                   help="print eval.json files (or folders holding one) side by side instead of evaluating")


def _check_out(out: Path) -> None:
    """Refuse an eval.json path that cannot be written (a folder, below a file, no permission)."""
    if out.is_dir():
        raise MultiLoRAError(f"--out {out} is a folder; name a file such as {out / EVAL_NAME}")
    if out.parent.exists() and not out.parent.is_dir():
        raise MultiLoRAError(f"cannot write {out}: {out.parent} is a file, not a folder; choose another path")
    check_writable_dir(out.parent, "folder of --out")


def run_eval_cli(args: argparse.Namespace) -> None:
    """`multilora eval`: evaluate TARGET, print the table, write eval.json; or --compare results."""
    from rich.console import Console

    console = Console()
    if args.compare:
        if args.target is not None:
            raise MultiLoRAError("give either TARGET or --compare RUN..., not both")
        console.print(compare(args.compare))
        gens = generations_table([read_result(p) for p in args.compare], _labels(args.compare))
        if gens is not None:
            console.print(gens)
        return
    if args.target is None:
        raise MultiLoRAError("name what to evaluate: multilora eval TARGET --tasks ... (or --compare RUN...)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise MultiLoRAError(f"--tasks {args.tasks!r} names no task; e.g. --tasks {DEFAULT_TASKS}")
    from .tasks import get_task
    from .tasks.mmlu import MAX_SHOTS

    for task in tasks:
        get_task(task)  # fail on a typo before loading a model
    for name, value, low in (("--generate", args.generate, 0), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--shots", args.shots, 0),
                             ("--limit", 1 if args.limit is None else args.limit, 1)):
        if value < low:
            raise MultiLoRAError(f"{name} must be at least {low}, got {value}")
    if args.shots > MAX_SHOTS:
        raise MultiLoRAError(f"--shots must be 0..{MAX_SHOTS} (MMLU's dev split has {MAX_SHOTS} questions per "
                             f"subject), got {args.shots}")
    out = Path(args.out) if args.out else (Path(args.target) / EVAL_NAME if Path(args.target).is_dir()
                                           else Path(EVAL_NAME))
    _check_out(out)  # now, not after the whole evaluation
    model, tokenizer, identity = resolve_target(args.target, args.model)
    result = evaluate(model, tokenizer, tasks, shots=args.shots, limit=args.limit, batch_size=args.batch_size,
                      chat=args.chat, identity=identity, progress=True, generate=args.generate,
                      max_new_tokens=args.max_new_tokens, save_items=args.save_items)
    write_json_atomic(out, result)
    console.print(result_table(result))
    gens = generations_table([result], [identity.get("target", "output")])
    if gens is not None:
        console.print(gens)
    console.print(f"wrote {out} ({result['seconds']:.1f} s)")
