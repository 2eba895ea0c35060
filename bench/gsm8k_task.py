"""GSM8K (Cobbe et al.): loader, workflow input and the last-number scorer.

SCOREFLOW.md §4 table: the workflow and the generator get `question`; the gold is `answer` (it may
hold thousands commas); the id is `id`. §4 "Training scorers / GSM8K": the last match of
NUMBER_RE in output and gold, commas removed, as floats; 1 if they differ by at most 1e-6, else 0
(also 0 when the output holds no number).

Data: the ScoreFlow files gsm8k_{validate,test}.jsonl ({question, answer, cot, id}) and the public
layout ({question, answer: "<reasoning> #### <number>"}), whose id is "<file stem>-<line>".
Non-goals: units, words for numbers ("twelve"), fractions ("3/4" reads as its last number, 4).
"""
from __future__ import annotations

import os
import re

from bench import Problem, build_problems, check_split, field_of, no_data, read_records, resolve_data

NAME = "gsm8k"
OPERATOR_SET = "math"
NUMBER_RE = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?|\d+\.\d+")  # SCOREFLOW.md §4, verbatim
TOLERANCE = 1e-6


def load(split: str, data: str | None = None, *, strict: bool = False) -> list[Problem]:
    check_split(NAME, split)
    if data is None:
        raise no_data(NAME, split)
    path = resolve_data(NAME, split, data)
    stem = os.path.basename(path).split(".")[0]
    return build_problems(read_records(path, strict=strict), lambda rec, line: _problem(rec, f"{stem}-{line}"),
                          strict=strict)


def _problem(rec: dict, fallback_id: str) -> Problem:
    question, answer = field_of(rec, "question"), field_of(rec, "answer", (str, int, float))
    answer = str(answer)
    cot = rec.get("cot", "")
    if "####" in answer:  # public layout: the reasoning, then "#### 72"
        cot, answer = (part.strip() for part in answer.rsplit("####", 1))
    if last_number(answer) is None:
        raise ValueError(f"field 'answer' holds no number: {answer[:40]!r}")
    pid = str(rec["id"]) if "id" in rec else fallback_id
    return Problem(id=pid, question=question, input=question, gold=answer, extra={"hidden_cot": cot})


def last_number(text: str) -> float | None:
    """The last NUMBER_RE match as a float (commas removed), or None."""
    found = NUMBER_RE.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def score(answer: str, problem: Problem) -> float:
    """1.0 if the last number of `answer` is within 1e-6 of the gold's (SCOREFLOW.md §4)."""
    got, want = last_number(answer), last_number(problem.gold)
    return 1.0 if got is not None and want is not None and abs(got - want) <= TOLERANCE else 0.0
