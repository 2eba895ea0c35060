"""operators.py end to end: real workflows, the real local server over the embedded SmolLM2, the
real sandbox. No mocked LLM. Replies are short (max_tokens small) because the model is tiny and the
CPU shared; the assertions check plumbing (what reached the executor, what came back, statuses),
not the quality of a 135M model's answers.

The leakage guard: every problem here carries distinctive hidden text (gold, "hidden_*" extras);
no prompt that reached the executor may contain it, while the visible problem text must.
"""
import asyncio
import socket

import pytest

import executor
import operators as O

OPTS = O.OperatorOptions(max_tokens=40, program_timeout=10.0, programmer_attempts=1, test_rounds=1)
HIDDEN = ("HIDDEN-GOLD-7f3a", "HIDDEN-TEST-91bc", "HIDDEN-SOLUTION-c0de")


class Problem:  # duck-typed like bench.Problem: operators read only .input and .extra
    def __init__(self, input, extra=None):
        self.id, self.question, self.input = "t", "", input
        self.gold = HIDDEN[0]
        self.extra = dict(extra or {}, hidden_tests=HIDDEN[1], hidden_canonical_solution=HIDDEN[2])


@pytest.fixture(scope="module")
def client(local_server):
    return executor.ChatClient(local_server.base_url, local_server.model_name, api_key="", timeout=300)


def prompts(run):
    return [c["prompt"] for c in run.calls]


def assert_no_leak(run, visible):
    texts = prompts(run)
    assert texts, "no executor call was made"
    for text in texts:
        assert not any(h in text for h in HIDDEN), text
    assert all(visible in t for t in texts)  # the guard is not vacuous: the problem did get through


def go(coro):
    return asyncio.run(coro)


def test_math_set_end_to_end(client):
    code = """class Workflow:
    def __init__(self, config, problem):
        self.custom = Custom(config)
        self.programmer = Programmer(config)
        self.sc_ensemble = ScEnsemble(config)
        self.review = Review(config)

    async def run_workflow(self):
        plan = await self.custom(instruction="List the steps to solve this.")
        program = await self.programmer(analysis=plan)
        best = await self.sc_ensemble(solutions=[plan, program])
        return await self.review(pre_solution=best)
"""
    problem = Problem("What is 12 plus 30?")
    run = go(O.run_workflow(code, problem, client, "math", timeout=240, options=OPTS))
    assert run.status == "ok", run.reason
    assert run.n_calls == 4 and [c["operator"] for c in run.calls] == ["Custom", "Programmer", "ScEnsemble", "Review"]
    assert isinstance(run.answer, str) and run.answer.strip()
    assert "solve()" in run.calls[1]["prompt"] and "List the steps" in run.calls[0]["prompt"]
    assert_no_leak(run, "What is 12 plus 30?")


def test_qa_set_with_gather_end_to_end(client):
    code = """class Workflow:
    def __init__(self, config, problem):
        self.answer_generate = AnswerGenerate(config)
        self.custom = Custom(config)
        self.sc_ensemble = ScEnsemble(config)
        self.review = Review(config)

    async def run_workflow(self):
        first = await self.answer_generate()
        more = await asyncio.gather(*[self.custom(instruction="Answer briefly.") for _ in range(2)])
        return await self.sc_ensemble(solutions=[first] + more)
"""
    problem = Problem("Question: Which is larger, 3 or 7?\n\nPassage: Seven is more than three.")
    run = go(O.run_workflow(code, problem, client, "qa", timeout=240, options=OPTS))
    assert run.status == "ok", run.reason
    assert run.n_calls == 4 and sorted(c["operator"] for c in run.calls) == ["AnswerGenerate", "Custom", "Custom",
                                                                               "ScEnsemble"]
    assert_no_leak(run, "Which is larger, 3 or 7?")


def test_code_set_end_to_end_sees_public_tests_only(client):
    code = """class Workflow:
    def __init__(self, config, problem):
        self.code_generate = CustomCodeGenerate(config)
        self.sc_ensemble = ScEnsemble(config)
        self.test = Test(config)

    async def run_workflow(self):
        drafts = await asyncio.gather(self.code_generate(instruction="Be careful."),
                                      self.code_generate(instruction="Be simple."))
        best = await self.sc_ensemble(solutions=drafts)
        return await self.test(solution=best)
"""
    prompt = 'def shout(word):\n    """Return word in capital letters.\n    >>> shout("hi")\n    \'HI\'\n    """\n'
    public = "assert candidate('public-probe') == 'PUBLIC-PROBE-NOT-REACHABLE'"  # fails: repair must run
    problem = Problem({"task_id": "t/0", "prompt": prompt, "entry_point": "shout"},
                      {"entry_point": "shout", "public_tests": [public]})
    run = go(O.run_workflow(code, problem, client, "code", timeout=300, options=OPTS))
    assert run.status == "ok", run.reason
    ops = [c["operator"] for c in run.calls]
    assert ops.count("CustomCodeGenerate") == 3 and "Test" in ops  # 2 drafts + the fresh one after repairs
    repair = next(c["prompt"] for c in run.calls if c["operator"] == "Test")
    assert "PUBLIC-PROBE-NOT-REACHABLE" in repair  # the failing public test is shown
    assert any("still failing" in n for n in run.notes)
    assert_no_leak(run, "Return word in capital letters.")


