"""Scoring a model: multiple choice by log-likelihood, response perplexity, generations, progress.

Multiple choice (docs/method.md §7). For a prompt p and a choice c = (c_1 .. c_m) (tokenized
separately, as in training):

    ll(c)      = sum_k log P(c_k | p, c_<k)          the choice's log-likelihood  -> `acc`
    ll_norm(c) = ll(c) / m                           per-token mean               -> `acc_norm`

The fast scorer feeds, per question, the rows p + c_j[:-1] (the last choice token is never an
input), dropping any row that is a prefix of another: choices that are one token (MMLU's " A" ..
" D", yes/no) share the single row p. Rows of several questions are right-padded into one batch
(padding comes after every real token, so causal attention never sees it and positions are
unchanged), and the LM head runs only at the positions that predict choice tokens
(`loss.logits_at`).
Questions whose prompts share a long prefix (k-shot MMLU: the subject header and the k examples)
are batched together and the prefix runs once, its KV cache expanded across each batch (`prefix`).

Perplexity: the summed loss of the response tokens (+ EOS) of held-out examples, prompt tokens
carrying no loss, as in training (`loss.token_losses`).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from .data import Example, MCItem, collate, encode_prompt, tokenize_example
from .errors import MultiLoRAError
from .loss import logits_at, token_losses
from .prefix import expand_kv, prefix_kv, shared_prefix_groups

PROGRESS_EVERY_S = 10.0  # without a terminal: a plain progress line at most this often


def max_length(model: nn.Module, cap: int = 4096) -> int:
    """The longest sequence the model takes (its position limit), capped at `cap`."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or cap
    return int(min(limit, cap))


def pad_id(tokenizer: Any) -> int:
    """The id used for right padding (never attended to, never scored)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


# ----------------------------------------------------------------------------- progress


class EvalProgress:
    """Progress of one scoring loop on stderr: a rich bar on a terminal, else a plain line every ~10 s.

        with EvalProgress(570, "mmlu", "items", enabled=True) as bar:
            bar.advance(8)          # no terminal: "eval mmlu: 120/570 items, 41 s" every ~10 s

    Without a terminal (a log file) a line is printed when `PROGRESS_EVERY_S` have passed since the
    last one, and once at the end. `clock` is for tests.
    """

    def __init__(self, total: int, label: str, unit: str, enabled: bool, clock: Any = time.monotonic) -> None:
        self.total, self.label, self.unit, self.enabled, self.clock = total, label, unit, enabled, clock
        self.stream = sys.stderr
        self.done = 0
        self.bar: Progress | None = None

    def __enter__(self) -> EvalProgress:
        if not self.enabled:
            return self
        self.started = self.last = self.clock()
        if self.stream.isatty():
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.bar.add_task(self.label, total=self.total)
            self.bar.start()
        return self

    def advance(self, n: int) -> None:
        """`n` more items are done."""
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.advance(self.bar.task_ids[0], n)
            return
        now = self.clock()
        if now - self.last >= PROGRESS_EVERY_S:
            self._line(now)

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled and exc_type is None:
            self._line(self.clock())

    def _line(self, now: float) -> None:
        self.last = now
        print(f"eval {self.label}: {self.done}/{self.total} {self.unit}, {now - self.started:.0f} s",
              file=self.stream, flush=True)


# ----------------------------------------------------------------------------- multiple choice


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


def _batch_inputs(plans: list[dict], batch: list[int], pad: int, prefix: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (R, T - L), attention_mask (R, T) and the scored positions (R, P) of the rows of `batch`'s questions.

    The rows' first `prefix` (L) tokens come from a cached prefix: input_ids hold what follows them
    and positions count from there; attention_mask covers the prefix too.
    """
    rows = [(i, row) for i in batch for row in plans[i]["rows"]]  # R rows
    width = max(len(row) for _, row in rows)
    # each row is scored from its question's last prompt token to its own last token
    spans = [len(row) - plans[i]["start"] for i, row in rows]
    input_ids = torch.full((len(rows), width - prefix), pad, dtype=torch.long)  # (R, T - L)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)         # (R, T)
    positions = torch.zeros((len(rows), max(spans)), dtype=torch.long)         # (R, P)
    for r, (i, row) in enumerate(rows):
        input_ids[r, : len(row) - prefix] = torch.tensor(row[prefix:])
        attention_mask[r, : len(row)] = 1
        span = torch.arange(plans[i]["start"], len(row)) - prefix
        positions[r] = torch.cat([span, span[-1:].expand(positions.shape[1] - len(span))])
    return input_ids, attention_mask, positions


