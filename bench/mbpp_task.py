"""MBPP (Austin et al.): loader, workflow input and the sandboxed pass/fail scorer.

SCOREFLOW.md §4 table: the workflow gets the record, the generator sees `prompt`, the gold is the
hidden `test` (def check(): the test_list asserts), the id is `task_id`. The workflow's record here
is {task_id, prompt, entry_point}; Problem.gold and extra["hidden_reference_code"] are
scorer-only. Public tests (SCOREFLOW.md §3) go to extra["public_tests"] from mbpp_public_test.jsonl,
looked up by entry_point; where a name is listed twice (8 in the ScoreFlow copy) the record whose
assert is one of this problem's test_list is taken. Where the file's assert is not one of the
problem's tests (5 records of the ScoreFlow copy have `candidate(` in place of an outer `set(`), and
when there is no file, the public test is test_list[0] with the entry point renamed `candidate`, the
rule that reproduces the file's other 422 records; each such repair is reported on stderr.

§4 "Training scorers / MBPP": as HumanEval (math, hashlib, re and typing preloaded, plus the
record's test_imports), but check() takes no argument and the timeout is 15 s. Pass = exit 0 and
the fresh marker printed after check() (humaneval_task.run_program).

Data: the ScoreFlow files mbpp_{validate,test}.jsonl and the public layouts ({text, code, task_id,
test_list, test_setup_code} and the sanitized {prompt, code, task_id, test_imports, test_list}),
where the generator's prompt is built as in the ScoreFlow files: the text, a blank line, and the
`def` line of the entry point taken from the reference code.
"""
from __future__ import annotations

import os
import re
import sys

from bench import (Problem, bad_record, build_problems, check_split, field_of, no_data, read_records,
                   resolve_data)
from bench.humaneval_task import PRELOAD, new_marker, passed, run_program
from operators import code_block

NAME = "mbpp"
OPERATOR_SET = "code"
TIMEOUT = 15.0  # seconds per check() run, SCOREFLOW.md §4
PUBLIC_TESTS_FILE = "mbpp_public_test.jsonl"


def load(split: str, data: str | None = None, *, strict: bool = False,
         public_tests: str | None = None) -> list[Problem]:
    check_split(NAME, split)
    if data is None:
        raise no_data(NAME, split)
    path = resolve_data(NAME, split, data)
    problems = build_problems(read_records(path, strict=strict), _problem, strict=strict)
    if public_tests is None:
        near = os.path.join(os.path.dirname(os.path.abspath(path)), PUBLIC_TESTS_FILE)
        public_tests = near if os.path.isfile(near) else None
    table: dict[str, list[list[str]]] = {}
    if public_tests is not None:
        for path_, line, rec in read_records(public_tests, strict=strict):
            try:
                tests = field_of(rec, "test", list)
                table.setdefault(field_of(rec, "entry_point"), []).append(tests)
            except (KeyError, TypeError) as e:
                bad_record(path_, line, f"{type(e).__name__}: {e}", strict)
    derived = []
    for p in problems:
        ep, own = p.extra["entry_point"], p.extra["hidden_test_list"]
        match = [t for t in table.get(ep, []) if t and all(_rename(a, "candidate", ep) in own for a in t)]
        if match:
            p.extra["public_tests"] = list(match[0])
        else:
            p.extra["public_tests"] = [_rename(own[0], ep, "candidate")]
            derived.append(p.id)
    if derived and public_tests is not None:
        print(f"bench: mbpp: {len(derived)} problems have no matching public test in {public_tests}; "
              f"derived from test_list[0]: {', '.join(derived)}", file=sys.stderr)
    return problems


def _rename(source: str, old: str, new: str) -> str:
    return re.sub(rf"\b{re.escape(old)}\(", f"{new}(", source)


def _problem(rec: dict, line: int) -> Problem:
    task_id = str(field_of(rec, "task_id", (int, str)))
    test_list = field_of(rec, "test_list", list)
    if not test_list or not all(isinstance(t, str) for t in test_list):
        raise TypeError("field 'test_list' should be a non-empty list of assert strings")
    code = rec.get("code", "")
    entry_point = rec.get("entry_point") or _entry_point(code, test_list[0])
    if "prompt" in rec and "def " in rec["prompt"]:
        prompt = field_of(rec, "prompt")
    else:  # public layouts: the text, then the def line, as in the ScoreFlow files
        text = field_of(rec, "text") if "text" in rec else field_of(rec, "prompt")
        def_line = re.search(rf"^def\s+{re.escape(entry_point)}\s*\(.*$", code, re.M)
        if not def_line:
            raise ValueError(f"field 'code' has no `def {entry_point}(` line")
        prompt = f"{text}\n\n{def_line.group(0)}"
    test = rec.get("test") or "def check():\n" + "".join(f"    {t}\n" for t in test_list)
    if rec.get("test_setup_code"):
        test = rec["test_setup_code"] + "\n" + test
    imports = rec.get("test_imports") or []
    return Problem(id=task_id, question=prompt,
                   input={"task_id": task_id, "prompt": prompt, "entry_point": entry_point}, gold=test,
                   extra={"entry_point": entry_point, "public_tests": [], "test_imports": list(imports),
                          "hidden_test_list": list(test_list), "hidden_reference_code": code})


def _entry_point(code: str, first_test: str) -> str:
    """The function of the reference code that the first assert calls."""
    for name in re.findall(r"^def\s+(\w+)", code, re.M):
        if re.search(rf"\b{name}\(", first_test):
            return name
    raise ValueError("no field 'entry_point', and no function of 'code' is called by test_list[0]")


def program(answer: str, problem: Problem, marker: str) -> str:
    """Preloads, test_imports, candidate, hidden test, check(), then the pass marker (as HumanEval)."""
    ep = problem.extra["entry_point"]
    imports = "".join(f"{line}\n" for line in problem.extra.get("test_imports", []))
    return f"{PRELOAD}{imports}\n{code_block(answer, ep)}\n\n{problem.gold}\n\ncheck()\n{passed(marker)}"


def verdict(answer: str, problem: Problem) -> tuple[float, str]:
    marker = new_marker()
    return run_program(program(answer, problem, marker), TIMEOUT, marker)


def score(answer: str, problem: Problem) -> float:
    """1.0 if the candidate passes the hidden check() within 15 s (SCOREFLOW.md §4), else 0.0."""
    return verdict(answer, problem)[0]
