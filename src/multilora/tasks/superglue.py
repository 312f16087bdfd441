"""SuperGLUE tasks as prompts whose response is a short label word (the first choice listed is gold 0).

    boolq    {passage}\\nQuestion: {question}?\\nAnswer:                                  " no" | " yes"
    cb       {premise}\\nQuestion: {hypothesis}. True, False, or
             Neither?\\nAnswer:                                          " True" | " False" | " Neither"
    copa     Premise: {premise}\\nWhat was the cause?\\nOption 1: {choice1}\\nOption 2: {choice2}\\nAnswer:
             ("What happened as a result?" for effect questions)                         " 1" | " 2"
    rte      {premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:                  " True" | " False"
    wic      Sentence 1: {s1}\\nSentence 2: {s2}\\nQuestion: Is the word '{word}' used in the same way
             in the two sentences above?\\nAnswer:                                          " no" | " yes"
    wsc      Passage: {text}\\nQuestion: In the passage above, does the pronoun "{span2}" refer to
             "{span1}"?\\nAnswer:                                                           " no" | " yes"
    multirc  {passage}\\nQuestion: {question}\\nCandidate answer: {answer}\\nIs the candidate answer
             correct?\\nAnswer:                                                             " no" | " yes"

CB: entailment -> True, contradiction -> False, neutral -> Neither; RTE: entailment -> True.
COPA answers with the option number, so both choices are one short token and no length bias enters.
MultiRC yields one item per (passage, question, answer) with group "<passage idx>:<question idx>",
for exact match per question and F1 over answers.
Splits: train and val (the SuperGLUE validation set). BoolQ ships only val.jsonl here: a row goes
to "val" when `split_bucket(passage) < 20` (about 20%, whole passages on one side), else "train".
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..data import Example, MCItem, data_file, split_bucket
from .custom import check_split, label_index, need, read_rows

SPLITS = ("train", "val")
BOOLQ_VAL_PERCENT = 20
NO_YES = [" no", " yes"]


def boolq(row: dict, where: str) -> list[MCItem]:
    """BoolQ: does the passage answer the question with yes?"""
    gold = label_index(need(row, "label", where, (object,)), (False, True), where)
    prompt = f"{need(row, 'passage', where)}\nQuestion: {need(row, 'question', where)}?\nAnswer:"
    return [MCItem("boolq", prompt, NO_YES, gold)]


def cb(row: dict, where: str) -> list[MCItem]:
    """CommitmentBank: does the premise entail, contradict or leave open the hypothesis?"""
    gold = label_index(need(row, "label", where, (object,)), ("entailment", "contradiction", "neutral"), where)
    prompt = (f"{need(row, 'premise', where)}\nQuestion: {need(row, 'hypothesis', where)}. "
              "True, False, or Neither?\nAnswer:")
    return [MCItem("cb", prompt, [" True", " False", " Neither"], gold)]


def copa(row: dict, where: str) -> list[MCItem]:
    """COPA: which option is the cause (or effect) of the premise? Answered with its number."""
    gold = label_index(need(row, "label", where, (object,)), (0, 1), where)
    kind = label_index(need(row, "question", where), ("cause", "effect"), where, "question")
    ask = ("What was the cause?", "What happened as a result?")[kind]
    prompt = (f"Premise: {need(row, 'premise', where)}\n{ask}\nOption 1: {need(row, 'choice1', where)}\n"
              f"Option 2: {need(row, 'choice2', where)}\nAnswer:")
    return [MCItem("copa", prompt, [" 1", " 2"], gold)]


def rte(row: dict, where: str) -> list[MCItem]:
    """RTE: does the premise entail the hypothesis?"""
    gold = label_index(need(row, "label", where, (object,)), ("entailment", "not_entailment"), where)
    prompt = f"{need(row, 'premise', where)}\nQuestion: {need(row, 'hypothesis', where)} True or False?\nAnswer:"
    return [MCItem("rte", prompt, [" True", " False"], gold)]


def wic(row: dict, where: str) -> list[MCItem]:
    """WiC: is the word used in the same sense in both sentences?"""
    gold = label_index(need(row, "label", where, (object,)), (False, True), where)
    prompt = (f"Sentence 1: {need(row, 'sentence1', where)}\nSentence 2: {need(row, 'sentence2', where)}\n"
              f"Question: Is the word '{need(row, 'word', where)}' used in the same way in the two "
              "sentences above?\nAnswer:")
    return [MCItem("wic", prompt, NO_YES, gold)]


def wsc(row: dict, where: str) -> list[MCItem]:
    """WSC: does the pronoun (span 2) refer to span 1?"""
    gold = label_index(need(row, "label", where, (object,)), (False, True), where)
    target = need(row, "target", where, (dict,))
    prompt = (f"Passage: {need(row, 'text', where)}\nQuestion: In the passage above, does the pronoun "
              f"\"{need(target, 'span2_text', where + ' target')}\" refer to "
              f"\"{need(target, 'span1_text', where + ' target')}\"?\nAnswer:")
    return [MCItem("wsc", prompt, NO_YES, gold)]


def multirc(row: dict, where: str) -> list[MCItem]:
    """MultiRC: one item per (passage, question, candidate answer): is the answer correct?"""
    passage = need(row, "passage", where, (dict,))
    text = need(passage, "text", f"{where} passage")
    out = []
    for qi, q in enumerate(need(passage, "questions", f"{where} passage", (list,))):
        q_where = f"{where} passage.questions[{qi}]"
        question = need(q, "question", q_where)
        group = f"{row.get('idx', where)}:{q.get('idx', qi)}"
        for ai, a in enumerate(need(q, "answers", q_where, (list,))):
            a_where = f"{q_where}.answers[{ai}]"
            gold = label_index(need(a, "label", a_where, (object,)), (0, 1), a_where)
            prompt = (f"{text}\nQuestion: {question}\nCandidate answer: {need(a, 'text', a_where)}\n"
                      "Is the candidate answer correct?\nAnswer:")
            out.append(MCItem("multirc", prompt, NO_YES, gold, group))
    return out


TASKS: dict[str, tuple[str, Callable[[dict, str], list[MCItem]]]] = {
    "boolq": ("BoolQ", boolq), "cb": ("CB", cb), "copa": ("COPA", copa), "rte": ("RTE", rte),
    "wic": ("WiC", wic), "wsc": ("WSC", wsc), "multirc": ("MultiRC", multirc),
}


def source(task: str, split: str) -> str:
    """The bundled file a task's split is read from, relative to the data root."""
    folder = TASKS[task][0]
    return f"superglue/{folder}/{'val' if task == 'boolq' else split}.jsonl"


def items(task: str, split: str = "val", root: str | Path | None = None) -> list[MCItem]:
    """Multiple-choice items of one SuperGLUE task and split."""
    check_split(task, split, SPLITS)
    build = TASKS[task][1]
    out = []
    for where, row in read_rows(data_file(source(task, split), root)):
        if task == "boolq" and (split_bucket(need(row, "passage", where)) < BOOLQ_VAL_PERCENT) != (split == "val"):
            continue
        out.extend(build(row, where))
    return out


def examples(task: str, split: str = "train", root: str | Path | None = None) -> list[Example]:
    """Training examples: the items' prompts with the gold label word as response."""
    return [item.example() for item in items(task, split, root)]
