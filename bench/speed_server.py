"""Speed: N concurrent chat requests through executor's LocalServer + ChatClient, against the same N
prompts through model.generate directly, in the same run (issue 4; target >= 0.8x).

--scenario executor (issue 17): the executor stage's shape. Workflows of 1-3 sequential calls, each
call with its own prompt length and max_tokens, start one after another; a workflow's next call is
sent when its previous one returns. Our continuous-batching server against StaticServer (this file:
the batcher before issue 17, one model.generate call per batch, run to its slowest row) and against
one direct batched generate of every call (the ceiling, with no waiting between calls). Target:
continuous >= 2x static in completion tokens/s, same texts at temperature 0.

The direct batched generate is the ceiling the server can reach: the server's only extra work is HTTP,
JSON, the chat template and gathering the batch. Both sides decode greedily with the same max_tokens,
so they produce the same tokens; we print aggregate completion tokens/s (median of --repeats after a
warm-up), the ratio, how many texts agree, and the batch sizes the server formed.

    python bench/speed_server.py [--n 32] [--max-tokens 64] [--repeats 3] [--device cpu] [--threads 2]
    python bench/speed_server.py --scenario executor [--workflows 48] [--gap-ms 50] [--seed 0]
"""
import argparse
import os
import random
import threading
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import executor  # noqa: E402
import model as modellib  # noqa: E402

TOPICS = ["the sea", "a lighthouse", "autumn leaves", "a robot", "mountains", "coffee", "a library", "rain",
          "the moon", "a bicycle", "snow", "a garden", "the desert", "a violin", "trains", "a city at night",
          "the wind", "an old map", "fireflies", "a bridge", "the forest", "a clock", "sunrise", "a cat",
          "the river", "a kite", "thunder", "a market", "stars", "a candle", "the harbour", "a letter"]


def prompts(n):
    return [[{"role": "user", "content": f"Write a short poem about {TOPICS[i % len(TOPICS)]} (number {i})."}]
            for i in range(n)]


class StaticServer(executor.LocalServer):
    """The LocalServer batcher before continuous batching: gather a batch, run model.generate on it
    to its slowest row, then gather the next; requests arriving meanwhile wait for the whole batch."""

    def _work(self):
        while True:
            with self._cv:
                self._gather()
                if self._closing:
                    return
                batch = self._take_batch(self._modellib.Decoder(self.model, self.tokenizer))
            try:
                outs = self._modellib.generate(
                    self.model, self.tokenizer, [j.prompt for j in batch],
                    max_new_tokens=[j.max_tokens for j in batch], temperature=[j.temperature for j in batch],
                    top_p=[j.top_p for j in batch], stop=[j.stop for j in batch], seed=[j.seed for j in batch])
            except Exception as e:  # noqa: BLE001
                outs = None
                executor._fail(batch, f"generation failed: {e}", 500)
            with self._cv:  # (_take_batch counted the batch in batch_sizes)
                self.n_completions += len(batch)
            for job, c in zip(batch, outs or []):
                job.future.set_result(c)


FILLER = ("Consider the problem carefully and check each step of the reasoning before answering. ")


