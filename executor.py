"""executor.py: how ScoreFlow talks to the executor LLM and runs model-written code.

The executor is the LLM that runs every workflow's operators: SCOREFLOW.md §1 step 3 and §4
("Executor": GPT-4o-mini at temperature 0 in the paper, max_tokens 4096 in the official code). Each
operator call is one chat request (SCOREFLOW.md §3), thousands per iteration, so this module makes
them fast under concurrency, survivable on a flaky endpoint, counted, and replayable.

Sections, in reading order:
1. HTTP chat client, call cache, budget. `ChatClient.chat` / `chat_many` speak OpenAI chat
   completions to any compatible endpoint with `requests`; retries follow openai-python's policy
   (STYLE.md §6); every call ends as a `ChatResult` or an `ExecutorError` with a kind, because an
   endpoint failure is not a wrong answer (SCOREFLOW.md §10.7). Tokens and dollars are summed per
   stage and per tag under an optional hard `Budget`; finished calls live in a sqlite3 journal
   (`CallCache`) so a rerun or a resumed run replays them without asking again.
2. Local OpenAI-compatible server. `start_local_server` / `serve_main` (`python scoreflow.py serve`)
   serve model.py's model on 127.0.0.1 with the standard library's HTTP server, gathering concurrent
   requests into one batched `model.generate` call (dynamic batching).
3. Subprocess sandbox: `run_python` runs model-written code under OS isolation (SCOREFLOW.md §10.10).

Non-goals: streaming, tool/function calls, logprobs, n > 1 choices per request, embeddings, and
any provider SDK. The server is for one trusted machine, not the internet.
"""

import argparse
import atexit
import contextlib
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
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import requests

# --- HTTP chat client, call cache, budget (issue 4) -------------------------------------------
# One chat call = one POST {base_url}/chat/completions. The client retries what a retry can fix,
# raises ExecutorError for the rest, counts tokens and dollars per stage and per tag, refuses calls
# that could pass the budget, and journals every finished call in sqlite so reruns replay them.

# $ per 1M (prompt, completion) tokens: published list prices (early 2025). Override or extend with
# ChatClient(prices={name: (prompt, completion)}); a dated name ("gpt-4o-mini-2024-07-18") falls
# back to its longest listed prefix. A model missing here costs nothing unless a dollar cap needs it.
DEFAULT_PRICES = {
    "gpt-4o-mini": (0.15, 0.60),     # the paper's executor (SCOREFLOW.md §4)
    "gpt-4o": (2.50, 10.00),         # ablation executor (SCOREFLOW.md §8)
    "deepseek-chat": (0.27, 1.10),   # DeepSeek-V3, ablation executor
}
# The body fields the client sets from its own arguments; ChatClient(extra=...) may not replace them.
CLIENT_FIELDS = ("model", "messages", "temperature", "top_p", "max_tokens", "stop", "seed")
# Budget reservations bound a prompt's tokens by its UTF-8 bytes (a BPE token covers >= 1 byte)
# plus the chat template's own tokens, which we cannot see: this many per call and per message.
TEMPLATE_TOKENS_PER_CALL, TEMPLATE_TOKENS_PER_MESSAGE = 32, 8


@dataclass
class ChatResult:
    """One finished chat call."""
    text: str                # choices[0].message.content
    prompt_tokens: int       # usage.prompt_tokens as the endpoint reported it
    completion_tokens: int   # usage.completion_tokens
    finish_reason: str       # "stop" | "length" | what the endpoint said
    cached: bool = False     # replayed from the call cache: nothing was sent


class ExecutorError(RuntimeError):
    """A chat call that ended without a completion, after its retries. `.kind` says why: "http"
    (`.status` holds the code), "timeout", "connection", "bad_body" or "budget". These are endpoint
    failures, never evidence about a workflow (SCOREFLOW.md §10.7): score them as neither 0 nor 1."""

    def __init__(self, kind, message, *, status=None, endpoint=None, attempts=0):
        super().__init__(message)
        self.kind, self.status, self.endpoint, self.attempts = kind, status, endpoint, attempts

    def __reduce__(self):  # picklable, so results can cross process boundaries
        return (_rebuild_error, (type(self), self.kind, str(self), self.status, self.endpoint,
                                 self.attempts))


class BudgetExceeded(ExecutorError):
    """The call could pass the run's budget, so it was not sent (kind "budget")."""

    def __init__(self, kind="budget", message="", *, status=None, endpoint=None, attempts=0):
        super().__init__("budget", message, status=status, endpoint=endpoint, attempts=attempts)


class EndpointDown(ExecutorError):
    """The endpoint stopped answering: ENDPOINT_DOWN_AFTER calls in a row ended in a timeout or a
    dropped connection after all their retries, none answered in between. Every later call of the
    client raises it unsent (kind "down"), so a hung endpoint ends a stage within one client
    timeout of the trip instead of one per queued call."""

    def __init__(self, kind="down", message="", *, status=None, endpoint=None, attempts=0):
        super().__init__("down", message, status=status, endpoint=endpoint, attempts=attempts)


ENDPOINT_DOWN_AFTER = 3  # consecutive calls ending in timeout/connection (retries spent) that trip it


def _rebuild_error(cls, kind, message, status, endpoint, attempts):
    return cls(kind, message, status=status, endpoint=endpoint, attempts=attempts)


@dataclass
class RetryPolicy:
    """openai-python's retry policy (STYLE.md §6), with a larger default retry bound."""
    max_retries: int = 5             # retries after the first attempt (openai-python: 2)
    initial_delay: float = 0.5       # s, backoff before the first retry
    max_delay: float = 8.0           # s, backoff cap
    max_retry_after: float = 120.0   # s; a longer Retry-After ends the call (openai-python: 120)

    def __post_init__(self):
        if self.max_retries < 0 or self.initial_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError(f"RetryPolicy: all fields must be >= 0, got {self}")


@dataclass
class Budget:
    """A hard cap across all calls of a run. Calls replayed from the cache count at their recorded
    cost, so a resumed run spends up to the cap in total; raise the cap to continue a stopped run."""
    dollars: float | None = None     # $ cap; None = no dollar cap
    tokens: int | None = None        # prompt + completion tokens cap; None = no token cap

    def __post_init__(self):
        for name in ("dollars", "tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"Budget.{name}: expected a number >= 0 or None, got {v!r}")


@dataclass
class Usage:
    """Token and dollar totals over a set of calls (a stage, a tag, or the whole client)."""
    calls: int = 0                   # finished calls, sent or replayed
    cached: int = 0                  # of which replayed from the cache
    errors: int = 0                  # calls that ended as ExecutorError
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dollars: float = 0.0


def retry_after_seconds(headers, now=None):
    """Seconds a response asks us to wait before retrying, or None: `retry-after-ms`, then
    `Retry-After` as (possibly fractional) seconds, then as an HTTP date (RFC 9110 §10.2.3)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        return seconds if math.isfinite(seconds) else math.inf
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp() - (time.time() if now is None else now)


def backoff_delay(n_retry, policy, rand=random.random):
    """Exponential backoff before retry n_retry (0-based): initial_delay·2ⁿ capped at max_delay,
    times a jitter in (0.75, 1] so that many clients do not retry in lockstep."""
    return min(policy.initial_delay * 2.0 ** min(n_retry, 64), policy.max_delay) * (1.0 - 0.25 * rand())


def _is_retryable_status(status, headers):
    """openai-python's rule: obey x-should-retry, else retry 408, 409, 429 and 5xx."""
    hint = headers.get("x-should-retry")
    if hint in ("true", "false"):
        return hint == "true"
    return status in (408, 409, 429) or status >= 500


def _excerpt(raw, limit=300):
    """The start of a response body for an error message."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _server_message(raw):
    """The server's own words from an error body: OpenAI's {"error": {"message"}}, else an excerpt."""
    try:
        data = json.loads(raw)
    except ValueError:
        return _excerpt(raw)
    if isinstance(data, dict):
        err = data.get("error", data.get("detail"))
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
    return _excerpt(raw)


def _is_read_timeout(exc):
    """requests reports a read timeout met while reading the body as a ConnectionError that wraps
    urllib3's ReadTimeoutError; walk the causes to tell it from a dropped connection."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, requests.exceptions.Timeout) or type(exc).__name__ == "ReadTimeoutError":
            return True
        exc = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc.__cause__
        seen += 1
    return False


def parse_chat_response(raw, endpoint):
    """A chat-completions body -> ChatResult. Malformed JSON or a missing choices[0].message is an
    ExecutorError("bad_body") quoting the body. A missing `usage` gives -1 token counts."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise ExecutorError("bad_body", f"{endpoint}: response is not valid JSON: {_excerpt(raw)}",
                            endpoint=endpoint) from None
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ExecutorError("bad_body", f"{endpoint}: response has no choices[0].message.content: "
                            f"{_excerpt(raw)}", endpoint=endpoint) from None
    if text is None:  # e.g. a refusal or a content filter: no text, the finish_reason says why
        text = ""
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = [usage.get("prompt_tokens", -1), usage.get("completion_tokens", -1)]
    if not isinstance(text, str) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ExecutorError("bad_body", f"{endpoint}: content or usage has the wrong type: {_excerpt(raw)}",
                            endpoint=endpoint)
    return ChatResult(text, tokens[0], tokens[1], str(choice.get("finish_reason") or ""))


def _price_of(prices, model):
    """(prompt, completion) $ per 1M tokens for `model`: exact name, else the longest listed
    prefix that ends at a '-' ("gpt-4o-mini-2024-07-18" -> "gpt-4o-mini"), else None."""
    if model in prices:
        return prices[model]
    best = max((k for k in prices if model.startswith(k + "-")), key=len, default=None)
    return prices[best] if best is not None else None


class CallCache:
    """Durable call cache and journal: one sqlite3 row per finished call, keyed by the full request.
    WAL mode, one connection per thread, a commit per finished call, so a kill -9 loses only the
    calls in flight. synchronous=NORMAL: a process crash loses nothing committed (a power cut may
    lose the last commits, which are then asked again). Several processes may share one file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._local, self._conns, self._lock = threading.local(), [], threading.Lock()
        con = self._con()
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, request TEXT NOT NULL, "
                    "text TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER, "
                    "finish_reason TEXT, stage TEXT, tag TEXT, seconds REAL, created REAL)")
        con.commit()

    def _con(self):
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False)
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
            with self._lock:
                self._conns.append(con)
        return con

    def get(self, key):
        row = self._con().execute("SELECT text, prompt_tokens, completion_tokens, finish_reason "
                                  "FROM calls WHERE key = ?", (key,)).fetchone()
        return None if row is None else ChatResult(row[0], row[1], row[2], row[3], cached=True)

    def put(self, key, request, result, *, stage="", tag="", seconds=0.0):
        con = self._con()
        con.execute("INSERT OR REPLACE INTO calls VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (key, request, result.text, result.prompt_tokens, result.completion_tokens,
                     result.finish_reason, stage, tag, seconds, time.time()))
        con.commit()

    def keys(self):
        return {k for (k,) in self._con().execute("SELECT key FROM calls")}

    def __len__(self):
        return self._con().execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def close(self):
        with self._lock:
            for con in self._conns:
                con.close()
            self._conns.clear()
        self._local = threading.local()


