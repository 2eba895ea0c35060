"""executor's local OpenAI-compatible server: the real server on 127.0.0.1 over the embedded model,
talked to by our ChatClient, by raw HTTP and by the official `openai` client (dev-only oracle)."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import requests

import executor
import model as modellib
from executor import ChatClient, ChatResult, ExecutorError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "Name three colours of the rainbow."


def msgs(text):
    return [{"role": "user", "content": text}]


def client(server, **kw):
    return ChatClient(server.base_url, server.model_name, api_key="", timeout=300, **kw)


def post(server, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(server.base_url + "/chat/completions", data=data, timeout=300, **kw)


def test_completion_equals_generate_and_usage_counts_generated_tokens(local_server, smol):
    m, tok = smol
    with client(local_server) as c:
        r = c.chat(msgs(QUESTION), max_tokens=16)
    prompt = tok.apply_chat(msgs(QUESTION))
    ref = modellib.generate(m, tok, [prompt], max_new_tokens=16)[0]
    assert r.text == ref.text and r.finish_reason == ref.finish_reason
    assert r.completion_tokens == len(ref.token_ids)
    assert r.prompt_tokens == len(tok.encode(prompt)) == ref.n_prompt_tokens


def test_length_and_stop_strings(local_server, smol):
    _, tok = smol
    with client(local_server) as c:
        full = c.chat(msgs("Write a long story about a dragon."), max_tokens=24)
        assert full.finish_reason == "length" and full.completion_tokens == 24
        words = full.text.split()
        stop = words[len(words) // 2]
        cut = c.chat(msgs("Write a long story about a dragon."), max_tokens=24, stop=[stop, "@@never@@"])
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    # usage counts exactly the tokens generated: up to the one that completed the stop string
    prompt = tok.apply_chat(msgs("Write a long story about a dragon."))
    ids = modellib.generate(local_server.model, tok, [prompt], max_new_tokens=24)[0].token_ids
    k = next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k]))
    assert cut.completion_tokens == k < full.completion_tokens


def test_seeds_reproduce_samples_whatever_the_batch(local_server):
    kw = dict(temperature=1.0, max_tokens=12)
    with client(local_server, max_concurrency=8) as c:
        a = c.chat(msgs(QUESTION), seed=7, **kw)
        b = c.chat(msgs(QUESTION), seed=7, **kw)
        others = {c.chat(msgs(QUESTION), seed=s, **kw).text for s in (8, 9, 10)}
        batched = c.chat_many([dict(messages=msgs(QUESTION), seed=7, **kw)] +
                              [dict(messages=msgs(f"Tell me about {x}."), seed=1, **kw) for x in "ABCDEFG"])
    assert a.text == b.text and others != {a.text}
    assert batched[0].text == a.text  # each row samples from its own seeded generator


def test_64_concurrent_clients_all_answered_in_batches(local_server, smol):
    _, tok = smol
    before = dict(local_server.batch_sizes)
    texts = ["hi " * (i % 13) + str(i) for i in range(64)]  # prompt lengths differ, so answers can be traced
    with client(local_server, max_concurrency=64) as c:
        out = c.chat_many([dict(messages=msgs(t), max_tokens=2) for t in texts])
    assert all(isinstance(r, ChatResult) for r in out), [r for r in out if not isinstance(r, ChatResult)]
    assert [r.prompt_tokens for r in out] == [len(tok.encode(tok.apply_chat(msgs(t)))) for t in texts]
    assert all(1 <= r.completion_tokens <= 2 for r in out)
    new = {n: k - before.get(n, 0) for n, k in local_server.batch_sizes.items() if k > before.get(n, 0)}
    assert sum(n * k for n, k in new.items()) == 64
    assert max(new) >= 16, f"requests were not batched: batch sizes {new}"


BAD = [  # (body, status, param or None, what)
    (b"{not json", 400, None, "invalid JSON"),
    (b"[1, 2]", 400, None, "not an object"),
    ({"messages": msgs("x")}, 400, "model", "missing model"),
    ({"model": 3, "messages": msgs("x")}, 400, "model", "model not a string"),
    ({"model": "gpt-4", "messages": msgs("x")}, 404, "model", "unknown model"),
    ({"model": None}, 400, "messages", "missing messages"),
    ({"model": None, "messages": "hi"}, 400, "messages", "messages not a list"),
    ({"model": None, "messages": []}, 400, "messages", "empty messages"),
    ({"model": None, "messages": [{"role": "user"}]}, 400, "messages[0].content", "no content"),
    ({"model": None, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "bad role"),
    ({"model": None, "messages": msgs("x"), "max_tokens": 10 ** 9}, 400, "max_tokens", "absurd max_tokens"),
    ({"model": None, "messages": msgs("x"), "max_tokens": 0}, 400, "max_tokens", "zero max_tokens"),
    ({"model": None, "messages": msgs("x"), "max_tokens": "5"}, 400, "max_tokens", "string max_tokens"),
    ({"model": None, "messages": msgs("x"), "max_tokens": 8190}, 400, "max_tokens", "past the context"),
    ({"model": None, "messages": msgs("x"), "temperature": 3}, 400, "temperature", "hot"),
    ({"model": None, "messages": msgs("x"), "temperature": "0"}, 400, "temperature", "string temperature"),
    ({"model": None, "messages": msgs("x"), "top_p": 0}, 400, "top_p", "top_p 0"),
    ({"model": None, "messages": msgs("x"), "stop": [""]}, 400, "stop", "empty stop"),
    ({"model": None, "messages": msgs("x"), "stop": 5}, 400, "stop", "stop not a string"),
    ({"model": None, "messages": msgs("x"), "seed": 1.5}, 400, "seed", "float seed"),
    ({"model": None, "messages": msgs("x"), "stream": True}, 400, "stream", "streaming"),
    ({"model": None, "messages": msgs("x"), "n": 2}, 400, "n", "n > 1"),
    ({"model": None, "messages": msgs("x"), "tools": []}, 400, "tools", "unknown field"),
    ({"model": None, "messages": msgs("word " * 9000)}, 400, "messages", "prompt longer than the context"),
]


def test_bad_requests_get_openai_style_4xx_and_the_server_keeps_serving(local_server):
    for body, status, param, what in BAD:
        if isinstance(body, dict) and body.get("model", "") is None:
            body = {**body, "model": local_server.model_name}
        r = post(local_server, body)
        err = r.json()["error"]
        assert (r.status_code, err["param"]) == (status, param), (what, r.status_code, err)
        assert err["type"] == "invalid_request_error" and err["message"], what
    with client(local_server) as c:
        assert c.chat(msgs(QUESTION), max_tokens=2).completion_tokens == 2
    # our client turns a 4xx into a clear error naming the endpoint and the server's message
    with ChatClient(local_server.base_url, "gpt-4", api_key="") as c, pytest.raises(ExecutorError) as ei:
        c.chat(msgs("x"), max_tokens=2)
    assert ei.value.status == 404 and "does not exist" in str(ei.value) and local_server.base_url in str(ei.value)


def test_routes_models_and_framing(local_server):
    listed = requests.get(local_server.base_url + "/models", timeout=30).json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [local_server.model_name]
    one = requests.get(f"{local_server.base_url}/models/{local_server.model_name}", timeout=30).json()
    assert one["id"] == local_server.model_name and one["object"] == "model"
    assert requests.get(local_server.base_url + "/nope", timeout=30).status_code == 404
    assert requests.post(local_server.base_url + "/completions", data=b"{}", timeout=30).status_code == 404
    with socket.create_connection(("127.0.0.1", local_server.port), timeout=30) as s:  # no Content-Length
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 411")


def test_api_key_is_required_when_set(smol):
    m, tok = smol
    with executor.LocalServer(m, tok, model_name="keyed", api_key="k3y") as server:
        assert requests.get(server.base_url + "/models", timeout=30).status_code == 401
        r = post(server, {"model": "keyed", "messages": msgs("x")}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with ChatClient(server.base_url, "keyed", api_key="wrong") as c, pytest.raises(ExecutorError) as ei:
            c.chat(msgs("x"), max_tokens=1)
        assert ei.value.status == 401 and ei.value.attempts == 1
        with ChatClient(server.base_url, "keyed", api_key="k3y") as c:
            assert c.chat(msgs("x"), max_tokens=1).completion_tokens == 1


def test_official_openai_client_talks_to_our_server_unchanged(local_server):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=local_server.base_url, api_key="unused", max_retries=0)
    assert [m.id for m in oc.models.list()] == [local_server.model_name]
    resp = oc.chat.completions.create(model=local_server.model_name, messages=msgs(QUESTION), max_tokens=10,
                                      temperature=0, seed=3, stop=["\n\n"])
    with client(local_server) as c:
        ours = c.chat(msgs(QUESTION), max_tokens=10, seed=3, stop=["\n\n"])
    assert resp.object == "chat.completion" and resp.model == local_server.model_name
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content == ours.text
    assert resp.choices[0].finish_reason == ours.finish_reason
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (ours.prompt_tokens, ours.completion_tokens)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oc.chat.completions.create(model=local_server.model_name, messages=msgs("x"), max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        oc.chat.completions.create(model="gpt-4o", messages=msgs("x"))


def test_serve_main_runs_until_sigterm():
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import executor; sys.exit(executor.serve_main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", "0", "--model-name", "served"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving served at http://127.0.0.1:"), (line, proc.stderr.read() if not line else "")
        base_url = line.split(" at ", 1)[1].strip()
        with ChatClient(base_url, "served", api_key="") as c:
            assert c.chat(msgs("hi"), max_tokens=3).completion_tokens == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_short_request_does_not_wait_for_a_long_one(local_server):
    """Continuous batching: a request sent while a long one decodes joins the running batch and is
    answered long before the long one ends (a static batcher answered it after)."""
    import threading
    import time
    done = {}

    def ask(name, max_tokens, delay):
        time.sleep(delay)
        with client(local_server) as c:
            c.chat(msgs("Write a very long story about a dragon and a knight."), max_tokens=max_tokens,
                   temperature=0.0)
        done[name] = time.monotonic()
    threads = [threading.Thread(target=ask, args=("long", 160, 0.0)),
               threading.Thread(target=ask, args=("short", 4, 1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done["short"] < done["long"], "the short request waited for the long one's batch"


@pytest.mark.slow
def test_speed_server_executor_scenario_runs_and_sides_agree():
    """bench/speed_server.py --scenario executor at a tiny size: static, continuous and direct all
    answer every call, and static and continuous give the same texts at temperature 0."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "speed_server.py"), "--scenario", "executor",
                        "--workflows", "3", "--gap-ms", "10", "--repeats", "1"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    n = int(r.stdout.split(" calls,")[0].rsplit(" ", 1)[1])
    assert f"texts identical         : {n}/{n}" in r.stdout, r.stdout
    assert "ratio continuous/static" in r.stdout
