"""Examples, prompt rendering, tokenization with response-only labels, padding, and the task mixture.

A training example is (task, prompt, response); the loss covers the response tokens (and EOS)
only. Prompt and response are tokenized separately, so the evaluator, which scores each choice
as a continuation of the prompt, sees exactly the token boundary training saw.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .errors import MultiLoRAError

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)
STRATEGIES = ("proportional", "temperature", "uniform", "weights")
BUNDLED = Path(__file__).resolve().parent / "bundled"  # the public data shipped in the package


@dataclass(frozen=True)
class Example:
    """One training example: the loss covers `response` (plus EOS), never `prompt`.

    A chat example also holds `messages` ((role, content) pairs): it is rendered by the tokenizer's
    chat template and the loss covers every assistant turn (`prompt`/`response` then only describe it).
    """

    task: str
    prompt: str
    response: str
    messages: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item, scored by the log-likelihood of each choice after `prompt`.

    Choices start with the separator a response would (" yes"); `group` ties the items of one
    question together where a metric needs it (MultiRC: exact match per question).
    """

    task: str
    prompt: str
    choices: list[str]
    gold: int
    group: str | None = None

    def example(self) -> Example:
        """The training example with the same prompt: response = the gold choice."""
        return Example(self.task, self.prompt, self.choices[self.gold])


def data_root() -> Path:
    """The data folder the tasks read: `$MULTILORA_DATA` if set, else the copy shipped in the package (`bundled/`).

    Either holds alpaca/, mmlu/ and superglue/ (see bundled/README.md for sources and licenses).
    """
    env = os.environ.get("MULTILORA_DATA")
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise MultiLoRAError(f"$MULTILORA_DATA={env} is not a folder; point it at the folder "
                                 "holding alpaca/, mmlu/ and superglue/ (or unset it to use the bundled data)")
        return root
    if not BUNDLED.is_dir():
        raise MultiLoRAError(f"bundled data folder not found at {BUNDLED} (an incomplete install?); reinstall "
                             "multilora or set $MULTILORA_DATA to the folder holding alpaca/, mmlu/ and superglue/")
    return BUNDLED


def data_file(relative: str, root: str | Path | None = None) -> Path:
    """`root / relative`, or its gzipped copy `relative + ".gz"` (root defaults to `data_root()`).

    A MultiLoRAError names the plain path if neither exists.
    """
    path = Path(root if root is not None else data_root()) / relative
    if path.is_file():
        return path
    packed = path.with_name(path.name + ".gz")
    if packed.is_file():
        return packed
    raise MultiLoRAError(f"{path}: data file not found (nor {packed.name}); check the data root "
                         "(set $MULTILORA_DATA to the folder holding alpaca/, mmlu/, superglue/)")


