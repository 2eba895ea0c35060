"""score_dpo.py: preference pairs, the Score-DPO loss and a LoRA trainer for the generator.

Implements ScoreFlow (Wang et al. 2025, arXiv 2502.04306) as written down in SCOREFLOW.md:
- §5   preference pairs: every pair of a problem's workflows with different scores, winner = higher
       score, ties dropped; N pairs drawn i.i.d. with replacement with P ∝ d(s_w, s_l) (`power_d`);
- §6.1 the Score-DPO loss −log σ(f(s_w)·r_w − (1 − f(s_l))·r_l) and plain DPO as its special case;
- §6.2 the per-sample influence (our reconstruction of Definition 3.1), to check Theorem 3.2;
- §7   training: model.py's LoRA on q_proj/v_proj, AdamW with linear decay, reference = same weights
       with the adapters off, log-probs summed over completion tokens (prompt masked, EOS appended).

Non-goals: other preference losses (IPO, hinge, ...), full fine-tuning, a second model copy as
reference, loss weighting by d (SCOREFLOW.md §10.2: d acts through resampling only), length caps
on prompts or completions (the paper has none; no flag asked for them).
"""
import functools
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import model as M

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


def power_d(s_w, s_l, power=3):
    """d(x, y) = (x − y)^power, the pair-sampling weight. power 3 is the official choice
    (SCOREFLOW.md §5, §6.1 "Choices"); §9's Table 4 varies it as (x − y)^α; power 0 gives d = 1,
    every eligible pair equally likely (the DPO-style sampling ablation). Floats or tensors."""
    return (s_w - s_l) ** power


def build_pairs(problem_id, prompt, completions, scores):
    """All preference pairs of one problem (SCOREFLOW.md §5 "Eligible"): for each unordered pair of
    its workflows with s_i ≠ s_j, one Pair with the higher score as chosen. Ties are dropped; a
    workflow whose score is None (it failed to load or was left out, §10.7) takes part in no pair.
    Order: i < j in the order given, so the result is deterministic."""
    if len(completions) != len(scores):
        raise ValueError(f"build_pairs({problem_id!r}): {len(completions)} completions but "
                         f"{len(scores)} scores")
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


def sample_pairs(pairs, n, d=power_d, seed=0):
    """Draw n pairs i.i.d. with replacement, P(pair) = d(s_w, s_l) / Σ d (SCOREFLOW.md §5
    "Sampling", §6.1 P*). Seeded (the official code is not, §10.9): the same (pairs, n, d, seed)
    give the same draw."""
    if n < 0:
        raise ValueError(f"sample_pairs: n must be >= 0, got {n}")
    if n == 0:
        return []
    if not pairs:
        raise ValueError(f"sample_pairs: asked for {n} pairs from an empty pool")
    weights = []
    for p in pairs:
        if not p.chosen_score > p.rejected_score:
            raise ValueError(f"sample_pairs: pair for {p.problem_id!r} has chosen_score "
                             f"{p.chosen_score} not above rejected_score {p.rejected_score}")
        w = float(d(p.chosen_score, p.rejected_score))
        if not (w >= 0.0 and math.isfinite(w)):
            raise ValueError(f"sample_pairs: d({p.chosen_score}, {p.rejected_score}) = {w}, "
                             f"expected finite >= 0")
        weights.append(w)
    if sum(weights) <= 0.0:
        raise ValueError(f"sample_pairs: d is 0 on all {len(pairs)} pairs, nothing to draw")
    return random.Random(seed).choices(pairs, weights=weights, k=n)


# --- the loss (SCOREFLOW.md §6) ------------------------------------------------------------------


