"""executor.ChatClient against a fault-injecting stdlib HTTP server on 127.0.0.1 (STYLE.md §5, §6).

The server answers chat completions by echoing the last user message, but a per-message script can
make any request answer 429 + Retry-After, 5xx, truncated JSON, a body without choices, a reply slower
than the client's timeout, or a dropped connection. Every request it receives is logged, so the tests
can prove what was retried, what was not, and that the call cache never asks a finished call twice.
"""
import email.utils
import json
import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import executor
from executor import Budget, BudgetExceeded, ChatClient, ExecutorError, RetryPolicy

FAST = RetryPolicy(max_retries=3, initial_delay=0.01, max_delay=0.05)
PROMPT_TOKENS, COMPLETION_TOKENS = 5, 7  # what the fault server reports for every answer


class FaultServer:
    """script: {message content: [action, ...]}; each request for that content takes the next
    action, then "ok" once the list is used up. Actions: "ok", ("status", code, headers, body),
    "truncated", "no_choices", ("sleep", seconds) (then ok), "drop". `delay` slows every ok."""

    def __init__(self, script=None, delay=0.0):
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.delay = delay
        self.log = []            # (monotonic time, content, action) per request received
        self.answered = 0        # ok answers fully written
        self.inflight = self.max_inflight = 0
        self.auth = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                content = json.loads(raw)["messages"][-1]["content"]
                with owner.lock:
                    todo = owner.script.get(content, [])
                    action = todo.pop(0) if todo else "ok"
                    owner.log.append((time.monotonic(), content, action))
                    owner.auth.append(self.headers.get("Authorization"))
                    owner.inflight += 1
                    owner.max_inflight = max(owner.max_inflight, owner.inflight)
                try:
                    owner.act(self, content, action)
                except OSError:  # the client gave up on us (timeout test)
                    self.close_connection = True
                finally:
                    with owner.lock:
                        owner.inflight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @staticmethod
    def answer(content):
        return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "echo",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo:{content}"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                          "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}}

    def act(self, h, content, action):
        def send(code, body, headers=()):
            h.send_response(code)
            for k, v in dict(headers).items():
                h.send_header(k, v)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            h.wfile.flush()

        good = json.dumps(self.answer(content)).encode()
        if isinstance(action, tuple) and action[0] == "status":
            send(action[1], action[3], action[2])
        elif action == "truncated":
            send(200, good[: len(good) // 2])
        elif action == "no_choices":
            send(200, b'{"id": "chatcmpl-x", "object": "chat.completion", "error": null}')
        elif action == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        else:
            time.sleep(action[1] if isinstance(action, tuple) else self.delay)
            send(200, good)
            with self.lock:
                self.answered += 1

    def requests_for(self, content):
        return [a for _, c, a in self.log if c == content]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def msgs(content):
    return [{"role": "user", "content": content}]


def client_for(server, **kw):
    kw.setdefault("retry", FAST)
    kw.setdefault("api_key", "")
    return ChatClient(server.base_url, "echo", **kw)


# --- retry policy, as pure functions ------------------------------------------------------------

def test_backoff_is_half_second_doubling_capped_at_8_with_quarter_jitter():
    p = RetryPolicy()
    assert [executor.backoff_delay(n, p, lambda: 0.0) for n in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    assert executor.backoff_delay(2, p, lambda: 1.0) == pytest.approx(2.0 * 0.75)
    assert all(0.375 <= executor.backoff_delay(0, p) <= 0.5 for _ in range(200))


def test_retry_after_parses_ms_seconds_and_http_date():
    f = executor.retry_after_seconds
    assert f({"retry-after-ms": "250", "retry-after": "9"}) == pytest.approx(0.25)
    assert f({"retry-after": "2"}) == 2.0 and f({"retry-after": "1.5"}) == 1.5
    now = 1_700_000_000.0
    assert f({"retry-after": email.utils.formatdate(now + 30, usegmt=True)}, now=now) == pytest.approx(30, abs=1)
    assert f({"retry-after": "soon"}) is None and f({}) is None


# --- faults a retry can fix, and ones it cannot -------------------------------------------------

@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
def test_retryable_status_then_success(server, status):
    server.script["q"] = [("status", status, {}, b'{"error": {"message": "busy"}}')]
    with client_for(server) as c:
        r = c.chat(msgs("q"))
    assert r.text == "echo:q" and not r.cached
    assert len(server.requests_for("q")) == 2 and c.n_requests == 2 and c.n_sent == 1


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_non_retryable_4xx_raises_at_once_with_endpoint_status_and_message(server, status):
    server.script["q"] = [("status", status, {}, b'{"error": {"message": "you sent nonsense", "type": "x"}}')]
    with client_for(server) as c, pytest.raises(ExecutorError) as ei:
        c.chat(msgs("q"))
    e = ei.value
    assert (e.kind, e.status, e.attempts) == ("http", status, 1)
    assert c.endpoint in str(e) and str(status) in str(e) and "you sent nonsense" in str(e)
    assert len(server.requests_for("q")) == 1
    assert c.errors == {"http": 1} and c.total.errors == 1


def test_x_should_retry_false_stops_a_500(server):
    server.script["q"] = [("status", 500, {"x-should-retry": "false"}, b"oops")]
    with client_for(server) as c, pytest.raises(ExecutorError):
        c.chat(msgs("q"))
    assert len(server.requests_for("q")) == 1


def test_persistent_500_gives_up_after_bounded_retries(server):
    server.script["q"] = [("status", 500, {}, b'{"error": {"message": "db on fire"}}')] * 10
    with client_for(server, retry=RetryPolicy(max_retries=2, initial_delay=0.01)) as c:
        with pytest.raises(ExecutorError) as ei:
            c.chat(msgs("q"))
    assert ei.value.status == 500 and ei.value.attempts == 3 and "db on fire" in str(ei.value)
    assert "after 3 attempts" in str(ei.value) and len(server.requests_for("q")) == 3


def test_429_retry_after_seconds_is_honoured(server):
    server.script["q"] = [("status", 429, {"Retry-After": "1"}, b'{"error": {"message": "slow down"}}')]
    with client_for(server) as c:  # FAST backoff is 10 ms: a 1 s gap can only come from Retry-After
        assert c.chat(msgs("q")).text == "echo:q"
    (t0, _, _), (t1, _, _) = server.log
    assert t1 - t0 >= 0.95


def test_retry_after_ms_is_honoured(server):
    server.script["q"] = [("status", 503, {"retry-after-ms": "300"}, b"{}")]
    with client_for(server) as c:
        assert c.chat(msgs("q")).text == "echo:q"
    assert server.log[1][0] - server.log[0][0] >= 0.28


def test_retry_after_above_cap_stops_and_says_so(server):
    server.script["q"] = [("status", 429, {"Retry-After": "3600"}, b'{"error": {"message": "quota"}}')]
    with client_for(server) as c, pytest.raises(ExecutorError) as ei:
        c.chat(msgs("q"))
    assert "3600" in str(ei.value) and "cap" in str(ei.value) and ei.value.status == 429
    assert len(server.requests_for("q")) == 1


def test_truncated_json_is_retried_then_reported_with_body_excerpt(server):
    server.script["once"] = ["truncated"]
    server.script["always"] = ["truncated"] * 10
    with client_for(server) as c:
        assert c.chat(msgs("once")).text == "echo:once"
        with pytest.raises(ExecutorError) as ei:
            c.chat(msgs("always"))
    assert ei.value.kind == "bad_body" and "not valid JSON" in str(ei.value)
    assert '{"id": "chatcmpl-test"' in str(ei.value)  # quotes the body it got
    assert len(server.requests_for("always")) == FAST.max_retries + 1


def test_missing_choices_is_bad_body_not_keyerror(server):
    server.script["q"] = ["no_choices"] * 10
    with client_for(server, retry=RetryPolicy(max_retries=0)) as c, pytest.raises(ExecutorError) as ei:
        c.chat(msgs("q"))
    assert ei.value.kind == "bad_body" and "choices" in str(ei.value) and "chatcmpl-x" in str(ei.value)


def test_slow_reply_past_timeout_is_retried_then_reported(server):
    server.script["once"] = [("sleep", 1.0)]
    server.script["always"] = [("sleep", 1.0)] * 10
    with client_for(server, timeout=0.3, retry=RetryPolicy(max_retries=1, initial_delay=0.01)) as c:
        assert c.chat(msgs("once")).text == "echo:once"
        with pytest.raises(ExecutorError) as ei:
            c.chat(msgs("always"))
    assert ei.value.kind == "timeout" and "0.3 s" in str(ei.value) and ei.value.attempts == 2


def test_dropped_connection_is_retried_then_reported(server):
    server.script["once"] = ["drop"]
    server.script["always"] = ["drop"] * 10
    with client_for(server) as c:
        assert c.chat(msgs("once")).text == "echo:once"
        with pytest.raises(ExecutorError) as ei:
            c.chat(msgs("always"))
    assert ei.value.kind == "connection" and len(server.requests_for("always")) == FAST.max_retries + 1


def test_refused_connection_is_a_connection_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = ChatClient(f"http://127.0.0.1:{port}/v1", "m", retry=RetryPolicy(max_retries=1, initial_delay=0.01))
    with pytest.raises(ExecutorError) as ei:
        c.chat(msgs("q"))
    assert ei.value.kind == "connection" and ei.value.attempts == 2 and f":{port}/v1/chat/completions" in str(ei.value)
    e2 = pickle.loads(pickle.dumps(ei.value))
    assert (type(e2), e2.kind, str(e2)) == (ExecutorError, "connection", str(ei.value))


def test_bearer_key_is_sent(server):
    with client_for(server, api_key="sekrit") as c:
        c.chat(msgs("q"))
    assert server.auth == ["Bearer sekrit"]


# --- concurrency, order, accounting -------------------------------------------------------------

def test_chat_many_keeps_order_bounds_concurrency_and_returns_failures_as_data(server):
    server.delay = 0.15
    server.script["bad"] = [("status", 400, {}, b'{"error": {"message": "no"}}')]
    reqs = [dict(messages=msgs(f"q{i}"), stage="gen" if i % 2 else "exec", tag=f"w{i % 3}") for i in range(12)]
    reqs[5] = dict(messages=msgs("bad"), stage="exec", tag="w2")
    with client_for(server, max_concurrency=4) as c:
        out = c.chat_many(reqs)
    assert [r.text if i != 5 else r.kind for i, r in enumerate(out)] == \
        [f"echo:q{i}" if i != 5 else "http" for i in range(12)]
    assert server.max_inflight == 4
    s = c.stats()
    assert s["total"]["calls"] == 11 and s["total"]["errors"] == 1
    assert s["total"]["prompt_tokens"] == 11 * PROMPT_TOKENS and s["total"]["completion_tokens"] == 11 * COMPLETION_TOKENS
    assert s["by_stage"]["gen"]["calls"] == 5 and s["by_stage"]["exec"]["calls"] == 6  # q5 became "bad"
    assert s["by_stage"]["exec"]["errors"] == 1
    assert sum(v["calls"] for v in s["by_tag"].values()) == 11 and s["by_tag"]["w2"] == dict(
        calls=3, cached=0, errors=1, prompt_tokens=15, completion_tokens=21, dollars=0.0)


def test_dollars_use_the_price_table_and_dated_names(server):
    c = ChatClient(server.base_url, "gpt-4o-mini-2024-07-18", api_key="", retry=FAST)
    assert c.price == executor.DEFAULT_PRICES["gpt-4o-mini"]
    c.chat(msgs("q"), stage="s")
    want = (PROMPT_TOKENS * 0.15 + COMPLETION_TOKENS * 0.60) / 1e6
    assert c.total.dollars == pytest.approx(want) and c.by_stage["s"].dollars == pytest.approx(want)
    c2 = ChatClient(server.base_url, "gpt-4o-mini", api_key="", prices={"gpt-4o-mini": (1.0, 3.0)})
    assert c2.price == (1.0, 3.0)
    with pytest.raises(ValueError, match="dollar budget needs a price"):
        ChatClient(server.base_url, "my-local-model", budget=Budget(dollars=1.0))


# --- the call cache ------------------------------------------------------------------------------

def test_cache_replays_finished_calls_and_keeps_samples_distinct(server, tmp_path):
    db = tmp_path / "calls.sqlite"
    reqs = [dict(messages=msgs("a"), sample=0), dict(messages=msgs("a"), sample=1),
            dict(messages=msgs("a"), sample=0, temperature=0.5), dict(messages=msgs("b"), max_tokens=9)]
    with client_for(server, cache_path=db) as c:
        first = c.chat_many(reqs)
    assert len(server.log) == 4 and not any(r.cached for r in first)
    with client_for(server, cache_path=db) as c:
        again = c.chat_many(reqs)
        assert c.n_sent == 0 and c.total.cached == 4
        assert c.total.prompt_tokens == 4 * PROMPT_TOKENS  # replays count at their recorded usage
    assert len(server.log) == 4
    assert [r.text for r in again] == [r.text for r in first] and all(r.cached for r in again)
    # other endpoint or model: a different request, so a miss
    with ChatClient(server.base_url, "echo-2", api_key="", cache_path=db) as c:
        c.chat(msgs("a"))
    assert len(server.log) == 5


def test_identical_concurrent_calls_are_sent_once(server, tmp_path):
    server.delay = 0.2
    with client_for(server, cache_path=tmp_path / "c.sqlite", max_concurrency=8) as c:
        out = c.chat_many([dict(messages=msgs("same"))] * 8)
    assert len(server.log) == 1 and {r.text for r in out} == {"echo:same"}
    assert sum(r.cached for r in out) == 7


def test_journal_holds_every_finished_call_and_rerun_asks_only_failures(server, tmp_path):
    db = tmp_path / "calls.sqlite"
    server.script.update({"q1": ["drop", "truncated"], "q2": [("status", 429, {"Retry-After": "0"}, b"{}")],
                          "q3": [("status", 500, {}, b"{}")] * 100, "q4": [("status", 400, {}, b"{}")]})
    reqs = [dict(messages=msgs(f"q{i}")) for i in range(6)]
    with client_for(server, cache_path=db) as c:
        out = c.chat_many(reqs)
    assert [getattr(r, "kind", None) for r in out] == [None, None, None, "http", "http", None]
    rows = sqlite3.connect(db).execute("SELECT request, text FROM calls").fetchall()
    assert sorted(t for _, t in rows) == ["echo:q0", "echo:q1", "echo:q2", "echo:q5"]
    n = len(server.log)
    with client_for(server, cache_path=db) as c:
        out = c.chat_many(reqs)
    asked = {content for _, content, _ in server.log[n:]}
    assert asked == {"q3", "q4"}  # only the calls that had not finished
    assert [r.cached for r in out if isinstance(r, executor.ChatResult)] == [True, True, True, False, True]


KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from executor import ChatClient
    c = ChatClient({url!r}, "echo", api_key="", cache_path={db!r}, max_concurrency=4)
    c.chat_many([dict(messages=[{{"role": "user", "content": f"k{{i}}"}}]) for i in range(40)])
    print("finished all", flush=True)
""")


def test_kill_9_mid_batch_then_rerun_asks_only_unfinished_calls(server, tmp_path):
    server.delay = 0.05
    db = str(tmp_path / "calls.sqlite")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = KILL_SCRIPT.format(root=root, url=server.base_url, db=db)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while server.answered < 12 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        answered_before_kill = server.answered
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert 12 <= answered_before_kill < 40
    rows = sqlite3.connect(db).execute("SELECT request FROM calls").fetchall()  # the key blob: body and which call
    done = {json.loads(r)["body"]["messages"][-1]["content"] for (r,) in rows}
    assert len(done) >= answered_before_kill - 4  # at most max_concurrency calls were in flight
    n = len(server.log)
    with client_for(server, cache_path=db) as c:
        out = c.chat_many([dict(messages=msgs(f"k{i}")) for i in range(40)])
    asked = [content for _, content, _ in server.log[n:]]
    assert [r.text for r in out] == [f"echo:k{i}" for i in range(40)]
    assert len(asked) == len(set(asked)) and not set(asked) & done
    assert set(asked) | done == {f"k{i}" for i in range(40)}
    assert c.n_sent == len(asked) and c.total.cached == len(done)


# --- the budget ------------------------------------------------------------------------------------

def reservation(content, max_tokens):
    """The client's worst case for one call: UTF-8 bytes + template allowance + max_tokens."""
    return (executor.TEMPLATE_TOKENS_PER_CALL + executor.TEMPLATE_TOKENS_PER_MESSAGE
            + len(content.encode()) + max_tokens)


def test_token_budget_stops_before_sending_and_resumes_with_raised_cap(server, tmp_path):
    db = tmp_path / "calls.sqlite"
    per_call, bound = PROMPT_TOKENS + COMPLETION_TOKENS, reservation("q0", 10)  # 12 spent, 52 reserved
    cap = 100  # call k+1 is sent while 12k + 52 <= 100: k = 0..4, so 5 calls
    reqs = [dict(messages=msgs(f"q{i}"), max_tokens=10) for i in range(8)]
    with client_for(server, cache_path=db, budget=Budget(tokens=cap), max_concurrency=1) as c:
        out = c.chat_many(reqs)
    n_ok = sum(1 for k in range(8) if all(per_call * j + bound <= cap for j in range(k + 1)))
    assert n_ok == 5 and len(server.log) == 5
    assert all(isinstance(r, executor.ChatResult) for r in out[:5])
    assert all(isinstance(r, BudgetExceeded) and r.kind == "budget" for r in out[5:])
    assert "cap 100" in str(out[5]) and "not sent" in str(out[5])
    assert c.total.prompt_tokens + c.total.completion_tokens == 60 <= cap
    with client_for(server, cache_path=db, budget=Budget(tokens=200), max_concurrency=1) as c:
        out = c.chat_many(reqs)
    assert all(isinstance(r, executor.ChatResult) for r in out)
    assert [content for _, content, _ in server.log[5:]] == ["q5", "q6", "q7"]
    assert c.total.cached == 5 and c.total.prompt_tokens + c.total.completion_tokens == 8 * per_call


def test_dollar_budget_is_never_passed_under_concurrency(server):
    # $1 per prompt token and $2 per completion token: a call costs $19, reserves up to $62
    prices = {"echo": (1e6, 2e6)}
    cap = 300.0
    with client_for(server, budget=Budget(dollars=cap), prices=prices, max_concurrency=8) as c:
        out = c.chat_many([dict(messages=msgs(f"q{i}"), max_tokens=10) for i in range(40)])
    ok = [r for r in out if isinstance(r, executor.ChatResult)]
    # A call that does not fit only because of calls in flight waits for them, so exactly the calls
    # with 19k + 62 (63 for q10..) <= 300 (k = 0..12) are sent, whatever the concurrency: 13 calls, $247.
    assert len(ok) == len(server.log) == 13 and c.total.dollars == pytest.approx(19.0 * 13)
    assert sum(isinstance(r, BudgetExceeded) for r in out) == 40 - 13


def test_bad_arguments_raise_before_any_request(server):
    with client_for(server) as c:
        for kw, field in [(dict(temperature=3), "temperature"), (dict(top_p=0), "top_p"),
                          (dict(max_tokens=0), "max_tokens"), (dict(stop=[""]), "stop"),
                          (dict(seed="1"), "seed"), (dict(sample=-1), "sample")]:
            with pytest.raises(ValueError, match=field):
                c.chat(msgs("q"), **kw)
        with pytest.raises(ValueError, match="messages"):
            c.chat([{"role": "user"}])
    assert server.log == []

