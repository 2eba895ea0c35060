"""Speed of model.generate() against transformers' generate(), same model, prompts and settings,
timed in the same run (interleaved repeats, median). Prints tok/s per side and the ratio.

    python bench/speed_generate.py                 # batch 1 and 32, fp32 and bf16, 2 threads
    python bench/speed_generate.py --packed        # also ours with int4-packed weights (pack_weights)
    python bench/speed_generate.py --dtypes bf16 --batches 1 --packed --compile   # batch 1 at its fastest
    python bench/speed_generate.py --new-tokens 256 --batches 32 --dtypes bf16   # until eos, mostly

With 64 new tokens nearly every row runs to the limit (a fixed-length test of the decode step);
with 256 most rows end at eos first, where our generate drops finished rows and transformers
keeps computing them. --compile adds each of ours with generate(step=compiled_step()); its warm-up
column includes the compilation (~1 min the first time; inductor's on-disk cache makes later runs
~10 s).

Tokens/s counts completion tokens up to and including each row's eos (transformers' padding after
a finished row is not counted). Both sides decode greedily from the same token ids; the
transformers model is the same GGUF, dequantised by transformers itself. The ceiling line is
memory bandwidth / bytes of weights read per decode step (batch 1 is bandwidth-bound).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

# --------------------------------------------------------------------------- int4 weights (--packed)
# Only this script uses them, so they live here: model.project runs a module's `group` (all of a
# group's weights in one matmul), and prepacked / add_lora leave a model holding one alone.


class PackedLinear(nn.Module):
    """Inference-only packed copy of one or more weights (N_i, K), concatenated along N, so small-batch
    decoding reads fewer bytes: 4-bit integers in groups of 32 with a bf16 scale and offset each
    (w = (q - 8) s + z, torch's CPU int4 kernel), or 8-bit with one scale per row. Computes in bf16.
    A Q4_1 GGUF tensor (x = d q + m per 32) is recovered exactly up to the bf16 rounding of s and z.
    Used only for matmuls of at most `max_rows` rows; the dense weights serve everything else."""

    def __init__(self, weights, bits=4, group=32, max_rows=4):
        super().__init__()
        self.bits, self.group_size, self.max_rows = bits, group, max_rows
        self.dense, self.sizes = list(weights), [x.shape[0] for x in weights]
        self.weight = weights[0]  # registered when a Parameter: state_dict names stay the model's
        w = torch.cat([x.detach().float() for x in weights])  # (N, K)
        N, K = w.shape
        if K % group or N % 16:
            raise ValueError(f"pack_weights: a ({N}, {K}) weight does not fit int{bits} packing "
                             f"(in features must divide by {group}, out features by 16)")
        if bits == 4:
            wg = w.view(N, K // group, group)
            lo, hi = wg.amin(-1), wg.amax(-1)  # (N, K/group)
            scale = ((hi - lo) / 15).clamp(min=1e-12)
            q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(N, K)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            scales = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous()  # (K/group, N, 2)
        elif bits == 8:
            scales = (w.abs().amax(-1) / 127).clamp(min=1e-12)  # (N,)
            packed = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        else:
            raise ValueError(f"pack_weights: bits must be 4 or 8, got {bits}")
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales.to(torch.bfloat16), persistent=False)

    def group(self, x):
        """x (..., K) -> one tensor (..., N_i) per packed weight."""
        if x.numel() // x.shape[-1] > self.max_rows:
            return [F.linear(x, w) for w in self.dense]
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (N, K)
        if self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.packed, self.scales)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return list(y.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [y]

    def forward(self, x):
        return self.group(x)[0]


def pack_weights(model, bits=4, head_bits=0, max_rows=4):
    """Swap the first Linear of every group (q|k|v, o, gate|up, down) for a PackedLinear of the
    group with `bits`, and lm_head for one with `head_bits` (0, the default, keeps it dense:
    per-row int8 re-quantises a Q8_0 head more coarsely than the file, and measured no faster);
    matmuls of at most `max_rows` rows then read the packed weights. Inference only and CPU only:
    an explicit call, refused on a model with LoRA layers (the packed copies would bypass the
    adapters). Returns the model."""
    if M.lora_layers(model):
        raise ValueError("pack_weights: the model has LoRA layers; merge and save_hf, then load and pack that")
    if model.lm_head.weight.device.type != "cpu":
        raise ValueError(f"pack_weights: the packed kernels are CPU-only, model is on {model.lm_head.weight.device}")
    for parent, names in M._linear_groups(model):
        b = head_bits if names == ("lm_head",) else bits
        if b:
            setattr(parent, names[0], PackedLinear([getattr(parent, n).weight for n in names], b, max_rows=max_rows))
    return model


def compiled_step():
    """torch.compile of model.decode_step, for generate(step=) (needs a C++ compiler; the first
    call compiles for ~1 min). It is for batch 1, where fusing the small per-layer ops pays once
    int4 weights shrink the matmuls (135M int4 bf16: 21 -> 35 tok/s); generate runs it on the
    plain weights (inductor cannot trace prepacked's oneDNN ones), so larger batches lose (fp32
    batch 8: 53-63 vs 64-76 tok/s). Only this script and its test use it, so it lives here."""
    fn = torch.compile(M.decode_step, dynamic=True)  # one graph for every t, and for any B > 1

    def step(model, tokens, pos, mask, cache, t, prefix=None):
        if tokens.shape[0] > 1:  # B varies (compaction, calls): symbolic, or each B recompiles
            for x in [tokens, pos] + ([] if mask is None else [mask]) + cache.k + cache.v:
                torch._dynamo.mark_dynamic(x, 0)
        return fn(model, tokens, pos, mask, cache, t, prefix)
    return step


# --------------------------------------------------------------------------- timing

TOPICS = ["a dragon who is afraid of fire", "how rainbows form", "the history of the printing press",
          "why the sky is blue", "a robot learning to paint", "the water cycle", "how to bake bread",
          "a lighthouse keeper's last night", "prime numbers", "the life of a honeybee", "black holes",
          "a city under the sea", "how vaccines work", "the first day at a new school", "volcanoes",
          "a chess game between friends"]


def prompts(tok, n, group=1):
    """n chat prompts; with group k, n/k distinct prompts each repeated k times (k samples each)."""
    out = []
    for i in range(0, n, group):
        ask = ["Write a story about", "Explain", "Write a poem about", "Give a detailed essay on"][i % 4]
        out += [tok.apply_chat([{"role": "user", "content": f"{ask} {TOPICS[i % len(TOPICS)]}."}])] * group
    return out[:n]


def hf_generate(hf, tok, texts, max_new, temperature=0.0):
    """transformers generate on our token ids, left-padded; returns completion tokens counted to eos."""
    ids = [tok.encode(t) for t in texts]
    T = max(len(r) for r in ids)
    x = torch.tensor([[0] * (T - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in ids])
    eos = sorted(tok.eos_ids)
    with torch.no_grad():
        sampling = dict(do_sample=True, temperature=temperature, top_p=0.95, top_k=0) if temperature else \
            dict(do_sample=False)
        out = hf.generate(x, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos[0],
                          **sampling)[:, T:].tolist()
    n = 0
    for row in out:
        ends = [i for i, t in enumerate(row) if t in tok.eos_ids]
        n += ends[0] + 1 if ends else len(row)
    return n, out


def ours_generate(model, tok, texts, max_new, temperature=0.0, step=None):
    res = M.generate(model, tok, texts, max_new_tokens=max_new, temperature=temperature, top_p=0.95,
                     seed=list(range(len(texts))), step=step)
    return sum(r.n_completion_tokens for r in res), [r.token_ids for r in res]


def timed(fn, *args):
    t = time.perf_counter()
    n, toks = fn(*args)
    return n / (time.perf_counter() - t), toks


def bandwidth_gbs():
    a = torch.empty(64 << 20, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    return 5 * 2 * a.numel() * 4 / (time.perf_counter() - t) / 1e9


def step_bytes(model):
    """Bytes of weights one batch-1 decode step reads: the packed copies where pack_weights swapped
    them in (a PackedLinear holds its whole group), else the dense weights (lm_head included,
    embedding rows not)."""
    total = 0
    for parent, names in M._linear_groups(model):
        first = getattr(parent, names[0])
        if isinstance(first, PackedLinear):
            total += first.packed.nbytes + first.scales.nbytes
        else:
            total += sum(getattr(parent, n).weight.numel() * getattr(parent, n).weight.element_size() for n in names)
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both sides (default 2)")
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    ap.add_argument("--new-tokens", type=int, default=64, help="max new tokens per row (default 64)")
    ap.add_argument("--samples-per-prompt", type=int, default=1,
                    help="k: batch rows are batch/k prompts x k samples, sampled at temperature 0.8, "
                         "top_p 0.95 (ScoreFlow's k workflows per problem); default 1 = distinct prompts, greedy")
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side, median reported (default 3)")
    ap.add_argument("--packed", action="store_true", help="also time ours after pack_weights (int4, bf16)")
    ap.add_argument("--head-bits", type=int, default=0, help="pack_weights' lm_head bits: 8, or 0 = dense (default)")
    ap.add_argument("--compile", action="store_true",
                    help="also time each of ours with generate(step=compiled_step()) "
                         "(torch.compile of the decode step; its first call compiles, untimed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    path = args.model or M.embedded_model_path()
    bw = bandwidth_gbs()
    how = (f"{args.samples_per_prompt} samples per prompt at temperature 0.8" if args.samples_per_prompt > 1
           else "distinct prompts, greedy")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"copy bandwidth {bw:.1f} GB/s, max {args.new_tokens} new tokens, {how}, median of {args.repeats}")
    print(f"{'dtype':<6} {'batch':>5} {'ours':<8} {'ours tok/s':>10} {'hf tok/s':>9} {'ratio':>6} "
          f"{'ceiling b1':>10} {'ours/ceil':>9} {'same tokens':>11} {'tokens':>7} {'warm-up s':>9}")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for dname in args.dtypes.split(","):
        dtype = dtypes[dname]
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                               dtype=dtype).eval()
        assert type(hf.model.layers[0].self_attn.q_proj) is torch.nn.Linear, "transformers kept GGUF blocks packed"
        variants = [("dense", M.load(path, dtype=dtype), None)]
        print(f"{dname}: compute path {M.compute_path(variants[0][1][0])}", flush=True)
        if args.packed and dtype == torch.bfloat16:
            pm, ptok = M.load(path, dtype=dtype)
            variants.append(("int4", (pack_weights(pm, head_bits=args.head_bits), ptok), None))
        if args.compile:
            variants += [(name + "+c", pair, compiled_step()) for name, pair, _ in variants]
        for batch in [int(b) for b in args.batches.split(",")]:
            for vname, (ours, tok), compiled in variants:
                k = min(args.samples_per_prompt, batch)
                temp = 0.8 if k > 1 else 0.0
                texts = prompts(tok, batch, k)
                t0 = time.perf_counter()
                ours_generate(ours, tok, texts, 4, 0.0, compiled)  # warm-up both (compiles, for +c)
                ours_generate(ours, tok, texts[:max(1, batch // 2)], 6, 0.0, compiled)  # other shapes
                warm = time.perf_counter() - t0
                hf_generate(hf, tok, texts, 4)
                o, h = [], []
                for _ in range(args.repeats):
                    r, ours_toks = timed(ours_generate, ours, tok, texts, args.new_tokens, temp, compiled)
                    o.append(r)
                    r, hf_toks = timed(hf_generate, hf, tok, texts, args.new_tokens, temp)
                    h.append(r)
                same = sum(a == b[:len(a)] for a, b in zip(ours_toks, hf_toks))
                ceiling = bw * 1e9 / step_bytes(ours)  # tok/s at batch 1 if only weight reads cost
                mo, mh = statistics.median(o), statistics.median(h)
                frac = f"{mo / ceiling:>9.2f}" if batch == 1 else f"{'-':>9}"
                print(f"{dname:<6} {batch:>5} {vname:<8} {mo:>10.1f} {mh:>9.1f} {mo / mh:>5.2f}x {ceiling:>10.0f} "
                      f"{frac} {same:>6}/{batch} {sum(map(len, ours_toks)):>7} {warm:>9.1f}", flush=True)
        del hf, variants


if __name__ == "__main__":
    main()
