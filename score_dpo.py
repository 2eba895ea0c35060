"""score_dpo.py: preference pairs, the Score-DPO loss and a LoRA trainer for the generator.

Implements ScoreFlow (Wang et al. 2025, arXiv 2502.04306) as written down in SCOREFLOW.md:
- §5   preference pairs: every pair of a problem's workflows with different scores, winner = higher
       score, ties dropped; N pairs drawn i.i.d. with replacement with P ∝ d(s_w, s_l), d = (x − y)^3;
- §6.1 the Score-DPO loss −log σ(f(s_w)·r_w − (1 − f(s_l))·r_l) and plain DPO as its special case;
- §6.2 the per-sample influence (our reconstruction of Definition 3.1) so Theorem 3.2 can be checked;
- §7   training: model.py's LoRA on q_proj/v_proj, AdamW with linear decay, reference = same weights
       with the adapters off, log-probs summed over completion tokens (prompt masked, EOS appended).

Non-goals: other preference losses (IPO, hinge, ...), full fine-tuning, a second model copy as
reference, loss weighting by d (SCOREFLOW.md §10.2: d acts through resampling only).
"""
import json
import math
import os
import random
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

# --- preference pairs and d-sampling (SCOREFLOW.md §5) ------------------------------------------


@dataclass
class Pair:
    """One preference pair (SCOREFLOW.md §5 "Record"): chosen scored strictly above rejected."""
    problem_id: str        # the problem both workflows were written for
    prompt: str            # the generator input, exactly as sampled from
    chosen: str            # winner w: the generator's full output text
    rejected: str          # loser l
    chosen_score: float    # s_w in [0, 1]
    rejected_score: float  # s_l in [0, 1], s_l < s_w


def cube_d(s_w, s_l):
    """d(x, y) = (x − y)^3, the official choice (SCOREFLOW.md §5, §6.1). Floats or tensors."""
    return (s_w - s_l) ** 3


def uniform_d(s_w, s_l):
    """d = 1: every eligible pair equally likely (the DPO-style sampling ablation, SCOREFLOW.md §10.5)."""
    return 1.0


def build_pairs(problem_id, prompt, completions, scores):
    """All preference pairs of one problem (SCOREFLOW.md §5 "Eligible"): for each unordered pair of
    its workflows with s_i ≠ s_j, one Pair with the higher score as chosen. Ties are dropped; a
    workflow whose score is None (it failed to load or was left out, §10.7) takes part in no pair.
    Order: i < j in the order given, so the result is deterministic."""
    if len(completions) != len(scores):
        raise ValueError(f"build_pairs({problem_id!r}): {len(completions)} completions but {len(scores)} scores")
    for s in scores:
        if s is not None and not (0.0 <= s <= 1.0):
            raise ValueError(f"build_pairs({problem_id!r}): score {s!r} outside [0, 1]")
    pairs = []
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            s_i, s_j = scores[i], scores[j]
            if s_i is None or s_j is None or s_i == s_j:
                continue
            w, l = (i, j) if s_i > s_j else (j, i)
            pairs.append(Pair(str(problem_id), prompt, completions[w], completions[l],
                              float(scores[w]), float(scores[l])))
    return pairs


def sample_pairs(pairs, n, d=cube_d, seed=0):
    """Draw n pairs i.i.d. with replacement, P(pair) = d(s_w, s_l) / Σ d (SCOREFLOW.md §5 "Sampling",
    §6.1 P*). Seeded (the official code is not, §10.9): the same (pairs, n, d, seed) give the same draw."""
    if n < 0:
        raise ValueError(f"sample_pairs: n must be >= 0, got {n}")
    if n == 0:
        return []
    if not pairs:
        raise ValueError(f"sample_pairs: asked for {n} pairs from an empty pool")
    weights = []
    for p in pairs:
        if not p.chosen_score > p.rejected_score:
            raise ValueError(f"sample_pairs: pair for {p.problem_id!r} has chosen_score {p.chosen_score} "
                             f"not above rejected_score {p.rejected_score}")
        w = float(d(p.chosen_score, p.rejected_score))
        if not (w >= 0.0 and math.isfinite(w)):
            raise ValueError(f"sample_pairs: d({p.chosen_score}, {p.rejected_score}) = {w}, expected finite >= 0")
        weights.append(w)
    if sum(weights) <= 0.0:
        raise ValueError(f"sample_pairs: d is 0 on all {len(pairs)} pairs, nothing to draw")
    return random.Random(seed).choices(pairs, weights=weights, k=n)


