"""executor.py: how ScoreFlow talks to the executor LLM and runs model-written code.

The executor is the LLM that runs every workflow's operators: SCOREFLOW.md §1 step 3 and §4
("Executor": GPT-4o-mini at temperature 0 in the paper, max_tokens 4096 in the official code). Each
operator call is one chat request (SCOREFLOW.md §3), thousands per iteration, so calls must be fast
under concurrency, survive a flaky endpoint, be counted, and be replayable.

Sections, in reading order, each readable on its own:
1. HTTP chat client. `ChatClient.chat` / `chat_many` speak OpenAI chat completions with
   `requests`, retrying as openai-python does (STYLE.md §6). A call ends as a `ChatResult` or an
   `ExecutorError` with a kind: an endpoint failure is not a wrong answer (SCOREFLOW.md §10.7).
   Tokens and dollars are summed per stage and tag under an optional hard `Budget`; finished calls
   are journalled in sqlite, so a rerun replays them without asking again.
2. Local OpenAI-compatible server. `start_local_server` / `serve_main` (`scoreflow.py serve`)
   serve model.py's model on 127.0.0.1, decoding concurrent requests together (model.Decoder).
3. Subprocess sandbox. `run_python` runs model-written code under OS isolation (SCOREFLOW.md
   §10.10); its section says what it covers and what it does not.

Non-goals: streaming, tool calls, logprobs, n > 1, embeddings, provider SDKs. The server is for one
trusted machine, not the internet.
"""

import argparse
import atexit
import contextlib
import ctypes
import dataclasses
import datetime
import email.utils
import functools
import hashlib
import hmac
import itertools
import json
import marshal
import math
import os
import random
import resource
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

if __name__ != "__main__":  # run as a program, this file is the sandbox server: no HTTP stack there
    import requests

# --- 1. HTTP chat client, call journal, budget -----------------------------------------------
# One chat call = one POST {base_url}/chat/completions. Its path through ChatClient: chat() checks
# the fields (check_chat, the server's own check) -> _journalled(): replayed from the sqlite
# journal, or sent once however many threads ask -> _send(): a concurrency slot and a budget
# reservation -> _post(): the HTTP attempts, retried as openai-python does -> the endpoint. A call
# that ends without a completion raises ExecutorError; chat_many() returns those as data.

# $ per 1M (prompt, completion) tokens, published list prices (early 2025). Extend with
# ChatClient(prices=...); a dated name ("gpt-4o-mini-2024-07-18") falls back to its longest listed
# prefix. A model missing here costs nothing unless a dollar cap needs it.
DEFAULT_PRICES = {
    "gpt-4o-mini": (0.15, 0.60),     # the paper's executor (SCOREFLOW.md §4)
    "gpt-4o": (2.50, 10.00),         # ablation executor (SCOREFLOW.md §8)
    "deepseek-chat": (0.27, 1.10),   # DeepSeek-V3, ablation executor
}
# Body fields the client sets from its own arguments; ChatClient(extra=...) may not replace them.
CLIENT_FIELDS = ("model", "messages", "temperature", "top_p", "max_tokens", "stop", "seed")
# Budget reservations bound a prompt's tokens by its UTF-8 bytes (a BPE token covers >= 1 byte)
# plus the chat template's own tokens, which we cannot see: this many per call and per message.
TEMPLATE_TOKENS_PER_CALL, TEMPLATE_TOKENS_PER_MESSAGE = 32, 8
ENDPOINT_DOWN_AFTER = 3  # consecutive calls ending in timeout/connection (retries spent) stop it
ROLES = ("system", "developer", "user", "assistant")
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # host names of this machine only


@dataclass
class ChatResult:
    """One finished chat call."""
    text: str                # choices[0].message.content
    prompt_tokens: int       # usage.prompt_tokens as the endpoint reported it (-1: missing)
    completion_tokens: int   # usage.completion_tokens (-1: missing)
    finish_reason: str       # "stop" | "length" | what the endpoint said
    cached: bool = False     # replayed from the call journal: nothing was sent


class ExecutorError(RuntimeError):
    """A chat call that ended without a completion, after its retries. `.kind` says why: "http"
    (`.status` holds the code), "timeout", "connection", "bad_body", "budget" or "down". These
    are endpoint failures, never evidence about a workflow (SCOREFLOW.md §10.7): score neither 0
    nor 1."""

    def __init__(self, kind, message, *, status=None, endpoint=None, attempts=0):
        super().__init__(message)
        self.kind, self.status, self.endpoint, self.attempts = kind, status, endpoint, attempts

    def __reduce__(self):  # BaseException's would rebuild it as type(message), losing the kind
        return type(self), (self.kind, str(self)), self.__dict__


class BudgetExceeded(ExecutorError):
    """The call could pass the run's Budget, so it was not sent (kind "budget"); every later call
    of the client raises it too."""


class EndpointDown(ExecutorError):
    """ENDPOINT_DOWN_AFTER calls in a row got no answer (timeout or dropped connection, retries
    spent), none answered in between (kind "down"). Every later call of the client raises it
    unsent, so a hung endpoint ends a stage within one client timeout instead of one per call."""


class RequestError(ValueError):
    """A bad chat request: a ValueError to the client's caller; our server answers it as an
    OpenAI-style error (status, param, code)."""

    def __init__(self, message, param=None, code="invalid_value", status=400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def _number(name, v, lo, hi, *, integer=False, lo_open=False):
    """v if it is a number (an int if `integer`) in [lo, hi] ((lo, hi] if lo_open), else raise."""
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or v != v or (v <= lo if lo_open else v < lo) or v > hi:
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'} in "
                           f"{'(' if lo_open else '['}{lo}, {hi}], got {v!r:.100}", param=name)
    return v


def check_chat(body):
    """A chat-completions body's standard fields, checked, as they are sent: {messages, temperature,
    top_p[, max_tokens][, stop][, seed]}. The one check of both sides: the client's of what it
    sends, the server's of what it gets. A content may be a list of {"type": "text", "text"} parts
    (joined); no temperature or top_p means OpenAI's 1; max_completion_tokens is max_tokens's newer
    name; stop is a string or a list of up to 16."""
    messages, out = body.get("messages"), []
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"'messages' must be a non-empty array, got {type(messages).__name__}",
                           param="messages", code="invalid_type")
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ROLES:
            raise RequestError(f"'messages[{i}]' must be an object with a role in {ROLES}, got "
                               f"{m!r:.100}", param=f"messages[{i}].role")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"'messages[{i}].content' must be a string or a list of text parts, "
                               f"got {type(content).__name__}", param=f"messages[{i}].content")
        out.append({"role": role, "content": content})
    t, p = (1.0 if body.get(k) is None else body[k] for k in ("temperature", "top_p"))
    out = {"messages": out, "temperature": float(_number("temperature", t, 0, 2)),
           "top_p": float(_number("top_p", p, 0, 1, lo_open=True))}
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    if field != "max_tokens" and body.get("max_tokens") is not None:
        raise RequestError("give 'max_tokens' or 'max_completion_tokens', not both", param=field)
    if body.get(field) is not None:
        out["max_tokens"] = _number(field, body[field], 1, 2 ** 31, integer=True)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not (isinstance(stops, (list, tuple)) and len(stops) <= 16
            and all(isinstance(s, str) and s for s in stops)):
        raise RequestError(f"'stop' must be a non-empty string or an array of at most 16 of "
                           f"them, got {stop!r:.200}", param="stop")
    if stops:
        out["stop"] = list(stops)
    if body.get("seed") is not None:
        out["seed"] = _number("seed", body["seed"], -2 ** 63, 2 ** 63 - 1, integer=True)
    return out


@dataclass
class RetryPolicy:
    """openai-python's retry policy (STYLE.md §6), with a larger default retry bound."""
    max_retries: int = 5             # retries after the first attempt (openai-python: 2)
    initial_delay: float = 0.5       # s, backoff before the first retry
    max_delay: float = 8.0           # s, backoff cap
    max_retry_after: float = 120.0   # s; a longer Retry-After ends the call (openai-python: 120)


@dataclass
class Budget:
    """A hard cap across all calls of a run. Calls replayed from the journal count at their
    recorded cost, so a resumed run spends up to the cap in total; raise the cap to go on."""
    dollars: float | None = None     # $ cap; None = no dollar cap
    tokens: int | None = None        # prompt + completion tokens cap; None = no token cap


@dataclass
class Usage:
    """Token and dollar totals over a set of calls (a stage, a tag, or the whole client)."""
    calls: int = 0                   # finished calls, sent or replayed
    cached: int = 0                  # of which replayed from the journal
    errors: int = 0                  # calls that ended as ExecutorError
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dollars: float = 0.0


def retry_after_seconds(headers, now=None):
    """Seconds a response asks us to wait before retrying, or None: `retry-after-ms`, then
    `Retry-After` as (possibly fractional) seconds, then as an HTTP date (RFC 9110 §10.2.3)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        with contextlib.suppress(TypeError, ValueError):
            seconds = float(headers.get(name)) * scale
            return seconds if math.isfinite(seconds) else math.inf
    try:
        when = email.utils.parsedate_to_datetime(headers.get("retry-after"))
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp() - (time.time() if now is None else now)


def backoff_delay(n_retry, policy, rand=random.random):
    """Backoff before retry n_retry (0-based): initial_delay·2ⁿ capped at max_delay, times a
    jitter in (0.75, 1] so that many clients do not retry in lockstep."""
    delay = min(policy.initial_delay * 2.0 ** min(n_retry, 64), policy.max_delay)
    return delay * (1.0 - 0.25 * rand())


def _headers(api_key):
    """A request's headers: api_key None reads OPENAI_API_KEY, "" sends no key."""
    key = os.environ.get("OPENAI_API_KEY", "") if api_key is None else api_key
    return ({"Content-Type": "application/json", "Accept": "application/json"}
            | ({"Authorization": f"Bearer {key}"} if key else {}))


