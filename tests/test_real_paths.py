"""The paths a real user takes beyond the fp32 CPU default (issue 14): a bf16/fp16 generator that
trains, generates with its adapter and trains again; and torchrun, data-parallel over pairs."""
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import score_dpo  # noqa: E402
from score_dpo import Pair, TrainConfig  # noqa: E402

PAIRS = [Pair("a", "Question: what is 2 + 2?\nAnswer:", " 4", " 5", 1.0, 0.0),
         Pair("b", "Question: what is 3 + 3?\nAnswer:", " 6", " 7", 0.75, 0.25)]
PROMPT = "Question: what is 12 * 7? Answer with a program.\nAnswer:"

# logits of the half-precision model with its fp32 adapter vs the fp32 model with the same adapter,
# over all positions and the 49k vocabulary. Measured with this test's adapter (lr 2e-2, 2 steps):
# bf16 mean 0.16, max 1.1; fp16 mean 0.022, max 0.20; while the adapter itself moves fp32 logits by
# mean 1.4-1.5, max 12-13. bf16 keeps ~3 significant digits, fp16 ~4.
TOLERANCE = {"bfloat16": dict(mean=0.4, max=3.0), "float16": dict(mean=0.08, max=0.8)}


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])  # CPU fp16: ~8x slower
def test_half_precision_trains_generates_with_adapter_and_trains_again(dtype, smol, tmp_path):
    """Iteration 0 trains on a bf16 (fp16) base, its adapter generates, a fresh model of that dtype
    reloads it exactly, an interrupted training resumes to the same adapter, and iteration 1 continues
    it; logits match the fp32 model with the same adapter within the stated tolerance."""
    dt = getattr(torch, dtype)
    cfg = TrainConfig(lr=2e-2, epochs=1, grad_accum=1, log_every=0, seed=1, save_every=1)
    half, tok = M.load(None, dtype=dt)
    res = score_dpo.train(half, tok, PAIRS, cfg, str(tmp_path / "it0"), log=io.StringIO())
    assert res.steps == 2 and res.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res.history[1]["margin"] > 0  # it learned on the half-precision base
    assert all(p.dtype == dt for n, p in half.named_parameters() if ".lora_" not in n)
    assert all(p.dtype == torch.float32 for p in M.lora_state_dict(half).values())
    half.eval()

    # generation with the trained adapter (it failed here: BFloat16 != float in LoRALinear.delta)
    ref = M.load_adapter(M.load(None, dtype=torch.float32)[0], res.adapter_dir).eval()
    out_half = M.generate(half, tok, [PROMPT, PROMPT], max_new_tokens=6)
    out_ref = M.generate(ref, tok, [PROMPT], max_new_tokens=6)
    assert out_half[0].text and out_half[0].token_ids[0] == out_ref[0].token_ids[0], (out_half[0].text, out_ref[0].text)

    ids = torch.tensor([M.prompt_ids(tok, PROMPT)])
    with torch.no_grad():
        got, want, base = half(ids).float(), ref(ids), smol[0](ids)
    diff, effect = (got - want).abs(), (want - base).abs()
    assert diff.mean() < TOLERANCE[dtype]["mean"] and diff.max() < TOLERANCE[dtype]["max"], (diff.mean(), diff.max())
    assert effect.mean() > 3 * TOLERANCE[dtype]["mean"]  # the comparison sees the adapter

    # a fresh model of this dtype reloads the fp32 adapter exactly (iteration 1 of a resumed run)
    again = M.load_adapter(M.load(None, dtype=dt)[0], res.adapter_dir).eval()
    trained = M.lora_state_dict(half)
    for k, v in M.lora_state_dict(again).items():
        assert v.dtype == torch.float32 and torch.equal(v, trained[k]), k
    with torch.no_grad():
        assert torch.equal(again(ids), half(ids))

    # an interrupted training resumes from its checkpoint to the same adapter
    class Crash(io.StringIO):
        def write(self, s):
            if "step 1/" in s:
                raise KeyboardInterrupt
            return super().write(s)
    with pytest.raises(KeyboardInterrupt):
        score_dpo.train(M.load(None, dtype=dt)[0], tok, PAIRS, cfg, str(tmp_path / "cut"), log=Crash())
    log = io.StringIO()
    resumed = M.load(None, dtype=dt)[0]
    score_dpo.train(resumed, tok, PAIRS, cfg, str(tmp_path / "cut"), log=log)
    assert "resumed from" in log.getvalue()
    for k, v in M.lora_state_dict(resumed).items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=1e-6)

    # iteration 1 continues the reloaded adapter against the base reference: it starts off ln 2
    res1 = score_dpo.train(again, tok, PAIRS, TrainConfig(lr=2e-2, epochs=1, log_every=0, seed=2),
                           str(tmp_path / "it1"), log=io.StringIO())
    assert res1.history[0]["margin"] > 0.01 and res1.history[0]["loss"] < math.log(2) - 0.005
    assert M.generate(again.eval(), tok, [PROMPT], max_new_tokens=4)[0].token_ids


