"""GGUF blocks kept quantized (store/gguf_repack.py): every repacked type dequantizes to the
gguf package's values (exactly where the scales are fp16 already, up to the fp16 rounding
of d·sc / dmin·mn for the K-quants), and a llama-architecture file (q/k rows permuted by
llama.cpp) loads kept quantized with the logits of its dequantized load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from localsgl.engine.layers.quant import QuantizedWeight, RowStack  # noqa: E402
from localsgl.store.gguf_repack import REPACKED, can_repack, repack  # noqa: E402

ROWS, COLS = 12, 512


# where each type keeps its fp16 fields (d, and dmin / m): byte offsets in a block
_FP16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q5_0": (0,), "Q5_1": (0, 2), "Q3_K": (108,),
                "Q2_K": (80, 82), "IQ4_NL": (0,), "IQ4_XS": (0,)}
EXACT = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "IQ4_NL")  # the file's fp16 scales are the kernel's


def _k_blocks(qname: str, n: int, rng) -> np.ndarray:
    """Valid random blocks (gguf-py cannot quantize most types): random bits with sane fp16 scales."""
    size = REPACKED[qname][0]
    b = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for off in _FP16_FIELDS[qname]:
        b[:, off:off + 2] = np.asarray(rng.uniform(1e-3, 2e-2, n), np.float16).view(np.uint8).reshape(n, 2)
    return b


def _blocks(qname: str, rng) -> np.ndarray:
    if qname in ("Q4_0", "Q4_1", "Q8_0"):
        return gguf.quants.quantize(rng.standard_normal((ROWS, COLS)).astype(np.float32) * 0.05, Q[qname])
    return _k_blocks(qname, ROWS * COLS // REPACKED[qname][1], rng).reshape(ROWS, -1)


@pytest.mark.parametrize("qname", list(REPACKED))
def test_repacked_values_equal_gguf_dequantization(qname):
    rng = np.random.default_rng(list(REPACKED).index(qname))
    data = _blocks(qname, rng)
    ref = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, Q[qname]), dtype=np.float32)).reshape(ROWS, COLS)
    w = repack(qname, torch.from_numpy(data.copy()), (ROWS, COLS))
    assert isinstance(w, QuantizedWeight) and w.fmt == REPACKED[qname][2] and w.shape == (ROWS, COLS)
    ours = w.dequantize()
    if qname in EXACT:
        assert torch.equal(ours, ref)  # the scales are fp16 in the file: nothing is rounded
        return
    # K-quants and IQ4_XS: only d·sc and dmin·mn are rounded, to fp16 (relative error <= 2^-11 each)
    q = w.int_values().view(ROWS, -1, w.group)
    bound = q.abs() * w.scales.float().abs()[..., None] * 2.0**-11
    if w.mins is not None:
        bound = bound + w.mins.float().abs()[..., None] * 2.0**-11
    diff = (ours - ref).abs().view_as(bound)
    assert bool((diff <= bound + 1e-7).all()), float((diff - bound).max())
    assert float(diff.max()) > 0 or qname == "Q6_K"  # the rounding is real, and the bound is what holds


@pytest.mark.parametrize("qname", ["Q5_K", "Q5_0", "Q5_1", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"])
def test_torch_dequantization_is_bit_identical_to_gguf(qname):
    """store/gguf_dequant.py dequantizes these through the repack's unpackers (on the target
    device, for ``--weights dequantize``): the same fp32 values as gguf-py's numpy code."""
    from localsgl.store import gguf_dequant

    rng = np.random.default_rng(40 + list(REPACKED).index(qname))
    data = _k_blocks(qname, ROWS * COLS // REPACKED[qname][1], rng)
    ref = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, Q[qname]), dtype=np.float32)).reshape(-1)
    ours = gguf_dequant._TORCH_DEQUANT[qname](torch.from_numpy(data.copy()))
    assert gguf.GGML_QUANT_SIZES[Q[qname]][1] == data.shape[1]  # the block bytes dequantize_tensor views by
    assert torch.equal(ours.reshape(-1), ref)


