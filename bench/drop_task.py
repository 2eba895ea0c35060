"""DROP (Dua et al.): loader, workflow input and the token-F1 scorer.

SCOREFLOW.md §4 table: the workflow gets a lead-in (a request for a step-by-step solution) + the
question + the passage; the generator sees the question alone; golds are `ref_text` split on "|";
the id is `id`. The question and passage are cut out of `context` at "Passage:", "Question:" and
"Answer:". §4 "Training scorers / DROP": normalise (lowercase, drop ASCII punctuation, whole-word
a/an/the to a space, collapse whitespace); F1 on token multisets (0 with no overlap, else
2PR/(P+R)); the score is the max over each non-blank gold and each "|"-part of the output.

Data: the ScoreFlow files drop_{validate,test}.jsonl ({context, completion, ref_text, id}) and the
public DROP json ({passage_id: {passage, qa_pairs: [{question, answer, validated_answers,
query_id}]}}), where an answer is its number, its date as "day month year", or its spans joined
with " and ", and the golds are the distinct answers.
Non-goals: DROP's official number-aware multi-span alignment metric (the paper trains on this F1).
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter

from bench import (Problem, bad_record, build_problems, check_split, field_of, no_data, read_records,
                   resolve_data)

NAME = "drop"
OPERATOR_SET = "qa"
LEAD_IN = ("Read the passage and answer the question. Work through it step by step, "
           "then give the final answer as a short phrase or number.")


def load(split: str, data: str | None = None, *, strict: bool = False) -> list[Problem]:
    check_split(NAME, split)
    if data is None:
        raise no_data(NAME, split)
    path = resolve_data(NAME, split, data)
    if path.endswith(".json"):
        return _public(path, strict)
    return build_problems(read_records(path, strict=strict), _problem, strict=strict)


def _problem(rec: dict, line: int) -> Problem:
    """ScoreFlow layout: {context: "Passage: ...\nQuestion: ...\nAnswer:", ref_text, id}."""
    context = field_of(rec, "context")
    cuts = [context.find("Passage:"), context.rfind("Question:"), context.rfind("Answer:")]
    if min(cuts) < 0 or not cuts[0] < cuts[1] < cuts[2]:
        raise ValueError("field 'context' is not 'Passage: ... Question: ... Answer:'")
    passage = context[cuts[0] + len("Passage:"):cuts[1]].strip()
    question = context[cuts[1] + len("Question:"):cuts[2]].strip()
    return _make(str(field_of(rec, "id", (int, str))), question, passage, field_of(rec, "ref_text"))


def _public(path: str, strict: bool) -> list[Problem]:
    """Public DROP json: {passage_id: {passage, qa_pairs: [...]}}; a bad question is reported as
    path:passage_id/query_id and skipped."""
    with open(path, encoding="utf-8") as f:
        try:
            passages = json.load(f)
        except json.JSONDecodeError as e:
            bad_record(path, e.lineno, f"not valid JSON: {e.msg}", strict)
            return []
    if not isinstance(passages, dict):
        raise ValueError(f"{path}: expected the DROP object {{passage_id: {{passage, qa_pairs}}}}, "
                         f"got {type(passages).__name__}")
    out = []
    for pid, item in passages.items():
        for k, qa in enumerate(item.get("qa_pairs", []) if isinstance(item, dict) else [None]):
            try:
                passage = field_of(item, "passage")
                golds = [_answer_text(a) for a in [qa["answer"]] + list(qa.get("validated_answers", []))]
                golds = list(dict.fromkeys(g for g in golds if g.strip()))
                out.append(_make(str(qa["query_id"]), field_of(qa, "question"), passage, "|".join(golds)))
            except KeyError as e:
                bad_record(path, f"{pid}/qa_pairs[{k}]", f"missing field {e.args[0]!r}", strict)
            except (TypeError, ValueError, AttributeError) as e:
                bad_record(path, f"{pid}/qa_pairs[{k}]", f"{e}", strict)
    return out


def _answer_text(answer: dict) -> str:
    if str(answer.get("number", "")).strip():
        return str(answer["number"]).strip()
    spans = [s for s in answer.get("spans", []) if s.strip()]
    if spans:
        return " and ".join(spans)
    date = answer.get("date", {})
    return " ".join(str(date.get(k, "")).strip() for k in ("day", "month", "year")).strip()


def _make(pid: str, question: str, passage: str, ref_text: str) -> Problem:
    if not any(g.strip() for g in ref_text.split("|")):
        raise ValueError("field 'ref_text' holds no non-blank answer")
    return Problem(id=pid, question=question, input=f"{LEAD_IN}\n\nQuestion: {question}\n\nPassage: {passage}",
                   gold=ref_text, extra={"passage": passage})


# --- token F1 (SCOREFLOW.md §4) -------------------------------------------------------------------

_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, whole-word a/an/the -> space, collapse whitespace."""
    text = _PUNCT.sub("", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the normalised token multisets: 0 with no overlap, else 2PR/(P+R)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(answer: str, problem: Problem) -> float:
    """Max F1 over each non-blank gold x each "|"-part of the answer (SCOREFLOW.md §4)."""
    golds = [g for g in problem.gold.split("|") if g.strip()]
    return max((token_f1(part, g) for g in golds for part in answer.split("|")), default=0.0)
