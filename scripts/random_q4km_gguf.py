"""A GGUF in llama.cpp's Q4_K_M type layout with random K-quant blocks, for benchmarks on a
machine without llama.cpp (shared/peer builds the real one from an F16 file in ~4 minutes).

    python3 scripts/random_q4km_gguf.py OUT.gguf [--tiny]

Llama-3.1-8B shape (``--tiny``: a 4-layer model that loads in a second): Q4_K everywhere, Q6_K
for the output and for attn_v / ffn_down in the first and last eighth of the layers and every
third one between (llama.cpp's choice for Q4_K_M).  Blocks are random bits with sane fp16
scales, drawn once per type and shared by every tensor (speed does not depend on the values);
the tokenizer is "no_vocab" (engines run on token ids)."""
from __future__ import annotations

import argparse

import numpy as np

SIZE = {"Q4_K": 144, "Q6_K": 210}  # bytes per 256-value block


def _pool(t: str, nblocks: int, rng) -> np.ndarray:
    b = rng.integers(0, 256, (nblocks, SIZE[t]), dtype=np.uint8)
    f16 = lambda v: np.full(nblocks, v, np.float16).view(np.uint8).reshape(nblocks, 2)  # noqa: E731
    if t == "Q4_K":  # d, dmin
        b[:, 0:2], b[:, 2:4] = f16(2e-3), f16(1e-3)
    else:  # int8 sub-block scales, d
        b[:, 192:208] = rng.integers(-20, 20, (nblocks, 16), dtype=np.int8).view(np.uint8)
        b[:, 208:210] = f16(1e-3)
    return b


def write(path: str, tiny: bool = False) -> None:
    import gguf

    V, H, L, F, NH, NKV, D = (1024, 256, 4, 512, 4, 2, 64) if tiny else (128256, 4096, 32, 14336, 32, 8, 128)
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(131072)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_rope_dimension_count(D)
    w.add_file_type(15)  # MOSTLY_Q4_K_M
    w.add_tokenizer_model("no_vocab")
    rng = np.random.default_rng(0)
    most = max(V * H, F * H) // 256
    pools = {t: _pool(t, most, rng) for t in SIZE}
    types = {"Q4_K": gguf.GGMLQuantizationType.Q4_K, "Q6_K": gguf.GGMLQuantizationType.Q6_K}

    def add(name: str, rows: int, cols: int, t: str) -> None:
        blocks = pools[t][: rows * cols // 256]
        w.add_tensor(name, blocks.reshape(rows, cols // 256 * SIZE[t]), raw_dtype=types[t])

    ones = np.ones(H, dtype=np.float32)
    add("token_embd.weight", V, H, "Q4_K")
    w.add_tensor("output_norm.weight", ones)
    add("output.weight", V, H, "Q6_K")
    for i in range(L):
        p = f"blk.{i}."
        big = "Q6_K" if i < L // 8 or i >= 7 * L // 8 or (i - L // 8) % 3 == 2 else "Q4_K"
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "ffn_norm.weight", ones)
        add(p + "attn_q.weight", H, H, "Q4_K")
        add(p + "attn_k.weight", NKV * D, H, "Q4_K")
        add(p + "attn_v.weight", NKV * D, H, big)
        add(p + "attn_output.weight", H, H, "Q4_K")
        add(p + "ffn_gate.weight", F, H, "Q4_K")
        add(p + "ffn_up.weight", F, H, "Q4_K")
        add(p + "ffn_down.weight", H, F, big)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    write(a.out, a.tiny)
    print("written", a.out)