def write_pairs(path, pairs):
    """Pairs as JSON lines, written atomically (temp file in the same directory, fsync, replace)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pairs.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for p in pairs:
                fh.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_pairs(path):
    """Inverse of write_pairs; a bad line is an error naming the file, line and field."""
    fields = {"problem_id": str, "prompt": str, "chosen": str, "rejected": str,
              "chosen_score": (int, float), "rejected_score": (int, float)}
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg}): {line[:80]!r}") from None
            for name, typ in fields.items():
                if name not in rec:
                    raise ValueError(f"{path}:{lineno}: missing field {name!r}")
                if not isinstance(rec[name], typ) or isinstance(rec[name], bool):
                    raise ValueError(f"{path}:{lineno}: field {name!r} is {type(rec[name]).__name__}, "
                                     f"expected {'number' if typ is not str else 'str'}")
            if not rec["chosen_score"] > rec["rejected_score"]:
                raise ValueError(f"{path}:{lineno}: chosen_score {rec['chosen_score']} not above "
                                 f"rejected_score {rec['rejected_score']}")
            pairs.append(Pair(**{k: (float(rec[k]) if k.endswith("_score") else rec[k]) for k in fields}))
    return pairs


# --- the loss (SCOREFLOW.md §6) --------------------------------------------------------------------


def identity(x):
    """f(x) = x, the official score transform (SCOREFLOW.md §6.1 "Choices")."""
    return x


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO, SCOREFLOW.md §6.1 "DPO as a special case": ℓ = −log σ(r_w − r_l) with the implicit
    rewards r = β·(log π_θ(y|q) − log π_ref(y|q)), log π summed over completion tokens.
    Inputs (P,); returns (losses (P,), chosen_rewards (P,), rejected_rewards (P,)), rewards detached."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)        # r_w
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # r_l
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def score_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   chosen_scores, rejected_scores, beta, f=identity):
    """Score-DPO, SCOREFLOW.md §6.1 "Loss" (paper Fig. 1): ℓ = −log σ(z) with
    z = f(s_w)·r_w − (1 − f(s_l))·r_l and r = β·(log π_θ − log π_ref) summed over completion tokens.
    The expectation over P* ∝ d·P is taken by resampling (§5), so the batch mean of these losses is L.
    Scores 1 and 0 give dpo_loss exactly. Inputs (P,); returns (losses, chosen_rewards, rejected_rewards)
    with the paper's r_w, r_l (detached; the official code logs f(s_w)·r_w and (1 − f(s_l))·r_l, §6.3)."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)        # r_w
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # r_l
    z = f(chosen_scores) * chosen_rewards - (1 - f(rejected_scores)) * rejected_rewards
    losses = -F.logsigmoid(z)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def score_dpo_influence(chosen_rewards, rejected_rewards, chosen_scores, rejected_scores, d=cube_d, f=identity):
    """Per-sample influence, SCOREFLOW.md §6.2 "Our reconstruction" of Definition 3.1:
    I_z = d(s_w, s_l)·(−∂ℓ/∂r_z) with z = f(s_w)·r_w − (1 − f(s_l))·r_l, i.e.
      winner  I_w = d·f(s_w)·σ(−z)           (rises in s_w while r_w ≤ 1/f(s_w), Theorem 3.2),
      loser   I_l = −d·(1 − f(s_l))·σ(−z)    (rises in s_l while r_l ≥ −1/(1 − f(s_l))).
    Inputs (P,) tensors; returns (chosen_influence (P,), rejected_influence (P,))."""
    fw, fl = f(chosen_scores), f(rejected_scores)
    z = fw * chosen_rewards - (1 - fl) * rejected_rewards
    weight = d(chosen_scores, rejected_scores)
    sig = torch.sigmoid(-z)  # −∂ℓ/∂z
    return weight * fw * sig, -weight * (1 - fl) * sig