# --- the whole program --------------------------------------------------------------------------

from test_scoreflow import TASK, TINY, run_cli  # noqa: E402


def _iterations_continue_the_adapter(run_dir, smol):
    """Iteration 0 trained and iteration 1 generated with its adapter: iteration 1's workflows are
    far likelier under the base plus iteration 0's adapter than under the base alone (they were
    sampled from the adapted generator; 4 steps at lr 5e-3 move a sample's log-prob by nats). If
    iteration 1 had pairs, its first step already has a margin (base reference vs the continued
    adapter; a fresh adapter would start at ln 2, margin 0)."""
    for f in ("config.json", "metrics.json", "report.md", "iter0/train/adapter/adapter_model.safetensors",
              "iter1/workflows.jsonl", "iter1/scores.json", "test/gen2.json"):
        assert (run_dir / f).exists(), f
    its = json.load(open(run_dir / "metrics.json"))["iterations"]
    assert [it["iteration"] for it in its] == [0, 1] and its[1]["samples"] > 0
    assert its[0]["loss_curve"][0] == pytest.approx(math.log(2), abs=1e-6) and its[0]["margin_curve"][0] == 0
    if its[1]["pairs"]:
        assert (run_dir / "iter1/train/adapter/adapter_model.safetensors").exists()
        assert abs(its[1]["margin_curve"][0]) > 1e-4
    base, tok = smol
    tuned = M.load_adapter(M.load(None, dtype=torch.float32)[0], str(run_dir / "iter0/train/adapter")).eval()
    recs = [r for line in open(run_dir / "iter1/workflows.jsonl") if (r := json.loads(line))["completion"]]
    prompts = [M.prompt_ids(tok, r["prompt"]) for r in recs]
    comps = [tok.encode(r["completion"]) for r in recs]
    with torch.no_grad():
        lp_base = sum(x.sum() for x in score_dpo.token_logprobs(base, prompts, comps)) / len(comps)
        lp_tuned = sum(x.sum() for x in score_dpo.token_logprobs(tuned, prompts, comps)) / len(comps)
    assert lp_tuned > lp_base + 1.0, (float(lp_tuned), float(lp_base))