def identity(x):
    """f(x) = x, the official score transform (SCOREFLOW.md §6.1 "Choices")."""
    return x


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta):
    """DPO, SCOREFLOW.md §6.1 "DPO as a special case": ℓ = −log σ(r_w − r_l) with the implicit
    rewards r = β·(log π_θ(y|q) − log π_ref(y|q)), log π summed over completion tokens.
    Inputs (P,); returns (losses (P,), chosen_rewards (P,), rejected_rewards (P,)), rewards
    detached."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)        # r_w
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # r_l
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def score_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                   ref_rejected_logps, chosen_scores, rejected_scores, beta, f=identity):
    """Score-DPO, SCOREFLOW.md §6.1 "Loss" (paper Fig. 1): ℓ = −log σ(z) with
    z = f(s_w)·r_w − (1 − f(s_l))·r_l and r = β·(log π_θ − log π_ref) summed over completion
    tokens. The expectation over P* ∝ d·P is taken by resampling (§5), so the batch mean of these
    losses is L. Scores 1 and 0 give dpo_loss exactly. Inputs (P,); returns (losses,
    chosen_rewards, rejected_rewards) with the paper's r_w, r_l (detached; the official code logs
    f(s_w)·r_w and (1 − f(s_l))·r_l, §6.3)."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)        # r_w
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # r_l
    z = f(chosen_scores) * chosen_rewards - (1 - f(rejected_scores)) * rejected_rewards
    losses = -F.logsigmoid(z)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def score_dpo_influence(chosen_rewards, rejected_rewards, chosen_scores, rejected_scores,
                        d=power_d, f=identity):
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


# --- pair files -----------------------------------------------------------------------------------


def write_pairs(path, pairs):
    """Pairs as JSON lines, written atomically (model.write_atomic)."""
    M.write_atomic(path, "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in pairs))


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
                    raise ValueError(f"{path}:{lineno}: field {name!r} is "
                                     f"{type(rec[name]).__name__}, expected "
                                     f"{'number' if typ is not str else 'str'}")
            if not rec["chosen_score"] > rec["rejected_score"]:
                raise ValueError(f"{path}:{lineno}: chosen_score {rec['chosen_score']} not above "
                                 f"rejected_score {rec['rejected_score']}")
            pairs.append(Pair(**{k: (float(rec[k]) if k.endswith("_score") else rec[k])
                                 for k in fields}))
    return pairs


# --- sequences and log-probs (SCOREFLOW.md §6.1 "log π(y|q) is the sum", §7 "Sequences") -------


def completion_eos_id(tokenizer):
    """The EOS appended to each completion (§7): the chat format's end-of-turn marker when it is an
    eos id (<|im_end|>, <|eot_id|>; what TRL appends for these models), else the smallest eos id."""
    if not tokenizer.eos_ids:
        raise ValueError("tokenizer has no eos ids; cannot append EOS to completions "
                         "(SCOREFLOW.md §7)")
    for marker in ("<|im_end|>", "<|eot_id|>"):
        i = tokenizer.tok.token_to_id(marker)
        if i in tokenizer.eos_ids:
            return i
    return min(tokenizer.eos_ids)


def encode_pair(tokenizer, pair):
    """(prompt_ids, chosen_ids, rejected_ids): the prompt as generate read it (model.prompt_ids,
    BOS rule included), each completion encoded on its own with EOS appended (§7), so neither
    completion is ever empty."""
    eos = completion_eos_id(tokenizer)
    return (M.prompt_ids(tokenizer, pair.prompt), tokenizer.encode(pair.chosen) + [eos],
            tokenizer.encode(pair.rejected) + [eos])


def gather_logprobs(logits, labels):
    """log softmax(logits)[label] = logit[label] − logsumexp(logits): logits (N, V), labels (N,)
    -> (N,). Half precision is lifted to fp32 first; fp32 and fp64 stay as they are (the float64
    oracle checks)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits.gather(-1, labels[:, None]).squeeze(-1) - logits.logsumexp(-1)


def token_logprobs(model, prompt_ids, completion_ids, head=None):
    """Per-token log p(c_t | prompt, c_<t) of each row's completion, a list of (len(c),) tensors,
    differentiable when grad is enabled; prompt tokens never get a log-prob. The one log-prob
    pass: the trainer (policy and reference) and the tests use it.

    The prefix all prompts share (each keeping >= 1 token of its own) runs ONCE into a 1-row
    KVCache (model.prefix_cache); one right-padded batch of the rows' prompt suffix + completion
    attends to it and to its own past. Exact, and the backward goes through the prefix once: with
    scoreflow's default prompt ~740 of ~770 tokens are the same for every problem, which is what
    makes training affordable. lm_head sees only the positions that predict completion tokens.
    head: that prefix already run (a KVCache of P columns, see shared_head), for rows whose
    prompts all start with its P tokens and go on past them."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} rows, completion_ids "
                         f"{len(completion_ids)}")
    for i, p in enumerate(prompt_ids):
        if not p:
            raise ValueError(f"prompt_ids[{i}] is empty; the first completion token needs a "
                             f"context")
    device = model.lm_head.weight.device
    P = shared_head(prompt_ids) if head is None else head.length
    rows = [list(p[P:]) + list(c[:-1]) for p, c in zip(prompt_ids, completion_ids)]
    B, T = len(rows), max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)  # (B, T)
    pos = (P + torch.arange(T, device=device)).expand(B, T)  # (B, T)
    # the prefix, then causal over the rows' own columns (padding only trails): (B, 1, T, P + T)
    mask = M.prefill_mask(torch.ones(B, P + T, dtype=torch.bool, device=device), T) if P else None
    # with checkpoint_blocks on (TrainConfig.checkpoint) the head is rerun in backward too when
    # several pairs share it (8 a step: train peak -0.5 GB, +5% time), not for one pair, whose
    # head is its whole prompt (bench/speed_train.py: +22% a step); train_step's split passes
    # bring their own head
    if head is None:
        head = M.prefix_cache(model, prompt_ids[0][:P], checkpoint=None if B > 2 else False)
    h = model.hidden(tokens, pos, mask, prefix=head)  # (B, T, C)
    b_idx = [b for b, c in enumerate(completion_ids) for _ in c]
    t_idx = [len(p) - P - 1 + j for p, c in zip(prompt_ids, completion_ids) for j in range(len(c))]
    labels = torch.tensor([x for c in completion_ids for x in c], device=device, dtype=torch.long)
    logp = gather_logprobs(model.lm_head(h[b_idx, t_idx]), labels)  # (N,)
    return list(logp.split([len(c) for c in completion_ids]))


