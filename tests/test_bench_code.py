"""Code scorers (SCOREFLOW.md §4): candidate + hidden test run in the real sandbox,
executor.run_python. The default run checks all 164 HumanEval problems and a few MBPP ones;
`-m slow` runs all 427 MBPP."""
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench import humaneval_task, mbpp_task
from conftest import DATASETS

pytestmark = pytest.mark.skipif(not os.path.isdir(DATASETS),
                                reason=f"no ScoreFlow data at {DATASETS}")

# Replaces the entry point by a wrapper whose every result is off by a little: a mutated solution.
MUTATION = '''
_sf_original = {ep}
def _sf_perturb(r):
    if isinstance(r, bool): return not r
    if isinstance(r, (int, float)): return r + 1
    if isinstance(r, str): return r + "x"
    if isinstance(r, list): return r + [None]
    if isinstance(r, tuple): return r + (None,)
    return object() if r is not None else 0
def {ep}(*args, **kwargs):
    return _sf_perturb(_sf_original(*args, **kwargs))
'''


@pytest.fixture(scope="module")
def humaneval():
    problems = humaneval_task.load("validate", DATASETS) + humaneval_task.load("test", DATASETS)
    return {p.id: p for p in problems}


@pytest.fixture(scope="module")
def mbpp():
    problems = mbpp_task.load("validate", DATASETS) + mbpp_task.load("test", DATASETS)
    return {p.id: p for p in problems}


def _canonical(p):
    return p.extra["hidden_canonical_solution"]


def _reference(p):
    return p.extra["hidden_reference_code"]


def _mutant(code, p):
    return code + MUTATION.format(ep=p.extra["entry_point"])


def test_humaneval_canonical_and_mutated_subset(humaneval):
    # the three problems whose prompt helper is prepended, one with a helper that is not, two plain
    for task_id in ("HumanEval/32", "HumanEval/38", "HumanEval/50", "HumanEval/10", "HumanEval/0",
                    "HumanEval/2"):
        p = humaneval[task_id]
        assert humaneval_task.verdict(_canonical(p), p) == (1.0, "passed"), task_id
        assert humaneval_task.score(_mutant(_canonical(p), p), p) == 0.0, task_id


def test_humaneval_helper_rule_and_fences(humaneval):
    # decode_cyclic: encode_cyclic comes from the prompt (SCOREFLOW.md §4)
    p = humaneval["HumanEval/38"]
    body = "def decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n"
    assert humaneval_task.score(body, p) == 1.0
    assert humaneval_task.score(f"Here it is:\n```python\n{body}```\nDone.", p) == 1.0
    p = humaneval["HumanEval/10"]  # make_palindrome: its prompt's helper is not prepended
    body = ("def make_palindrome(string: str) -> str:\n    for i in range(len(string) + 1):\n"
            "        if is_palindrome(string[i:]):\n            return string + string[:i][::-1]\n")
    score, why = humaneval_task.verdict(body, p)
    assert score == 0.0 and "NameError" in why
    assert humaneval_task.score("def is_palindrome(s):\n    return s == s[::-1]\n" + body, p) == 1.0


def test_failures_are_results_with_reasons(humaneval):
    p = humaneval["HumanEval/0"]
    assert humaneval_task.verdict("def has_close_elements(:", p)[1].startswith("error: SyntaxError")
    score, why = humaneval_task.run_program("while True:\n    pass\n", timeout=1.0, marker="m")
    assert score == 0.0 and why.startswith("timeout")


# Candidates that end the program cleanly (exit status 0) before check() has run or finished: each
# scored 1.0 when a clean exit counted as a pass. The fake line has the marker's shape, not its
# value.
CHEATS = {
    "sys.exit": "import sys\nsys.exit(0)\n",
    "os._exit": "import os\nos._exit(0)\n",
    "SystemExit": "raise SystemExit(0)\n",
    "fake marker": ("import sys\nprint('scoreflow-check-passed-' + '0' * 32, flush=True)\n"
                    "sys.exit(0)\n"),
    # a wrong solution whose failing check() is turned into exit 0 by an at-exit hook
    "atexit": ("import atexit, os\natexit.register(os._exit, 0)\n"
               "def {ep}(*args):\n    return None\n"),
}