@pytest.mark.slow
def test_bf16_run_trains_then_generates_with_the_adapter(tmp_path, smol):
    """The issue's failure: a bf16 run trained iteration 0, then iteration 1's generation died in
    LoRALinear.delta (BFloat16 != float)."""
    run_dir = tmp_path / "run"
    r = run_cli(TINY + ["--iterations", "2", "--dtype", "bfloat16", "--no-baselines", "--run-dir", str(run_dir)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(run_dir / "config.json"))["dtype"] == "bfloat16"
    _iterations_continue_the_adapter(run_dir, smol)


@pytest.mark.slow
def test_paper_protocol_bf16_passes_iteration_0(tmp_path, smol):
    """--paper (bf16, the paper's prompt settings, LLM extractor, trial run always) with its sizes cut
    to fit CI; the few-shot prompt, since the 135M generator writes no usable zero-shot workflow.
    Three validate problems, not two: at --runs 1 a problem gives pairs only if its k workflows
    score differently, and with two problems the bf16 samples can give none (generate's bf16
    rounding changed when it became one Decoder batch, and that happened)."""
    run_dir = tmp_path / "run"
    r = run_cli(["--paper", "--bench", TASK, "--prompt", "fewshot", "-k", "3", "--n-validate", "3", "--n-test", "1",
                 "--pairs", "4", "--runs", "1", "--gen-max-tokens", "48", "--exec-max-tokens", "24",
                 "--regen-rounds", "0", "--iterations", "2", "--lr", "5e-3", "--max-calls", "4", "--no-baselines",
                 "--dtype", "bfloat16", "--run-dir", str(run_dir)])
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.load(open(run_dir / "config.json"))
    assert cfg["dtype"] == "bfloat16" and cfg["extractor"] == "llm" and cfg["grad_accum"] == 1
    _iterations_continue_the_adapter(run_dir, smol)


# --- torchrun -----------------------------------------------------------------------------------

# Runs a program as itself, logging every write Python makes under $AUDIT_RUN_DIR (opens for writing,
# mkdir, rename/replace, remove, rmtree, sqlite connections) to $AUDIT_LOG_DIR/writes.<RANK>.
AUDIT = r'''
import os, runpy, sys
run_dir = os.path.realpath(os.environ["AUDIT_RUN_DIR"])
log = open(os.path.join(os.environ["AUDIT_LOG_DIR"], "writes." + os.environ.get("RANK", "0")), "w", buffering=1)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "sqlite3.connect", "os.truncate"):
        path, writing = args[0], True
    else:
        return
    if writing and isinstance(path, (str, bytes)):
        p = os.path.realpath(os.fsdecode(path))
        if p == run_dir or p.startswith(run_dir + os.sep):
            log.write(f"{event} {p}\n")

sys.addaudithook(hook)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_equal_one_process_with_double_accumulation(tmp_path):
    """One process, 4 pairs per step (--grad-accum 4), then the same run directory without its
    training resumed under `torchrun --nproc-per-node 2` with --grad-accum 2 (2 ranks x 2 = 4 pairs
    per step): both trainings see the same pairs (iteration 0's workflows, scores and pairs.jsonl
    are reused) and give the same adapter within float tolerance. Only rank 0 writes the run dir, and
    the copy resumes where it is, though its config.json names the directory it was copied from."""
    from safetensors.torch import load_file
    one = tmp_path / "one"
    args = TINY + ["--pairs", "8", "--grad-accum", "4", "--no-baselines", "--lr", "5e-3"]
    r = run_cli(args + ["--run-dir", str(one)])
    assert r.returncode == 0, r.stderr[-3000:]

    two = tmp_path / "two"
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("train", "test", "metrics.json", "report.md", "*.svg"))
    assert (two / "iter0" / "pairs.jsonl").exists() and not (two / "iter0" / "train").exists()
    cfg = json.load(open(two / "config.json"))
    cfg["grad_accum"] = 2  # per rank: the trainer's step is grad_accum x world pairs
    (two / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "audit.py").write_text(AUDIT)
    env = dict(os.environ, OMP_NUM_THREADS="1", AUDIT_RUN_DIR=str(two), AUDIT_LOG_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                        "--nproc-per-node", "2", str(tmp_path / "audit.py"), os.path.join(ROOT, "scoreflow.py"),
                        "--resume", str(two)], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 2" in r.stderr and "iter0 generate: done earlier" in r.stderr
    for f in ("iter0/train/adapter/adapter_model.safetensors", "test/gen1.json", "metrics.json", "report.md"):
        assert (two / f).exists(), f

    h1, h2 = (json.load(open(d / "iter0" / "train" / "history.json")) for d in (one, two))
    assert len(h1) == len(h2) == 2  # 8 pairs, 4 per step
    for a, b in zip(h1, h2):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    w1, w2 = (load_file(str(d / "iter0" / "train" / "adapter" / "adapter_model.safetensors")) for d in (one, two))
    assert w1.keys() == w2.keys()
    # as in test_score_dpo's DDP test: Adam's step on a ~0 gradient element can flip with summation
    # order (size up to lr); nearly every element agrees to 1e-5, none is off by more than 2 lr
    for k in w1:
        diff = (w1[k] - w2[k]).abs()
        assert (diff > 1e-5).float().mean() < 0.01 and diff.max() <= 2 * 5e-3, (k, diff.max())

    writes0, writes1 = ((tmp_path / f"writes.{rank}").read_text() for rank in (0, 1))
    assert writes1 == "", writes1[:2000]
    assert "iter0/train/adapter" in writes0 and "report.md" in writes0  # the audit sees rank 0's writes