def _item_scores(plan: dict, item: MCItem, logp: torch.Tensor, first_row: int) -> dict:
    """One question's result from the log-probabilities (R, P, V) of its batch; its rows start at `first_row`."""
    ll = []
    for j, tokens in enumerate(plan["choices"]):
        r = first_row + plan["choice_row"][j]
        picked = logp[r, torch.arange(len(tokens)), torch.tensor(tokens)]  # (m,)
        ll.append(float(picked.double().sum()))
    n_tokens = [len(t) for t in plan["choices"]]
    ll_norm = [v / n for v, n in zip(ll, n_tokens)]
    return {"task": item.task, "group": item.group, "gold": item.gold, "ll": ll, "ll_norm": ll_norm,
            "n_tokens": n_tokens, "pred": max(range(len(ll)), key=ll.__getitem__),
            "pred_norm": max(range(len(ll_norm)), key=ll_norm.__getitem__)}


def _batches(plans: list[dict], questions: list[int], batch_size: int) -> list[list[int]]:
    """`questions` in batches of `batch_size`, longest first (rows of similar length: less padding)."""
    order = sorted(questions, key=lambda i: -max(len(r) for r in plans[i]["rows"]))
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def score_choices(model: nn.Module, tokenizer: Any, items: Sequence[MCItem], batch_size: int = 8,
                  chat: bool = False, progress: bool = False, label: str | None = None,
                  reuse_prefix: bool = True) -> list[dict]:
    """Per item (in order): ll and ll_norm per choice, pred and pred_norm (argmax), gold, n_tokens, task, group.

    `batch_size` is the number of questions per forward pass (each brings its rows, see the module
    docstring); results do not depend on it beyond float rounding. Questions whose prompts share a
    long prefix (k-shot examples, a MultiRC passage) run it once (`prefix`), unless `reuse_prefix`
    is False or the model's cache cannot be reused; the log-likelihoods are the same to float
    rounding. `progress` shows progress on stderr under `label` (default: the first item's task).
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise MultiLoRAError(f"batch size must be a positive integer, got {batch_size!r}")
    if not items:
        return []
    max_len = max_length(model)
    bos = tokenizer.bos_token_id
    plans = [_plan(item, tokenizer, chat, max_len, bos) for item in items]
    prompts = [plan["rows"][0][: plan["start"] + 1] for plan in plans]  # every row starts with its prompt
    groups, rest = shared_prefix_groups(prompts) if reuse_prefix else ([], list(range(len(plans))))
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    out: list[dict | None] = [None] * len(items)
    was_training = model.training
    model.eval()
    try:
        with EvalProgress(len(items), label or items[0].task, "items", progress) as bar, torch.inference_mode():
            work = [(length, members) for length, members in groups] + [(0, rest)]
            while work:
                length, members = work.pop(0)
                kv = prefix_kv(model, prompts[members[0]][:length]) if length else None
                if length and kv is None:  # this model's cache cannot be reused: the plain way
                    work.append((0, members))
                    continue
                for batch in _batches(plans, members, batch_size):
                    input_ids, attention_mask, positions = _batch_inputs(plans, batch, pad, length)
                    cache = (lambda rows=input_ids.shape[0]: expand_kv(kv, rows)) if kv is not None else None
                    logits = logits_at(model, input_ids.to(device), attention_mask.to(device),
                                       positions.to(device), cache)                       # (R, P, V)
                    logp = torch.log_softmax(logits.float(), dim=-1).cpu()                 # (R, P, V)
                    first_row = 0
                    for i in batch:
                        out[i] = _item_scores(plans[i], items[i], logp, first_row)
                        first_row += len(plans[i]["rows"])
                    bar.advance(len(batch))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- perplexity and generation


def response_nll(model: nn.Module, tokenizer: Any, examples: Sequence[Example], batch_size: int = 8,
                 chat: bool = False, progress: bool = False, label: str | None = None,
                 per_item: bool = False) -> dict:
    """Summed negative log-likelihood of the response tokens (+ EOS) of `examples`, their count and perplexity.

    `per_item` adds "items": per example (in order) its summed "nll" and scored "tokens".
    """
    max_len = max_length(model, cap=2048)
    rows = [tokenize_example(ex, tokenizer, max_len, chat) for ex in examples]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    item_nll, item_tokens = [0.0] * len(rows), [0] * len(rows)
    was_training = model.training
    model.eval()
    try:
        bar = EvalProgress(len(rows), f"{label or rows[0]['task']} perplexity", "examples", progress)
        with bar, torch.inference_mode():
            for b0 in range(0, len(order), batch_size):
                index = order[b0:b0 + batch_size]
                chunk = [rows[i] for i in index]
                tasks = sorted({row["task"] for row in chunk})
                batch = {k: v.to(device) for k, v in collate(chunk, pad_id(tokenizer), tasks, multiple_of=1).items()}
                batch["task_ids"] = torch.arange(len(chunk), device=device)  # one "task" per row: per-example sums
                sums, counts = token_losses(model, batch, len(chunk))  # (B,) each
                for i, s, c in zip(index, sums.double().tolist(), counts.tolist()):
                    item_nll[i], item_tokens[i] = s, int(c)
                bar.advance(len(chunk))
    finally:
        model.train(was_training)
    nll, count = math.fsum(item_nll), sum(item_tokens)
    out = {"nll": nll, "tokens": count, "nll_per_token": nll / max(count, 1),
           "perplexity": math.exp(nll / count) if count else float("nan")}
    if per_item:
        out["items"] = [{"nll": v, "tokens": n} for v, n in zip(item_nll, item_tokens)]
    return out


def generate_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64,
                   chat: bool = False, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[dict]:
    """Continuations of `prompts`, one at a time (no padding): [{"prompt", "output", "new_tokens", "stop"}].

    Greedy when `temperature` is 0, else sampled from softmax(logits / temperature) cut to the
    smallest set of tokens holding `top_p` of the probability (no top-k). Prompt i is sampled with
    the seed `seed + i` in a forked RNG, so an output depends only on (model, prompt, settings, seed, i)
    and the caller's random state is left as it was. `stop` is "eos" or "length". A prompt too long
    for the model's positions loses its oldest tokens (after BOS), as in training.
    """
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise MultiLoRAError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise MultiLoRAError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise MultiLoRAError(f"top_p must be in (0, 1], got {top_p!r}")
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    room = max_length(model) - max_new_tokens  # prompt tokens that fit
    if room < 1:
        raise MultiLoRAError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                             f"{max_length(model)} positions; ask for fewer tokens")
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0} \
        if temperature > 0 else {"do_sample": False}
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i, prompt in enumerate(prompts):
                ids = encode_prompt(prompt, tokenizer, chat)
                if len(ids) > room:
                    keep_bos = 1 if ids[:1] == [tokenizer.bos_token_id] else 0
                    ids = ids[:keep_bos] + ids[len(ids) - room + keep_bos:]
                ids_t = torch.tensor([ids], device=device)  # (1, T)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(seed + i)
                    new = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), pad_token_id=pad,
                                         max_new_tokens=max_new_tokens, **sampling)[0, ids_t.shape[1]:]  # (N,)
                stop = "eos" if new.numel() and int(new[-1]) in eos_ids else "length"
                out.append({"prompt": prompt, "output": tokenizer.decode(new, skip_special_tokens=True),
                            "new_tokens": int(new.numel()), "stop": stop})
    finally:
        model.train(was_training)
    return out


def generate_samples(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64,
                     chat: bool = False) -> list[dict]:
    """Greedy continuations of `prompts` (one at a time, no padding): [{"prompt", "output"}]."""
    return [{"prompt": row["prompt"], "output": row["output"]}
            for row in generate_texts(model, tokenizer, prompts, max_new_tokens, chat)]