def split_bucket(key: str) -> int:
    """A stable bucket 0..99 for `key` (SHA-256, independent of file order and Python's hash seed)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100


# ----------------------------------------------------------------------------- prompts and tokens


def render(prompt: str, tokenizer: Any, chat: bool) -> str:
    """The prompt as the model sees it: unchanged, or wrapped in the tokenizer's chat template."""
    if not chat:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise MultiLoRAError("chat templates are on but this tokenizer has no chat_template; "
                             "turn chat off or use a model that ships one")
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token first when asked for special tokens (Llama does, GPT-2 not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def encode_prompt(prompt: str, tokenizer: Any, chat: bool = False) -> list[int]:
    """Token ids of the rendered prompt, with BOS first exactly when the tokenizer would add one."""
    ids = tokenizer(render(prompt, tokenizer, chat), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if adds_bos(tokenizer) and ids[:1] != [bos]:  # a chat template may already start with BOS
        ids = [bos] + ids
    return ids


def tokenize_example(ex: Example, tokenizer: Any, max_len: int, chat: bool = False, truncate: bool = False) -> dict:
    """input_ids = prompt + response + EOS; labels = -100 on the prompt; the prompt loses its left end if too long.

    A response that does not fit in `max_len` is an error, or with `truncate` (training) the row is
    cut to `max_len` tokens keeping up to half the window of prompt.
    """
    if ex.messages is not None:
        return tokenize_chat(ex, tokenizer, max_len, truncate)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MultiLoRAError("the tokenizer has no eos_token; set one (tokenizer.eos_token = ...)")
    prompt = encode_prompt(ex.prompt, tokenizer, chat)
    response = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [eos]
    if not prompt:
        raise MultiLoRAError(f"task {ex.task!r}: empty prompt; every example needs prompt text")
    keep_bos = 1 if adds_bos(tokenizer) else 0
    room = max_len - len(response)  # tokens left for the prompt
    if room < keep_bos + 1:
        if truncate:  # keep the end of the prompt (up to half the window) and the start of the response
            start = len(prompt) - min(len(prompt), max_len // 2)
            ids, labels = prompt + response, [IGNORE] * len(prompt) + response
            return {"input_ids": ids[start:start + max_len], "labels": labels[start:start + max_len], "task": ex.task}
        raise MultiLoRAError(
            f"task {ex.task!r}: the response needs {len(response)} tokens (with EOS) and the prompt "
            f"at least {keep_bos + 1}, but max_len is {max_len}; raise max_len or shorten the response")
    if len(prompt) > room:  # keep BOS, drop the oldest prompt tokens
        prompt = prompt[:keep_bos] + prompt[len(prompt) - room + keep_bos:]
    return {"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response, "task": ex.task}


def chat_segments(messages: Sequence[tuple[str, str]], tokenizer: Any, task: str = "chat") -> list[tuple[str, bool]]:
    """The conversation rendered by the chat template as (text, trained) pieces; trained = an assistant turn.

    Each assistant turn is the text its message adds after the prompt that asks for it
    (`add_generation_prompt`), so the turn's end-of-turn marker is trained and the role header is not.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise MultiLoRAError(f"task {task!r} is a chat task but this tokenizer has no chat_template; "
                             "use a model that ships one or set tokenizer.chat_template")

    def text(upto: int, ask: bool) -> str:
        msgs = [{"role": role, "content": content} for role, content in messages[:upto]]
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=ask, tokenize=False)
        except Exception as e:  # the template's own checks (jinja raises, e.g. "roles must alternate")
            raise MultiLoRAError(f"task {task!r}: the chat template refused a conversation ({type(e).__name__}: "
                                 f"{str(e)[:200]}); fix the messages or use another template") from None

    if messages and messages[0][0] == "assistant":
        raise MultiLoRAError(f"task {task!r}: a conversation starts with an assistant message; put a user (or "
                             "system) message first")

    pieces, done = [], ""
    for k, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before, after = text(k, True), text(k + 1, False)
        if not (before.startswith(done) and after.startswith(before)):
            raise MultiLoRAError(f"task {task!r}: the chat template does not render the conversation turn by "
                                 "turn (an earlier turn's text changes later), so assistant turns cannot be "
                                 "masked; use another template or the instruction format")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    rest = text(len(messages), False)
    if rest.startswith(done) and len(rest) > len(done):
        pieces.append((rest[len(done):], False))
    return [(t, trained) for t, trained in pieces if t]


def tokenize_chat(ex: Example, tokenizer: Any, max_len: int, truncate: bool = False) -> dict:
    """A chat example: the chat template's tokens; labels = the tokens themselves on assistant turns, -100 elsewhere.

    Pieces are tokenized one by one (as prompt and response are), BOS first when the tokenizer adds one.
    A row longer than `max_len` loses its oldest tokens (after BOS); if no assistant token would be
    left it keeps its first `max_len` tokens instead (with `truncate`), else it is an error.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in chat_segments(ex.messages or (), tokenizer, ex.task):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    bos = tokenizer.bos_token_id
    keep_bos = 1 if adds_bos(tokenizer) else 0
    if keep_bos and ids[:1] != [bos]:
        ids, labels = [bos] + ids, [IGNORE] + labels
    if len(ids) > max_len:
        cut = len(ids) - max_len
        tail_ids, tail_labels = ids[:keep_bos] + ids[keep_bos + cut:], labels[:keep_bos] + labels[keep_bos + cut:]
        if any(label != IGNORE for label in tail_labels):
            ids, labels = tail_ids, tail_labels
        elif truncate:
            ids, labels = ids[:max_len], labels[:max_len]
        else:
            raise MultiLoRAError(f"task {ex.task!r}: the conversation needs {len(ids)} tokens and its last "
                                 f"assistant turn does not fit in {max_len}; raise max_len or shorten it")
    if all(label == IGNORE for label in labels):
        raise MultiLoRAError(f"task {ex.task!r}: a conversation has no assistant text to train on; "
                             "every conversation needs an assistant message")
    return {"input_ids": ids, "labels": labels, "task": ex.task}


def collate(batch: Sequence[Mapping], pad_id: int, task_names: Sequence[str],
            multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad a list of `tokenize_example` outputs to a multiple of `multiple_of`; task_ids index `task_names`."""
    if pad_id is None:
        raise MultiLoRAError("no pad token id; pass the tokenizer's pad_token_id or, if it has none, its eos_token_id")
    index = {name: i for i, name in enumerate(task_names)}
    longest = max(len(row["input_ids"]) for row in batch)
    width = -(-longest // multiple_of) * multiple_of
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)   # (B, T)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)      # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)     # (B, T)
    for b, row in enumerate(batch):
        n = len(row["input_ids"])
        input_ids[b, :n] = torch.tensor(row["input_ids"])
        labels[b, :n] = torch.tensor(row["labels"])
        attention_mask[b, :n] = 1
    task_ids = torch.tensor([index[row["task"]] for row in batch], dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "task_ids": task_ids}


# ----------------------------------------------------------------------------- the mixture


def mixture_probs(sizes: Mapping[str, int], strategy: str = "proportional", temperature: float = 2.0,
                  weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Task probabilities: proportional n_t, temperature n_t^(1/T), uniform, or explicit weights (normalised)."""
    if not sizes:
        raise MultiLoRAError("the mixture has no tasks; name at least one task")
    empty = [t for t, n in sizes.items() if n <= 0]
    if empty:
        raise MultiLoRAError(f"task(s) {', '.join(empty)} have no examples; remove them from the mixture "
                             "or check their data")
    if strategy not in STRATEGIES:
        raise MultiLoRAError(f"unknown mixture strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if weights is not None and strategy != "weights":
        raise MultiLoRAError(f"mixture weights given but strategy is {strategy!r}; set strategy: weights")
    if strategy == "proportional":
        raw = {t: float(n) for t, n in sizes.items()}
    elif strategy == "temperature":
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise MultiLoRAError(f"mixture temperature must be a positive number, got {temperature!r}")
        raw = {t: float(n) ** (1.0 / temperature) for t, n in sizes.items()}
    elif strategy == "uniform":
        raw = {t: 1.0 for t in sizes}
    else:
        weights = weights or {}
        unknown = sorted(set(weights) - set(sizes))
        missing = [t for t in sizes if t not in weights]
        bad = [f"{t}={w!r}" for t, w in weights.items()
               if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)]
        problems = []
        if unknown:
            problems.append(f"unknown task(s) in weights: {', '.join(unknown)} (mixture tasks: {', '.join(sizes)})")
        if missing:
            problems.append(f"no weight for {', '.join(missing)}")
        if bad:
            problems.append(f"weights must be positive numbers: {', '.join(bad)}")
        if problems:
            raise MultiLoRAError("; ".join(problems) + "; give one positive weight per mixture task")
        raw = {t: float(weights[t]) for t in sizes}
    total = sum(raw.values())
    return {t: v / total for t, v in raw.items()}


def _uniform(seed: int, n: int) -> float:
    """The n-th number in [0, 1) of the stream `seed` (a hash, so any position is computed directly)."""
    digest = hashlib.blake2b(f"{seed}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class MixtureSampler:
    """Endless, seeded stream of (task, index) draws; resumable from `state_dict()`.

    Draw n picks task t with probability p_t (see `mixture_probs`) from a hash of (seed, n);
    within a task, indices follow a fresh seeded permutation each epoch over that task.
    The state is the seed, the number of draws and the per-task counts.
    """

    def __init__(self, sizes: Mapping[str, int], strategy: str = "proportional", temperature: float = 2.0,
                 weights: Mapping[str, float] | None = None, seed: int = 0) -> None:
        self.sizes = dict(sizes)
        self.probs = mixture_probs(self.sizes, strategy, temperature, weights)
        self.tasks = list(self.sizes)
        self._cum = list(itertools.accumulate(self.probs[t] for t in self.tasks))
        self.seed = int(seed)
        self.draws = 0
        self.counts = {t: 0 for t in self.tasks}
        self._perm: dict[str, tuple[int, list[int]]] = {}  # task -> (epoch, permutation)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return self

    def __next__(self) -> tuple[str, int]:
        i = min(bisect.bisect_right(self._cum, _uniform(self.seed, self.draws)), len(self.tasks) - 1)
        task = self.tasks[i]
        epoch, pos = divmod(self.counts[task], self.sizes[task])
        if self._perm.get(task, (None,))[0] != epoch:
            order = list(range(self.sizes[task]))
            random.Random(f"{self.seed}:{task}:{epoch}").shuffle(order)
            self._perm[task] = (epoch, order)
        self.counts[task] += 1
        self.draws += 1
        return task, self._perm[task][1][pos]

    def state_dict(self) -> dict:
        """The position in the stream (JSON-serialisable)."""
        return {"seed": self.seed, "draws": self.draws, "counts": dict(self.counts),
                "sizes": dict(self.sizes), "probs": dict(self.probs)}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue the stream saved by `state_dict()`; the mixture must be the same."""
        same = dict(state["sizes"]) == self.sizes and all(
            math.isclose(state["probs"].get(t, -1.0), p, rel_tol=1e-9) for t, p in self.probs.items())
        if not same:
            raise MultiLoRAError(f"the saved sampler state mixes {dict(state['sizes'])} with probabilities "
                                 f"{state['probs']}, this run {self.sizes} with {self.probs}; resume with "
                                 "the same tasks, data and mixture settings")
        self.seed, self.draws = int(state["seed"]), int(state["draws"])
        self.counts = {t: int(state["counts"][t]) for t in self.tasks}
        self._perm = {}
