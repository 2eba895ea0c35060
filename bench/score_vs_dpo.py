"""Score-DPO against DPO on the same settings (issue 17; SCOREFLOW.md's Table 2 compares them).

For each seed: the default run (`python scoreflow.py --bench math --seed S`, plus any flags after
`--`) with --loss score-dpo; then a fork of it with --loss dpo that starts after iteration 0's
execute stage. Up to there nothing depends on the loss (the same seeds give the same workflows, the
same executor answers and the same drawn pairs, since d is --d-power's, not the loss's), so the
fork copies those files and `--resume`s: it trains iteration 0 with DPO and runs everything after
it itself. Prints, per seed and on average, the test solve rate of each iteration's generator, CoT
and IO, and how many drawn pairs are not (1, 0) (on those alone the two losses differ).

    python bench/score_vs_dpo.py [--seeds 0,1,2] [--out runs/score-vs-dpo] [-- scoreflow flags]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a run has written once iteration 0's execute stage is done (scoreflow.py's run directory)
SHARED = ["calls.sqlite", "plan.json", "metrics.json", "iter0/workflows.jsonl", "iter0/scores.json",
          "iter0/pairs.jsonl", "test/gen0.json", "test/cot.json", "test/io.json"]


def scoreflow(args, log):
    t = time.time()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, os.path.join(ROOT, "scoreflow.py")] + args, stdout=f,
                             stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        sys.exit(f"scoreflow {' '.join(args)} exited {rc}: see {log}")
    return time.time() - t


def fork(src, dst, loss):
    """dst: src's files up to iteration 0's execute stage, its config with `loss` and dst."""
    for name in SHARED:
        if os.path.exists(os.path.join(src, name)):
            os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(loss=loss, run_dir=dst)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def summary(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    test = {k: v["score"] for k, v in m["test"].items()}
    its = m["iterations"]
    return {"test": test, "pairs": [it["pairs"] for it in its],
            "not_1_0": [it["pairs_not_1_0"] for it in its]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=os.path.join("runs", "score-vs-dpo"))
    p.add_argument("flags", nargs=argparse.REMAINDER,
                   help="after --: more scoreflow.py flags for every run")
    a = p.parse_args()
    flags = [f for f in a.flags if f != "--"]
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    rows = {}
    for seed in [int(s) for s in a.seeds.split(",")]:
        base = os.path.join(out, f"seed{seed}-score-dpo")
        if not os.path.exists(os.path.join(base, "report.md")):
            shutil.rmtree(base, ignore_errors=True)
            sec = scoreflow(["--bench", "math", "--seed", str(seed), "--loss", "score-dpo",
                             "--run-dir", base] + flags, base + ".log")
            print(f"seed {seed} score-dpo: {sec:.0f} s", flush=True)
        other = os.path.join(out, f"seed{seed}-dpo")
        if not os.path.exists(os.path.join(other, "report.md")):
            shutil.rmtree(other, ignore_errors=True)
            fork(base, other, "dpo")
            sec = scoreflow(["--resume", other], other + ".log")
            print(f"seed {seed} dpo (forked after iteration 0's execute stage): {sec:.0f} s",
                  flush=True)
        rows[seed] = {"score-dpo": summary(base), "dpo": summary(other)}

    gens = sorted(k for k in rows[next(iter(rows))]["score-dpo"]["test"] if k.startswith("gen"))
    cols = gens + ["cot", "io"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print("\n| seed | loss | " + " | ".join(cols) + " | drawn pairs not (1, 0), per iteration |")
    print("|---|---|" + "---|" * len(cols) + "---|")
    for seed, r in rows.items():
        for loss in ("score-dpo", "dpo"):
            s = r[loss]
            pairs = ", ".join(f"{n}/{t}" for n, t in zip(s["not_1_0"], s["pairs"]))
            print(f"| {seed} | {loss} | " + " | ".join(pct(s["test"].get(c)) for c in cols)
                  + f" | {pairs} |")
    for loss in ("score-dpo", "dpo"):
        mean = [statistics.mean(r[loss]["test"][c] for r in rows.values()) for c in cols]
        print(f"| mean | {loss} | " + " | ".join(pct(x) for x in mean) + " | |")


if __name__ == "__main__":
    main()
