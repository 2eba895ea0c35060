"""Executing workflows against an endpoint (issue 14 items 2-5, issue 15 items 3-4): budget stops,
resume across ports, the executor's time vs the workflow's, hung endpoints, preflight and
--executor-extra, repeated identical calls, and retries by the workflow's own fault.

All real: our LocalServer over the embedded model, or `Canned`, a stdlib ThreadingHTTPServer on
127.0.0.1 that records every request body and answers OpenAI-shaped replies (optionally one at a
time with a fixed delay, or never)."""
import asyncio
import json
import os
import re
import sqlite3
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import executor  # noqa: E402
import operators as O  # noqa: E402
import scoreflow  # noqa: E402
from bench import Problem  # noqa: E402
from conftest import run_cli  # noqa: E402

TASK = os.path.join(ROOT, "tests", "data", "parity_task.py")
TINY = ["--bench", TASK, "--n-validate", "2", "--n-test", "1", "-k", "3", "--iterations", "1", "--pairs", "4",
        "--grad-accum", "2", "--gen-max-tokens", "48", "--exec-max-tokens", "24", "--regen-rounds", "0",
        "--lr", "5e-3", "--max-calls", "4"]
NO_RETRY = executor.RetryPolicy(max_retries=0)


class Canned:
    """reply(body, n) -> text for the n-th POST (0-based). serial: one request at a time, each taking
    `delay` s; hang: POSTs are never answered (the socket accepts and reads, then nothing).
    models: the ids GET /v1/models lists."""

    def __init__(self, reply=lambda body, n: f"reply {n}", *, delay=0.0, serial=False, hang=False,
                 models=("canned",)):
        self.reply, self.delay, self.hang, self.models = reply, delay, hang, list(models)
        self.bodies, self.lock, self.serial = [], threading.Lock(), threading.Lock() if serial else None
        self.stopping = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, obj):
                raw = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._json({"object": "list", "data": [{"id": m, "object": "model"} for m in owner.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    n = len(owner.bodies)
                    owner.bodies.append(body)
                if owner.hang:
                    owner.stopping.wait()
                    return
                if owner.serial is not None:
                    with owner.serial:
                        time.sleep(owner.delay)
                else:
                    time.sleep(owner.delay)
                self._json({"choices": [{"index": 0, "message": {"role": "assistant", "content": owner.reply(body, n)},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 10, "completion_tokens": 5}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def canned_factory():
    made = []

    def make(*a, **kw):
        made.append(Canned(*a, **kw))
        return made[-1]
    yield make
    for c in made:
        c.close()


def workflow(set_name, body):
    return scoreflow.assemble(set_name, "\n" + "\n".join("        " + line for line in body.strip("\n").split("\n")) + "\n")


def execute(cfg, jobs, client, task=None):
    task = task or SimpleNamespace(score=lambda answer, problem: float(str(problem.gold) in answer))
    return scoreflow.execute_workflows(cfg, task, jobs, "math" if "programmer" in jobs[0][1] else "qa", client,
                                       "test execute")



def journal(run_dir):
    """{key: (request blob, created, stage)} of the run's call journal."""
    con = sqlite3.connect(os.path.join(run_dir, "calls.sqlite"), timeout=30)
    try:
        return {k: (r, c, st) for k, r, c, st in con.execute("SELECT key, request, created, stage FROM calls")}
    finally:
        con.close()


def assert_no_call_asked_twice(before, after):
    """Every call journaled before is still there untouched (a re-sent call would rewrite its row),
    and no two rows are the same call under different endpoint identities (the port bug)."""
    for k, row in before.items():
        assert after.get(k) == row, "a call finished before the stop was asked again"
    calls = [json.loads(r) for r, _, _ in after.values()]
    which = [json.dumps({k: v for k, v in c.items() if k != "endpoint"}, sort_keys=True) for c in calls]
    assert len(set(which)) == len(which), "one call journaled under two endpoint identities"


# --- 15.4: repeated identical calls are distinct calls; resume replays them ---------------------

def test_repeated_identical_calls_are_distinct_and_replay_exactly(tmp_path, canned_factory):
    server = canned_factory()
    code = workflow("qa", '''
outs = []
for i in range(3):
    r = await self.custom(instruction="Say a number.")
    outs.append(r)
return outs[0] + " | " + outs[1] + " | " + outs[2]''')
    db = str(tmp_path / "calls.sqlite")
    p = Problem(id="p", question="Q", input="Q", gold="x")
    with executor.ChatClient(server.url, "canned", api_key="", cache_path=db, retry=NO_RETRY) as c:
        run = asyncio.run(O.run_workflow(code, p, c, "qa"))
    assert run.status == "ok" and run.answer == "reply 0 | reply 1 | reply 2"  # three calls made, three replies
    assert len(server.bodies) == 3 and len({json.dumps(b) for b in server.bodies}) == 1  # identical requests
    with executor.ChatClient(server.url, "canned", api_key="", cache_path=db, retry=NO_RETRY) as c:  # resume
        again = asyncio.run(O.run_workflow(code, p, c, "qa"))
        assert c.stats()["n_sent"] == 0
    assert again.answer == run.answer and len(server.bodies) == 3
    # with a seed (the execute stage's runs send one), a repeat is sampled anew: its own seed
    opts = O.OperatorOptions(temperature=0.5, seed=1000, sample=1)
    with executor.ChatClient(server.url, "canned", api_key="", cache_path=db, retry=NO_RETRY) as c:
        seeded = asyncio.run(O.run_workflow(code, p, c, "qa", options=opts))
    assert seeded.status == "ok" and [b["seed"] for b in server.bodies[3:]] == [1000, 1000 + 7919, 1000 + 2 * 7919]


# --- 15.3: retries by the workflow's own fault -------------------------------------------------

def test_a_run_that_raises_is_attempted_n_times_then_scores_0(canned_factory):
    server = canned_factory()
    raises = workflow("qa", 'a = await self.custom(instruction="x")\nreturn a + 1')  # str + int: TypeError
    empty = canned_factory(reply=lambda body, n: "")
    returns_empty = workflow("qa", 'a = await self.custom(instruction="y")\nreturn a')
    p = Problem(id="p", question="Q", input="Q", gold="reply")
    cfg = scoreflow.RunConfig(runs=1, run_attempts=3, concurrency=4, workflow_timeout=30)
    with executor.ChatClient(server.url, "canned", api_key="", retry=NO_RETRY) as c:
        t0 = time.monotonic()
        out = execute(cfg, [("k", raises, p)], c)
        took = time.monotonic() - t0
    run, = out["k"]["runs"]
    assert (run["status"], run["attempts"], out["k"]["score"]) == ("workflow_error", 3, 0.0)
    assert "TypeError" in run["reason"] and took >= 2 * scoreflow.RUN_RETRY_DELAY
    assert len(server.bodies) == 3  # each attempt asked anew (the attempt index is in the call's key)
    with executor.ChatClient(empty.url, "canned", api_key="", retry=NO_RETRY) as c:
        out = execute(cfg, [("e", returns_empty, p)], c)
    assert out["e"]["runs"][0]["attempts"] == 1 and out["e"]["score"] == 0.0  # a bad return value did not raise
    assert len(empty.bodies) == 1
    assert scoreflow.PAPER["run_attempts"] == 5 and scoreflow.PAPER["programmer_call_attempts"] == 3


def test_programmer_whole_call_retried_when_it_raises(canned_factory):
    # a reply whose code ast.parse cannot take (MemoryError: too deeply nested) makes Programmer raise
    bad = "```python\n" + "-" * 200000 + "1\n```"
    server = canned_factory(reply=lambda body, n: bad if n == 0 else "```python\ndef solve():\n    return 42\n```")
    code = workflow("math", 'a = await self.programmer(analysis="x")\nreturn a')
    p = Problem(id="p", question="Q", input="Q", gold="42")
    with executor.ChatClient(server.url, "canned", api_key="", retry=NO_RETRY) as c:
        once = asyncio.run(O.run_workflow(code, p, c, "math", options=O.OperatorOptions(programmer_call_attempts=1)))
    assert once.status == "workflow_error" and once.raised and "MemoryError" in once.reason
    server.bodies.clear()
    server.reply = lambda body, n: bad if n == 0 else "```python\ndef solve():\n    return 42\n```"
    with executor.ChatClient(server.url, "canned", api_key="", retry=NO_RETRY) as c:
        run = asyncio.run(O.run_workflow(code, p, c, "math", options=O.OperatorOptions(
            programmer_call_attempts=3, programmer_call_delay=0.1)))
    assert run.status == "ok" and "Output: 42" in run.answer and run.n_calls == 1
    assert any("call attempt 1 raised MemoryError" in n for n in run.notes) and len(server.bodies) == 2


# --- 14.4: the executor's time is not the workflow's ----------------------------------------------

def test_serial_endpoint_queue_time_is_not_workflow_time(canned_factory):
    """One request at a time, 0.3 s each: 8 workflows x 2 calls take ~4.8 s of queueing against a
    1 s workflow timeout. None times out; the time shows as executor_seconds."""
    server = canned_factory(reply=lambda body, n: "the answer is 7", delay=0.3, serial=True)
    code = workflow("qa", 'a = await self.custom(instruction="x")\nb = await self.review(pre_solution=a)\nreturn b')
    jobs = [(f"k{i}", code, Problem(id=f"p{i}", question="Q", input=f"Q{i}", gold="7")) for i in range(8)]
    cfg = scoreflow.RunConfig(runs=1, concurrency=8, workflow_timeout=1.0)
    with executor.ChatClient(server.url, "canned", api_key="", retry=NO_RETRY, max_concurrency=8) as c:
        out = execute(cfg, jobs, c)
    runs = [v["runs"][0] for v in out.values()]
    assert [r["status"] for r in runs] == ["ok"] * 8, [r["reason"] for r in runs]
    assert all(v["score"] == 1.0 for v in out.values()) and len(server.bodies) == 16
    assert max(r["seconds"] for r in runs) > 2.0 and all(r["seconds"] - r["executor_seconds"] < 1.0 for r in runs)


def test_own_work_still_times_out_and_a_client_timeout_is_infra_by_kind(canned_factory, monkeypatch):
    sleeper = canned_factory(reply=lambda body, n: "```python\nimport time\ntime.sleep(4)\nprint(1)\n```")
    code = workflow("math", 'a = await self.programmer(analysis="x")\nreturn a')
    p = Problem(id="p", question="Q", input="Q", gold="1")
    with executor.ChatClient(sleeper.url, "canned", api_key="", retry=NO_RETRY) as c:
        run = asyncio.run(O.run_workflow(code, p, c, "math", timeout=1.5))
    assert run.status == "workflow_error" and "of its own work" in run.reason and run.raised  # the sandbox's time
    slow = canned_factory(delay=3.0)
    jobs = [("k", workflow("qa", 'a = await self.custom(instruction="x")\nreturn a'), p)]
    # tries below the client's stop threshold: two unanswered calls are an infra failure, a third would
    # be the endpoint down (test_hung_endpoint_stops_the_check_stage_for_a_single_workflow)
    monkeypatch.setattr(scoreflow, "INFRA_TRIES", executor.ENDPOINT_DOWN_AFTER - 1)
    with executor.ChatClient(slow.url, "canned", api_key="", retry=NO_RETRY, timeout=0.5) as c:
        out = execute(scoreflow.RunConfig(runs=1, workflow_timeout=60), jobs, c)
        assert c.stopped is None
    assert out["k"]["score"] is None and out["k"]["runs"][0]["kind"] == "timeout"
    assert scoreflow.infra_kinds(out) == {"timeout": 1}


def test_hung_endpoint_ends_the_stage_within_the_client_timeout(canned_factory):
    server = canned_factory(hang=True)
    code = workflow("qa", 'a = await self.custom(instruction="x")\nreturn a')
    jobs = [(f"k{i}", code, Problem(id=f"p{i}", question="Q", input=f"Q{i}", gold="x")) for i in range(12)]
    policy = executor.RetryPolicy(max_retries=1, initial_delay=0.05, max_delay=0.1)
    t0 = time.monotonic()
    with executor.ChatClient(server.url, "canned", api_key="", retry=policy, timeout=1.0, max_concurrency=4) as c:
        with pytest.raises(executor.EndpointDown):
            execute(scoreflow.RunConfig(runs=1, concurrency=12, workflow_timeout=60), jobs, c)
    took = time.monotonic() - t0
    # 2 attempts x 1 s for the first calls, then one more timeout at most for those in flight at the trip
    assert took < 6.0, took
    assert not [t for t in threading.enumerate() if t.name.startswith("workflow")], "a blocked thread outlived the stage"
    assert len(server.bodies) <= 4 * 2 + 4  # the queued calls were never sent


def test_hung_endpoint_stops_the_check_stage_for_a_single_workflow(canned_factory):
    """One workflow's trial run against a hung endpoint: the check asks again (as execute does) until
    the client trips EndpointDown, rather than recording an 'infra' verdict as the stage's result."""
    server = canned_factory(hang=True)
    code = workflow("qa", 'a = await self.custom(instruction="x")\nreturn a')
    rec = {"code": code}
    policy = executor.RetryPolicy(max_retries=0)
    cfg = scoreflow.RunConfig(trial_run="always", concurrency=4)
    with executor.ChatClient(server.url, "canned", api_key="", retry=policy, timeout=0.5, max_concurrency=4) as c:
        with pytest.raises(executor.EndpointDown):
            scoreflow.run_async(scoreflow._check_all(cfg, [rec], "qa", c), 4)
    assert len(server.bodies) == executor.ENDPOINT_DOWN_AFTER  # the one trial, asked until the client tripped


# --- 14.3 / 14.5: the journal key, --executor-extra, preflight --------------------------------

def test_local_server_journal_replays_across_ports(tmp_path, smol):
    import model as M
    m, tok = smol
    path = M.embedded_model_path()
    db = str(tmp_path / "calls.sqlite")
    msgs = [{"role": "user", "content": "Say hi."}]
    a = executor.start_local_server(path, model=m, tokenizer=tok)
    b = executor.start_local_server(path, model=m, tokenizer=tok)
    try:
        assert a.port != b.port and a.identity == b.identity and a.identity.startswith("local:")
        with executor.ChatClient(a.base_url, a.model_name, api_key="", cache_path=db, identity=a.identity) as c:
            first = c.chat(msgs, max_tokens=8)
        url_b = b.base_url.replace("127.0.0.1", "localhost")
        with executor.ChatClient(url_b, b.model_name, api_key="", cache_path=db, identity=b.identity) as c:
            again = c.chat(msgs, max_tokens=8)
            assert again.cached and again.text == first.text and c.n_sent == 0
        assert b.n_completions == 0
        with executor.ChatClient(b.base_url, b.model_name, api_key="", cache_path=db,
                                 identity=b.identity, extra={"repeat_penalty": 1.0}) as c:
            extra = c.chat(msgs, max_tokens=8)  # our server takes llama.cpp's neutral sampler fields
            assert not extra.cached and c.n_sent == 1  # extra fields are part of the key
        with executor.ChatClient(b.base_url, b.model_name, api_key="", retry=NO_RETRY,
                                 extra={"repeat_penalty": 1.1}) as c:
            with pytest.raises(executor.ExecutorError, match="repeat_penalty"):
                c.chat(msgs, max_tokens=8)
    finally:
        a.stop()
        b.stop()


def test_executor_extra_reaches_the_body_and_the_key(tmp_path, canned_factory):
    server = canned_factory()
    db = str(tmp_path / "calls.sqlite")
    msgs = [{"role": "user", "content": "q"}]
    extra = {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}
    with executor.ChatClient(server.url, "canned", api_key="", cache_path=db, extra=extra) as c:
        c.chat(msgs)
        c.chat(msgs)  # replayed
    with executor.ChatClient(server.url, "canned", api_key="", cache_path=db) as c:
        c.chat(msgs)  # no extra: a different call
    assert len(server.bodies) == 2
    assert {k: server.bodies[0][k] for k in extra} == extra and "repeat_penalty" not in server.bodies[1]
    with pytest.raises(ValueError, match="temperature"):
        executor.ChatClient(server.url, "canned", extra={"temperature": 1.0})


def test_preflight_and_executor_extra_flags_fail_before_any_work(tmp_path, canned_factory):
    llama = canned_factory(models=["the-one-model.gguf"])  # llama.cpp lists its one model, echoes any name
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    cases = [
        (["--executor-url", dead, "--executor-model", "m"], "no answer from GET"),
        (["--executor-url", llama.url, "--executor-model", "gpt-4o-mini"],
         "--executor-model gpt-4o-mini: " + llama.url + "/models does not serve it; it lists the-one-model.gguf"),
        (["--executor-extra", "{bad"], "--executor-extra: expected a JSON object"),
        (["--executor-extra", "[1]"], "expected a JSON object, got list"),
        (["--executor-extra", '{"temperature": 0.5}'], "set by their own flags"),
        (["--executor-extra", '{"repeat_penalty": 1.1}'], "our local server refuses it"),
    ]
    for i, (args, message) in enumerate(cases):
        r = run_cli(args + ["--run-dir", str(tmp_path / f"run{i}")], timeout=120)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr[-800:])
        assert not (tmp_path / f"run{i}").exists()
    assert not llama.bodies  # nothing was asked


# --- the CLI end to end: budget stop and resume, a hung endpoint, kill -9 of a default run ----------

@pytest.mark.slow
def test_budget_stop_then_resume_scores_every_run_and_asks_nothing_twice(tmp_path):
    run_dir = str(tmp_path / "run")
    r = run_cli(TINY + ["--run-dir", run_dir, "--budget-tokens", "1500"])
    assert r.returncode == scoreflow.EXIT_BUDGET, r.stderr[-3000:]
    assert "tokens spent of the cap 1500" in r.stderr
    assert f"python scoreflow.py --resume {run_dir} --budget-tokens 3000" in r.stderr
    assert not os.path.exists(f"{run_dir}/iter0/scores.json") and not os.path.exists(f"{run_dir}/report.md")
    before = journal(run_dir)
    assert before  # some calls finished before the stop
    first_wall = json.load(open(f"{run_dir}/metrics.json"))["wall_seconds"]
    r = run_cli(["--resume", run_dir, "--budget-tokens", "1000000"])
    assert r.returncode == 0, r.stderr[-3000:]
    # the report's total is both sessions' wall time, not the resumed session's alone
    second = float(re.search(r"done in (\d+) s", r.stderr).group(1))
    wall = json.load(open(f"{run_dir}/metrics.json"))["wall_seconds"]
    assert first_wall > 2 and abs(wall - (first_wall + second)) < 1.5, (first_wall, second, wall)
    scores = json.load(open(f"{run_dir}/iter0/scores.json"))
    runs = [x for v in scores.values() for x in v["runs"]]
    assert runs and not [x for x in runs if x["status"] == "infra_error"]  # none left as a budget failure
    assert all(v["score"] is not None for v in scores.values())
    after = journal(run_dir)
    assert_no_call_asked_twice(before, after)
    last = json.load(open(f"{run_dir}/metrics.json"))["executor_sessions"][-1]
    # the stopped stage's finished calls replayed (the generate stage, done, is not redone); the rest sent
    # once each (replayed also counts this session's repeats of its own calls: two workflows with the
    # same code on one problem make the same call in their run r, one key, asked once)
    assert last["replayed"] >= sum(st == "execute" for _, _, st in before.values()) > 0
    assert last["sent"] == len(after) - len(before)
    assert last["served_by_local_server"] == last["sent"]


@pytest.mark.slow
def test_hung_endpoint_stops_the_run_resumably(tmp_path, canned_factory):
    server = canned_factory(hang=True)
    run_dir = str(tmp_path / "run")
    t0 = time.monotonic()
    r = run_cli(TINY + ["--run-dir", run_dir, "--executor-url", server.url, "--executor-model", "canned",
                        "--executor-timeout", "1", "--trial-run", "always"])
    took = time.monotonic() - t0
    assert r.returncode == scoreflow.EXIT_ENDPOINT_DOWN, r.stderr[-3000:]
    assert "stopped answering" in r.stderr and f"--resume {run_dir}" in r.stderr
    # nothing the unanswered calls decided was recorded: the check stage stopped unwritten, or (when no
    # sample reached a trial run) its records name no infrastructure verdict; no stage after it wrote
    wf = f"{run_dir}/iter0/workflows.jsonl"
    if os.path.exists(wf):
        recs = scoreflow.read_jsonl(wf)
        assert not [x for x in recs if x.get("trial") or x["reason"].startswith("infra")], recs
    assert not os.path.exists(f"{run_dir}/iter0/scores.json")
    assert len(server.bodies) >= executor.ENDPOINT_DOWN_AFTER
    assert took < 300, took  # model load + generation (~30-90 s on 2 busy cores) + 6 x 1 s timeouts with backoff (~16 s)