def workflows(n, seed):
    """n workflows, each a list of 1-3 calls (messages, max_tokens): prompts of ~20 to ~400 tokens,
    max_tokens from 16 to 160, seeded."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        calls = []
        for j in range(rng.randint(1, 3)):
            topic = TOPICS[(7 * i + j) % len(TOPICS)]
            text = FILLER * rng.choice([0, 0, 1, 3, 8, 20]) + f"Write about {topic} (workflow {i}, step {j})."
            calls.append(([{"role": "user", "content": text}], rng.choice([16, 32, 64, 96, 160])))
        out.append(calls)
    return out


def executor_scenario(args, model, tok):
    flows = workflows(args.workflows, args.seed)
    n_calls = sum(map(len, flows))

    def served(cls):
        with cls(model, tok, model_name="bench", max_batch=32) as server, \
                executor.ChatClient(server.base_url, "bench", api_key="", timeout=3600, max_concurrency=64) as client:
            client.chat([{"role": "user", "content": "warm up"}], max_tokens=2, temperature=0.0)
            texts, tokens = {}, [0]
            lock = threading.Lock()

            def flow(i):
                time.sleep(i * args.gap_ms / 1000)
                for j, (messages, max_tokens) in enumerate(flows[i]):
                    r = client.chat(messages, max_tokens=max_tokens, temperature=0.0)
                    with lock:
                        texts[i, j] = r.text
                        tokens[0] += r.completion_tokens
            t0 = time.perf_counter()
            threads = [threading.Thread(target=flow, args=(i,)) for i in range(len(flows))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - t0, tokens[0], texts, dict(server.batch_sizes)

    def direct():
        prompts = [tok.apply_chat(m) for calls in flows for m, _ in calls]
        t0 = time.perf_counter()
        outs = modellib.generate(model, tok, prompts, max_new_tokens=[k for calls in flows for _, k in calls])
        return time.perf_counter() - t0, sum(c.n_completion_tokens for c in outs)

    runs = {"static": [], "continuous": [], "direct": []}
    for _ in range(args.repeats):  # interleaved, so background load hits every side alike
        runs["static"].append(served(StaticServer))
        runs["continuous"].append(served(executor.LocalServer))
        runs["direct"].append(direct())
    tps = {k: statistics.median(r[1] / r[0] for r in v) for k, v in runs.items()}
    secs = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    st, co = runs["static"][-1][2], runs["continuous"][-1][2]
    print(f"device {args.device} {args.dtype}, torch threads {torch.get_num_threads()}; {len(flows)} workflows, "
          f"{n_calls} calls, one workflow starting every {args.gap_ms:g} ms; median of {args.repeats}")
    for k in ("static", "continuous", "direct"):
        print(f"{k:11s}: {tps[k]:7.1f} completion tok/s  {secs[k]:6.1f} s  ({runs[k][-1][1]} tokens)")
    print(f"ratio continuous/static : {tps['continuous'] / tps['static']:.2f}  (target >= 2)")
    print(f"ratio continuous/direct : {tps['continuous'] / tps['direct']:.2f}  (direct: every call in one batch, no waiting)")
    print(f"texts identical         : {sum(st[k] == co[k] for k in st)}/{len(st)} (static vs continuous, temperature 0)")
    print(f"rows joining together   : static {runs['static'][-1][3]}, continuous {runs['continuous'][-1][3]}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32, help="concurrent requests / batch rows (default: 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side; the median is reported (default: 3)")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")
    p.add_argument("--batch-window-ms", type=float, default=None, help="server gathering window, ms "
                   "(default: LocalServer's)")
    p.add_argument("--scenario", choices=["burst", "executor"], default="burst",
                   help="burst: N requests at once (default); executor: sequential calls of staggered workflows")
    p.add_argument("--workflows", type=int, default=48, help="executor scenario: workflows (default: 48)")
    p.add_argument("--gap-ms", type=float, default=50, help="executor scenario: ms between workflow starts (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="executor scenario: seed of the calls' shapes")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, tok = modellib.load(args.model, device=args.device, dtype=dtype)
    if args.scenario == "executor":
        return executor_scenario(args, model, tok)
    chats = prompts(args.n)
    rendered = [tok.apply_chat(m) for m in chats]

    def direct():
        t0 = time.perf_counter()
        outs = modellib.generate(model, tok, rendered, max_new_tokens=args.max_tokens, temperature=0.0)
        return time.perf_counter() - t0, sum(c.n_completion_tokens for c in outs), [c.text for c in outs]

    options = {} if args.batch_window_ms is None else {"batch_window": args.batch_window_ms / 1000}
    with executor.start_local_server(model=model, tokenizer=tok, max_batch=args.n, **options) as server, \
            executor.ChatClient(server.base_url, server.model_name, api_key="", timeout=3600,
                                max_concurrency=args.n) as client:
        requests = [dict(messages=m, max_tokens=args.max_tokens, temperature=0.0) for m in chats]

        def served():
            t0 = time.perf_counter()
            outs = client.chat_many(requests)
            dt = time.perf_counter() - t0
            bad = [o for o in outs if not isinstance(o, executor.ChatResult)]
            if bad:
                raise SystemExit(f"speed_server: {len(bad)} requests failed, first: {bad[0]}")
            return dt, sum(o.completion_tokens for o in outs), [o.text for o in outs]

        # warm-up both paths; the server's also opens the client's N keep-alive connections
        modellib.generate(model, tok, rendered, max_new_tokens=1)
        client.chat_many([dict(r, max_tokens=1) for r in requests])
        warm = dict(server.batch_sizes)
        runs_d, runs_s = [], []
        for _ in range(args.repeats):  # interleaved, so background load hits both sides alike
            runs_d.append(direct())
            runs_s.append(served())
        batches = {n: k - warm.get(n, 0) for n, k in sorted(server.batch_sizes.items()) if k > warm.get(n, 0)}

    tps_d = statistics.median(tok / dt for dt, tok, _ in runs_d)
    tps_s = statistics.median(tok / dt for dt, tok, _ in runs_s)
    agree = sum(a == b for a, b in zip(runs_d[-1][2], runs_s[-1][2]))
    print(f"device {args.device} {args.dtype}, torch threads {torch.get_num_threads()}, {args.n} prompts x "
          f"{args.max_tokens} max tokens, median of {args.repeats}")
    print(f"model.generate direct : {tps_d:8.1f} completion tok/s  ({runs_d[-1][1]} tokens, "
          f"{statistics.median(dt for dt, _, _ in runs_d):.2f} s)")
    print(f"server + ChatClient   : {tps_s:8.1f} completion tok/s  ({runs_s[-1][1]} tokens, "
          f"{statistics.median(dt for dt, _, _ in runs_s):.2f} s)")
    print(f"ratio server/direct   : {tps_s / tps_d:.3f}  (target >= 0.8; direct batched generate is the ceiling)")
    print(f"texts identical       : {agree}/{args.n}")
    print(f"server batch sizes    : {batches}  (rows per generate call -> count, over {args.repeats} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
