"""HotpotQA (Yang et al.): loader, workflow input and the token-F1 scorer.

SCOREFLOW.md §4 table: the workflow gets a lead-in (a request for a step-by-step solution) + the
question + the context, one line per paragraph: "title: " and the sentences joined with no
separator; the generator sees `question`; the gold is `answer`; the id is `_id`. §4 "Training
scorers / HotpotQA": the DROP token F1 against `answer`.

Data: hotpotqa_validate.jsonl of the ScoreFlow copy and the public distractor json (a list of the
same records). The ScoreFlow copy has no test split (SCOREFLOW.md §8): pass your own with --data.
Non-goals: the supporting-fact metrics (the paper scores the answer only).
"""
from __future__ import annotations

from bench import Problem, build_problems, check_split, field_of, no_data, read_records, resolve_data
from bench.drop_task import token_f1

NAME = "hotpotqa"
OPERATOR_SET = "qa"
LEAD_IN = ("Answer the question using the context below. Work through it step by step, "
           "then give the final answer as a short phrase.")


def load(split: str, data: str | None = None, *, strict: bool = False) -> list[Problem]:
    check_split(NAME, split)
    if data is None:
        raise no_data(NAME, split)
    path = resolve_data(NAME, split, data)
    return build_problems(read_records(path, strict=strict), _problem, strict=strict)


def _problem(rec: dict, line: int) -> Problem:
    question, answer = field_of(rec, "question"), field_of(rec, "answer")
    lines = []
    for k, paragraph in enumerate(field_of(rec, "context", list)):
        if not (isinstance(paragraph, list) and len(paragraph) == 2 and isinstance(paragraph[0], str)
                and isinstance(paragraph[1], list)):
            raise TypeError(f"field 'context'[{k}] should be [title, [sentences]], got {str(paragraph)[:60]!r}")
        lines.append(f"{paragraph[0]}: " + "".join(paragraph[1]))
    context = "\n".join(lines)
    return Problem(id=str(field_of(rec, "_id", (str, int))), question=question,
                   input=f"{LEAD_IN}\n\nQuestion: {question}\n\nContext:\n{context}", gold=answer,
                   extra={"context": context, "type": rec.get("type"), "level": rec.get("level")})


def score(answer: str, problem: Problem) -> float:
    """Token F1 of the answer against `answer` (SCOREFLOW.md §4)."""
    return token_f1(answer, problem.gold)