def _excerpt(raw):
    """The start of a response body (300 characters), for an error message."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return repr(text[:300] + ("..." if len(text) > 300 else ""))


def _server_message(raw):
    """The server's words in an error body (OpenAI's {"error": {"message"}}), else an excerpt."""
    with contextlib.suppress(ValueError, AttributeError):
        err = json.loads(raw)
        err = err.get("error", err.get("detail"))
        err = err.get("message") if isinstance(err, dict) else err
        if isinstance(err, str):
            return err
    return _excerpt(raw)


def _is_read_timeout(exc):
    """requests reports a read timeout met while reading the body as a ConnectionError wrapping
    urllib3's ReadTimeoutError: walk the causes to tell it from a dropped connection."""
    for _ in range(8):
        if isinstance(exc, requests.exceptions.Timeout) or type(exc).__name__ == "ReadTimeoutError":
            return True
        inner = [a for a in getattr(exc, "args", ())[:1] if isinstance(a, BaseException)]
        exc = inner[0] if inner else getattr(exc, "__cause__", None)
    return False


def parse_chat_response(raw, endpoint):
    """A chat-completions body -> ChatResult. Malformed JSON or a missing choices[0].message is an
    ExecutorError("bad_body") quoting the body. A missing `usage` gives -1 token counts."""
    def bad(why):
        return ExecutorError("bad_body", f"{endpoint}: {why}: {_excerpt(raw)}", endpoint=endpoint)
    try:
        data = json.loads(raw)
    except ValueError:
        raise bad("response is not valid JSON") from None
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise bad("response has no choices[0].message.content") from None
    text = "" if text is None else text  # a refusal or a content filter: finish_reason says why
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = [usage.get("prompt_tokens", -1), usage.get("completion_tokens", -1)]
    if not isinstance(text, str) or not all(type(t) is int for t in tokens):
        raise bad("content or usage has the wrong type")
    return ChatResult(text, tokens[0], tokens[1], str(choice.get("finish_reason") or ""))


