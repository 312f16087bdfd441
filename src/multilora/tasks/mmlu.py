"""MMLU (Hendrycks et al.): 57 subjects, four options, answer letter; splits dev (5 per subject), val, test.

Prompt (the original evaluation format; k solved dev questions of the same subject first):

    The following are multiple choice questions (with answers) about {subject, "_" -> " "}.\\n\\n
    {dev question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n     (k times)
    {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:

Choices " A", " B", " C", " D"; the response is the gold one. Task name "mmlu" for all subjects,
"mmlu_<subject>" for one. The demo trains on val (0-shot) and evaluates on test.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..data import Example, MCItem, data_file
from ..errors import MultiLoRAError
from .custom import check_split, label_index, read_rows

SPLITS = ("dev", "val", "test")
LETTERS = ("A", "B", "C", "D")
COLUMNS = ("question", "A", "B", "C", "D", "answer")
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)
MAX_SHOTS = 5  # the dev split holds 5 questions per subject

# Hendrycks et al.'s subject -> category mapping (their categories.py, subcategories folded in).
CATEGORY_SUBJECTS = {
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
CATEGORY: dict[str, str] = {s: cat for cat, subjects in CATEGORY_SUBJECTS.items() for s in subjects}


def question_text(row: dict) -> str:
    """One question with its options, ending in "Answer:" (no answer)."""
    options = "".join(f"\n{letter}. {row[letter]}" for letter in LETTERS)
    return f"{row['question']}{options}\nAnswer:"


def _rows(subject: str, split: str, root: str | Path | None) -> list[dict]:
    rows = []
    for where, row in read_rows(data_file(f"mmlu/{split}/{subject}_{split}.csv", root), COLUMNS):
        label_index(row["answer"], LETTERS, where, "answer")
        rows.append(row)
    return rows


def _subjects(subject: str | None) -> tuple[str, ...]:
    if subject is None:
        return SUBJECTS
    if subject not in SUBJECTS:
        close = difflib.get_close_matches(subject, SUBJECTS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise MultiLoRAError(f"unknown MMLU subject {subject!r}; {hint}subjects: {', '.join(SUBJECTS)}")
    return (subject,)


def items(split: str = "test", root: str | Path | None = None, k: int = 0,
          subject: str | None = None) -> list[MCItem]:
    """Items of one split (all subjects, or one), each with k solved dev questions of its subject first."""
    task = "mmlu" if subject is None else f"mmlu_{subject}"
    check_split(task, split, SPLITS)
    if not (isinstance(k, int) and 0 <= k <= MAX_SHOTS):
        raise MultiLoRAError(f"MMLU k-shot must be 0..{MAX_SHOTS} (the dev split has {MAX_SHOTS} "
                             f"per subject), got {k!r}")
    choices = [f" {letter}" for letter in LETTERS]
    out = []
    for name in _subjects(subject):
        header = f"The following are multiple choice questions (with answers) about {name.replace('_', ' ')}.\n\n"
        dev = _rows(name, "dev", root) if k else []
        for row in _rows(name, split, root):
            shots = [d for d in dev if d != row][:k]  # a dev question is never its own shot
            context = "".join(f"{question_text(d)} {d['answer']}\n\n" for d in shots)
            out.append(MCItem(task, header + context + question_text(row), choices, LETTERS.index(row["answer"])))
    return out


def examples(split: str = "val", root: str | Path | None = None, k: int = 0,
             subject: str | None = None) -> list[Example]:
    """Training examples: the items' prompts with the gold letter as response."""
    return [item.example() for item in items(split, root, k, subject)]
