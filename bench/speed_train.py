"""Seconds per Score-DPO training pair: score_dpo.train against TRL's DPOTrainer + PEFT, same model,
same pairs, same LoRA (r 8, alpha 16, q_proj/v_proj, dropout 0.01), same optimiser settings, timed
in the same run. Prints seconds per pair for each side, the ratio and a rough hardware fraction.

    python bench/speed_train.py                          # 3 timed pairs, prompt 1200, completions 300
    python bench/speed_train.py --pairs 5 --threads 2 --dtype bf16
    python bench/speed_train.py --memory-ab --prompt-tokens 740 --completion-tokens 40   # the default run's shape

What a "pair" costs on each side (SCOREFLOW.md §7: batch 1, reference = base with adapters off):
- ours: the reference log-probs (one no-grad pass, precomputed before training) + one training step;
  the prompt is run once per pass and both completions attend to it (score_dpo.pairs_token_logps).
- TRL: one training step, which runs the reference (adapters off) and the policy on the batch
  [prompt + chosen, prompt + rejected], so the prompt is run twice per pass.
The two sides alternate pair by pair (one warm-up pair each first) and the medians are compared,
so load from other processes hits both alike; ours adds its reference time to each step. Both
sides see the same text; TRL tokenises prompt + completion jointly, so its token counts can differ
by a token or two (printed). On a machine shared with other busy processes use --threads 1: with
more threads than free cores, OpenMP's spinning makes every small op erratic (seen here: 10-50x).

The hardware fraction is model FLOPs / (seconds × measured fp32/bf16 matmul FLOP/s on this machine):
FLOPs = 2·P·T for each forward (P = non-embedding weights + lm_head at the completion positions only)
and 2× that for the backward, over the tokens each side actually processes. Attention is left out.
"""
import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import score_dpo as S  # noqa: E402
from scoreflow import rss_gb, trim_heap  # noqa: E402

WORDS = ("the of and to in is was for that with as on by at from value number list sum each step result "
         "compute answer problem total average equal given find first second third many more less than "
         "integer prime factor divide remainder square root graph node edge path cost time speed rate").split()


def text_of_tokens(tok, n, rng, code=False):
    """A text that encodes to about n tokens: seeded prose (prompt) or workflow-like code (completion)."""
    parts = []
    while True:
        if code:
            parts.append(f"        {rng.choice(WORDS)}_{rng.randint(0, 99)} = await self.custom(instruction="
                         f"\"{' '.join(rng.choice(WORDS) for _ in range(6))}\")\n")
        else:
            parts.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + f" {rng.randint(2, 999)}. ")
        ids = tok.encode("".join(parts))
        if len(ids) >= n:
            return tok.decode(ids[:n])


def make_pairs(tok, n, prompt_tokens, completion_tokens, seed=0):
    rng = random.Random(seed)
    return [S.Pair(f"p{i}", text_of_tokens(tok, prompt_tokens, rng), text_of_tokens(tok, completion_tokens, rng, True),
                   text_of_tokens(tok, completion_tokens, rng, True), 1.0, rng.choice([0.0, 1 / 3, 2 / 3]))
            for i in range(n)]


def matmul_flops(dtype, threads):
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best