def shared_head(prompt_ids):
    """P: the length of the head all prompts share, each keeping >= 1 token of its own (the list
    doubled: a single prompt then shares itself up to its last token)."""
    return M.shared_prefix(list(prompt_ids) * 2, min_len=1)


def pairs_token_logps(model, items, head=None):
    """items = [(prompt_ids, chosen_ids, rejected_ids), ...] (encode_pair) -> [(chosen (Lc,),
    rejected (Lr,)), ...], the per-token log p of each completion given its prompt: one
    token_logprobs pass of 2 rows per pair, so the prefix all prompts share runs once (head: as
    token_logprobs')."""
    logp = token_logprobs(model, [p for p, _, _ in items for _ in (0, 1)],
                          [x for _, c, r in items for x in (c, r)], head)
    return list(zip(logp[0::2], logp[1::2]))


# --- the trainer (SCOREFLOW.md §7) ---------------------------------------------------------------
# The official code's optimiser and LoRA settings; no flag changes them, so they are constants.
ADAM_BETAS, ADAM_EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.0  # AdamW, lr decayed linearly to 0
MAX_GRAD_NORM = 1.0                  # gradient-norm clip
LORA_TARGETS = ("q_proj", "v_proj")
LORA_DROPOUT = 0.01  # written into the adapter; training runs with dropout off (§7), so it is 0