class ChatClient:
    """Thread-safe synchronous client for any OpenAI-compatible chat-completions endpoint (OpenAI,
    vLLM, llama.cpp's server, Ollama, our LocalServer). Async callers use
    `await asyncio.to_thread(client.chat, ...)`.

    base_url ends before /chat/completions (e.g. "https://api.openai.com/v1"). api_key None reads
    OPENAI_API_KEY; "" sends no key. timeout is seconds to connect and to wait between bytes
    (requests semantics). max_concurrency bounds calls in flight (None: 32 on a loopback server,
    which batches them, 16 elsewhere). cache_path names the sqlite call cache (None: no cache).
    budget is a Budget, or a number meaning dollars. prices extends DEFAULT_PRICES.
    extra: server-specific request fields added to every body (e.g. llama.cpp's
    {"repeat_penalty": 1.0}); they may not replace a field the client sets itself.
    identity: what determines the endpoint's replies, for the journal key (default: base_url; our
    local server passes its model file's fingerprint, so a resumed run replays its journal whatever
    port the server gets this time). The model name and the extra fields are in the body, so in the key.
    """

    def __init__(self, base_url, model, *, api_key=None, timeout=60.0, max_concurrency=None,
                 cache_path=None, budget=None, prices=None, retry=None, extra=None, identity=None):
        self.base_url = str(base_url).rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"ChatClient: base_url must be http(s)://host[:port]/path, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"ChatClient: model must be a non-empty string, got {model!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"ChatClient: timeout must be > 0 seconds, got {timeout!r}")
        self.endpoint = self.base_url + "/chat/completions"
        self.model, self.timeout = model, float(timeout)
        self.extra = dict(extra or {})
        clash = sorted(set(self.extra) & set(CLIENT_FIELDS))
        if clash:
            raise ValueError(f"ChatClient: extra fields {clash} are set by the client itself "
                             f"(its own arguments: temperature, top_p, max_tokens, stop, seed)")
        self.identity = self.base_url if identity is None else str(identity)
        self.api_key = os.environ.get("OPENAI_API_KEY", "") if api_key is None else api_key
        local = parts.hostname in ("127.0.0.1", "localhost", "::1")
        self.max_concurrency = int(max_concurrency or (32 if local else 16))
        if self.max_concurrency < 1:
            raise ValueError(f"ChatClient: max_concurrency must be >= 1, got {max_concurrency!r}")
        self.retry = retry if retry is not None else RetryPolicy()
        self.prices = dict(DEFAULT_PRICES)
        for name, pair in (prices or {}).items():
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
                    isinstance(p, (int, float)) and p >= 0 for p in pair)):
                raise ValueError(f"ChatClient: prices[{name!r}] must be ($/1M prompt, $/1M completion) "
                                 f">= 0, got {pair!r}")
            self.prices[name] = (float(pair[0]), float(pair[1]))
        self.price = _price_of(self.prices, model)  # None: unpriced, costs $0
        self.budget = Budget(dollars=budget) if isinstance(budget, (int, float)) else (budget or Budget())
        if not isinstance(self.budget, Budget):
            raise TypeError(f"ChatClient: budget must be a Budget, a number of dollars or None, got {budget!r}")
        if self.budget.dollars is not None and self.price is None:
            raise ValueError(f"ChatClient: a dollar budget needs a price for model {model!r}; pass "
                             f"prices={{{model!r}: (prompt $/1M, completion $/1M)}}")
        self.cache = CallCache(cache_path) if cache_path is not None else None
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=self.max_concurrency,
                                                max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._lock = threading.Lock()
        self._inflight = {}                    # cache key -> Event set when its owner finishes
        self._pool = None                      # chat_many's worker threads, made on first use
        self._reserved = [0, 0.0]              # tokens, dollars held by calls in flight
        self._n_inflight = 0                   # calls holding a reservation
        self._budget_freed = threading.Condition(self._lock)
        self.total, self.by_stage, self.by_tag = Usage(), {}, {}
        self.n_sent = 0                        # calls that went to the endpoint (cache misses)
        self.n_requests = 0                    # HTTP attempts, retries included
        self.n_missing_usage = 0               # finished calls whose body had no usage counts
        self.errors = {}                       # ExecutorError kind -> count
        self.stopped = None                    # the BudgetExceeded / EndpointDown that stopped the client
        self._dead_in_a_row = 0                # calls ended in timeout/connection since the last answer

    # -- request building ----------------------------------------------------------------------
    def _body(self, messages, temperature, top_p, max_tokens, stop, seed):
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"chat: messages must be a non-empty list of dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"chat: messages[{i}] must be {{'role': str, 'content': str}}, got {m!r:.200}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise ValueError(f"chat: temperature must be in [0, 2], got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"chat: top_p must be in (0, 1], got {top_p!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"chat: max_tokens must be an int >= 1, got {max_tokens!r}")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"chat: stop must be a non-empty string or a list of them, got {stop!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"chat: seed must be an int or None, got {seed!r}")
        body = {"model": self.model, "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                "temperature": float(temperature), "top_p": float(top_p), "max_tokens": max_tokens}
        if stop:
            body["stop"] = stop
        if seed is not None:
            body["seed"] = seed
        body.update(self.extra)
        return body

    def _blob(self, body, sample, attempt, occurrence):
        """What the journal key hashes: the endpoint's identity (not its port), the full request
        body (model, messages, sampling, extra fields), and which call this is: the sample (k
        samples of one prompt stay k calls), the attempt (a retried run asks anew) and the
        occurrence (the n-th identical request within one run: repeated calls are n calls)."""
        return json.dumps({"endpoint": self.identity, "body": body, "sample": sample, "attempt": attempt,
                           "occurrence": occurrence}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def _key(self, body, sample, attempt=0, occurrence=0):
        return hashlib.sha256(self._blob(body, sample, attempt, occurrence).encode("utf-8")).hexdigest()

    def _cost(self, prompt_tokens, completion_tokens):
        if self.price is None:
            return 0.0
        return (max(prompt_tokens, 0) * self.price[0] + max(completion_tokens, 0) * self.price[1]) / 1e6

    @staticmethod
    def _prompt_bound(messages):
        """An upper bound on a prompt's tokens (see TEMPLATE_TOKENS_PER_CALL)."""
        return TEMPLATE_TOKENS_PER_CALL + sum(TEMPLATE_TOKENS_PER_MESSAGE + len(m["content"].encode("utf-8"))
                                              for m in messages)

    # -- the call ------------------------------------------------------------------------------
    def chat(self, messages, *, temperature=0.0, top_p=1.0, max_tokens=512, stop=None, seed=None,
             sample=0, attempt=0, occurrence=0, stage="", tag=""):
        """One chat call -> ChatResult, from the cache when this exact call already finished.
        Raises ExecutorError when it ends without a completion: BudgetExceeded for the budget and
        EndpointDown for an endpoint that stopped answering; after either, every call raises it.
        sample, attempt and occurrence say which call of an identical request this is (see _blob).
        stage and tag only label the accounting (by_stage, by_tag); they are not part of the key."""
        for name, v in (("sample", sample), ("attempt", attempt), ("occurrence", occurrence)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"chat: {name} must be an int >= 0, got {v!r}")
        body = self._body(messages, temperature, top_p, max_tokens, stop, seed)
        try:
            if self.cache is None:
                return self._send(body, stage, tag)
            result = self._cached_call(body, (sample, attempt, occurrence), stage, tag)
        except ExecutorError as e:
            self._account_error(e, stage, tag)
            raise
        if result.cached:  # a sent call was counted by _send
            with self._lock:
                self._account(result, stage, tag)
        return result

    def _cached_call(self, body, which, stage, tag):
        """Replay the call from the cache, or become its only sender: concurrent identical calls
        wait for the one in flight instead of asking the endpoint twice."""
        blob = self._blob(body, *which)
        key = hashlib.sha256(blob.encode("utf-8")).hexdigest()
        while True:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
            with self._lock:
                event = self._inflight.get(key)
                if event is None:
                    event = self._inflight[key] = threading.Event()
                    break
            event.wait()  # its owner finished: a hit next time round, or our turn if it failed
        try:
            hit = self.cache.get(key)  # finished between our first look and taking ownership
            if hit is not None:
                return hit
            t0 = time.monotonic()
            result = self._send(body, stage, tag)
            self.cache.put(key, blob, result, stage=stage, tag=tag, seconds=time.monotonic() - t0)
            return result
        finally:
            with self._lock:
                del self._inflight[key]
            event.set()

    def _over_budget(self, tokens, dollars):
        """Why spent + in flight + this call's worst case would pass the budget ("" if it would not).
        Call with self._lock held."""
        b, spent, over = self.budget, self.total, []
        used = spent.prompt_tokens + spent.completion_tokens
        if b.tokens is not None and used + self._reserved[0] + tokens > b.tokens:
            over.append(f"{used} tokens spent + {self._reserved[0]} in flight + up to {tokens} for this "
                        f"call > cap {b.tokens}")
        if b.dollars is not None and spent.dollars + self._reserved[1] + dollars > b.dollars:
            over.append(f"${spent.dollars:.6f} spent + ${self._reserved[1]:.6f} in flight + up to "
                        f"${dollars:.6f} for this call > cap ${b.dollars:.6f}")
        return "; ".join(over)

    def _send(self, body, stage, tag):
        """Reserve the call's worst case (prompt bound + max_tokens) against the budget, POST it
        with retries, then swap the reservation for the tokens actually used, in one locked step.
        A call that only fails to fit because of calls in flight waits for them; one that cannot
        fit with nothing in flight is refused unsent."""
        with self._slots:
            tokens = self._prompt_bound(body["messages"]) + body["max_tokens"]
            dollars = self._cost(tokens - body["max_tokens"], body["max_tokens"])
            with self._lock:
                while (over := self._over_budget(tokens, dollars)) and self._n_inflight and not self.stopped:
                    self._budget_freed.wait()
                if self.stopped is not None:  # a stop is a stop: nothing more is sent
                    raise type(self.stopped)(message=str(self.stopped), endpoint=self.endpoint)
                if over:
                    self.stopped = BudgetExceeded(message=f"{self.endpoint}: budget reached, call not sent: {over} "
                                                  "(resume with a raised cap)", endpoint=self.endpoint)
                    self._budget_freed.notify_all()
                    raise self.stopped
                self._reserved[0] += tokens
                self._reserved[1] += dollars
                self._n_inflight += 1
                self.n_sent += 1
            result = None
            try:
                result = self._post(body)
                return result
            except ExecutorError as e:
                if self._note_failure(e):  # the call that trips the stop raises it, not its own timeout
                    raise EndpointDown(message=str(self.stopped), endpoint=self.endpoint) from e
                raise
            finally:
                with self._lock:
                    self._reserved[0] -= tokens
                    self._reserved[1] -= dollars
                    self._n_inflight -= 1
                    if result is not None:
                        self._account(result, stage, tag)
                    self._budget_freed.notify_all()

    def _note_failure(self, error):
        """Count a call that ended unanswered; ENDPOINT_DOWN_AFTER in a row stop the client.
        True when this call tripped the stop."""
        with self._lock:
            if error.kind not in ("timeout", "connection") or self.stopped is not None:
                return False
            self._dead_in_a_row += 1
            if self._dead_in_a_row < ENDPOINT_DOWN_AFTER:
                return False
            self.stopped = EndpointDown(message=f"{self.endpoint}: {self._dead_in_a_row} calls in a row got no "
                                        f"answer within {self.timeout:g} s, retries included; last: {error}",
                                        endpoint=self.endpoint)
            self._budget_freed.notify_all()
            return True

    def _post(self, body):
        """POST with openai-python's retry policy (STYLE.md §6) -> ChatResult, or ExecutorError."""
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        policy, attempt = self.retry, 0
        while True:
            attempt += 1
            with self._lock:
                if self.stopped is not None and attempt > 1:  # no retries once the client is stopped
                    raise type(self.stopped)(message=str(self.stopped), endpoint=self.endpoint)
                self.n_requests += 1
            wait = None
            try:
                resp = self._session.post(self.endpoint, data=payload, headers=headers,
                                          timeout=(self.timeout, self.timeout))
                raw = resp.content
            except requests.exceptions.RequestException as exc:
                kind = "timeout" if _is_read_timeout(exc) else "connection"
                if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
                    raise ExecutorError("connection", f"{self.endpoint}: {exc}", endpoint=self.endpoint,
                                        attempts=attempt) from None
                what = f"no response within {self.timeout:g} s" if kind == "timeout" else "connection failed"
                error = ExecutorError(kind, f"{self.endpoint}: {what} ({type(exc).__name__}: {exc})",
                                      endpoint=self.endpoint)
            else:
                if 200 <= resp.status_code < 300:
                    try:
                        result = parse_chat_response(raw, self.endpoint)
                    except ExecutorError as exc:  # truncated or garbled: another try may do
                        error = exc
                    else:
                        with self._lock:
                            self.n_missing_usage += result.prompt_tokens < 0 or result.completion_tokens < 0
                            self._dead_in_a_row = 0
                        return result
                else:
                    error = ExecutorError("http", f"{self.endpoint}: HTTP {resp.status_code}: "
                                          f"{_server_message(raw)}", status=resp.status_code, endpoint=self.endpoint)
                    if not _is_retryable_status(resp.status_code, resp.headers):
                        error.attempts = attempt
                        raise error
                    wait = retry_after_seconds(resp.headers)
                    if wait is not None and wait > policy.max_retry_after:
                        error.args = (f"{error} -- Retry-After asks for {wait:g} s, above the cap of "
                                      f"{policy.max_retry_after:g} s (RetryPolicy.max_retry_after): not retrying",)
                        error.attempts = attempt
                        raise error
            error.attempts = attempt
            if attempt > policy.max_retries:
                error.args = (f"{error} (gave up after {attempt} attempts)",)
                raise error
            delay = wait if wait is not None and wait > 0 else backoff_delay(attempt - 1, policy)
            time.sleep(delay)

    # -- accounting ----------------------------------------------------------------------------
    def _account(self, result, stage, tag):
        """Add a finished call to the totals (self._lock held). A missing usage (-1) counts as 0."""
        cost = self._cost(result.prompt_tokens, result.completion_tokens)
        for usage in (self.total, self.by_stage.setdefault(stage, Usage()), self.by_tag.setdefault(tag, Usage())):
            usage.calls += 1
            usage.cached += result.cached
            usage.prompt_tokens += max(result.prompt_tokens, 0)
            usage.completion_tokens += max(result.completion_tokens, 0)
            usage.dollars += cost

    def _account_error(self, error, stage, tag):
        with self._lock:
            self.errors[error.kind] = self.errors.get(error.kind, 0) + 1
            for usage in (self.total, self.by_stage.setdefault(stage, Usage()), self.by_tag.setdefault(tag, Usage())):
                usage.errors += 1

    def stats(self):
        """A snapshot of the accounting, JSON-ready."""
        with self._lock:
            return {"model": self.model, "endpoint": self.endpoint, "priced": self.price is not None,
                    "total": dataclasses.asdict(self.total), "n_sent": self.n_sent, "n_requests": self.n_requests,
                    "n_missing_usage": self.n_missing_usage, "errors": dict(self.errors),
                    "identity": self.identity, "extra": dict(self.extra), "max_concurrency": self.max_concurrency,
                    "timeout": self.timeout,
                    "by_stage": {k: dataclasses.asdict(v) for k, v in self.by_stage.items()},
                    "by_tag": {k: dataclasses.asdict(v) for k, v in self.by_tag.items()},
                    "budget": dataclasses.asdict(self.budget)}

    def estimate(self, requests, *, completion_fraction=1.0):
        """The cost of planned calls before a run, without asking anyone: `requests` are chat()
        keyword dicts. Prompt tokens are guessed at 4 characters per token plus the template;
        completions at completion_fraction·max_tokens (1.0: the worst case). Calls already in the
        cache are free and counted apart. Returns a dict of counts, tokens and dollars."""
        calls = cached = prompt = completion = 0
        for req in requests:
            body = self._body(req["messages"], req.get("temperature", 0.0), req.get("top_p", 1.0),
                              req.get("max_tokens", 512), req.get("stop"), req.get("seed"))
            calls += 1
            if self.cache is not None and self.cache.get(self._key(body, req.get("sample", 0), req.get("attempt", 0),
                                                                   req.get("occurrence", 0))) is not None:
                cached += 1
                continue
            prompt += TEMPLATE_TOKENS_PER_CALL + sum(TEMPLATE_TOKENS_PER_MESSAGE + math.ceil(len(m["content"]) / 4)
                                                     for m in body["messages"])
            completion += math.ceil(completion_fraction * body["max_tokens"])
        return {"calls": calls, "cached": cached, "prompt_tokens": prompt, "completion_tokens": completion,
                "dollars": self._cost(prompt, completion), "priced": self.price is not None}

    # -- many calls ----------------------------------------------------------------------------
    def chat_many(self, requests, *, progress=None):
        """Run chat(**r) for every dict r, up to max_concurrency at once -> results in order, each
        a ChatResult or the ExecutorError it ended with (failures are data). Bad arguments raise.
        progress: a label; then done/total, rate and ETA go to stderr (updated in place on a
        terminal, one line at the end otherwise)."""
        requests = list(requests)
        if not requests:
            return []
        tty = progress is not None and sys.stderr.isatty()
        count = {"done": 0, "errors": 0, "shown": 0.0}
        t0 = time.monotonic()

        def report(final):
            done, n, dt = count["done"], len(requests), time.monotonic() - t0
            rate = done / dt if dt > 0 else 0.0
            eta = f", ETA {(n - done) / rate:.0f} s" if rate > 0 and done < n else ""
            start, end = ("\r" if tty else ""), ("\n" if final else "")
            print(f"{start}{progress}: {done}/{n} calls, {count['errors']} errors, {dt:.1f} s, "
                  f"{rate:.2f} calls/s{eta}", end=end, file=sys.stderr, flush=True)

        def one(req):
            try:
                out = self.chat(**req)
            except ExecutorError as e:
                out = e
            if progress is not None:
                with self._lock:
                    count["done"] += 1
                    count["errors"] += isinstance(out, ExecutorError)
                    if tty and time.monotonic() - count["shown"] > 0.5:
                        count["shown"] = time.monotonic()
                        report(False)
            return out

        with self._lock:  # one pool for the client's life: a burst starts without spawning threads
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="chat")
        results = list(self._pool.map(one, requests))
        if progress is not None:
            report(True)
        return results

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._session.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def preflight(base_url, model, *, api_key=None, timeout=30.0):
    """Before any work: does the endpoint answer GET {base_url}/models, and does it serve `model`
    where it lists models? "" if so, else one line saying what is wrong. An endpoint without the
    route (404/405) is taken as answering. A listing without `model` is an error even when it has a
    single id: llama.cpp's server answers any name with its one model and echoes the name back."""
    url = str(base_url).rstrip("/") + "/models"
    key = os.environ.get("OPENAI_API_KEY", "") if api_key is None else api_key
    headers = {"Accept": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        resp = requests.get(url, headers=headers, timeout=(timeout, timeout))
    except requests.exceptions.RequestException as e:
        return f"--executor-url {base_url}: no answer from GET {url} ({type(e).__name__}: {e})"
    if resp.status_code in (404, 405):
        return ""
    if resp.status_code in (401, 403):
        return (f"--executor-url {base_url}: GET {url} refused the key (HTTP {resp.status_code}: "
                f"{_server_message(resp.content)}); pass --api-key or set OPENAI_API_KEY")
    if not 200 <= resp.status_code < 300:
        return f"--executor-url {base_url}: GET {url} answered HTTP {resp.status_code}: {_server_message(resp.content)}"
    try:
        data = resp.json().get("data")
        ids = [str(m["id"]) for m in data]
    except (ValueError, AttributeError, TypeError, KeyError):
        return ""  # answered, but lists nothing we can read: nothing to check the name against
    if ids and model not in ids and f"{model}:latest" not in ids:  # Ollama lists "name:latest"
        shown = ", ".join(ids[:8]) + (f", ... ({len(ids)} models)" if len(ids) > 8 else "")
        return f"--executor-model {model}: {url} does not serve it; it lists {shown}"
    return ""


def model_fingerprint(path, *, blocks=8, block_bytes=1 << 16):
    """A cheap identity for a model file or directory: sha256 over the size and `blocks` evenly
    spaced blocks of each file (a directory: each file by relative name, sorted). It reads at most
    blocks x block_bytes per file, and differs for any other model file we know of."""
    h = hashlib.sha256()
    path = os.fspath(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for name in files:
        size = os.path.getsize(name)
        h.update(f"{os.path.relpath(name, path) if name != path else ''}\0{size}\0".encode())
        with open(name, "rb") as fh:
            for i in range(blocks):
                fh.seek(max(0, size - block_bytes) * i // max(blocks - 1, 1))
                h.update(fh.read(block_bytes))
    return h.hexdigest()[:32]


# --- local OpenAI-compatible server (issue 4) -------------------------------------------------
# POST /v1/chat/completions and GET /v1/models over a model.py model, on the standard library's
# ThreadingHTTPServer. Handler threads validate a request, render it with the chat template and
# queue it; one worker thread owns the model, takes what is queued (waiting while requests keep
# arriving, up to a short window) and decodes the whole batch in one model.generate call with
# per-row max_tokens, temperature, top_p, stop and seed, so 32 concurrent clients cost about one
# batch-32 generate. Errors are OpenAI-style bodies: {"error": {"message", "type", "param", "code"}}.

MAX_BODY_BYTES = 16 << 20   # a request body larger than this is refused with 413
MAX_STOP_STRINGS = 16
# Fields OpenAI clients (and llama.cpp's own sampler fields) may send that we accept when they ask for
# our only behaviour: our sampler has no penalties, no top-k and no min-p.
_NEUTRAL_FIELDS = {"stream": False, "n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0,
                   "repeat_penalty": 1, "top_k": 0, "min_p": 0}


def neutral_field_error(name, value):
    """Why our server refuses `name` = value ("" if it accepts it): unknown fields are refused, and
    the known optional ones only at the value that asks for our only behaviour."""
    if name not in _NEUTRAL_FIELDS:
        return (f"Unrecognized request argument supplied: {name} (this server also takes, at one value each: "
                + ", ".join(f"{k}={v!r}" for k, v in _NEUTRAL_FIELDS.items()) + ")")
    want = _NEUTRAL_FIELDS[name]
    if value is not None and (isinstance(value, bool) != isinstance(want, bool) or value != want):
        return f"'{name}' = {value!r} is not supported by this server (only {want!r})"
    return ""


class _BadRequest(Exception):
    def __init__(self, message, param=None, code=None, status=400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class _Job:
    """One queued chat request, as the worker's batch will need it."""
    prompt: str              # chat-rendered prompt text
    prompt_tokens: int       # its token count (+1 for a possible bos), for batch planning
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    seed: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    completion: object = None   # model.Completion once done
    error: str = ""             # set instead when the batch failed


def _number(body, name, lo, hi, default, *, integer=False, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or (v <= lo if lo_open else v < lo) or v > hi or v != v:
        span = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise _BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'} in {span}, got {v!r}",
                          param=name, code="invalid_value")
    return v


def _chat_messages(messages):
    """Validate OpenAI `messages` -> [{"role", "content": str}] for Tokenizer.apply_chat. Content
    may be a string or a list of {"type": "text", "text": ...} parts; "developer" acts as "system"."""
    if not isinstance(messages, list) or not messages:
        raise _BadRequest(f"'messages' must be a non-empty array, got {type(messages).__name__}",
                          param="messages", code="invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _BadRequest(f"'messages[{i}]' must be an object, got {type(m).__name__}", param=f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise _BadRequest(f"'messages[{i}].role' must be system, developer, user or assistant, got {role!r}",
                              param=f"messages[{i}].role")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _BadRequest(f"'messages[{i}].content' must be a string or a list of text parts, got "
                              f"{type(content).__name__}", param=f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


class LocalServer:
    """An OpenAI-compatible chat server over an already loaded (model, tokenizer), started on
    construction; `base_url` ends in "/v1". Use it as a context manager or call stop().

    max_batch caps rows per generate call; batch_window (s) is how long the worker keeps
    gathering after the last new request (longer while a received request is still being
    parsed), at most max_wait (s) after the first; max_kv_bytes caps
    one batch's KV cache (rows x (longest prompt + largest max_tokens)); default_max_tokens is
    used when a request gives none (OpenAI's default is "up to the context", too slow on a CPU).
    """

    def __init__(self, model, tokenizer, *, model_name="local", host="127.0.0.1", port=0, api_key=None,
                 max_batch=32, batch_window=0.01, max_wait=0.2, max_kv_bytes=2 << 30,
                 default_max_tokens=1024, verbose=False):
        import model as modellib  # here, not at the top: clients and the sandbox need no torch
        self._generate = modellib.generate
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.api_key, self.verbose = api_key or None, verbose
        self.max_batch, self.batch_window, self.max_wait = int(max_batch), float(batch_window), float(max_wait)
        self.context = int(model.config.max_seq_len)
        self.default_max_tokens = int(default_max_tokens)
        cfg, weight = model.config, model.lm_head.weight
        kv_bytes_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * weight.element_size()
        self.max_kv_tokens = max(int(max_kv_bytes) // kv_bytes_per_token, self.context)  # rows x S per batch
        self.created = int(time.time())
        self.batch_sizes = {}        # rows per generate call -> how many calls (dynamic batching at work)
        self.n_completions = 0
        self._pending, self._closing = [], False
        self._arriving = 0           # POSTs received but not yet queued (parsing, rendering)
        self._cv = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="executor-batcher", daemon=True)
        self._worker.start()
        self._httpd = ThreadingHTTPServer((host, port), _ChatHandler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self.host, self.port = host, self._httpd.server_address[1]
        url_host = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{url_host}:{self.port}/v1"
        self._serving = threading.Thread(target=self._httpd.serve_forever, args=(0.1,),
                                         name="executor-http", daemon=True)
        self._serving.start()

    # -- requests ------------------------------------------------------------------------------
    def parse_request(self, raw):
        """A POST /v1/chat/completions body -> _Job, or _BadRequest saying which field is wrong."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _BadRequest(f"request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise _BadRequest(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
        known = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                 "seed", "user"}
        for name in body:
            why = "" if name in known else neutral_field_error(name, body[name])
            if why:
                raise _BadRequest(why, param=name, code="unsupported_parameter" if name not in _NEUTRAL_FIELDS
                                  else "unsupported_value")
        name = body.get("model")
        if not isinstance(name, str):
            raise _BadRequest(f"'model' must be a string, got {name!r}", param="model", code="invalid_type")
        if name != self.model_name:
            raise _BadRequest(f"The model `{name}` does not exist; this server has `{self.model_name}`",
                              param="model", code="model_not_found", status=404)
        prompt = self.tokenizer.apply_chat(_chat_messages(body.get("messages")), add_generation_prompt=True)
        n_prompt = len(self.tokenizer.encode(prompt)) + 1
        room = self.context - n_prompt
        if room < 1:
            raise _BadRequest(f"the prompt is {n_prompt} tokens; the model's context is {self.context}",
                              param="messages", code="context_length_exceeded")
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise _BadRequest("give 'max_tokens' or 'max_completion_tokens', not both", param="max_tokens")
        field_ = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, field_, 1, self.context, None, integer=True)
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, room)
        elif max_tokens > room:
            raise _BadRequest(f"'{field_}' is {max_tokens} but the prompt ({n_prompt} tokens) leaves "
                              f"{room} of the context ({self.context})", param=field_,
                              code="context_length_exceeded")
        temperature = float(_number(body, "temperature", 0, 2, 1.0))  # OpenAI's default is 1
        top_p = float(_number(body, "top_p", 0, 1, 1.0, lo_open=True))
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
        if not (isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in stop)):
            raise _BadRequest(f"'stop' must be a non-empty string or an array of at most {MAX_STOP_STRINGS}, "
                              f"got {body.get('stop')!r:.200}", param="stop", code="invalid_value")
        seed = _number(body, "seed", -2 ** 63, 2 ** 63 - 1, None, integer=True)
        if seed is None:  # a fresh seed per request keeps rows independent of their batch mates
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        if "user" in body and not isinstance(body["user"], str):
            raise _BadRequest(f"'user' must be a string, got {body['user']!r}", param="user")
        return _Job(prompt, n_prompt, max_tokens, temperature, top_p, stop, seed)

    def submit(self, job):
        """Queue a job for the next batch; False once the server is stopping."""
        with self._cv:
            if self._closing:
                return False
            self._pending.append(job)
            self._cv.notify_all()
            return True

    def response(self, job):
        """The OpenAI chat.completion body for a finished job."""
        c = job.completion
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "logprobs": None, "finish_reason": c.finish_reason}],
                "usage": {"prompt_tokens": c.n_prompt_tokens, "completion_tokens": c.n_completion_tokens,
                          "total_tokens": c.n_prompt_tokens + c.n_completion_tokens}}

    def models(self):
        return {"object": "model", "id": self.model_name, "created": self.created, "owned_by": "scoreflow"}

    # -- the batching worker -------------------------------------------------------------------
    def _take_batch(self):
        """FIFO rows while the batch fits: <= max_batch rows, longest prompt + largest max_tokens
        within the context, rows x that length within max_kv_tokens. Called with self._cv held."""
        batch, longest, most = [], 0, 0
        for job in self._pending:
            lo, mo = max(longest, job.prompt_tokens), max(most, job.max_tokens)
            if batch and (len(batch) >= self.max_batch or lo + mo > self.context
                          or (len(batch) + 1) * (lo + mo) > self.max_kv_tokens):
                break
            batch.append(job)
            longest, most = lo, mo
        del self._pending[:len(batch)]
        return batch

    def _work(self):
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return
                first = time.monotonic()
                while len(self._pending) < self.max_batch:  # gather while requests keep coming
                    seen, left = len(self._pending), first + self.max_wait - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(min(self.batch_window, left))
                    # stop when a window passed with nothing new and no request is still being parsed
                    if self._closing or (len(self._pending) == seen and not self._arriving):
                        break
                batch = self._take_batch()
            self._run(batch)

    def _run(self, batch):
        try:
            outs = self._generate(self.model, self.tokenizer, [j.prompt for j in batch],
                                  max_new_tokens=[j.max_tokens for j in batch],
                                  temperature=[j.temperature for j in batch], top_p=[j.top_p for j in batch],
                                  stop=[j.stop for j in batch], seed=[j.seed for j in batch])
            for job, c in zip(batch, outs):
                job.completion = c
        except Exception as e:  # report to every waiting client; the server keeps serving
            for job in batch:
                job.error = f"generation failed for a batch of {len(batch)}: {type(e).__name__}: {e}"
            print(f"executor server: {batch[0].error}", file=sys.stderr)
        finally:
            with self._cv:
                self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
                self.n_completions += len(batch)
            for job in batch:
                job.done.set()

    def stop(self):
        """Stop accepting, finish the batch in progress, fail what is still queued (503)."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            left, self._pending = self._pending, []
            self._cv.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        for job in left:
            job.error = "server stopped"
            job.done.set()
        self._worker.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class _ChatHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, so clients' connection pools are used
    server_version = "scoreflow-executor"
    timeout = 600                   # s an idle keep-alive connection may hold its thread

    def log_message(self, fmt, *args):
        if self.server.owner.verbose:
            super().log_message(fmt, *args)

    def _send_json(self, status, obj, headers=()):
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client went away; nothing to tell it
            self.close_connection = True

    def _error(self, status, message, *, type_="invalid_request_error", param=None, code=None, headers=()):
        self._send_json(status, {"error": {"message": message, "type": type_, "param": param, "code": code}}, headers)

    def _authorised(self):
        key = self.server.owner.api_key
        if key is None or hmac.compare_digest(self.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
            return True
        self._error(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                    headers=[("WWW-Authenticate", "Bearer")])
        return False

    def do_GET(self):
        owner, path = self.server.owner, self.path.split("?", 1)[0].rstrip("/")
        if not self._authorised():
            return
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [owner.models()]})
        elif path == f"/v1/models/{owner.model_name}":
            self._send_json(200, owner.models())
        else:
            self._error(404, f"no route GET {path}; this server has GET /v1/models and POST /v1/chat/completions",
                        code="not_found")

    def do_POST(self):
        owner, path = self.server.owner, self.path.split("?", 1)[0].rstrip("/")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._error(411, f"a Content-Length header is required, got {length!r}")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            return self._error(413, f"request body is {length} bytes, above the limit of {MAX_BODY_BYTES}")
        with owner._cv:  # the batcher waits for requests already here but still being parsed
            owner._arriving += 1
        try:
            raw = self.rfile.read(int(length))  # read before any answer, so keep-alive stays in step
            if not self._authorised():
                return
            if path != "/v1/chat/completions":
                return self._error(404, f"no route POST {path}; this server has POST /v1/chat/completions",
                                   code="not_found")
            try:
                job = owner.parse_request(raw)
            except _BadRequest as e:
                return self._error(e.status, e.message, param=e.param, code=e.code)
            except Exception as e:  # a bug of ours: say so, and keep serving
                return self._error(500, f"internal error reading the request: {type(e).__name__}: {e}",
                                   type_="server_error")
            if not owner.submit(job):
                return self._error(503, "server is stopping", type_="server_error")
        finally:
            with owner._cv:
                owner._arriving -= 1
                owner._cv.notify_all()
        job.done.wait()
        if job.error:
            status = 503 if job.error == "server stopped" else 500
            return self._error(status, job.error, type_="server_error")
        self._send_json(200, owner.response(job))


def _dtype(name):
    import torch
    if name is None or isinstance(name, torch.dtype):
        return name or torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype: expected one of {sorted(table)}, got {name!r}")
    return table[name]


def start_local_server(model_path=None, *, host="127.0.0.1", port=0, api_key=None, device="cpu", dtype=None,
                       model=None, tokenizer=None, model_name=None, **options):
    """Load model_path with model.load (None: the embedded SmolLM2-135M-Instruct GGUF), or serve an
    already loaded (model, tokenizer), and start a LocalServer on host:port (0: a free port).
    options go to LocalServer (max_batch, batch_window, max_wait, max_kv_bytes, default_max_tokens,
    verbose). The name clients send as `model` defaults to the file or directory name."""
    import model as modellib  # see LocalServer.__init__
    if (model is None) != (tokenizer is None):
        raise ValueError("start_local_server: pass both model and tokenizer, or neither")
    loaded = model is None
    if model is None:
        model, tokenizer = modellib.load(model_path, device=device, dtype=_dtype(dtype))
    path = model_path if model_path is not None else modellib.embedded_model_path()
    if model_name is None:
        model_name = os.path.basename(os.path.normpath(os.fspath(path)))
        model_name = model_name[:-5] if model_name.endswith(".gguf") else model_name
    server = LocalServer(model, tokenizer, model_name=model_name, host=host, port=port, api_key=api_key, **options)
    # what determines its replies, for a client's journal key (ChatClient identity): not the port
    weights = model.lm_head.weight
    server.identity = (f"local:{model_fingerprint(path) if loaded or model_path is not None else model_name + '-given'}:"
                       f"{str(weights.dtype).replace('torch.', '')}:{weights.device.type}")
    return server


def serve_main(argv=None):
    """`python scoreflow.py serve`: serve a model until SIGINT/SIGTERM. Prints the base URL and
    model name on stdout once it is listening."""
    p = argparse.ArgumentParser(prog="scoreflow.py serve", description="Serve a model over an OpenAI-compatible "
                                "API: POST /v1/chat/completions, GET /v1/models (dynamic batching).")
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: the embedded "
                   "SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--model-name", default=None, help="name clients send as 'model' (default: the file name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0 = any free port (default: 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: no key)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: float32)")
    p.add_argument("--max-batch", type=int, default=32, help="rows per batched generate call (default: 32)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="keep gathering while requests arrive this often, ms (default: 10)")
    p.add_argument("--max-kv-gib", type=float, default=2.0, help="KV-cache cap per batch, GiB (default: 2)")
    p.add_argument("--default-max-tokens", type=int, default=1024,
                   help="completion tokens when a request gives no max_tokens (default: 1024)")
    p.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.batch_window_ms < 0 or args.max_kv_gib <= 0 or args.default_max_tokens < 1:
        p.error("--max-batch and --default-max-tokens must be >= 1, --batch-window-ms >= 0, --max-kv-gib > 0")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"scoreflow serve: warning: binding {args.host} without --api-key lets anyone who can reach "
              "it use the model", file=sys.stderr)
    server = start_local_server(args.model, host=args.host, port=args.port, api_key=args.api_key,
                                device=args.device, dtype=args.dtype, model_name=args.model_name,
                                max_batch=args.max_batch, batch_window=args.batch_window_ms / 1000,
                                max_kv_bytes=int(args.max_kv_gib * (1 << 30)),
                                default_max_tokens=args.default_max_tokens, verbose=args.verbose)
    stopping = threading.Event()
    if threading.current_thread() is threading.main_thread():
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


# --- subprocess sandbox (issue 5) --------------------------------------------------------------
# run_python(code) runs model-written Python walled in by the operating system, never by exec in our
# process (STYLE.md section 6; SCOREFLOW.md section 10.10). Each run is a fork of a sandbox server: a
# fresh `python -I` started once per parent process, which never runs model code itself; a fork costs
# about 1 ms where a new interpreter costs 10-20 ms (multiprocessing's forkserver idea). The fork
# builds its own walls, as root where we are root, then runs the code; preexec_fn would be unsafe in
# our threaded parent. Layers, each reported in SandboxResult.layers when active:
#   session         the code leads its own session and process group
#   cgroup-pids     a pids cgroup shared by all runs of one server caps their tasks together
#   cgroup-memory   a memory cgroup shared likewise caps their memory (tmpfs pages included) at half
#                   the machine's: per-run caps come from rlimits, this one protects the host
#   pid-namespace   the code is init of a new PID namespace: when it exits or is killed, the kernel
#                   kills every descendant, setsid'ed escapees included; outside PIDs are invisible
#   uid-sweep       only without pid-namespace, as root: after the run, SIGKILL to every process of
#                   the run's uid (kill(-1) from a child holding that uid)
#   net-namespace   a new network namespace with no interface up: no network, loopback included
#   ipc-namespace   private System V IPC and POSIX message queues, gone with the run
#   mount-namespace private mounts, for the next three layers
#   tmpfs-workdir   the work dir is /tmp, a fresh size-capped tmpfs (a disk quota) over the host's,
#                   gone with the run (without mount namespaces: a host temp dir, removed after)
#   hidden-dirs     the user's home and the project are covered by empty tmpfs mounts; interpreter
#                   directories inside them (or /tmp) are bound back read-only
#   proc-private    /proc shows the sandbox's own processes only
#   rlimits         CPU seconds, address space, file size (stdout and stderr too), open files, no core
#   uid-drop        as root: a per-run unprivileged uid/gid (_SANDBOX_UID_BASE + host pid): root
#                   ignores RLIMIT_NPROC and file permissions, and a shared `nobody` would let
#                   parallel runs signal each other and share one process count
#   nproc           RLIMIT_NPROC, which binds only after uid-drop
#   user-namespace  not root: the server's own unprivileged user namespace, for the namespaces
#   no-new-privs    setuid binaries cannot raise privileges
#   landlock        writes only in the work dir and /dev/null; reads only the interpreter, system dirs
#                   and the work dir (home, the project: unreadable); TCP bind/connect denied
#   landlock-scope  signals and abstract unix sockets to processes outside the run blocked (ABI >= 6)
# The wall-clock limit is kept by the caller, which SIGKILLs the code's process at the limit: as init
# of its PID namespace it takes every descendant with it. Should the server die, the code gets
# SIGKILL as its parent-death signal. A missing layer is said once on stderr.
_SANDBOX_UID_BASE = 1_500_000_000

# The server (argv: socket fd, modules to preload, uid base, CONTROLLER=PATH cgroups) first sends
# "hello LAYER..." (its own layers, and "mounts" if it can make mount namespaces). Then each request
# is one message carrying five fds (config memfd, stdout, stderr, report, the write end of a "done"
# pipe); it answers with a pidfd of the forked run. The run writes one fact per line to the report:
# "layer NAME", "missing NAME WHY", "error WHY", "start"; after reaping it the server adds
# "exit WAITSTATUS" and closes "done". Syscalls 444-446 (landlock) have these numbers on every arch.
_SANDBOX_SERVER = r'''
import ctypes, marshal, os, resource, signal, socket, sys, traceback
sock = socket.socket(fileno=int(sys.argv[1]))
for name in sys.argv[2].split(","):  # modules model code often imports: every run inherits them
    try:
        __import__(name)
    except ImportError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
L = ctypes.c_long
def call(name, *args):
    rc = getattr(libc, name)(*args)
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, name + ": " + os.strerror(e))
    return rc
root = os.geteuid() == 0
uid_base = int(sys.argv[3])  # a run's uid is uid_base + its host pid
hello = ["hello"]
for arg in sys.argv[4:]:  # "CONTROLLER=PATH": the shared cgroups every run inherits from us
    ctl, _, path = arg.partition("=")
    try:
        with open(path + "/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        hello.append("cgroup-" + ctl)
    except OSError as e:
        sys.stderr.write("sandbox server: cannot join %s: %s\n" % (path, e))
if not root:  # a user namespace of our own maps us to root inside, which the namespaces need
    try:
        u, g = os.getuid(), os.getgid()
        call("unshare", L(0x10000000))
        for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % u), ("gid_map", "0 %d 1" % g)):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
        hello.append("user-namespace")
    except OSError as e:
        sys.stderr.write("sandbox server: no user namespace: %s\n" % e)
own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
try:  # a PID namespace per run: unshare before each fork, setns back after it
    call("unshare", L(0x20000000))
    call("setns", L(own_pid_ns), L(0x20000000))
    pid_ns = ""
except OSError as e:
    pid_ns = str(e)  # why not: said in each run's report
def sweep(uid):
    """Without PID namespaces: SIGKILL every process of the run's uid, from a child holding it."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(100):  # a killed process cannot fork, so this converges in a few rounds
                os.kill(-1, signal.SIGKILL)
        except OSError:
            pass  # ESRCH: none left
        os._exit(0)
    os.waitpid(pid, 0)
probe = os.fork()  # can we make mount namespaces? (the private /tmp work dir needs one)
if probe == 0:
    try:
        call("unshare", L(0x20000))
        os._exit(0)
    except OSError:
        os._exit(1)
if os.waitpid(probe, 0)[1] == 0:
    hello.append("mounts")
alive_r, alive_w = os.pipe()  # runs see EOF on alive_r once we are gone
runs = {}  # pid -> (report fd, done fd) of each live run
def reap(*_):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        rep, done = runs.pop(pid, (-1, -1))
        if rep >= 0:
            if pid_ns and root:
                sweep(uid_base + pid)
            os.write(rep, b"exit %d\n" % status)
            os.close(rep)
            os.close(done)  # the caller wakes now
call("prctl", L(36), L(1), L(0), L(0), L(0))  # PR_SET_CHILD_SUBREAPER: orphans come to reap()
signal.signal(signal.SIGCHLD, reap)
sock.send(" ".join(hello).encode())
while True:  # one forked run per request until the parent closes its end of the socket
    msg, fds, _, _ = socket.recv_fds(sock, 16, 5)
    if not msg:
        sys.exit(0)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # no reaping before runs[pid] exists
    pid = -1
    try:
        if not pid_ns:
            call("unshare", L(0x20000000))  # our next child is init of a new PID namespace
        try:
            pid = os.fork()
        finally:
            if not pid_ns and pid != 0:
                call("setns", L(own_pid_ns), L(0x20000000))
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        socket.send_fds(sock, [("error fork: %s" % e).encode()], [])
        for fd in fds:
            os.close(fd)
        continue
    if pid == 0:
        break  # the run goes on below the loop
    pidfd = os.pidfd_open(pid)
    runs[pid] = (fds[3], fds[4])
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    socket.send_fds(sock, [b"ok"], [pidfd])
    for fd in fds[:3] + [pidfd]:
        os.close(fd)
# --- one run: init of its own PID namespace, root until the uid drop if the server is root ---
signal.signal(signal.SIGCHLD, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
cfg_fd, out_fd, err_fd, rep, done = fds
os.close(done)
def say(*words):
    os.write(rep, (" ".join(map(str, words)) + "\n").encode())
def layer(name, fn, *args):
    try:
        fn(*args)
        say("layer", name)
        return True
    except OSError as e:
        say("missing", name, e)
        return False
try:
    sock.close()
    os.close(alive_w)
    os.close(own_pid_ns)
    for fd in runs.values():
        os.close(fd[0]), os.close(fd[1])
    call("prctl", L(1), L(signal.SIGKILL), L(0), L(0), L(0))  # PR_SET_PDEATHSIG: die with the server
    os.setsid()
    say("layer session")
    for fd, to in ((out_fd, 1), (err_fd, 2)):
        os.dup2(fd, to)
        os.close(fd)
    cfg = marshal.loads(os.pread(cfg_fd, os.fstat(cfg_fd).st_size, 0))
    os.close(cfg_fd)
    with open("/proc/self/status") as f:  # NSpid: our pid in each namespace, the host's first
        host_pid = int(next(line for line in f if line.startswith("NSpid:")).split()[1])
    uid = gid = cfg["uid_base"] + host_pid
    work = cfg["workdir"]
    if pid_ns:
        say("missing pid-namespace", pid_ns)
        say(*(["layer", "uid-sweep"] if root else ["missing", "uid-sweep", "not root"]))
    else:
        say("layer pid-namespace")
    ns = {n: layer(n + "-namespace", call, "unshare", L(flag)) for n, flag in
          (("mount", 0x20000), ("net", 0x40000000), ("ipc", 0x08000000))}
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
    MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
    def mount(src, dst, fstype, flags, data):
        call("mount", src and src.encode(), dst.encode(), fstype and fstype.encode(), L(flags),
             data and data.encode())
    if cfg["private_tmp"] and not ns["mount"]:
        raise OSError("work dir /tmp needs a mount namespace")
    if ns["mount"]:
        mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # what we mount stays in this namespace
        # Each covered dir gets an empty tmpfs; interpreter dirs inside it are bound back read-only
        # through fds opened before the cover.
        covers = [(d, "size=1m,mode=0755") for d in cfg["hide"]]
        if cfg["private_tmp"]:  # the work dir: a fresh tmpfs over /tmp, size-capped, the run's own
            covers.append((work, "size=%dm,nr_inodes=%d,mode=0700,uid=%d,gid=%d"
                           % (cfg["disk_mb"], cfg["max_files"], uid if root else 0, gid if root else 0)))
        keep = {k: os.open(k, os.O_PATH | os.O_CLOEXEC) for k in cfg["keep"]
                if any(k.startswith(d + "/") for d, _ in covers)}
        def cover(d, opts):
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, opts)
            for k, fd in keep.items():
                if k.startswith(d + "/"):
                    os.makedirs(k, 0o755, exist_ok=True)
                    mount("/proc/self/fd/%d" % fd, k, None, MS_BIND | MS_REC, None)
                    mount(None, k, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        if cfg["hide"]:
            layer("hidden-dirs", lambda: [cover(d, o) for d, o in covers if d != work])
        if cfg["private_tmp"]:
            cover(work, covers[-1][1])  # no fallback: without it /tmp would be the host's
            say("layer tmpfs-workdir")
        for fd in keep.values():
            os.close(fd)
        if not pid_ns:
            ns["proc"] = layer("proc-private", mount, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    if root and not cfg["private_tmp"]:
        os.chown(work, uid, gid)  # a host temp dir: hand it to the run's uid
    R = resource
    for r, soft in ((R.RLIMIT_CPU, cfg["cpu_s"]), (R.RLIMIT_AS, cfg["memory_mb"] << 20),
                    (R.RLIMIT_FSIZE, cfg["file_mb"] << 20), (R.RLIMIT_NOFILE, cfg["max_fds"]),
                    (R.RLIMIT_CORE, 0)):
        R.setrlimit(r, (soft, soft + (r == R.RLIMIT_CPU)))  # SIGXCPU first, SIGKILL a second later
    say("layer rlimits")
    # Landlock: handle every access right this kernel knows, then allow a few trees.
    ruleset, abi = -1, 0
    try:
        abi = call("syscall", L(444), None, L(0), L(1))  # LANDLOCK_CREATE_RULESET_VERSION
        fs_all = (1 << 13) - 1 | (abi >= 2) << 13 | (abi >= 3) << 14 | (abi >= 5) << 15
        file_rights = 1 | 2 | 4 | (abi >= 3) << 14 | (abi >= 5) << 15  # exec, write, read, truncate, ioctl
        read = 1 | 4 | 8  # execute, read file, read dir
        attr = (ctypes.c_uint64 * 3)(fs_all, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
        ruleset = call("syscall", L(444), ctypes.byref(attr), L(8 if abi < 4 else 16 if abi < 6 else 24), L(0))
        class Beneath(ctypes.Structure):  # struct landlock_path_beneath_attr (packed)
            _pack_ = 1
            _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
        rules = [(p, read) for p in cfg["read"]] + [(work, fs_all), ("/dev/null", 2 | 4 | (abi >= 3) << 14)]
        if ns.get("proc"):
            rules.append(("/proc", read))
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # e.g. no /lib32 here
            if not os.path.isdir(path):
                access &= file_rights
            call("syscall", L(445), L(ruleset), L(1), ctypes.byref(Beneath(access, fd)), L(0))
            os.close(fd)
    except OSError as e:
        say("missing landlock", e)
    if root:
        R.setrlimit(R.RLIMIT_NPROC, (cfg["max_procs"], cfg["max_procs"]))
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        say("layer uid-drop")
        say("layer nproc")
    else:
        say("missing uid-drop not root")
        say("missing nproc RLIMIT_NPROC would count every process of this user")
    call("prctl", L(38), L(1), L(0), L(0), L(0))  # PR_SET_NO_NEW_PRIVS
    say("layer no-new-privs")
    if ruleset >= 0:
        call("syscall", L(446), L(ruleset), L(0))
        os.close(ruleset)
        say("layer landlock")
        say(*(["layer", "landlock-scope"] if abi >= 6 else ["missing", "landlock-scope", "landlock ABI %d < 6" % abi]))
    # setuid cleared the parent-death signal: set it again, then check the server still lives
    call("prctl", L(1), L(signal.SIGKILL), L(0), L(0), L(0))
    os.set_blocking(alive_r, False)
    try:
        os.read(alive_r, 1)  # b"": EOF, the server is gone
        os._exit(137)
    except BlockingIOError:
        os.close(alive_r)
    os.chdir(work)
    for name, data in cfg["files"].items():
        os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
        with open(name, "wb") as f:
            f.write(data)
    with open(".stdin", "wb") as f:
        f.write(cfg["stdin"])
    fd = os.open(".stdin", os.O_RDONLY)
    os.unlink(".stdin")
    os.dup2(fd, 0)
    os.close(fd)
    os.environ.clear()
    os.environ.update(cfg["env"])
    if "random" in sys.modules:  # forks share the server's generator state: reseed as a fresh start would
        sys.modules["random"].seed()
    sys.argv[:] = ["main.py"]
    sys.path.insert(0, work)
    sys.dont_write_bytecode = True
    main = type(sys)("__main__")
    main.__file__ = "main.py"
    sys.modules["__main__"] = main
    source = cfg["files"]["main.py"]
    del cfg, ns
    say("start")
    os.close(rep)
except BaseException as e:
    try:
        say("error", repr(e))
    finally:
        os._exit(126)
# The code runs here, in a fork of a fresh interpreter that never ran model code. The exit does
# what `python main.py` would (exit code rules, thread joins, atexit, flushes) but skips the module
# teardown, which costs more than the rest of a short run; the work dir is discarded anyway.
try:
    exec(compile(source, "main.py", "exec"), main.__dict__)
    code = 0
except SystemExit as e:
    code = e.code
except BaseException as e:
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # without this file's frame
    code = 1
if code is not None and not isinstance(code, int):
    print(code, file=sys.stderr)
    code = 1
try:
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    import atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
except BaseException:
    code = 120  # as Python when the final flush fails
os._exit((code or 0) & 0xFF)
'''


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


class _SandboxServer:
    """The fork server behind run_python (see above). Exits when our end of its socket closes."""

    def __init__(self):
        self.owner = os.getpid()  # a forked parent needs a server of its own
        self.lock = threading.Lock()
        self.cgroups = _make_cgroups(f"{os.getpid()}-{next(_sandbox_state['servers'])}")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _SANDBOX_SERVER, str(theirs.fileno()), ",".join(_SANDBOX_PRELOAD),
                 str(_SANDBOX_UID_BASE)]
                + [f"{ctl}={path}" for ctl, path in self.cgroups],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                start_new_session=True, cwd="/", env={"PATH": _SANDBOX_PATH, "LANG": "C.UTF-8"})
        self.sock = ours
        hello = self.sock.recv(1024).decode().split()
        if hello[:1] != ["hello"]:
            self.close()
            raise OSError(f"sandbox server: expected a hello, got {hello!r}")
        self.layers = [w for w in hello[1:] if w != "mounts"]
        self.private_tmp = "mounts" in hello  # the work dir can be a tmpfs over /tmp

    def launch(self, fds):
        """Send the run's five fds; get back a pidfd of its process."""
        with self.lock:
            socket.send_fds(self.sock, [b"run"], fds)
            msg, got, _, _ = socket.recv_fds(self.sock, 1024, 1)
        if not got:
            raise OSError(f"sandbox server: {msg.decode() or 'closed its socket'}")
        return got[0]

    def oom_kills(self):
        """OOM kills so far in the shared memory cgroup (v1 memory.oom_control, v2 memory.events)."""
        for ctl, path in self.cgroups:
            for name in ("memory.oom_control", "memory.events") if ctl == "memory" else ():
                with contextlib.suppress(OSError), open(f"{path}/{name}") as f:
                    for line in f:
                        key, _, value = line.partition(" ")
                        if key == "oom_kill":
                            return int(value)
        return 0

    def close(self):
        self.sock.close()
        self.proc.wait()
        for _, path in self.cgroups:
            _remove_cgroup(path)


_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
# Imported once by the server, before any model code exists, so each run inherits them instead of
# importing them again (HumanEval programs import typing, math, re, ... in nearly every problem).
_SANDBOX_PRELOAD = ("typing", "math", "re", "collections", "itertools", "functools", "heapq", "bisect",
                    "string", "hashlib", "random", "fractions", "decimal", "statistics", "json", "copy",
                    "operator", "datetime")
_sandbox_lock = threading.RLock()
_sandbox_state = {"server": None, "cgroups": None, "warned": set(), "servers": itertools.count(),
                  "atexit": None}
# The shared cgroups hold every run of one server: a cap on the host's exposure (a fork-and-allocate
# bomb meets RLIMIT_AS per process and RLIMIT_NPROC per run, but 32 x 1 GiB is still more than a
# laptop has). Per-run cgroups would cost a cgroup migration (an RCU grace period, often 10 ms) per run.
_SANDBOX_CGROUP_PIDS = 4096
_SANDBOX_CGROUP_MEMORY_FRACTION = 0.5  # of physical memory


def _sandbox_server(restart=False):
    with _sandbox_lock:
        server = _sandbox_state["server"]
        if restart or server is None or server.owner != os.getpid() or server.proc.poll() is not None:
            if server is not None and server.owner == os.getpid():
                with contextlib.suppress(OSError):
                    server.close()
            server = _sandbox_state["server"] = _SandboxServer()
            if not _sandbox_state["atexit"]:
                _sandbox_state["atexit"] = atexit.register(_close_sandbox_server)
        return server


def _close_sandbox_server():
    """Stop this process's sandbox server and remove its cgroups (atexit)."""
    with _sandbox_lock:
        server, _sandbox_state["server"] = _sandbox_state["server"], None
    if server is not None and server.owner == os.getpid():
        server.close()


def _cgroup_parents():
    """[(controller, directory we may mkdir in)] for pids and memory, cgroup v1 or v2; probed once.
    v2 needs the controller enabled in our cgroup's subtree_control, which v2 allows only at the
    root of a hierarchy that holds no processes of its own."""
    with _sandbox_lock:
        if _sandbox_state["cgroups"] is not None:
            return _sandbox_state["cgroups"]
        bases, own = [], {}
        with contextlib.suppress(OSError), open("/proc/self/cgroup") as f:
            own = {ctl: path for line in f for _, ctls, path in [line.rstrip("\n").split(":", 2)]
                   for ctl in ctls.split(",")}
        for ctl in ("pids", "memory") if os.geteuid() == 0 else ():
            if ctl in own and os.path.isdir(f"/sys/fs/cgroup/{ctl}"):
                bases.append((ctl, f"/sys/fs/cgroup/{ctl}{own[ctl].rstrip('/')}"))
            elif "" in own:
                base = "/sys/fs/cgroup" + own[""].rstrip("/")
                with contextlib.suppress(OSError), open(base + "/cgroup.subtree_control") as f:
                    if ctl in f.read().split():
                        bases.append((ctl, base))
        _sandbox_state["cgroups"] = bases
        return bases


def _make_cgroups(tag):
    """Fresh shared cgroups for one sandbox server; first removes those of dead parents."""
    made = []
    memory_bytes = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * _SANDBOX_CGROUP_MEMORY_FRACTION)
    for ctl, base in _cgroup_parents():
        with contextlib.suppress(OSError):
            for name in os.listdir(base):
                owner = name.removeprefix("scoreflow-sbx-").split("-")[0]
                if name.startswith("scoreflow-sbx-") and owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
                    _remove_cgroup(f"{base}/{name}")
        path = f"{base}/scoreflow-sbx-{tag}"
        limits = {"pids": [("pids.max", _SANDBOX_CGROUP_PIDS)],
                  "memory": [("memory.limit_in_bytes", memory_bytes), ("memory.max", memory_bytes),
                             ("memory.swap.max", 0)]}[ctl]
        try:
            os.mkdir(path)
            wrote = 0
            for name, value in limits:
                if os.path.exists(f"{path}/{name}"):
                    with open(f"{path}/{name}", "w") as f:
                        f.write(str(value))
                    wrote += 1
            if not wrote:
                raise OSError(f"{path}: no {limits[0][0]}")
            made.append((ctl, path))
        except OSError:
            _remove_cgroup(path)
    return made


def _remove_cgroup(path):
    """SIGKILL whatever is left in a run's cgroup, then remove it (it empties within ms)."""
    for _ in range(400):
        try:
            with open(path + "/cgroup.procs") as f:
                for pid in f.read().split():
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), signal.SIGKILL)
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.005)
    print(f"executor.run_python: cgroup {path} still busy after 2 s; left in place", file=sys.stderr)