def test_repack_in_chunks_gives_the_same_tensor(monkeypatch):
    from localsgl.store import gguf_repack

    data = torch.from_numpy(_k_blocks("Q4_K", ROWS * COLS // 256, np.random.default_rng(9)).reshape(ROWS, -1))
    whole = repack("Q4_K", data, (ROWS, COLS))
    monkeypatch.setattr(gguf_repack, "_CHUNK_BLOCKS", 2)
    parts = repack("Q4_K", data, (ROWS, COLS))
    assert torch.equal(whole.qweight, parts.qweight) and torch.equal(whole.scales, parts.scales)


def test_can_repack():
    assert can_repack("Q4_K", (8, 512)) and not can_repack("Q4_K", (8, 96)) and not can_repack("IQ2_XS", (8, 512))
    assert can_repack("Q5_0", (8, 96)) and not can_repack("Q3_K", (8, 96))
    assert not can_repack("Q8_0", (512,))


@pytest.mark.parametrize("qname", ["Q4_0", "Q8_0", "Q5_0", "Q5_1"])
def test_llama_gguf_kept_quantized_matches_its_dequantized_load(qname, tmp_path):
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from model_utils import prefill_logits
    from test_gguf import write_tiny_gguf
    from test_loader import make_hf_model, random_ids

    from localsgl.engine.models.loader import load_model
    from localsgl.store.resolve import resolve_model

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, make_hf_model("llama", seed=11), "llama", Q[qname])
    src = resolve_model(str(path), record_use=False)
    dense = load_model(src, torch.float32, "cpu", weights="dequantize")
    kept = load_model(src, torch.float32, "cpu", weights="keep")
    qkv = kept.layers[0].self_attn.qkv_proj.weight
    assert isinstance(qkv, QuantizedWeight) and qkv.fmt == REPACKED[qname][2]
    assert torch.equal(qkv.dequantize(), dense.layers[0].self_attn.qkv_proj.weight)  # rows unpermuted alike
    ids = random_ids(24, src.config["vocab_size"], seed=5)
    torch.testing.assert_close(prefill_logits(kept, ids), prefill_logits(dense, ids), atol=2e-5, rtol=0)


def test_llama_gguf_with_a_wider_v_keeps_q_k_narrow(tmp_path):
    """q/k in Q4_0 and v in Q8_0 (as Q4_K_M's Q4_K q/k and Q6_K v): the fused qkv keeps q/k in
    int4 and v in int8 (a row stack), with the logits of the dequantized load."""
    pytest.importorskip("transformers")
    from model_utils import prefill_logits
    from test_gguf import write_tiny_gguf
    from test_loader import make_hf_model, random_ids

    from localsgl.engine.models.loader import load_model
    from localsgl.store.resolve import resolve_model

    path = tmp_path / "mixed.gguf"
    write_tiny_gguf(path, make_hf_model("llama", seed=12), "llama", lambda name: Q.Q8_0 if "v_proj" in name else Q.Q4_0)
    src = resolve_model(str(path), record_use=False)
    dense = load_model(src, torch.float32, "cpu", weights="dequantize")
    kept = load_model(src, torch.float32, "cpu", weights="keep")
    qkv = kept.layers[0].self_attn.qkv_proj.weight
    assert isinstance(qkv, RowStack) and [p.fmt for p in qkv.parts] == [REPACKED["Q4_0"][2], REPACKED["Q8_0"][2]]
    assert torch.equal(qkv.dequantize(), dense.layers[0].self_attn.qkv_proj.weight)
    ids = random_ids(24, src.config["vocab_size"], seed=6)
    torch.testing.assert_close(prefill_logits(kept, ids), prefill_logits(dense, ids), atol=2e-5, rtol=0)