@dataclass
class TrainConfig:
    """Score-DPO training for one iteration. Defaults are the paper's (official code,
    SCOREFLOW.md §7). scoreflow.py's flags set loss .. seed; no flag reaches the last five, which
    stay for the speed script and the tests: amp (bench/speed_train.py's bf16 side), save_every
    (the resume tests' mid-epoch checkpoints), log_every (0: a line per step, which the crash
    tests need), checkpoint and pass_pairs (bench/speed_train.py --memory-ab times them)."""
    loss: str = "score-dpo"   # "score-dpo" (§6.1) or "dpo" (the ablation, §10.5)
    beta: float = 0.1         # β; paper 0.1
    lr: float = 1e-6          # AdamW peak learning rate; paper 1e-6
    epochs: int = 1           # passes over the pairs per iteration; paper 1
    grad_accum: int = 1       # pairs per optimizer step (the batch, summed over DDP ranks); paper 1
    lora_r: int = 8           # paper 8
    lora_alpha: int = 16      # paper 16
    reference: str = "base"   # π_ref: "base" = adapters off, every iteration (official);
    #                           "previous" = the policy as this call finds it (last iteration's)
    seed: int = 0             # pair shuffling per epoch and the initial LoRA A
    amp: str = "auto"         # "auto": bf16 autocast for fp32 weights on a CUDA with bf16, else
    #                           none (bf16/fp16 weights compute in their dtype, the LoRA in fp32);
    #                           "bf16": always; "off": never
    save_every: int = 0       # optimizer steps between resumable checkpoints; 0 = epoch ends only
    log_every: float = 30.0   # seconds between progress lines on stderr
    checkpoint: bool = False  # recompute each block of the policy pass in backward (model.hidden):
    #                           same gradients, less memory, 1.28-1.47x the time of a step
    pass_pairs: int = 2       # pairs per forward + backward pass over the step's shared prompt
    #                           head (train_step): the default run's step of 8 pairs, against one
    #                           pass of all 8: 1.05x the time, 0.37x the peak (speed_train.py)

    def __post_init__(self):
        choices = {"loss": ("score-dpo", "dpo"), "reference": ("base", "previous"),
                   "amp": ("auto", "bf16", "off")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name}: got {getattr(self, name)!r}, "
                                 f"expected one of {allowed}")
        for name in ("epochs", "grad_accum", "lora_r", "pass_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}: got {getattr(self, name)}, expected >= 1")
        for name in ("beta", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name}: got {getattr(self, name)}, expected > 0")


@dataclass
class TrainResult:
    steps: int              # optimizer steps taken in total (this call and any resumed part)
    pairs: int              # pairs trained on (epochs × pairs)
    history: list           # per optimizer step: step, loss, margin, lr, grad_norm, seconds
    ref_seconds: float      # time computing (or loading) the reference log-probs
    adapter_dir: str        # the final adapter, PEFT layout