class TRLSide:
    """TRL's DPOTrainer + PEFT on the transformers model loaded from our HF export; a fresh model and
    trainer per pair (a PeftModel handed back to TRL gets a second "ref" adapter), so the two sides
    can alternate pair by pair; step times come from a callback, so set-up is not counted."""

    def __init__(self, export_dir, dtype, out_dir):
        import transformers
        from peft import LoraConfig
        self.transformers, self.export_dir = transformers, export_dir
        self.tok = transformers.AutoTokenizer.from_pretrained(export_dir)
        self.lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.01, target_modules=["q_proj", "v_proj"],
                               bias="none", task_type="CAUSAL_LM")
        self.dtype, self.out_dir = dtype, out_dir

    def step(self, pair):
        """Train on one pair; returns (seconds of the step, token lengths TRL used)."""
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
        times = []

        class StepTime(self.transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                times.append(-time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                times[-1] += time.perf_counter()

        ds = Dataset.from_dict({"prompt": [pair.prompt], "chosen": [pair.chosen], "rejected": [pair.rejected]})
        args = DPOConfig(output_dir=self.out_dir, beta=0.1, learning_rate=1e-6, adam_beta1=0.9, adam_beta2=0.999,
                         adam_epsilon=1e-8, weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0,
                         max_grad_norm=1.0, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                         num_train_epochs=1, max_length=None, loss_type=["sigmoid"], precompute_ref_log_probs=False,
                         report_to=[], use_cpu=True, bf16=self.dtype == "bf16", save_strategy="no",
                         logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0)
        model = self.transformers.AutoModelForCausalLM.from_pretrained(self.export_dir, dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=self.tok,
                             peft_config=self.lora, callbacks=[StepTime()])
        r = trainer.train_dataset[0]
        trainer.train()
        return times[0], (len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"]))


def ours_step(model, tok, pair, dtype, out_dir):
    """score_dpo.train on one pair: (reference seconds + step seconds, step seconds)."""
    cfg = S.TrainConfig(lr=1e-6, amp="bf16" if dtype == "bf16" else "off", log_every=1e9)
    res = S.train(model, tok, [pair], cfg, out_dir, log=open(os.devnull, "w"))
    return res.ref_seconds + res.history[0]["seconds"], res.history[0]["seconds"]


def peak_rss_reset():
    """Return freed heap to the OS and restart the kernel's peak-RSS mark (VmHWM) from the current RSS."""
    trim_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


MEMORY_SIDES = {  # --memory-ab: name -> TrainConfig fields; "one pass" is the reference
    "one pass": lambda ga: dict(pass_pairs=ga),  # every pair at once, all activations kept
    "default": lambda ga: {},  # passes of TrainConfig.pass_pairs pairs over one shared head
    "checkpointed": lambda ga: dict(pass_pairs=ga, checkpoint=True),  # blocks rerun in backward
}


def memory_ab(args):
    """The memory/time trade of one optimizer step of --grad-accum pairs whose prompts share a
    --prompt-tokens head (as the default run's few-shot prompt): TrainConfig's default against
    one pass of every pair (the fastest and largest) and against activation checkpointing, the
    sides alternating round by round; prints each side's median step seconds and peak RSS above
    the loaded model, and the ratios to "one pass"."""
    model, tok = M.load(None, device="cpu", dtype=torch.float32)
    rng = random.Random(0)
    head = text_of_tokens(tok, args.prompt_tokens, rng)
    pairs = [S.Pair(f"p{i}", head + text_of_tokens(tok, 40, rng), text_of_tokens(tok, args.completion_tokens, rng, True),
                    text_of_tokens(tok, args.completion_tokens, rng, True), 1.0, rng.choice([0.0, 1 / 3, 2 / 3]))
             for i in range(args.grad_accum)]
    names = list(MEMORY_SIDES)
    times, peaks = {k: [] for k in names}, {k: [] for k in names}
    print(f"speed_train --memory-ab: {args.pairs} rounds (+1 warm-up) per side, step of {args.grad_accum} pairs, "
          f"head {args.prompt_tokens} + 40 own prompt tokens, completions {args.completion_tokens}, "
          f"{args.threads} threads", file=sys.stderr)
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.pairs + 1):
            for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
                peak_rss_reset()
                base = rss_gb("VmRSS")
                cfg = S.TrainConfig(lr=1e-6, grad_accum=args.grad_accum, log_every=1e9,
                                    amp="bf16" if args.dtype == "bf16" else "off",
                                    **MEMORY_SIDES[name](args.grad_accum))
                res = S.train(model, tok, pairs, cfg, os.path.join(d, f"{i}{name}"), log=open(os.devnull, "w"))
                peak = rss_gb("VmHWM") - base
                if i:
                    times[name].append(res.history[0]["seconds"])
                    peaks[name].append(peak)
                print(f"  round {i}{' (warm-up)' if i == 0 else ''} {name:12s}: step "
                      f"{res.history[0]['seconds']:.1f} s, peak +{peak:.2f} GB", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in names:
        print(f"{k:12s}: {med[k]:6.2f} s/step median, peak RSS +{max(peaks[k]):.2f} GB above the loaded model; "
              f"time {med[k] / med['one pass']:.2f}x, peak {max(peaks[k]) / max(peaks['one pass']):.2f}x one pass")
    print("target: the default's time <= 1.15x one pass")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3, help="timed pairs per side (plus one warm-up pair)")
    ap.add_argument("--prompt-tokens", type=int, default=1200)
    ap.add_argument("--completion-tokens", type=int, default=300, help="tokens per chosen / rejected text")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="fp32, or bf16 autocast on both sides")
    ap.add_argument("--memory-ab", action="store_true",
                    help="instead of TRL: our default step against one pass of every pair and against activation "
                    "checkpointing (time and peak RSS)")
    ap.add_argument("--grad-accum", type=int, default=8, help="--memory-ab: pairs per step (default 8, the run's)")
    args = ap.parse_args(argv)
    if args.pairs < 1:
        ap.error(f"--pairs must be >= 1, got {args.pairs}")
    torch.set_num_threads(args.threads)
    if args.memory_ab:
        return memory_ab(args)
    model, tok = M.load(None, device="cpu", dtype=torch.float32)
    pairs = make_pairs(tok, args.pairs + 1, args.prompt_tokens, args.completion_tokens)
    enc = [S.encode_pair(tok, p) for p in pairs]
    ours_lens = [(len(a), len(b), len(c)) for a, b, c in enc]
    trl_times, ours_times, ours_steps, trl_lens = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        export = os.path.join(d, "hf")
        M.save_hf(model, tok, export)
        trl = TRLSide(export, args.dtype, os.path.join(d, "trl"))
        print(f"speed_train: {args.pairs} timed pairs (+1 warm-up) per side, alternating, {args.threads} threads, "
              f"{args.dtype}", file=sys.stderr)
        for i, pair in enumerate(pairs):  # pair 0 warms both sides up
            t_trl, lens = trl.step(pair)
            t_ours, t_step = ours_step(model, tok, pair, args.dtype, os.path.join(d, f"ours{i}"))
            print(f"  pair {i}{' (warm-up)' if i == 0 else ''}: TRL {t_trl:.1f} s, ours {t_ours:.1f} s "
                  f"(step {t_step:.1f} s), load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
            if i:
                trl_times.append(t_trl)
                ours_times.append(t_ours)
                ours_steps.append(t_step)
                trl_lens.append(lens)
    t_trl, t_ours = statistics.median(trl_times), statistics.median(ours_times)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    p_o, c_o = mean([a for a, _, _ in ours_lens]), mean([(b + c) / 2 for _, b, c in ours_lens])
    p_t, c_t = mean([a for a, _, _ in trl_lens]), mean([(b + c) / 2 for _, b, c in trl_lens])
    cfg = model.config
    layer = cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim \
        + 3 * cfg.dim * cfg.ffn_dim
    body, head = cfg.n_layers * layer, cfg.dim * cfg.vocab_size
    # forward FLOPs of one pass; a training step = forward + backward (2x) ; plus one reference forward
    fwd_ours = 2 * body * (p_o + 2 * (c_o - 1)) + 2 * head * 2 * c_o
    fwd_trl = 2 * body * 2 * (p_t + c_t) + 2 * head * 2 * c_t
    peak = matmul_flops(torch.bfloat16 if args.dtype == "bf16" else torch.float32, args.threads)
    print(f"tokens per pair: ours prompt {p_o:.0f} + 2 x {c_o:.0f} (EOS included); "
          f"TRL prompt {p_t:.0f} + 2 x {c_t:.0f}")
    print(f"TRL DPOTrainer + PEFT : {t_trl:8.2f} s/pair median  ({', '.join(f'{x:.1f}' for x in trl_times)})")
    print(f"ours score_dpo.train  : {t_ours:8.2f} s/pair median  ({', '.join(f'{x:.1f}' for x in ours_times)}; "
          f"of which training step {statistics.median(ours_steps):.1f} s, the rest the reference pass)")
    print(f"speed-up              : {t_trl / t_ours:8.2f}x   (target >= 2x)")
    print(f"hardware fraction     : ours {4 * fwd_ours / t_ours / peak:.0%}, TRL {4 * fwd_trl / t_trl / peak:.0%} of "
          f"{peak / 1e9:.0f} GFLOP/s measured {args.dtype} matmul (4 forward-equivalents per pair)")
    print(f"load average          : {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