class ChatClient:
    """Thread-safe synchronous client for any OpenAI-compatible chat-completions endpoint (OpenAI,
    vLLM, llama.cpp, Ollama, our LocalServer); async callers use asyncio.to_thread(client.chat).

    base_url ends before /chat/completions ("https://api.openai.com/v1"). api_key None reads
    OPENAI_API_KEY; "" sends no key. timeout: seconds to connect and between bytes (requests').
    max_concurrency bounds calls in flight (None: 32 on loopback, where our server batches them,
    else 16). cache_path: the sqlite call journal (None: none). budget: a Budget (None: no cap).
    prices extends DEFAULT_PRICES. extra: server-specific body fields for every call
    (llama.cpp's {"repeat_penalty": 1.0}), never one the client sets itself. identity: what
    determines the endpoint's replies, for the journal key (default base_url; our local server
    passes its model file's fingerprint, so a resumed run replays whatever port it gets).

    The journal: one sqlite row per finished call, keyed by the whole request. WAL mode, a
    connection per thread, a commit per finished call, so a kill -9 loses only calls in flight.
    synchronous=NORMAL: a process crash loses nothing committed (a power cut may lose the last
    commits, which are then asked again). Several processes may share one file.
    """

    def __init__(self, base_url, model, *, api_key=None, timeout=60.0, max_concurrency=None,
                 cache_path=None, budget=None, prices=None, retry=None, extra=None, identity=None):
        self.base_url = str(base_url).rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"ChatClient: base_url must be http(s)://host[:port]/path, "
                             f"got {base_url!r}")
        self.endpoint = self.base_url + "/chat/completions"
        self.model, self.timeout, self.extra = model, float(timeout), dict(extra or {})
        if clash := sorted(set(self.extra) & set(CLIENT_FIELDS)):
            raise ValueError(f"ChatClient: extra fields {clash} are set by the client itself (its "
                             f"own arguments: temperature, top_p, max_tokens, stop, seed)")
        self.identity = self.base_url if identity is None else str(identity)
        self._headers = _headers(api_key)
        self.max_concurrency = int(max_concurrency or (32 if parts.hostname in LOOPBACK else 16))
        self.retry = retry if retry is not None else RetryPolicy()
        prices = DEFAULT_PRICES | {k: (float(p), float(c)) for k, (p, c) in (prices or {}).items()}
        # exact name, else the longest listed prefix ending at a '-'; None: unpriced, costs $0
        prefix = max((k for k in prices if model.startswith(k + "-")), key=len, default=None)
        self.price = prices.get(model, prices.get(prefix))
        self.budget = budget or Budget()
        if self.budget.dollars is not None and self.price is None:
            raise ValueError(f"ChatClient: a dollar budget needs a price for model {model!r}; "
                             f"pass prices={{{model!r}: (prompt $/1M, completion $/1M)}}")
        self._session = requests.Session()  # keep-alive connections; retries are ours (_post)
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, max_retries=0,
                                                pool_maxsize=self.max_concurrency)
        for scheme in ("http://", "https://"):  # replacing the defaults: same prefixes
            self._session.mount(scheme, adapter)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._lock = threading.Lock()
        self._budget_freed = threading.Condition(self._lock)
        self._inflight = {}                    # journal key -> Event set when its sender finishes
        self._pool = None                      # chat_many's worker threads, made on first use
        self._reserved = [0, 0.0, 0]           # tokens, dollars, calls held by calls in flight
        self.total, self.by_stage, self.by_tag = Usage(), defaultdict(Usage), defaultdict(Usage)
        self.n_sent = 0                        # calls that went to the endpoint (journal misses)
        self.n_requests = 0                    # HTTP attempts, retries included
        self.n_missing_usage = 0               # answers without usage: a token cap misses them
        self.errors = Counter()                # ExecutorError kind -> count
        self.stopped = None                    # the BudgetExceeded / EndpointDown that stopped us
        self._dead_in_a_row = 0                # calls ended in timeout/connection since an answer
        self.journal, self._local, self._conns = cache_path, threading.local(), []
        if cache_path is not None:
            self.journal = os.fspath(cache_path)
            os.makedirs(os.path.dirname(os.path.abspath(self.journal)), exist_ok=True)
            self._db().executescript(
                "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, "
                "request TEXT NOT NULL, text TEXT NOT NULL, prompt_tokens INTEGER, "
                "completion_tokens INTEGER, finish_reason TEXT, stage TEXT, tag TEXT, seconds REAL,"
                " created REAL)")

    def _db(self):
        """This thread's connection to the journal."""
        if (con := getattr(self._local, "con", None)) is None:
            con = self._local.con = sqlite3.connect(self.journal, timeout=60.0,
                                                    check_same_thread=False)
            con.execute("PRAGMA synchronous=NORMAL")
            with self._lock:
                self._conns.append(con)
        return con

    def _cost(self, prompt_tokens, completion_tokens):
        return 0.0 if self.price is None else (max(prompt_tokens, 0) * self.price[0]
                                               + max(completion_tokens, 0) * self.price[1]) / 1e6

    def chat(self, messages, *, temperature=0.0, top_p=1.0, max_tokens=512, stop=None, seed=None,
             sample=0, attempt=0, occurrence=0, stage="", tag=""):
        """One chat call -> ChatResult, from the journal when this exact call already finished.
        Raises ExecutorError when it ends without a completion: BudgetExceeded for the budget and
        EndpointDown for an endpoint that stopped answering; after either, every call raises it.
        sample, attempt and occurrence say which call of an identical request this is (see
        _journalled); stage and tag only label the accounting (by_stage, by_tag)."""
        which = dict(sample=sample, attempt=attempt, occurrence=occurrence)
        for name, v in which.items():
            _number(name, v, 0, 2 ** 63, integer=True)
        body = {"model": self.model} | check_chat(dict(
            messages=messages, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
            stop=stop, seed=seed)) | self.extra
        try:
            if self.journal is None:
                return self._send(body, stage, tag)
            return self._journalled(body, which, stage, tag)
        except ExecutorError as e:
            with self._lock:
                self.errors[e.kind] += 1
                for usage in (self.total, self.by_stage[stage], self.by_tag[tag]):
                    usage.errors += 1
            raise

    def _journalled(self, body, which, stage, tag):
        """Replay the call from the journal, or become its only sender: identical concurrent
        calls wait for the one in flight instead of asking the endpoint twice. The key hashes the
        blob the journal keeps: the endpoint's identity (not its port), the whole body (model,
        messages, sampling, extra fields), and `which` call this is: the sample (k samples of one
        prompt stay k calls), the attempt (a retried run asks anew) and the occurrence (the n-th
        identical request of a run: repeated calls are n calls)."""
        blob = json.dumps({"endpoint": self.identity, "body": body} | which, sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False)
        key = hashlib.sha256(blob.encode("utf-8")).hexdigest()
        while True:  # claim the key: look it up and send it as its only sender
            with self._lock:
                event = self._inflight.setdefault(key, mine := threading.Event())
            if event is not mine:
                event.wait()  # its sender finished: a hit next time round, or ours if it failed
                continue
            try:
                hit = self._db().execute(
                    "SELECT text, prompt_tokens, completion_tokens, finish_reason FROM calls "
                    "WHERE key = ?", (key,)).fetchone()
                if hit is None:
                    t0 = time.monotonic()
                    r = self._send(body, stage, tag)
                    with self._db() as con:  # commits
                        con.execute("INSERT OR REPLACE INTO calls VALUES (?,?,?,?,?,?,?,?,?,?)",
                                    (key, blob, r.text, r.prompt_tokens, r.completion_tokens,
                                     r.finish_reason, stage, tag, time.monotonic() - t0,
                                     time.time()))
                    return r
            finally:
                with self._lock:
                    del self._inflight[key]
                mine.set()
            with self._lock:
                self._account(hit := ChatResult(*hit, cached=True), stage, tag)
            return hit

    def _send(self, body, stage, tag):
        """Reserve the call's worst case (prompt bound + max_tokens) against the budget, POST it
        with retries, then swap the reservation for the tokens actually used, in one locked step.
        A call that only fails to fit because of calls in flight waits for them; one that cannot
        fit with nothing in flight is refused unsent and stops the client."""
        prompt = TEMPLATE_TOKENS_PER_CALL + sum(TEMPLATE_TOKENS_PER_MESSAGE + len(
            m["content"].encode("utf-8")) for m in body["messages"])
        hold = (prompt + body["max_tokens"], self._cost(prompt, body["max_tokens"]), 1)
        with self._slots:
            with self._lock:
                while (over := self._over_budget(*hold[:2])) and self._reserved[2] \
                        and not self.stopped:
                    self._budget_freed.wait()
                if over and self.stopped is None:
                    self._stop(BudgetExceeded("budget", f"{self.endpoint}: budget reached, call "
                                              f"not sent: {over} (resume with a raised cap)"))
                if self.stopped is not None:
                    raise self._stopped_error()
                self._reserved = [r + h for r, h in zip(self._reserved, hold)]
                self.n_sent += 1
            result = None
            try:
                result = self._post(body)
                return result
            finally:
                with self._lock:
                    self._reserved = [r - h for r, h in zip(self._reserved, hold)]
                    if result is not None:
                        self._account(result, stage, tag)
                    self._budget_freed.notify_all()

    def _over_budget(self, tokens, dollars):
        """Why spent + in flight + this call's worst case would pass the budget ("" if it would
        not). Called with self._lock held."""
        b, spent, (held_tokens, held_dollars, _) = self.budget, self.total, self._reserved
        used, over = spent.prompt_tokens + spent.completion_tokens, []
        if b.tokens is not None and used + held_tokens + tokens > b.tokens:
            over.append(f"{used} tokens spent + {held_tokens} in flight + up to {tokens} for "
                        f"this call > cap {b.tokens}")
        if b.dollars is not None and spent.dollars + held_dollars + dollars > b.dollars:
            over.append(f"${spent.dollars:.6f} spent + ${held_dollars:.6f} in flight + up to "
                        f"${dollars:.6f} for this call > cap ${b.dollars:.6f}")
        return "; ".join(over)

    def _stop(self, error):
        """Stop the client for good (self._lock held): every later call raises `error`."""
        error.endpoint, self.stopped = self.endpoint, error
        self._budget_freed.notify_all()

    def _stopped_error(self):
        """A fresh copy of the error that stopped the client, for each call it stops (one object
        raised in many threads would collect all their tracebacks)."""
        return type(self.stopped)(self.stopped.kind, str(self.stopped), endpoint=self.endpoint)

    def _post(self, body):
        """POST with openai-python's retry policy (STYLE.md §6) -> ChatResult, or ExecutorError.
        Retried: 408, 409, 429, 5xx (or what x-should-retry says), timeouts, dropped connections
        and bad bodies; Retry-After is obeyed up to max_retry_after, above it the call ends."""
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        policy, ep = self.retry, self.endpoint
        for attempt in itertools.count(1):
            with self._lock:
                if self.stopped is not None and attempt > 1:  # no retries once stopped
                    raise self._stopped_error()
                self.n_requests += 1
            wait = None
            try:
                resp = self._session.post(ep, data=payload, headers=self._headers,
                                          timeout=(self.timeout, self.timeout))
                raw, status = resp.content, resp.status_code
            except requests.exceptions.RequestException as exc:
                kind = "timeout" if _is_read_timeout(exc) else "connection"
                what = (f"no response within {self.timeout:g} s" if kind == "timeout"
                        else "connection failed")
                error = ExecutorError(kind, f"{ep}: {what} ({type(exc).__name__}: {exc})",
                                      endpoint=ep)
            else:
                if 200 <= status < 300:
                    try:
                        result = parse_chat_response(raw, ep)
                    except ExecutorError as exc:  # truncated or garbled: another try may do
                        error = exc
                    else:
                        with self._lock:
                            self.n_missing_usage += min(result.prompt_tokens,
                                                        result.completion_tokens) < 0
                            self._dead_in_a_row = 0
                        return result
                else:
                    error = ExecutorError("http", f"{ep}: HTTP {status}: {_server_message(raw)}",
                                          status=status, endpoint=ep, attempts=attempt)
                    hint = resp.headers.get("x-should-retry")
                    if hint == "false" or (hint != "true" and status not in (408, 409, 429)
                                           and status < 500):
                        raise error
                    wait = retry_after_seconds(resp.headers)
                    if wait is not None and wait > policy.max_retry_after:
                        error.args = (f"{error} -- Retry-After asks for {wait:g} s, above the cap "
                                      f"of {policy.max_retry_after:g} s "
                                      "(RetryPolicy.max_retry_after): not retrying",)
                        raise error
            error.attempts = attempt
            if attempt > policy.max_retries:
                error.args = (f"{error} (gave up after {attempt} attempts)",)
                if error.kind in ("timeout", "connection"):
                    self._no_answer(error)
                raise error
            time.sleep(wait if wait is not None and wait > 0 else backoff_delay(attempt - 1,
                                                                                policy))

    def _no_answer(self, error):
        """A call got no answer, retries spent: the call that makes it ENDPOINT_DOWN_AFTER in a row
        stops the client (EndpointDown) and raises it."""
        with self._lock:
            if self.stopped is None:
                self._dead_in_a_row += 1
                if self._dead_in_a_row >= ENDPOINT_DOWN_AFTER:
                    self._stop(EndpointDown("down", f"{self.endpoint}: {self._dead_in_a_row} "
                                            f"calls in a row got no answer within "
                                            f"{self.timeout:g} s, retries included; last: {error}"))
                    raise self._stopped_error() from error

    def _account(self, result, stage, tag):
        """Add a finished call to the totals (self._lock held). A missing usage (-1) counts 0."""
        cost = self._cost(result.prompt_tokens, result.completion_tokens)
        for usage in (self.total, self.by_stage[stage], self.by_tag[tag]):
            usage.calls += 1
            usage.cached += result.cached
            usage.prompt_tokens += max(result.prompt_tokens, 0)
            usage.completion_tokens += max(result.completion_tokens, 0)
            usage.dollars += cost

    def stats(self):
        """A snapshot of the accounting, JSON-ready (a run keeps it in metrics.json)."""
        names = ("model", "endpoint", "identity", "timeout", "max_concurrency", "n_sent",
                 "n_requests", "n_missing_usage")
        with self._lock:
            return {k: getattr(self, k) for k in names} | {
                "priced": self.price is not None, "errors": dict(self.errors),
                "extra": dict(self.extra), "total": dataclasses.asdict(self.total),
                "budget": dataclasses.asdict(self.budget),
                **{k: {n: dataclasses.asdict(u) for n, u in getattr(self, k).items()}
                   for k in ("by_stage", "by_tag")}}

    def chat_many(self, requests):
        """chat(**r) for every dict r, up to max_concurrency at once -> results in order, each a
        ChatResult or the ExecutorError it ended with (failures are data); bad arguments raise.
        (A run calls chat() from its workflows' threads; scripts and benches send lists here.)"""
        def one(req):
            try:
                return self.chat(**req)
            except ExecutorError as e:
                return e
        # one pool for the client's life: a burst opens no threads, nor their journal connections
        with self._lock:
            self._pool = self._pool or ThreadPoolExecutor(self.max_concurrency, "chat")
        return list(self._pool.map(one, requests))

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._session.close()
        with self._lock:
            for con in self._conns:
                con.close()
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def preflight(base_url, model, *, api_key=None, timeout=30.0):
    """Before any work: does the endpoint answer GET {base_url}/models, and does it serve `model`
    where it lists models? "" if so, else one line saying what is wrong. An endpoint without the
    route (404/405) counts as answering. A listing without `model` is an error even with a single
    id: llama.cpp's server answers any name with its one model and echoes the name back."""
    url = str(base_url).rstrip("/") + "/models"
    where = f"--executor-url {base_url}: GET {url}"
    try:
        resp = requests.get(url, headers=_headers(api_key), timeout=(timeout, timeout))
    except requests.exceptions.RequestException as e:
        return f"--executor-url {base_url}: no answer from GET {url} ({type(e).__name__}: {e})"
    if resp.status_code in (404, 405):
        return ""
    if resp.status_code in (401, 403):
        return (f"{where} refused the key (HTTP {resp.status_code}: "
                f"{_server_message(resp.content)}); pass --api-key or set OPENAI_API_KEY")
    if not 200 <= resp.status_code < 300:
        return f"{where} answered HTTP {resp.status_code}: {_server_message(resp.content)}"
    try:
        ids = [str(m["id"]) for m in resp.json().get("data")]
    except (ValueError, AttributeError, TypeError, KeyError):
        return ""  # answered, but lists nothing we can read: nothing to check the name against
    if ids and model not in ids and f"{model}:latest" not in ids:  # Ollama lists "name:latest"
        shown = ", ".join(ids[:8]) + (f", ... ({len(ids)} models)" if len(ids) > 8 else "")
        return f"--executor-model {model}: {url} does not serve it; it lists {shown}"
    return ""