def _read_capped(fd, cap):
    """The text in fd if it fits in cap bytes, else its head and tail around a marker."""
    size = os.fstat(fd).st_size
    if size <= cap:
        data = os.pread(fd, size, 0)
    else:
        data = (os.pread(fd, cap // 2, 0) + f"\n[... {size - cap} bytes cut ...]\n".encode()
                + os.pread(fd, cap // 2, size - cap // 2))
    return data.decode("utf-8", "replace")


@functools.lru_cache(maxsize=1)
def _interpreter_dirs():
    """The directories the code's interpreter reads: prefixes, stdlib, site-packages, the binary's."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable))}
    dirs |= {p for k, p in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs = sorted({os.path.realpath(d) for d in dirs if d and os.path.isdir(d)})
    return tuple(d for d in dirs if not any(d.startswith(o + "/") for o in dirs))  # outermost only


def run_python(code: str, *, stdin: str = "", timeout: float = 10.0, memory_mb: int = 1024,
               files: dict | None = None, max_output: int = 64_000, max_procs: int = 32,
               file_mb: int = 16, disk_mb: int = 64) -> SandboxResult:
    """Run `code` as main.py in the sandbox (layers: see the table above) and wait for it.

    timeout: wall-clock seconds for the whole run (CPU seconds are capped at int(timeout) + 1).
    memory_mb: address space per process, and (cgroup) the run's total plus disk_mb and 64 MiB.
    files: {relative path: str | bytes} written into the work dir before the code starts.
    max_output: bytes of stdout and of stderr kept (head and tail). file_mb: the largest file the
    code may write, stdout and stderr included. disk_mb: the work dir's size. max_procs: tasks
    (processes and threads) the run may hold at once."""
    t0 = time.monotonic()
    files = dict(files or {})
    for name in files:
        if os.path.isabs(name) or ".." in name.split("/") or name in ("", "main.py", ".stdin"):
            raise ValueError(f"run_python: files key {name!r} must be a relative path inside the "
                             f"work dir and not main.py")
    files["main.py"] = code
    fds = [os.memfd_create(name) for name in ("sbx-config", "sbx-stdout", "sbx-stderr", "sbx-report")]
    done_r, done_w = os.pipe()  # EOF once the server has reported the run's end (or died)
    fds.append(done_w)
    timed_out, pidfd, launch_error, server, oom_before, workdir = False, -1, "", None, 0, None
    try:
        server = _sandbox_server()
    except OSError as e:
        launch_error = str(e)
    private_tmp = server is not None and server.private_tmp
    workdir = "/tmp" if private_tmp else tempfile.mkdtemp(prefix="scoreflow-sbx-")
    home = os.path.realpath(os.path.expanduser("~"))
    project = os.path.dirname(os.path.realpath(__file__))
    hide = [d for d in (home, project) if d != "/" and not workdir.startswith(d + "/")]
    hide = [d for d in hide if not any(d.startswith(o + "/") for o in hide)]  # outermost only
    keep = list(_interpreter_dirs())
    cfg = {"workdir": workdir, "private_tmp": private_tmp, "uid_base": _SANDBOX_UID_BASE, "hide": hide,
           "keep": keep, "read": keep + ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc",
                                         "/dev/zero", "/dev/urandom", "/dev/random",
                                         "/sys/devices/system/cpu"],
           "disk_mb": disk_mb, "max_files": 4096, "cpu_s": int(timeout) + 1, "memory_mb": memory_mb,
           "file_mb": file_mb, "max_fds": 256, "max_procs": max_procs, "stdin": stdin.encode(),
           "files": {k: v if isinstance(v, bytes) else v.encode() for k, v in files.items()},
           "env": {"PATH": _SANDBOX_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
                   "LC_ALL": "C.UTF-8"}}
    try:
        os.write(fds[0], marshal.dumps(cfg))
        for attempt in (0, 1):  # a dead server (killed from outside?) gets one fresh replacement
            try:
                server = server if attempt == 0 and server else _sandbox_server(restart=True)
                oom_before = server.oom_kills()
                pidfd = server.launch(fds)
                break
            except OSError as e:
                launch_error, server = str(e), None
        os.close(fds.pop())  # done_w: from now on only the server holds it
        if pidfd >= 0:
            poll = select.poll()  # not select(): our fds may be numbered past 1024
            poll.register(done_r, select.POLLIN)
            if not poll.poll(max(0.0, t0 + timeout - time.monotonic()) * 1000):
                timed_out = True  # SIGKILL to the init of its PID namespace: the whole run dies
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                poll.poll()
        oom = server is not None and pidfd >= 0 and server.oom_kills() > oom_before
        seconds = time.monotonic() - t0
        facts = [line.split(" ", 2) for line in _read_capped(fds[3], 1 << 20).splitlines()]
        stdout, stderr = _read_capped(fds[1], max_output), _read_capped(fds[2], max_output)
    finally:
        for fd in fds + [pidfd, done_r]:
            if fd >= 0:
                os.close(fd)
        if workdir and not private_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
    layers = (server.layers if pidfd >= 0 else []) + [f[1] for f in facts if f[0] == "layer"]
    _warn_missing_layers({f[1]: " ".join(f[2:]) for f in facts if f[0] == "missing"})
    errors = [" ".join(f[1:]) for f in facts if f[0] == "error"]
    waits = [int(f[1]) for f in facts if f[0] == "exit"]
    exit_code = os.waitstatus_to_exitcode(waits[0]) if waits and ["start"] in facts else None
    if timed_out:
        status, reason = "timeout", f"wall-clock limit of {timeout} s reached"
    elif exit_code is None:
        why = launch_error or (errors[0] if errors else "the run ended without a report")
        status, reason = "internal", f"sandbox failed before the code ran: {why}"
    elif exit_code == -signal.SIGXCPU:
        status, reason = "timeout", f"CPU limit of {cfg['cpu_s']} s reached"
    elif exit_code < 0:
        status = "memory" if oom else "killed"
        reason = f"killed by {signal.Signals(-exit_code).name}" + (
            " while the sandbox memory cgroup was OOM-killing" if oom else "")
    elif exit_code and stderr.rstrip().rpartition("\n")[2].startswith("MemoryError"):
        status, reason = "memory", f"MemoryError under the {memory_mb} MiB limit"
    elif exit_code:
        status, reason = "error", stderr.rstrip().rpartition("\n")[2] or f"exit code {exit_code}"
    else:
        status, reason = "ok", ""
    return SandboxResult(status, stdout, stderr, exit_code, seconds, layers, reason)


def _warn_missing_layers(missing):
    with _sandbox_lock:
        new = {k: v for k, v in missing.items() if k not in _sandbox_state["warned"]}
        _sandbox_state["warned"].update(new)
    for name, why in new.items():
        print(f"executor.run_python: sandbox layer {name!r} unavailable ({why}); running without it",
              file=sys.stderr)