def train_step(model, items, ref_logps, scores, cfg, n_step, optimizer, scheduler, autocast, dist):
    """One optimiser step on this rank's pairs `items` (encode_pair): the policy's log-probs
    (pairs_token_logps, LoRA on, in passes of cfg.pass_pairs over one shared head), the loss
    (cfg.loss, cfg.beta) against the precomputed reference sums ref_logps (P, 2) = (chosen,
    rejected) with scores (P, 2) = (s_w, s_l), backward of Σ loss / n_step (the mean over the
    step's n_step pairs, all ranks together), the LoRA gradients summed over the DDP ranks,
    clip, AdamW and the schedule. Returns (Σ loss, Σ margin r_w − r_l) over the step's pairs of
    all ranks, and the gradient norm."""
    params = optimizer.param_groups[0]["params"]
    device = params[0].device
    stats = torch.zeros(2, dtype=torch.float64)  # Σ loss, Σ margin
    with autocast():
        # this rank's pairs share a prompt head (default run: ~740 of ~780 tokens). One pass
        # (pass_pairs or fewer pairs) runs it inside its own graph. More: the head runs once, its
        # K/V are copied as leaves (`own`) that passes of cfg.pass_pairs pairs attend to, each
        # pass has its own backward (leaving the gradient of the head's K/V in own's .grad), and
        # the head's backward runs last, rerunning its blocks (checkpointed: it holds only their
        # inputs meanwhile). The same gradient as one pass, but autograd holds one pass's
        # activations at a time, not every pair's (TrainConfig.pass_pairs)
        P = shared_head([p for p, _, _ in items]) if len(items) > cfg.pass_pairs else 0
        head = M.prefix_cache(model, items[0][0][:P], checkpoint=True) if P else None
        own = None
        if head is not None:
            own = M.KVCache(1, P)
            own.k, own.v = ([x.detach().requires_grad_() for x in xs] for xs in (head.k, head.v))
        for k in range(0, len(items), cfg.pass_pairs):
            part = slice(k, k + cfg.pass_pairs)
            logps = pairs_token_logps(model, items[part], own)
            pc = torch.stack([c.float().sum() for c, _ in logps])  # (p,) log π_θ(y_w|q)
            pr = torch.stack([r.float().sum() for _, r in logps])  # (p,) log π_θ(y_l|q)
            rc, rr = ref_logps[part].to(device, torch.float32).unbind(-1)  # (p,) log π_ref
            if cfg.loss == "dpo":
                losses, r_w, r_l = dpo_loss(pc, pr, rc, rr, cfg.beta)
            else:
                sw, sl = scores[part].to(device).unbind(-1)  # (p,) each
                losses, r_w, r_l = score_dpo_loss(pc, pr, rc, rr, sw, sl, cfg.beta)
            (losses.sum() / n_step).backward()
            stats += torch.stack([losses.detach().double().sum(),
                                  (r_w - r_l).detach().double().sum()]).cpu()
        if own is not None:  # (layer 0's K has no grad: no LoRA on k_proj, frozen embeddings)
            kv = [(x, g.grad) for x, g in zip(head.k + head.v, own.k + own.v)
                  if x.requires_grad and g.grad is not None]
            if kv:
                torch.autograd.backward(*zip(*kv))
    if dist:  # the gradients and the stats, summed over the ranks in one flat buffer
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([g.flatten() for g in grads] + [stats.to(device, grads[0].dtype)])
        dist.all_reduce(flat)
        for p, g in zip(params, flat[:-len(stats)].split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()
        stats = flat[-len(stats):].cpu()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, grad_norm


def reference_logps(model, encoded, groups, reference, autocast):
    """(P, 2) float64 sums of log π_ref (chosen, rejected) of the encoded pairs, once before any
    step, one pass per group of pair indices (rows of pairs in no group stay 0). "base": the same
    weights under model.lora_disabled (the original base in every iteration, as the official
    code); "previous": with the adapters on, the policy as train finds it (no copy, no merge)."""
    ref = torch.zeros(len(encoded), 2, dtype=torch.float64)
    model.eval()  # no dropout in the reference
    with M.lora_disabled(model) if reference == "base" else torch.no_grad(), autocast():
        for group in filter(None, groups):  # a rank past a short last step has an empty group
            for i, (c, r) in zip(group, pairs_token_logps(model, [encoded[i] for i in group])):
                ref[i, 0], ref[i, 1] = c.double().sum(), r.double().sum()
    return ref


def train(model, tokenizer, pairs, cfg, out_dir, *, log=None):
    """Train the generator's LoRA (model.py's, created on first use, else trained on) with
    Score-DPO or DPO on `pairs`, already d-sampled (§5); returns a TrainResult. The model keeps its
    device and dtype. Epochs of train_step on cfg.grad_accum pairs, shuffled per epoch with
    cfg.seed, against reference_logps taken once before any step; lr decays linearly to 0.

    DDP (torch.distributed initialised): each step's pairs are split over the ranks and their
    gradients summed; rank 0 writes out_dir, every rank reads it (a filesystem all ranks see). The
    fingerprint counts pairs per step over all ranks, so grad_accum 2G on one process resumes
    under two with G. Files: ref_logps.pt (a resume never recomputes the reference from a trained
    adapter), ckpt/ (adapter + optimizer state at every epoch end and every cfg.save_every steps),
    adapter/ (the final adapter, PEFT layout). A run continues from ckpt/ if its fingerprint
    (pairs + settings) matches, else it is an error."""
    log = sys.stderr if log is None else log
    if not pairs:
        raise ValueError("train: no pairs to train on")
    dist = torch.distributed if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else None
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    device, caller_mode, caller_redo = (model.lm_head.weight.device, model.training,
                                        model.checkpoint_blocks)

    def say(msg):  # progress on rank 0 only
        if rank == 0:
            print(msg, file=log, flush=True)

    params = _lora_params(model, cfg)
    base_dtype = next(p.dtype for n, p in model.named_parameters() if ".lora_" not in n)
    # no autocast on bf16/fp16 weights: training then runs the very forward pass generate runs
    auto = base_dtype == torch.float32 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    amp_dtype = torch.bfloat16 if cfg.amp == "bf16" or (cfg.amp == "auto" and auto) else None
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype or torch.float32,
                                 enabled=amp_dtype is not None)
    encoded = [encode_pair(tokenizer, p) for p in pairs]
    scores = torch.tensor([(p.chosen_score, p.rejected_score) for p in pairs])  # (P, 2)
    n, per_step = len(pairs), cfg.grad_accum * world  # pairs per optimizer step, all ranks
    steps_per_epoch, fingerprint = math.ceil(n / per_step), _fingerprint(pairs, cfg, world)
    total_steps = cfg.epochs * steps_per_epoch
    say(f"train: {n} pairs, {sum(len(e[0]) for e in encoded) / n:.0f} prompt + "
        f"{sum(len(e[1]) + len(e[2]) for e in encoded) / (2 * n):.0f} completion tokens on "
        f"average, loss {cfg.loss}, reference {cfg.reference}, world {world}, autocast {amp_dtype}")

    def step_pairs(epoch, k):
        """(step k of epoch's pairs, all ranks; this rank's share): shuffled per epoch."""
        order = list(range(n))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        batch = order[k * per_step:(k + 1) * per_step]
        return batch, batch[rank::world]

    # the reference log-probs: a previous run's ref_logps.pt, else computed and saved
    ckpt_dir, ref_path = os.path.join(out_dir, "ckpt"), os.path.join(out_dir, "ref_logps.pt")
    state_path = os.path.join(ckpt_dir, "trainer_state.pt")
    t_ref, ref = time.time(), None
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if not os.path.exists(ckpt_dir) and os.path.exists(ckpt_dir + ".old"):
            os.replace(ckpt_dir + ".old", ckpt_dir)  # a crash mid-swap (_replace_dir)
        if os.path.exists(ref_path):  # used if for these pairs and settings
            saved = torch.load(ref_path, map_location="cpu")
            ref = saved["ref_logps"] if saved.get("fingerprint") == fingerprint else None
    # rank 0's ref (or None) to every rank: all load or all compute (a collective), and no rank
    # reads out_dir (ckpt/ on a resume) before rank 0 has set it up
    if dist:
        box = [ref]
        dist.broadcast_object_list(box, src=0)
        ref = box[0]
    if ref is None:
        if os.path.exists(state_path):
            raise ValueError(f"{out_dir}: a checkpoint exists but ref_logps.pt is missing or for "
                             f"other pairs/settings; refusing to recompute the reference from a "
                             f"trained adapter (use a new out_dir)")
        # in epoch 0's step groups: the first step then sees π_θ = π_ref exactly
        ref = reference_logps(model, encoded, [step_pairs(0, k)[1] for k in range(steps_per_epoch)],
                              cfg.reference, autocast)
        if dist:  # each rank filled its own pairs' rows
            ref = ref.to(device)
            dist.all_reduce(ref)
            ref = ref.cpu()
        if rank == 0:
            _torch_save_atomic({"fingerprint": fingerprint, "ref_logps": ref}, ref_path)
    ref_seconds = time.time() - t_ref

    # the optimiser, and a resumed run's state from ckpt/ (load_adapter copies into `params`)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                  weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, (total_steps - s) / total_steps))
    step, history = 0, []
    if os.path.exists(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{state_path}: checkpoint is for other pairs or settings than this "
                             f"call (fingerprint {state['fingerprint'][:12]} != "
                             f"{fingerprint[:12]}); use a new out_dir")
        M.load_adapter(model, ckpt_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
        say(f"train: resumed from {ckpt_dir} at step {step}/{total_steps}")

    def pairs_done(s):  # pairs trained on after s steps (an epoch's last step may be short)
        return (s // steps_per_epoch) * n + min((s % steps_per_epoch) * per_step, n)

    model.eval()  # the official trainer turns dropout off (§7)
    model.checkpoint_blocks = cfg.checkpoint
    t0, last_log, start_step = time.time(), 0.0, step
    while step < total_steps:
        batch, mine = step_pairs(*divmod(step, steps_per_epoch))
        t_step, lr = time.time(), scheduler.get_last_lr()[0]
        stats, grad_norm = train_step(model, [encoded[i] for i in mine], ref[mine], scores[mine],
                                      cfg, len(batch), optimizer, scheduler, autocast, dist)
        step += 1
        mean_loss, mean_margin = (float(x) / len(batch) for x in stats)
        history.append({"step": step, "loss": mean_loss, "margin": mean_margin, "lr": lr,
                        "grad_norm": float(grad_norm), "seconds": time.time() - t_step})
        save = step % steps_per_epoch == 0 or (cfg.save_every and step % cfg.save_every == 0)
        if rank == 0 and save:  # every epoch end and every cfg.save_every steps
            _replace_dir(ckpt_dir, model, {"fingerprint": fingerprint, "step": step,
                                           "history": history, "optimizer": optimizer.state_dict(),
                                           "scheduler": scheduler.state_dict()})
        now = time.time() - t0
        if now - last_log >= cfg.log_every or step == total_steps:
            last_log = now
            rate = (pairs_done(step) - pairs_done(start_step)) / now if now > 0 else 0.0
            eta = (cfg.epochs * n - pairs_done(step)) / rate if rate > 0 else 0.0
            recent = history[-16:]
            say(f"train: {pairs_done(step)}/{cfg.epochs * n} pairs, step {step}/{total_steps}, "
                f"loss {sum(h['loss'] for h in recent) / len(recent):.4f}, "
                f"margin {sum(h['margin'] for h in recent) / len(recent):+.4f}, "
                f"{rate:.2f} pairs/s, ETA {_fmt_time(eta)}")
    model.train(caller_mode)
    model.checkpoint_blocks = caller_redo
    adapter_dir = os.path.join(out_dir, "adapter")
    if rank == 0:
        _replace_dir(adapter_dir, model)
    if dist:
        dist.barrier()
    return TrainResult(step, cfg.epochs * n, history, ref_seconds, adapter_dir)


def _lora_params(model, cfg):
    """The LoRA weights to train, in fp32 on any base (model.LoRALinear computes its term in fp32
    and casts it back): the adapter is created on first use with A a function of cfg.seed, else
    kept."""
    if any(m.merged for _, m in M.lora_layers(model)):
        raise ValueError("train: the model's LoRA is merged into its weights; call "
                         "model.unmerge_lora first")
    if not M.lora_layers(model):
        M.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=LORA_DROPOUT,
                   targets=LORA_TARGETS)
        g = torch.Generator().manual_seed(cfg.seed)  # add_lora draws A from the global RNG
        for _, layer in M.lora_layers(model):
            w = torch.empty(layer.lora_A.weight.shape)
            torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
            layer.lora_A.weight.data.copy_(w)
    params = list(M.lora_state_dict(model).values())
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def _replace_dir(path, model, state=None):
    """The adapter (and the trainer `state`, as trainer_state.pt) written completely to path.tmp,
    then swapped in for `path`; a crash mid-swap leaves path.old (train's resume reads it)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    M.save_adapter(model, tmp)
    if state is not None:
        _torch_save_atomic(state, os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _fingerprint(pairs, cfg, world):
    """Identifies a training job: resuming with other pairs or settings is an error, not a silent
    mix. grad_accum counts as the pairs per step of all `world` ranks (what the steps depend on)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps(asdict(p), sort_keys=True).encode())
    keep = {k: v for k, v in asdict(cfg).items()
            if k not in ("log_every", "save_every", "checkpoint", "pass_pairs")}
    keep["grad_accum"] = cfg.grad_accum * world
    h.update(json.dumps(keep, sort_keys=True, default=list).encode())
    return h.hexdigest()


def _torch_save_atomic(obj, path):
    """torch.save through model.write_atomic (the one atomic write)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    M.write_atomic(path, buf.getvalue())


def _fmt_time(s):
    return (f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600
            else f"{int(s // 60)}m{int(s % 60):02d}s")