@pytest.mark.parametrize("task_name,task_id", [("humaneval", "HumanEval/0"), ("mbpp", "2")])
def test_clean_exit_before_check_is_not_a_pass(task_name, task_id, humaneval, mbpp):
    if task_name == "humaneval":
        task, p = humaneval_task, humaneval[task_id]
        good = _canonical(p)
    else:
        task, p = mbpp_task, mbpp[task_id]
        good = _reference(p)
    assert task.verdict(good, p) == (1.0, "passed")
    for name, cheat in CHEATS.items():
        score, why = task.verdict(cheat.replace("{ep}", p.extra["entry_point"]), p)
        assert score == 0.0, (task_id, name, why)
        assert why.startswith("exit: the program exited 0 before check() finished"), (
            task_id, name, why)
    # the same cheat appended to a correct solution still scores 0: the exit comes before check()
    assert task.score(good + "\n" + CHEATS["sys.exit"], p) == 0.0


def test_marker_is_fresh_and_printed_only_after_check(humaneval):
    assert humaneval_task.new_marker() != humaneval_task.new_marker()
    p = humaneval["HumanEval/0"]
    source = humaneval_task.program(_canonical(p), p, "MARK")
    assert (source.index("check(has_close_elements)") < source.index("print('MARK'")
            == len(source) - len("print('MARK', flush=True)\n"))
    # exit 0 with the marker missing (a different one expected) is not a pass
    assert humaneval_task.run_program(source, 40.0, "OTHER")[0] == 0.0
    assert humaneval_task.run_program(source, 40.0, "MARK") == (1.0, "passed")


def test_mbpp_reference_and_mutated_subset(mbpp):
    # 85 needs `import math` from test_imports; 2 is a repaired public test; replace_spaces is a
    # repeated name
    for task_id in ("85", "2", "631", "116", "802"):
        p = mbpp[task_id]
        assert mbpp_task.verdict(_reference(p), p) == (1.0, "passed"), task_id
    for task_id in ("2", "116", "802"):
        p = mbpp[task_id]
        assert mbpp_task.score(_mutant(_reference(p), p), p) == 0.0


def _run_all(task, problems, answers):
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda pa: task.verdict(pa[1], pa[0]), zip(problems, answers)))


def test_humaneval_all_164_canonical_pass_and_mutants_fail(humaneval):  # ~4 s on 2 cores
    problems = list(humaneval.values())
    assert len(problems) == 164
    good = _run_all(humaneval_task, problems, [_canonical(p) for p in problems])
    assert [p.id for p, v in zip(problems, good) if v[0] != 1.0] == []
    bad = _run_all(humaneval_task, problems, [_mutant(_canonical(p), p) for p in problems])
    assert [p.id for p, v in zip(problems, bad) if v[0] != 0.0] == []


@pytest.mark.slow
def test_mbpp_all_reference_solutions_pass(mbpp):
    problems = list(mbpp.values())
    assert len(problems) == 427
    good = _run_all(mbpp_task, problems, [_reference(p) for p in problems])
    # task 630's reference code in the data is broken (its helper lost its parameters: NameError
    # 'ele')
    assert [p.id for p, v in zip(problems, good) if v[0] != 1.0] == ["630"]
    bad = _run_all(mbpp_task, problems, [_mutant(_reference(p), p) for p in problems])
    # the mutation is too small for 5 tests: isclose(rel_tol=1e-3) on large values (82, 85) and
    # `assert not f(...)` / truthiness checks on strings (737, 787, 794)
    assert (sorted(p.id for p, v in zip(problems, bad) if v[0] != 0.0)
            == ["737", "787", "794", "82", "85"])
