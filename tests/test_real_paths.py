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

    ids = torch.tensor([score_dpo.prompt_token_ids(tok, PROMPT)])
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