def test_bad_ensemble_letter_falls_back_and_is_recorded(client):
    code = """class Workflow:
    def __init__(self, config, problem):
        self.sc_ensemble = ScEnsemble(config)
        self.custom = Custom(config)

    async def run_workflow(self):
        return await self.sc_ensemble(solutions=["seven", "eight", "seven"])
"""
    one_token = O.OperatorOptions(max_tokens=1)  # a one-token reply cannot hold <solution_letter>X
    run = go(O.run_workflow(code, Problem("Pick one."), client, "qa", options=one_token))
    assert (run.status, run.answer) == ("ok", "seven")
    assert any("bad letter" in n for n in run.notes)


def test_executor_errors_are_infra_errors_not_wrong_answers():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = executor.ChatClient(f"http://127.0.0.1:{port}/v1", "none", api_key="",
                               retry=executor.RetryPolicy(max_retries=0))
    run = go(O.run_workflow(O.TEMPLATES["qa"], Problem("Q?"), dead, "qa"))
    assert run.status == "infra_error" and isinstance(run.error, executor.ExecutorError)
    assert run.error.kind == "connection" and run.answer == ""
    varied = O.TEMPLATES["qa"].replace("return answer", "checked = await self.review(pre_solution=answer)\n"
                                                        "        return checked")
    ok, reason = go(O.runnable_check(varied, "qa", dead))
    assert not ok and reason.startswith("infra:")


def test_executor_time_does_not_count_against_the_workflow_timeout(client):
    """SCOREFLOW.md §10.7: the 0.2 s limit is the workflow's own work; the executor call (a real
    generation, longer than that) is the executor's time. tests/test_executor_paths.py has the
    own-time limit firing and a serial endpoint's queue."""
    slow = O.OperatorOptions(max_tokens=64)
    run = go(O.run_workflow(O.TEMPLATES["math"], Problem("Write a long essay about numbers."), client, "math",
                            timeout=0.2, options=slow))
    assert run.status == "ok", run.reason
    assert run.executor_seconds > 0.2 and run.seconds - run.executor_seconds < 0.2, (run.seconds, run.executor_seconds)


def test_runnable_check_trial_run_and_extractor(client):
    code = """class Workflow:
    def __init__(self, config, problem):
        self.custom = Custom(config)
        self.review = Review(config)
        self.programmer = Programmer(config)
        self.sc_ensemble = ScEnsemble(config)

    async def run_workflow(self):
        draft = await self.custom(instruction="Think about what is asked, then answer.")
        return draft
"""
    ok, reason = go(O.runnable_check(code, "math", client, options=OPTS))
    assert ok, reason
    answer = go(O.extract_answer("So the total is 42 apples.", Problem("How many apples?"), client, "math",
                                 options=OPTS))
    assert answer.startswith("\\boxed{") and answer.endswith("}")


def test_runnable_program_forms():
    """Programmer runs solve(), a printing program, or an uncalled argument-free function; for real."""
    import executor
    cases = {
        "```python\ndef solve():\n    return 6 * 7\n```": "42",
        "```python\nx = 6 * 7\nprint(f'The answer is {x}')\n```": "The answer is 42",
        "```python\ndef main():\n    return 6 * 7\n```\nThis computes it.": "42",
        "```python\ndef helper(a):\n    return a * 7\n\ndef main():\n    print(helper(6))\n\nmain()\n```": "42",
    }
    for reply, want in cases.items():
        run = executor.run_python(O.runnable_program(reply), timeout=10)
        assert run.status == "ok" and run.stdout.strip() == want, (reply, run.stdout, run.stderr)
    # a solve(n) that needs arguments is not called blindly: the program prints nothing
    run = executor.run_python(O.runnable_program("```python\ndef solve(n):\n    return n\n```"), timeout=10)
    assert run.status == "ok" and run.stdout.strip() == ""


def test_straight_line_workflows_pass_the_real_trial_run(client):
    """What operators.straight_line lets the loop skip really passes §2.3's trial run on the real
    executor: the skip saves calls, never a rejection."""
    from test_workflow_validation import STRAIGHT, workflow
    for body in STRAIGHT:
        code = workflow(body)
        assert O.straight_line(code, "math")
        ok, reason = go(O.runnable_check(code, "math", client, options=OPTS))
        assert ok, (body, reason)


def test_programmer_example_turns_teach_the_solve_format(client):
    """Programmer's worked example turns reach the executor as earlier chat turns, and the embedded
    135M executor, which without them rarely writes the problem's numbers into an argument-free
    solve(), then does: real model, greedy, real sandbox."""
    from bench import mathgen_task
    problems = [p for p in mathgen_task.load("test", kinds=("basic",))][:6]
    code = """class Workflow:
    def __init__(self, config, problem):
        self.programmer = Programmer(config)

    async def run_workflow(self):
        return await self.programmer(analysis="Compute the answer.")
"""
    shown = []

    class Recording:  # the real client; records the messages each call sent
        def chat(self, messages, **kw):
            shown.append(messages)
            return client.chat(messages, **kw)

    def solved(n_examples):
        opts = O.OperatorOptions(max_tokens=40, program_timeout=10.0, programmer_attempts=1,
                                 programmer_examples=n_examples)
        runs = [go(O.run_workflow(code, p, Recording(), "math", timeout=240, options=opts)) for p in problems]
        assert all(r.status == "ok" for r in runs), [r.reason for r in runs]
        return sum(r.answer.endswith(f"Output: {p.gold}") for p, r in zip(problems, runs))

    with_examples = solved(2)
    assert [m["role"] for m in shown[0]] == ["user", "assistant", "user", "assistant", "user"]
    assert shown[0][1]["content"] == O.PROGRAMMER_EXAMPLES[0][2] and problems[0].input in shown[0][-1]["content"]
    shown.clear()
    without = solved(0)
    assert [m["role"] for m in shown[0]] == ["user"]
    assert with_examples >= 4 and with_examples > without, (with_examples, without)