# --- 2. Local OpenAI-compatible server --------------------------------------------------------
# POST /v1/chat/completions and GET /v1/models over a model.py model, on the standard library's
# ThreadingHTTPServer. A request's path: a handler thread (_ChatHandler._complete) reads the body,
# parse_request checks it (check_chat, as the client did) and renders and tokenizes the prompt
# into a _Job on the queue; the batching thread that owns the model (_work) moves queued jobs
# into its model.Decoder between decode steps and wakes a job's handler when its row finishes.
# Errors are OpenAI-style {"error": {"message", "type", "param", "code"}}.

MAX_BODY_BYTES = 16 << 20   # a request body larger than this is refused with 413
# Fields OpenAI clients (and llama.cpp's sampler) may send, accepted only at the value that asks
# for our only behaviour: our sampler has no penalties, no top-k and no min-p.
_NEUTRAL_FIELDS = {"stream": False, "n": 1, "logprobs": False, "presence_penalty": 0,
                   "frequency_penalty": 0, "repeat_penalty": 1, "top_k": 0, "min_p": 0}


def neutral_field_error(name, value):
    """Why our server refuses `name` = value ("" if it accepts it): unknown fields are refused,
    and the known optional ones accepted only at the value that asks for our only behaviour."""
    if name not in _NEUTRAL_FIELDS:
        return (f"Unrecognized request argument supplied: {name} (this server also takes, at one "
                "value each: " + ", ".join(f"{k}={v!r}" for k, v in _NEUTRAL_FIELDS.items()) + ")")
    want = _NEUTRAL_FIELDS[name]
    if value is not None and (isinstance(value, bool) != isinstance(want, bool) or value != want):
        return f"'{name}' = {value!r} is not supported by this server (only {want!r})"
    return ""


