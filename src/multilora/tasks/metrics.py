"""Metrics of multiple-choice tasks, from the per-item scores `scoring.score_choices` returns.

Each score is a dict with ll and ll_norm per choice, pred and pred_norm (their argmax), gold, task
and group. Every task reports accuracy (and acc_norm) with its chance level mean(1 / choices);
the registry (`tasks.TASKS`) names which function a task uses:

    accuracy        acc, acc_norm, chance, n
    multirc         accuracy + F1a over all answers and exact match per question (group)
    mmlu_metrics    accuracy + each subject, the four Hendrycks categories, macro over subjects

`exact_match` scores greedy outputs against answers (own tasks with metric: exact_match).
"""

from __future__ import annotations

import math
import string
from typing import Any, Iterable, Sequence

from .mmlu import CATEGORY, CATEGORY_SUBJECTS

_PUNCTUATION = frozenset(string.punctuation)


def mean(values: Iterable[float]) -> float:
    """The mean, or NaN for no values."""
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def accuracy(scores: Sequence[dict]) -> dict:
    """acc (sum log-likelihood), acc_norm (per-token mean), chance (mean of 1/choices), n."""
    return {"acc": mean(s["pred"] == s["gold"] for s in scores),
            "acc_norm": mean(s["pred_norm"] == s["gold"] for s in scores),
            "chance": mean(1.0 / len(s["ll"]) for s in scores), "n": len(scores)}


def multirc_metrics(scores: Sequence[dict], key: str = "pred") -> dict:
    """MultiRC: F1a over all answers (positive = choice 1, " yes") and EM per question (group)."""
    tp = sum(1 for s in scores if s[key] == 1 and s["gold"] == 1)
    fp = sum(1 for s in scores if s[key] == 1 and s["gold"] != 1)
    fn = sum(1 for s in scores if s[key] != 1 and s["gold"] == 1)
    f1a = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    groups: dict[Any, list[dict]] = {}
    for s in scores:
        groups.setdefault(s["group"], []).append(s)
    em = mean(all(s[key] == s["gold"] for s in g) for g in groups.values())
    positive = sum(s["gold"] == 1 for s in scores) / len(scores) if scores else 0.0  # share of true answers
    return {
        "f1a": f1a, "em": em, "questions": len(groups),
        # always answering "yes": precision = share of true answers, recall = 1
        "f1a_chance": 2 * positive / (1 + positive),
        # guessing each answer at random: a question is exact with probability prod 1/choices
        "em_chance": mean(math.prod(1.0 / len(s["ll"]) for s in g) for g in groups.values()),
    }


def multirc(scores: Sequence[dict]) -> dict:
    """MultiRC's metrics: accuracy, F1a and EM (by ll), and F1a by the per-token mean (f1a_norm)."""
    return {**accuracy(scores), **multirc_metrics(scores), "f1a_norm": multirc_metrics(scores, "pred_norm")["f1a"]}


def mmlu_metrics(scores: Sequence[dict]) -> dict:
    """MMLU: per subject, per category (micro within it, macro over its subjects) and overall macro/micro."""
    by_subject: dict[str, list[dict]] = {}
    for s in scores:
        by_subject.setdefault(s["task"].removeprefix("mmlu_"), []).append(s)
    subjects = {name: {**accuracy(ss), "category": CATEGORY.get(name, "other")}
                for name, ss in by_subject.items()}
    categories = {}
    for cat in CATEGORY_SUBJECTS:
        names = [n for n in subjects if subjects[n]["category"] == cat]
        if names:
            inside = [s for n in names for s in by_subject[n]]
            categories[cat] = {**accuracy(inside), "acc_macro": mean(subjects[n]["acc"] for n in names),
                               "subjects": len(names)}
    overall = accuracy(scores)
    return {**overall, "acc_macro": mean(v["acc"] for v in subjects.values()),
            "acc_norm_macro": mean(v["acc_norm"] for v in subjects.values()),
            "categories": categories, "subjects": subjects}


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(outputs: Sequence[str], answers: Sequence[str]) -> float:
    """Share of outputs whose first line equals the answer after `normalize_answer`."""
    hits = [normalize_answer(out.strip().split("\n")[0]) == normalize_answer(ans) for out, ans in zip(outputs, answers)]
    return mean(hits)
