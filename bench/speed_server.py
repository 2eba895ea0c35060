"""Speed: N concurrent chat requests through executor's LocalServer + ChatClient, against the same N
prompts through model.generate directly, in the same run (issue 4; target >= 0.8x).

The direct batched generate is the ceiling the server can reach: the server's only extra work is HTTP,
JSON, the chat template and gathering the batch. Both sides decode greedily with the same max_tokens,
so they produce the same tokens; we print aggregate completion tokens/s (median of --repeats after a
warm-up), the ratio, how many texts agree, and the batch sizes the server formed.

    python bench/speed_server.py [--n 32] [--max-tokens 64] [--repeats 3] [--device cpu] [--threads 2]
"""
import argparse
import os
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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, tok = modellib.load(args.model, device=args.device, dtype=dtype)
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