def model_fingerprint(path):
    """A cheap identity for a model file or directory: sha256 over the size and 8 evenly spaced
    64 KiB blocks of each file (a directory: each file by relative name, sorted). It differs for
    any other model file we know of."""
    h, path, block = hashlib.sha256(), os.fspath(path), 1 << 16
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for name in files:
        size = os.path.getsize(name)
        h.update(f"{os.path.relpath(name, path) if name != path else ''}\0{size}\0".encode())
        with open(name, "rb") as fh:
            for i in range(8):
                fh.seek(max(0, size - block) * i // 7)
                h.update(fh.read(block))
    return h.hexdigest()[:32]


@dataclass(eq=False)  # hashed by identity: the batcher keeps sets of them
class _Job:
    """One queued chat request: a row for model.Decoder.add, and the Future its handler waits
    on: a model.Completion, or a RequestError when the batch failed (500) or the server stopped
    (503)."""
    prompt: str              # chat-rendered prompt text
    ids: list                # its token ids, as model.prompt_ids gives them
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    seed: int
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    future: Future = dataclasses.field(default_factory=Future)


def _fail(jobs, why, status):
    """Answer the handlers of `jobs` with an error instead of a completion."""
    for job in jobs:
        job.future.set_exception(RequestError(why, code=None, status=status))


class LocalServer:
    """An OpenAI-compatible chat server over a loaded (model, tokenizer), started on
    construction; `base_url` ends in "/v1". Use it as a context manager or call stop().

    Continuous batching (model.Decoder): requests join the running batch between decode steps
    and leave it when they finish, so a workflow's next call never waits for the slowest row of
    a batch it was not in (bench/speed_server.py --scenario executor measures it against static
    batches). max_batch caps the rows decoding at once, max_kv_bytes the batch's KV cache;
    batch_window (s) is how long an idle batcher keeps gathering after the last new request (see
    _gather). default_max_tokens is used when a request gives none (OpenAI's default, "up to the
    context", is too slow on a CPU).
    """
    max_wait = 0.2   # s the oldest waiting request waits at most before it joins (see _work)

    def __init__(self, model, tokenizer, *, model_name="local", host="127.0.0.1", port=0,
                 api_key=None, max_batch=32, batch_window=0.01, max_kv_bytes=2 << 30,
                 default_max_tokens=1024, verbose=False):
        import model as modellib  # here, not at the top: clients and the sandbox need no torch
        self._modellib, cfg = modellib, model.config
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.api_key, self.verbose = api_key or None, verbose
        self.max_batch, self.batch_window = int(max_batch), float(batch_window)
        self.default_max_tokens, self.context = int(default_max_tokens), int(cfg.max_seq_len)
        kv_bytes_per_token = (2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim  # k and v
                              * model.lm_head.weight.element_size())
        self.max_kv_tokens = max(int(max_kv_bytes) // kv_bytes_per_token, self.context)
        self.created = int(time.time())
        self.batch_sizes = {}        # rows joining the batch together -> how many joins
        self.n_completions = 0
        self._pending, self._closing = [], False
        self._arriving = 0           # POSTs received but not yet queued (parsing, rendering)
        self._cv = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="executor-batcher", daemon=True)
        self._worker.start()
        self._httpd = ThreadingHTTPServer((host, port), _ChatHandler)
        self._httpd.daemon_threads, self._httpd.owner = True, self
        self.host, self.port = host, self._httpd.server_address[1]
        self.base_url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"
        threading.Thread(target=self._httpd.serve_forever, args=(0.1,), name="executor-http",
                         daemon=True).start()

    def parse_request(self, raw):
        """A POST /v1/chat/completions body -> _Job, or RequestError naming the wrong field."""
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise RequestError(f"request body is not valid JSON ({e})",
                               code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(f"request body must be a JSON object, got {type(body).__name__}",
                               code="invalid_json")
        for name in body.keys() - {*CLIENT_FIELDS, "max_completion_tokens", "user"}:
            if why := neutral_field_error(name, body[name]):
                raise RequestError(why, param=name, code="unsupported_value"
                                   if name in _NEUTRAL_FIELDS else "unsupported_parameter")
        if not isinstance(body.get("model"), str):
            raise RequestError(f"'model' must be a string, got {body.get('model')!r:.100}",
                               param="model", code="invalid_type")
        if body["model"] != self.model_name:
            raise RequestError(f"The model `{body['model']:.100}` does not exist; this server has "
                               f"`{self.model_name}`", param="model", code="model_not_found",
                               status=404)
        if not isinstance(body.get("user", ""), str):
            raise RequestError(f"'user' must be a string, got {body['user']!r:.100}", param="user")
        f = check_chat(body)
        for m in f["messages"]:  # check_chat's own copies; our chat templates know no developer
            m["role"] = "system" if m["role"] == "developer" else m["role"]
        prompt = self.tokenizer.apply_chat(f["messages"], add_generation_prompt=True)
        ids = self._modellib.prompt_ids(self.tokenizer, prompt)
        field = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"
        max_tokens, room = f.get("max_tokens"), self.context - len(ids)
        if room < 1 or max_tokens is not None and max_tokens > room:
            raise RequestError(f"the prompt is {len(ids)} tokens; with '{field}' = {max_tokens} it "
                               f"passes the model's context of {self.context}",
                               param="messages" if room < 1 else field,
                               code="context_length_exceeded")
        # a fresh seed per request keeps rows independent of their batch mates
        seed = f.get("seed", int.from_bytes(os.urandom(8), "little") >> 1)
        return _Job(prompt, ids, max_tokens or min(self.default_max_tokens, room),
                    f["temperature"], f["top_p"], f.get("stop", []), seed)

    # -- the batching thread ---------------------------------------------------------------------
    def _work(self):
        """Own the model: let due jobs into the Decoder, step it, wake the handlers of the rows
        that finished. While rows decode, waiting jobs join once they are a quarter of the rows
        decoding or the oldest has waited max_wait: each join costs a prefill and maybe a copy of
        the cache, so one join of several beats several of one."""
        M = self._modellib
        dec = M.Decoder(self.model, self.tokenizer)
        while True:
            with self._cv:
                if not len(dec):
                    self._gather()
                if self._closing:
                    break
                due = self._pending and (
                    not len(dec) or len(self._pending) * 4 >= len(dec)
                    or time.monotonic() - self._pending[0].arrived >= self.max_wait)
                batch = self._take_batch(dec) if due else []
            try:
                with M.prepacked(self.model):
                    if batch:
                        dec.add(batch, [j.ids for j in batch], [j.max_tokens for j in batch],
                                [j.temperature for j in batch], [j.top_p for j in batch],
                                [0] * len(batch), [j.seed for j in batch], [j.stop for j in batch])
                    finished = dec.step()
            except Exception as e:  # fail the jobs of this Decoder; the server keeps serving
                jobs = {j for j in batch + [r["tag"] for r in dec.rows] if not j.future.done()}
                why = f"generation failed for a batch of {len(jobs)}: {type(e).__name__}: {e}"
                print(f"executor server: {why}", file=sys.stderr)
                _fail(jobs, why, 500)
                finished, dec = [], M.Decoder(self.model, self.tokenizer)
            self.n_completions += len(finished)  # only this thread writes it
            for job, c in finished:
                job.future.set_result(c)
        # closing: rows still decoding get a 503, as queued requests do (stop)
        _fail([r["tag"] for r in dec.rows if r["done"] is None], "server stopped", 503)

    def _gather(self):
        """Idle: wait for a first request, then keep gathering while they keep coming (at most
        max_wait). Called with self._cv held."""
        self._cv.wait_for(lambda: self._pending or self._closing)
        first = time.monotonic()
        while not self._closing and len(self._pending) < self.max_batch:
            seen, left = len(self._pending), first + self.max_wait - time.monotonic()
            if left <= 0:
                break
            self._cv.wait(min(self.batch_window, left))
            # stop once a window passed with nothing new and no request still being parsed
            if len(self._pending) == seen and not self._arriving:
                break

    def _take_batch(self, dec):
        """FIFO jobs that may join `dec` now: rows <= max_batch, rows x (aligned prompt width +
        longest remaining completion) <= max_kv_tokens; at least one when nothing decodes.
        Called with self._cv held; counts the join in batch_sizes."""
        n, k, width = len(dec), 0, dec.t
        most = max((r["max_new"] - len(r["out"]) for r in dec.rows if r["done"] is None), default=0)
        for job in self._pending:
            width, most = max(width, len(job.ids)), max(most, job.max_tokens)
            if (k or n) and (n + k >= self.max_batch
                             or (n + k + 1) * (width + most) > self.max_kv_tokens):
                break
            k += 1
        batch = self._pending[:k]
        del self._pending[:k]
        if batch:
            self.batch_sizes[k] = self.batch_sizes.get(k, 0) + 1
        return batch

    def stop(self):
        """Stop accepting; fail what is queued or still decoding (503), after the current step."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            left, self._pending = self._pending, []
            self._cv.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        _fail(left, "server stopped", 503)
        self._worker.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class _ChatHandler(BaseHTTPRequestHandler):
    """One connection's thread. Every answer is JSON: the route's (200), or the RequestError it
    raised as OpenAI's {"error"}; any other exception is a bug of ours, a 500 saying so."""
    protocol_version = "HTTP/1.1"   # keep-alive, so clients' connection pools are used
    server_version = "scoreflow-executor"
    timeout = 600                   # s an idle keep-alive connection may hold its thread

    def log_message(self, fmt, *args):
        if self.server.owner.verbose:
            super().log_message(fmt, *args)

    def do_GET(self):
        self._answer(self._route, "GET")

    def do_POST(self):
        self._answer(self._complete)

    def _answer(self, handle, *args):
        try:
            status, obj = 200, handle(*args)
        except Exception as e:
            if not isinstance(e, RequestError):
                e = RequestError(f"internal error reading the request: {type(e).__name__}: {e}",
                                 code=None, status=500)
            status, obj = e.status, {"error": {
                "message": e.message, "param": e.param, "code": e.code,
                "type": "server_error" if e.status >= 500 else "invalid_request_error"}}
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client went away; nothing to tell it
            self.close_connection = True

    def _route(self, method):
        """GET's answer, None for POST /v1/chat/completions; a wrong key is a 401 and any other
        route a 404."""
        owner, path = self.server.owner, self.path.split("?", 1)[0].rstrip("/")
        if owner.api_key is not None and not hmac.compare_digest(
                self.headers.get("Authorization", "").encode(), f"Bearer {owner.api_key}".encode()):
            raise RequestError("Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", status=401)
        model = {"object": "model", "id": owner.model_name, "created": owner.created,
                 "owned_by": "scoreflow"}
        if method == "GET" and path == "/v1/models":
            return {"object": "list", "data": [model]}
        if method == "GET" and path == f"/v1/models/{owner.model_name}":
            return model
        if method != "POST" or path != "/v1/chat/completions":
            raise RequestError(f"no route {method} {path}; this server has GET /v1/models and "
                               "POST /v1/chat/completions", code="not_found", status=404)
        return None

    def _complete(self):
        """POST /v1/chat/completions: queue the request's _Job, wait until the batcher has done
        it -> a chat.completion."""
        owner, length = self.server.owner, self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:  # 411 / 413, and hang up
            self.close_connection = True
            if not length.isdigit():
                raise RequestError(f"a Content-Length header is required, got {length!r}",
                                   code=None, status=411)
            raise RequestError(f"request body is {length} bytes, above {MAX_BODY_BYTES}",
                               code=None, status=413)
        with owner._cv:  # the batcher waits for requests already here but still being parsed
            owner._arriving += 1
        try:
            raw = self.rfile.read(int(length))  # read before any answer: keep-alive stays in step
            self._route("POST")
            job = owner.parse_request(raw)
            with owner._cv:
                if owner._closing:
                    raise RequestError("server is stopping", code=None, status=503)
                owner._pending.append(job)
        finally:
            with owner._cv:
                owner._arriving -= 1
                owner._cv.notify_all()
        c = job.future.result()  # raises the batcher's RequestError, if any
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": owner.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "logprobs": None, "finish_reason": c.finish_reason}],
                "usage": {"prompt_tokens": c.n_prompt_tokens,
                          "completion_tokens": c.n_completion_tokens,
                          "total_tokens": c.n_prompt_tokens + c.n_completion_tokens}}


def start_local_server(model_path=None, *, device="cpu", dtype="float32", model=None,
                       tokenizer=None, model_name=None, **options):
    """Load model_path with model.load (None: the embedded SmolLM2-135M-Instruct GGUF) on device
    in dtype (a torch dtype's name), or serve a loaded (model, tokenizer), and start a
    LocalServer; options go to it (host, port: 0 for a free one, api_key, max_batch, ...). The
    name clients send as `model` defaults to the file or directory name."""
    import model as modellib  # see LocalServer.__init__
    if (model is None) != (tokenizer is None):
        raise ValueError("start_local_server: pass both model and tokenizer, or neither")
    loaded = model is None
    if loaded:
        import torch
        model, tokenizer = modellib.load(model_path, device=device, dtype=getattr(torch, dtype))
    path = model_path if model_path is not None else modellib.embedded_model_path()
    if model_name is None:
        model_name = os.path.basename(os.path.normpath(os.fspath(path))).removesuffix(".gguf")
    server = LocalServer(model, tokenizer, model_name=model_name, **options)
    # what determines its replies, for a client's journal key (ChatClient identity): not the port
    weights = model.lm_head.weight
    what = (model_fingerprint(path) if loaded or model_path is not None
            else model_name + "-given")
    server.identity = (f"local:{what}:{str(weights.dtype).replace('torch.', '')}:"
                       f"{weights.device.type}")
    return server


def serve_main(argv=None):
    """`python scoreflow.py serve`: serve a model until SIGINT/SIGTERM. Prints the base URL and
    model name on stdout once it is listening."""
    p = argparse.ArgumentParser(prog="scoreflow.py serve", description="Serve a model over an "
                                "OpenAI-compatible API: POST /v1/chat/completions, GET /v1/models "
                                "(continuous batching).")
    a = p.add_argument
    a("--model", help="GGUF file or HF directory (default: the embedded SmolLM2-135M GGUF)")
    a("--model-name", help="name clients send as 'model' (default: the file name)")
    a("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    a("--port", type=int, default=8000, help="TCP port, 0 = any free port (default: 8000)")
    a("--api-key", help="require 'Authorization: Bearer KEY' (default: no key)")
    a("--device", default="cpu", help="torch device (default: cpu)")
    a("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
      help="weight dtype (default: float32)")
    a("--max-batch", type=int, default=32, help="rows decoding at once (default: 32)")
    a("--batch-window-ms", type=float, default=10.0,
      help="keep gathering while requests arrive this often, ms (default: 10)")
    a("--max-kv-gib", type=float, default=2.0, help="KV-cache cap per batch, GiB (default: 2)")
    a("--default-max-tokens", type=int, default=1024,
      help="completion tokens when a request gives no max_tokens (default: 1024)")
    a("--verbose", action="store_true", help="log every request on stderr")
    args = p.parse_args(argv)
    if (args.max_batch < 1 or args.batch_window_ms < 0 or args.max_kv_gib <= 0
            or args.default_max_tokens < 1):
        p.error("--max-batch and --default-max-tokens must be >= 1, --batch-window-ms >= 0, "
                "--max-kv-gib > 0")
    if args.host not in LOOPBACK and not args.api_key:
        print(f"scoreflow serve: warning: binding {args.host} without --api-key lets anyone who "
              "can reach it use the model", file=sys.stderr)
    server = start_local_server(args.model, host=args.host, port=args.port, api_key=args.api_key,
                                device=args.device, dtype=args.dtype, model_name=args.model_name,
                                max_batch=args.max_batch, batch_window=args.batch_window_ms / 1000,
                                max_kv_bytes=int(args.max_kv_gib * (1 << 30)),
                                default_max_tokens=args.default_max_tokens, verbose=args.verbose)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    print(f"serving {server.model_name} at {server.base_url}", flush=True)
    try:
        while not stopping.wait(0.5):
            pass
    finally:
        server.stop()
        print("scoreflow serve: stopped", file=sys.stderr)
    return 0


# --- 3. Subprocess sandbox --------------------------------------------------------------------
# run_python(code) runs model-written Python walled in by the operating system, never by exec in
# our process (STYLE.md §6; SCOREFLOW.md §10.10); its docstring says what that covers and what it
# does not. A sandbox server (`python -I executor.py --sandbox-server`, one per parent process,
# never running model code itself) forks one child per run; the child builds its walls (as root
# where we are root: preexec_fn is unsafe in our threaded parent), then runs main.py. The caller
# keeps the wall clock: at the limit it SIGKILLs the run, which as init of its PID namespace takes
# every descendant along.
#
# The layers, in the order they are built (the server's, then each run's). One this kernel or user
# does not allow is skipped, said once on stderr, and left out of SandboxResult.layers.
#   cgroup-pids     a pids cgroup shared by the server's runs caps their tasks together
#   cgroup-memory   a shared memory cgroup caps their memory (tmpfs too) at half the machine's
#   user-namespace  not root: the server's own (us as root inside), for the other namespaces
#   pid-namespace   the code is init of a new PID namespace: when it ends, the kernel kills every
#                   descendant, setsid'ed escapees included
#   uid-sweep       without pid-namespace, as root: after the run, SIGKILL to the run's uid
#   session         the code leads its own session and process group
#   mount-namespace private mounts, for hidden-dirs, tmpfs-workdir and proc-private
#   net-namespace   a new network namespace with no interface up: no network, loopback included
#   ipc-namespace   private System V IPC and POSIX message queues
#   hidden-dirs     empty tmpfs over home and the project; interpreter dirs inside, bound read-only
#   tmpfs-workdir   the work dir is /tmp, a fresh size-capped tmpfs (else a host temp dir)
#   proc-private    /proc shows the sandbox's own processes only
#   rlimits         CPU seconds, address space, file size (stdout, stderr too), open files, no core
#   uid-drop        as root: a per-run uid/gid (_SANDBOX_UID_BASE + host pid); root ignores
#                   RLIMIT_NPROC, and a shared `nobody` would let parallel runs signal each other
#   nproc           RLIMIT_NPROC, which binds only after uid-drop
#   no-new-privs    setuid binaries cannot raise privileges
#   landlock        writes only in the work dir and /dev/null; reads only the interpreter, system
#                   dirs and the work dir; TCP bind/connect denied
#   landlock-scope  signals and abstract unix sockets out of the run blocked (Landlock ABI >= 6)
# The fork server and the module preload are there for speed only (bench/speed_sandbox.py --n 40
# --workers 2, 2 shared cores, every layer on): 94 runs/s, 70-74 without the preload; a bare
# `python -I -c pass` subprocess with no isolation at all manages 33-40/s.
#
# Protocol, over a SOCK_SEQPACKET socket pair. A fact is a line "layer NAME", "missing NAME WHY",
# "workdir PATH" (a host temp dir for the caller to remove), "error WHY", "start" or "exit STATUS".
#   caller -> server  "run" with five fds: config memfd, stdout, stderr, report memfd, "done" pipe
#   server -> caller  "ok" with a pidfd of the forked run, or "error fork: WHY"
#   run -> report     the server's facts, its own, then "start" (or "error WHY": code never runs)
#   server -> report  "exit STATUS" (a wait status) once reaped; closing "done" wakes the caller
_SANDBOX_UID_BASE = 1_500_000_000
_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
# Readable by the code besides the interpreter's own dirs and its work dir (Landlock).
_SANDBOX_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc", "/dev/zero", "/dev/urandom",
                 "/dev/random", "/sys/devices/system/cpu")
# Imported by the server before any model code exists, so each run inherits them (HumanEval
# programs import typing, math, re, ... in nearly every problem).
_SANDBOX_PRELOAD = ("typing", "math", "re", "collections", "itertools", "functools", "heapq",
                    "bisect", "string", "hashlib", "random", "fractions", "decimal", "statistics",
                    "json", "copy", "operator", "datetime")
# Shared cgroups hold every run of one server: a cap on the host's exposure (a fork-and-allocate
# bomb meets RLIMIT_AS per process and RLIMIT_NPROC per run, but 32 x 1 GiB is still more than a
# laptop has). Per-run cgroups would cost a migration (an RCU grace period, ~10 ms) per run.
_SANDBOX_CGROUP_PIDS, _SANDBOX_CGROUP_MEMORY_FRACTION = 4096, 0.5  # tasks; of physical memory
# Seconds the caller waits for the server: its answer to a launch, and its report of a killed
# run's end (it reaps within ms). Past them the server counts as wedged and is replaced.
_SANDBOX_REPLY_TIMEOUT, _SANDBOX_REAP_GRACE = 30.0, 10.0
# Linux constants: clone flags, prctl options, mount flags, landlock syscall numbers (444-446 on
# every architecture).
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 444, 445, 446


@dataclass
class SandboxResult:
    """One sandboxed run. status: "ok" (exit 0), "error" (non-zero exit), "timeout" (wall-clock or
    CPU limit), "memory" (MemoryError, or the memory cgroup's OOM killer), "killed" (any other
    signal), "internal" (the sandbox itself failed: not evidence about the code)."""
    status: str
    stdout: str            # capped: head and tail around a "[... N bytes cut ...]" marker
    stderr: str
    exit_code: int | None  # the code's exit code, -N if signal N ended it, None if it never ran
    seconds: float         # wall time of the whole run, sandbox setup included
    layers: list[str]      # the isolation layers that were active (see the table above)
    reason: str = ""       # why status is not "ok", one line


# -- the server and the run, in the server's process -------------------------------------------
_LIBC = ctypes.CDLL(None, use_errno=True)


def _sys(name, *args):
    """libc `name`(*args), ints passed as C longs; OSError when it fails."""
    rc = getattr(_LIBC, name)(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}: {os.strerror(e)}")
    return rc


def _mount(src, dst, fstype, flags, data=None):
    """mount(2); None passes NULL."""
    _sys("mount", *[s and s.encode() for s in (src, dst, fstype)], flags, data and data.encode())


def _layer(facts, name, build, *args):
    """build(*args) the layer `name`; record "layer NAME", or "missing NAME WHY" where the kernel
    refuses it (an OSError) -> whether it stands."""
    try:
        build(*args)
    except OSError as e:
        facts.append(f"missing {name} {e}")
        return False
    facts.append(f"layer {name}")
    return True


def _become(uid):
    """Drop to uid (and gid uid, no groups): from root, for good."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _own_user_namespace(sock):
    """Not root: enter a user namespace of our own that maps us to root inside, for the other
    namespaces. From it we may not setns back into the host's PID namespace, so the server goes on
    in a child, init of a PID namespace the user namespace owns; this process only waits for it,
    and the child dies with it (PDEATHSIG)."""
    uid, gid = os.getuid(), os.getgid()
    _sys("unshare", CLONE_NEWUSER | CLONE_NEWPID)
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    if (child := os.fork()) != 0:
        sock.close()
        os._exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) & 0xFF)
    _sys("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _sandbox_server_main(sock_fd):
    """The sandbox server's program: one forked run per request on the socket sock_fd, until the
    parent closes its end."""
    sock = socket.socket(fileno=sock_fd)
    for name in _SANDBOX_PRELOAD:
        __import__(name)
    _interpreter_dirs()  # cached once, like the preload
    root, facts = os.geteuid() == 0, []  # the server's facts: each run reports them first
    if not root:
        _layer(facts, "user-namespace", _own_user_namespace, sock)
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def pid_ns_round_trip():  # a PID namespace per run: unshare before each fork, setns back after
        _sys("unshare", CLONE_NEWPID)
        _sys("setns", own_pid_ns, CLONE_NEWPID)

    if not (pid_ns := _layer(facts, "pid-namespace", pid_ns_round_trip)):
        facts.append("layer uid-sweep" if root else "missing uid-sweep not root")
    alive_r, alive_w = os.pipe()  # runs see EOF on alive_r once we are gone
    runs = {}  # pid -> (report fd, done fd) of each live run

    def reap(*_):  # on SIGCHLD
        with contextlib.suppress(ChildProcessError):  # no children left
            while (ended := os.waitpid(-1, os.WNOHANG))[0]:
                if ended[0] in runs:  # else an orphan that came to us, or a uid sweeper
                    report, done = runs.pop(ended[0])
                    if root and not pid_ns:
                        _kill_uid(_SANDBOX_UID_BASE + ended[0])
                    os.write(report, b"exit %d\n" % ended[1])
                    os.close(report)
                    os.close(done)  # the caller wakes now

    _sys("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans come to reap()
    signal.signal(signal.SIGCHLD, reap)
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 16, 5)
        if not msg:
            return  # the parent is gone
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # reap after runs[pid] is set
        try:
            if pid_ns:
                _sys("unshare", CLONE_NEWPID)
            pid = os.fork()
        except OSError as e:
            pid, why = -1, e
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            sock.close()
            inherited = [alive_w, own_pid_ns, *(fd for pair in runs.values() for fd in pair)]
            try:
                _sandbox_run(fds, facts, alive_r, inherited, root, pid_ns)
            finally:
                os._exit(126)  # never back into the server's loop
        if pid_ns:
            _sys("setns", own_pid_ns, CLONE_NEWPID)
        if pid > 0:
            runs[pid], fds[3:] = (fds[3], fds[4]), [os.pidfd_open(pid)]
            socket.send_fds(sock, [b"ok"], fds[3:])
        else:
            sock.send(f"error fork: {why}".encode())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        for fd in fds:
            os.close(fd)


def _kill_uid(uid):
    """uid-sweep: SIGKILL every process of a run's uid, from a child holding that uid."""
    if (pid := os.fork()) == 0:
        with contextlib.suppress(OSError):  # ESRCH: none left
            _become(uid)
            for _ in range(100):  # a killed process cannot fork, so this converges in a few rounds
                os.kill(-1, signal.SIGKILL)
        os._exit(0)
    with contextlib.suppress(ChildProcessError):  # a nested reap() may have had it
        os.waitpid(pid, 0)


def _sandbox_run(fds, facts, alive_r, inherited, root, pid_ns):
    """One run, in a fresh fork of the server (init of its own PID namespace where allowed; root
    until uid-drop where the server is root): build the walls in the table's order, report them,
    then run main.py. Never returns."""
    cfg_fd, out_fd, err_fd, report, done = fds
    layer = functools.partial(_layer, facts)  # a wall the kernel may refuse: said either way
    try:
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        cfg = marshal.loads(os.pread(cfg_fd, os.fstat(cfg_fd).st_size, 0))
        for fd in inherited + [cfg_fd, out_fd, err_fd, done]:
            os.close(fd)
        os.setsid()
        facts.append("layer session")
        with open("/proc/self/status") as f:  # NSpid: our pid in each namespace, the host's first
            uid = _SANDBOX_UID_BASE + int(next(x for x in f if x.startswith("NSpid:")).split()[1])
        ns = {n: layer(f"{n}-namespace", _sys, "unshare", flag)
              for n, flag in (("mount", CLONE_NEWNS), ("net", CLONE_NEWNET), ("ipc", CLONE_NEWIPC))}
        work, proc_private = None, False
        if ns["mount"]:
            _mount(None, "/", None, MS_REC | MS_PRIVATE)  # what we mount stays in this namespace
            hide = _outermost(d for d in (cfg["home"], os.path.dirname(os.path.realpath(__file__)))
                              if os.path.realpath(d) != "/")
            keep = [(k, os.open(k, os.O_PATH | os.O_CLOEXEC)) for k in _interpreter_dirs()
                    if any(k.startswith(d + "/") for d in hide + ["/tmp"])]

            def cover(dirs, options):  # a tmpfs over each; interpreter dirs inside bound back r/o
                for d in dirs:
                    _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, options)
                    for k, fd in keep:
                        if k.startswith(d + "/"):
                            os.makedirs(k, 0o755, exist_ok=True)
                            _mount(f"/proc/self/fd/{fd}", k, None, MS_BIND | MS_REC)
                            _mount(None, k, None,
                                   MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)

            if hide:
                layer("hidden-dirs", cover, hide, "size=1m,mode=0755")
            owner = uid if root else 0  # in our user namespace, 0 is the user who started us
            if layer("tmpfs-workdir", cover, ["/tmp"], f"size={cfg['disk_mb']}m,nr_inodes=4096,"
                                                       f"mode=0700,uid={owner},gid={owner}"):
                work = "/tmp"
            for _, fd in keep:
                os.close(fd)
            proc_private = pid_ns and layer("proc-private", _mount, "proc", "/proc", "proc",
                                            MS_NOSUID | MS_NODEV | MS_NOEXEC)
        if work is None:  # no tmpfs of our own: a fresh host temp dir, for the caller to remove
            work = tempfile.mkdtemp(prefix="scoreflow-sbx-")
            facts.append(f"workdir {work}")
            if root:
                os.chown(work, uid, uid)
        R = resource
        for r, soft in ((R.RLIMIT_CPU, cfg["cpu_s"]), (R.RLIMIT_AS, cfg["memory_mb"] << 20),
                        (R.RLIMIT_FSIZE, cfg["file_mb"] << 20), (R.RLIMIT_NOFILE, 256),
                        (R.RLIMIT_CORE, 0)):
            R.setrlimit(r, (soft, soft + (r == R.RLIMIT_CPU)))  # SIGXCPU, then SIGKILL 1 s on
        facts.append("layer rlimits")
        try:  # built while still root: opening the paths it allows may need that
            ruleset, abi = _landlock_ruleset(
                [*_interpreter_dirs(), *_SANDBOX_READ] + ["/proc"] * proc_private, work)
        except OSError as e:
            ruleset = -1
            facts.append(f"missing landlock {e}")
        if root:
            R.setrlimit(R.RLIMIT_NPROC, (cfg["max_procs"], cfg["max_procs"]))
            _become(uid)
            facts += ["layer uid-drop", "layer nproc"]
        else:
            facts += ["missing uid-drop not root",
                      "missing nproc RLIMIT_NPROC would count every process of this user"]
        _sys("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        facts.append("layer no-new-privs")
        if ruleset >= 0:
            _sys("syscall", SYS_LANDLOCK_RESTRICT, ruleset, 0)
            os.close(ruleset)
            facts += ["layer landlock", "layer landlock-scope" if abi >= 6
                      else f"missing landlock-scope landlock ABI {abi} < 6"]
        # Die with the server: set only now (setuid clears it), then check the server still lives
        # (nothing is written to alive_r: it turns readable at EOF, once the server is gone).
        _sys("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(137)
        os.close(alive_r)
        os.chdir(work)
        for name, data in cfg["files"].items():  # main.py, the caller's files, and .stdin
            os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
            with open(name, "wb") as f:
                f.write(data)
        fd = os.open(".stdin", os.O_RDONLY)
        os.unlink(".stdin")
        os.dup2(fd, 0)
        os.close(fd)
        os.environ.clear()
        os.environ.update(PATH=_SANDBOX_PATH, HOME=work, TMPDIR=work, LANG="C.UTF-8",
                          LC_ALL="C.UTF-8")
        sys.modules["random"].seed()  # forks share the server's generator: reseed as a fresh start
        sys.argv[:] = ["main.py"]
        sys.path.insert(0, work)
        sys.dont_write_bytecode = True
        main = sys.modules["__main__"] = type(sys)("__main__")
        main.__file__ = "main.py"
        source = cfg["files"]["main.py"]
        del cfg
        facts.append("start")
    except BaseException as e:  # a wall that must stand did not: the code never runs
        facts.append(f"error {e!r}")
    os.write(report, "".join(f + "\n" for f in facts).encode())
    if facts[-1] != "start":
        os._exit(126)
    os.close(report)
    # The code runs here, in a fork of an interpreter that never ran model code. The exit does
    # what `python main.py` would (exit code rules, thread joins, atexit, flushes) but skips the
    # module teardown, which costs more than the rest of a short run.
    try:
        exec(compile(source, "main.py", "exec"), main.__dict__)
        code = 0
    except SystemExit as e:
        code = e.code
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # without our frame
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        code = 120  # as Python when the final flush fails
    os._exit((code or 0) & 0xFF)


def _landlock_ruleset(read_paths, work):
    """A Landlock ruleset handling every access right this kernel knows, allowing reads of
    read_paths, everything in the work dir and writes to /dev/null; no TCP bind/connect (ABI >= 4)
    and no signals or abstract unix sockets out (ABI >= 6) -> (ruleset fd, ABI)."""
    abi = _sys("syscall", SYS_LANDLOCK_CREATE, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    fs_all = (1 << 13) - 1 | (abi >= 2) << 13 | (abi >= 3) << 14 | (abi >= 5) << 15
    file_rights = 1 | 2 | 4 | (abi >= 3) << 14 | (abi >= 5) << 15  # exec, write, read, trunc, ioctl
    attr = (ctypes.c_uint64 * 3)(fs_all, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    ruleset = _sys("syscall", SYS_LANDLOCK_CREATE, ctypes.byref(attr),
                   8 if abi < 4 else 16 if abi < 6 else 24, 0)
    read = 1 | 4 | 8  # execute, read file, read dir
    for path, access in ([(p, read) for p in read_paths]
                         + [(work, fs_all), ("/dev/null", 2 | 4 | (abi >= 3) << 14)]):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # e.g. no /lib32 here
        access &= fs_all if os.path.isdir(path) else file_rights
        # struct landlock_path_beneath_attr, packed: u64 allowed_access, s32 parent_fd
        rule = access.to_bytes(8, sys.byteorder) + fd.to_bytes(4, sys.byteorder)
        _sys("syscall", SYS_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0)  # 1: a path-beneath rule
        os.close(fd)
    return ruleset, abi


def _outermost(dirs):
    """The real paths of dirs, without those inside another of them."""
    dirs = {os.path.realpath(d) for d in dirs}
    return sorted(d for d in dirs if not any(d.startswith(o + "/") for o in dirs))


@functools.cache
def _interpreter_dirs():
    """The directories the code's interpreter reads: prefixes, stdlib, site-packages, binary's."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable))}
    dirs |= {p for k, p in sysconfig.get_paths().items()
             if k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return _outermost(d for d in dirs if d and os.path.isdir(d))


# -- the caller's side -------------------------------------------------------------------------
class _SandboxServer:
    """The fork server behind run_python (protocol above), and its cgroups."""

    def __init__(self):
        self.owner = os.getpid()  # a forked parent needs a server of its own
        self.lock = threading.Lock()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(_SANDBOX_REPLY_TIMEOUT)  # a wedged server is an OSError, not a hang
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), "--sandbox-server",
                 str(theirs.fileno())], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), start_new_session=True, cwd="/",
                env={"PATH": _SANDBOX_PATH, "LANG": "C.UTF-8"})
        memory = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                     * _SANDBOX_CGROUP_MEMORY_FRACTION)
        self.cgroups, self.facts = {}, []  # cgroups: the server joins them before its first run
        for ctl, limits in (("pids", {"pids.max": _SANDBOX_CGROUP_PIDS}),
                            ("memory", {"memory.limit_in_bytes": memory, "memory.max": memory,
                                        "memory.swap.max": 0})):
            try:
                self.cgroups[ctl] = _make_cgroup(ctl, limits, self.proc.pid)
                self.facts.append(f"layer cgroup-{ctl}")
            except OSError as e:
                self.facts.append(f"missing cgroup-{ctl} {e}")

    def launch(self, fds):
        """Send the run's five fds; get back a pidfd of its process."""
        with self.lock:
            socket.send_fds(self.sock, [b"run"], fds)
            msg, got, _, _ = socket.recv_fds(self.sock, 1024, 1)
        if not got:
            raise OSError(f"sandbox server: {msg.decode() or 'closed its socket'}")
        return got[0]

    def oom_kills(self):
        """OOM kills so far in the shared memory cgroup (lines "KEY COUNT" in v1's
        memory.oom_control, v2's memory.events)."""
        for name in ("memory.oom_control", "memory.events") if "memory" in self.cgroups else ():
            with contextlib.suppress(OSError), open(f"{self.cgroups['memory']}/{name}") as f:
                return int(dict(line.split() for line in f).get("oom_kill", 0))
        return 0

    def close(self):
        """Stop the server (a serving one exits on EOF, a wedged one is killed) and remove its
        cgroups; nothing in a forked child, whose server is its parent's."""
        if self.owner != os.getpid():
            return
        self.sock.close()
        try:
            self.proc.wait(_SANDBOX_REPLY_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for path in self.cgroups.values():
            _remove_cgroup(path)


_sandbox_lock = threading.Lock()
_sandbox_state = {"server": None, "warned": set()}  # warned: missing layers said on stderr


def _sandbox_server(restart=False, stale=None):
    """This process's sandbox server, started on first use; restart=True replaces it, unless
    `stale` is given and another thread has replaced that one already."""
    with _sandbox_lock:
        server = _sandbox_state["server"]
        if (server is None or server.owner != os.getpid() or server.proc.poll() is not None
                or restart and (stale is None or stale is server)):
            if server is not None:
                server.close()
            server = _sandbox_state["server"] = _SandboxServer()
            atexit.register(server.close)
        return server


def _make_cgroup(ctl, limits, pid):
    """A fresh cgroup of controller `ctl` (v1 or v2) holding the sandbox server `pid`, and so every
    run it forks, with those of `limits` ({file: value}) this version has -> its path; then removes
    those left by dead parents. v2 needs the controller in our cgroup's subtree_control, which v2
    allows only at the root of a hierarchy (a cgroup with processes of its own cannot enable it)."""
    with open("/proc/self/cgroup") as f:  # lines ID:CONTROLLERS:PATH, controllers "" in v2
        own = {c: path for line in f for _, ctls, path in [line.rstrip("\n").split(":", 2)]
               for c in ctls.split(",")}
    v1 = ctl in own and os.path.isdir(f"/sys/fs/cgroup/{ctl}")
    base = f"/sys/fs/cgroup/{ctl}{own[ctl]}" if v1 else f"/sys/fs/cgroup{own.get('', '')}"
    base = base.rstrip("/")
    path = f"{base}/scoreflow-sbx-{os.getpid()}-{pid}"
    try:
        os.mkdir(path)
        wrote = [name for name in limits if os.path.exists(f"{path}/{name}")]
        if not wrote:  # v2 without the controller in our subtree_control
            raise OSError(f"{path}: none of {', '.join(limits)}")
        for name in wrote + ["cgroup.procs"]:
            with open(f"{path}/{name}", "w") as f:
                f.write(str(limits.get(name, pid)))
    except OSError:
        _remove_cgroup(path)
        raise
    for name in os.listdir(base):  # left by parents killed before their atexit ran
        parent = name.removeprefix("scoreflow-sbx-").split("-")[0]
        if name.startswith("scoreflow-sbx-") and not os.path.exists(f"/proc/{parent}"):
            _remove_cgroup(f"{base}/{name}")
    return path


def _remove_cgroup(path):
    """SIGKILL whatever is left in a cgroup, then remove it (it empties within ms)."""
    for _ in range(400):
        try:
            with open(path + "/cgroup.procs") as f:
                for pid in f.read().split():
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), signal.SIGKILL)
            return os.rmdir(path)
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.005)
    print(f"executor.run_python: cgroup {path} still busy after 2 s; left in place",
          file=sys.stderr)


def _read_capped(fd, cap):
    """The text in fd if it fits in cap bytes, else its head and tail around a marker."""
    size = os.fstat(fd).st_size
    if size <= cap:
        return os.pread(fd, size, 0).decode("utf-8", "replace")
    return (os.pread(fd, cap // 2, 0) + f"\n[... {size - cap} bytes cut ...]\n".encode()
            + os.pread(fd, cap // 2, size - cap // 2)).decode("utf-8", "replace")


def run_python(code: str, *, stdin: str = "", timeout: float = 10.0, memory_mb: int = 1024,
               files: dict | None = None, max_output: int = 64_000, max_procs: int = 32,
               file_mb: int = 16, disk_mb: int = 64) -> SandboxResult:
    """Run `code` as main.py in the sandbox (layers: the table above) and wait for it.

    Covered (tests/test_sandbox.py runs each attack): reading home or the project, writing outside
    the work dir, filling the disk, the network, signalling or ptracing other processes, fork
    bombs, memory exhaustion, spinning, flooding stdout, escaping the kill by setsid or double fork,
    and outliving our process. Not covered: kernel exploits (one shared kernel, no seccomp filter),
    side channels and timing, reading world-readable system files (/usr, /etc: the interpreter
    needs them), and fairness between the runs of one parent (they share the cgroups).

    timeout: wall-clock seconds for the whole run (CPU seconds are capped at int(timeout) + 1).
    memory_mb: address space per process. files: {relative path: str | bytes} written into the
    work dir before the code starts. max_output: bytes of stdout and of stderr kept (head and
    tail). file_mb: the largest file the code may write, stdout and stderr included. disk_mb: the
    work dir's size. max_procs: tasks (processes and threads) the run may hold at once."""
    t0 = time.monotonic()
    for name in files or {}:
        if os.path.isabs(name) or ".." in name.split("/") or name in ("", "main.py", ".stdin"):
            raise ValueError(f"run_python: files key {name!r} must be a relative path inside the "
                             f"work dir and not main.py")
    files = {**(files or {}), "main.py": code, ".stdin": stdin}
    cpu_s = int(timeout) + 1
    cfg = {"home": os.path.expanduser("~"), "disk_mb": disk_mb, "cpu_s": cpu_s,
           "memory_mb": memory_mb, "file_mb": file_mb, "max_procs": max_procs,
           "files": {k: v if isinstance(v, bytes) else v.encode() for k, v in files.items()}}
    fds = [os.memfd_create(f"sbx-{name}") for name in ("config", "stdout", "stderr", "report")]
    done_r, done_w = os.pipe()  # EOF once the server has reported the run's end (or died)
    fds.append(done_w)
    server, pidfd, why, timed_out, oom = None, -1, "", False, False
    try:
        os.write(fds[0], marshal.dumps(cfg))
        for attempt in (0, 1):  # a dead or wedged server gets one fresh replacement
            try:
                server = _sandbox_server(restart=attempt > 0, stale=server)
                oom_before = server.oom_kills()
                pidfd, why = server.launch(fds), ""
                break
            except OSError as e:
                why = str(e)
        os.close(fds.pop())  # done_w: from now on only the server holds it
        if pidfd >= 0:
            poll = select.poll()  # not select(): our fds may be numbered past 1024
            poll.register(done_r, select.POLLIN)
            if not poll.poll(max(0.0, t0 + timeout - time.monotonic()) * 1000):
                timed_out = True  # SIGKILL to the init of its PID namespace: the whole run dies
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                # The server reaps a killed run within ms. Never wait on it without end (a wedged
                # server would hang the caller's stage): past the grace the run is "internal".
                if not poll.poll(_SANDBOX_REAP_GRACE * 1000):
                    timed_out, why = False, (f"the sandbox server did not report the run's end "
                                             f"within {_SANDBOX_REAP_GRACE:g} s of its kill")
                    _sandbox_server(restart=True, stale=server)
            oom = server.oom_kills() > oom_before
        seconds = time.monotonic() - t0
        report = _read_capped(fds[3], 1 << 20).splitlines()
        stdout, stderr = _read_capped(fds[1], max_output), _read_capped(fds[2], max_output)
    finally:
        for fd in fds + [pidfd, done_r]:
            if fd >= 0:
                os.close(fd)
    facts = {}  # kind -> the rest of each fact line of that kind, in order
    for line in (server.facts if pidfd >= 0 else []) + report:
        kind, _, rest = line.partition(" ")
        facts.setdefault(kind, []).append(rest)
    for work in facts.get("workdir", []):
        shutil.rmtree(work, ignore_errors=True)
    missing = dict(rest.split(" ", 1) for rest in facts.get("missing", []))
    with _sandbox_lock:
        new = {k: v for k, v in missing.items() if k not in _sandbox_state["warned"]}
        _sandbox_state["warned"].update(new)
    for name, reason in new.items():
        print(f"executor.run_python: sandbox layer {name!r} unavailable ({reason}); running "
              "without it", file=sys.stderr)
    exit_code = None
    if "exit" in facts and "start" in facts:
        exit_code = os.waitstatus_to_exitcode(int(facts["exit"][0]))
    last_line = stderr.rstrip().rpartition("\n")[2]
    if timed_out:
        status, reason = "timeout", f"wall-clock limit of {timeout} s reached"
    elif exit_code is None:
        why = why or facts.get("error", ["the run ended without a report"])[0]
        status, reason = "internal", f"sandbox failed before the code ran: {why}"
    elif exit_code == -signal.SIGXCPU:
        status, reason = "timeout", f"CPU limit of {cpu_s} s reached"
    elif exit_code < 0:
        status = "memory" if oom else "killed"
        reason = f"killed by {signal.Signals(-exit_code).name}" + (
            " while the sandbox memory cgroup was OOM-killing" if oom else "")
    elif exit_code and last_line.startswith("MemoryError"):
        status, reason = "memory", f"MemoryError under the {memory_mb} MiB limit"
    elif exit_code:
        status, reason = "error", last_line or f"exit code {exit_code}"
    else:
        status, reason = "ok", ""
    layers = facts.get("layer", [])
    return SandboxResult(status, stdout, stderr, exit_code, seconds, layers, reason)


if __name__ == "__main__" and sys.argv[1:2] == ["--sandbox-server"]:
    _sandbox_server_main(int(sys.argv[2]))
