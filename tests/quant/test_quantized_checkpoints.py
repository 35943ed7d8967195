"""Pre-quantized hub checkpoints load into the kernel formats (store/quantized_checkpoint.py):
tiny AutoAWQ (int4 GEMM, zero points), GPTQ (v1 / v2), compressed-tensors (FP8, int4, int8) and
transformers' fine-grained FP8 (block scales) checkpoints written here from a random HF model.  Kept
quantized, each weight dequantizes to the values the checkpoint describes; loaded dense, the
logits match transformers' model holding those values."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from localsgl.engine.layers.quant import QuantizedWeight  # noqa: E402
from localsgl.engine.models.config import ModelConfig  # noqa: E402
from localsgl.engine.models.loader import load_model  # noqa: E402
from localsgl.engine.weight_estimate import estimate  # noqa: E402
from localsgl.store.quantized_checkpoint import awq_pack, awq_unpack  # noqa: E402
from localsgl.store.resolve import resolve_model  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_linear(name: str) -> bool:
    return any(f".{p}.weight" in name for p in LINEARS)


def _checkpoint_tensors(hf_model, dense_dtype: torch.dtype, quantize):
    """(checkpoint tensors, the dense values they describe) of ``hf_model``: each linear weight
    through ``quantize(w) -> ({part: tensor}, dense value)``, the rest stored in ``dense_dtype``."""
    tensors, reference = {}, {}
    for name, w in hf_model.state_dict().items():
        if not _is_linear(name):
            tensors[name] = w.to(dense_dtype)
            reference[name] = w.to(dense_dtype).float()
            continue
        parts, reference[name] = quantize(w)
        prefix = name.removesuffix(".weight")
        tensors.update({f"{prefix}.{part}": v for part, v in parts.items()})
    return tensors, reference


def _awq(w: torch.Tensor, group: int, g: torch.Generator):
    """Random AWQ tensors for a weight's shape and the dense weight they describe."""
    n, k = w.shape
    q = torch.randint(0, 16, (k, n), generator=g)
    z = torch.randint(0, 16, (k // group, n), generator=g)
    s = (torch.rand(k // group, n, generator=g) * 0.02 + 0.005).half()
    dense = ((q - z.repeat_interleave(group, 0)).float() * s.float().repeat_interleave(group, 0)).t()
    return {"qweight": awq_pack(q), "qzeros": awq_pack(z), "scales": s}, dense.contiguous()


def _write(tmp_path, hf_model, tensors: dict, qc: dict):
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf_model.config.to_dict()
    cfg["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _check(d, hf_model, reference: dict, kind: str, label: str):
    from model_utils import prefill_logits
    from test_loader import hf_logits, random_ids

    src = resolve_model(str(d), record_use=False)
    kept = load_model(src, torch.float32, "cpu", weights="keep")
    # `info --weights keep`: the linears under the format they load in, the rest at the run dtype
    est = estimate(src, ModelConfig.from_hf(src.config), "float32", "cpu", "keep")
    assert set(est.by_format) == {label, "float32"} and kept.layers[1].mlp.down_proj.weight.fmt.label() == label
    dense = load_model(src, torch.float32, "cpu", weights="dequantize")
    qkv = kept.layers[0].self_attn.qkv_proj.weight
    assert isinstance(qkv, QuantizedWeight) and qkv.fmt.kind == kind
    want = torch.cat([reference[f"model.layers.0.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(qkv.dequantize(), want)  # the checkpoint's values, exactly
    assert torch.equal(dense.layers[1].mlp.down_proj.weight, reference["model.layers.1.mlp.down_proj.weight"])
    hf_model.load_state_dict({k: v for k, v in reference.items()}, strict=False)
    ids = random_ids(20, hf_model.config.vocab_size, seed=4)
    ref = hf_logits(hf_model, ids)
    torch.testing.assert_close(prefill_logits(dense, ids), ref, atol=2e-3, rtol=0)
    torch.testing.assert_close(prefill_logits(kept, ids), ref, atol=2e-3, rtol=0)


def test_awq_pack_roundtrip():
    v = torch.randint(0, 16, (3, 24), generator=torch.Generator().manual_seed(0))
    p = awq_pack(v)
    assert p.dtype == torch.int32 and p.shape == (3, 3) and torch.equal(awq_unpack(p), v)


def test_awq_checkpoint(tmp_path):
    from test_loader import make_hf_model

    hf_model = make_hf_model("llama", seed=3)
    g = torch.Generator().manual_seed(1)
    tensors, reference = _checkpoint_tensors(hf_model, torch.float16, lambda w: _awq(w, 32, g))
    qc = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}
    _check(_write(tmp_path, hf_model, tensors, qc), hf_model, reference, "int4", "int4 g32 asym")


@pytest.mark.parametrize("scheme", ["compressed-tensors", "fp8-blocks"])
def test_fp8_checkpoint(scheme, tmp_path):
    from test_loader import make_hf_model

    hf_model = make_hf_model("llama", seed=4)
    bn, bk = 16, 32

    def quantize(w):
        if scheme == "compressed-tensors":
            s = w.abs().amax(1, keepdim=True) / 448.0
            q = (w / s).to(torch.float8_e4m3fn)
            # with a static activation scale, unused here
            return {"weight": q, "weight_scale": s, "input_scale": torch.ones(1)}, q.float() * s
        n, k = w.shape
        blocks = w.reshape(n // bn, bn, k // bk, bk)
        s = blocks.abs().amax((1, 3)) / 448.0  # [n / bn, k / bk]
        q = (blocks / s[:, None, :, None]).reshape(n, k).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale_inv": s}, \
            (q.float().reshape(n // bn, bn, k // bk, bk) * s[:, None, :, None]).reshape(n, k)

    tensors, reference = _checkpoint_tensors(hf_model, torch.bfloat16, quantize)
    if scheme == "compressed-tensors":
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                  "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}}}
    else:
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [bn, bk]}
    _check(_write(tmp_path, hf_model, tensors, qc), hf_model, reference, "fp8",
           "fp8 per-row" if scheme == "compressed-tensors" else f"fp8 g{bk}")


def _pack_words(u: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Values 0..15, eight an int32 word along ``dim``, value j at bits 4j (GPTQ's and
    compressed-tensors' packing)."""
    v = u.to(torch.int64) if dim == 1 else u.to(torch.int64).t()
    v = v.reshape(v.shape[0], -1, 8) << torch.arange(0, 32, 4, dtype=torch.int64)
    packed = v.sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed if dim == 1 else packed.t().contiguous()


def _ct_pack(values: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """compressed-tensors' int4 packing: signed values -8..7 stored + 8 (as its pack_to_int32 writes them)."""
    return _pack_words(values.to(torch.int64) + 8, dim)


@pytest.mark.parametrize("variant", ["v1-sym", "v1-asym", "v2-asym"])
def test_gptq_checkpoint(variant, tmp_path):
    """AutoGPTQ / GPTQModel int4 in groups: qweight packed down K, zero points stored minus one in
    the original format ("gptq") and as they are in "gptq_v2"; a symmetric one loads symmetric."""
    from test_loader import make_hf_model

    hf_model = make_hf_model("llama", seed=6)
    g = torch.Generator().manual_seed(3)
    group, v2, sym = 32, variant.startswith("v2"), variant.endswith("-sym")

    def quantize(w):
        n, k = w.shape
        q = torch.randint(0, 16, (k, n), generator=g)
        z = torch.full((k // group, n), 8) if sym else torch.randint(1 if not v2 else 0, 16, (k // group, n), generator=g)
        s = (torch.rand(k // group, n, generator=g) * 0.02 + 0.001).half()
        dense = ((q - z.repeat_interleave(group, 0)).float() * s.float().repeat_interleave(group, 0)).t()
        return {"qweight": _pack_words(q, dim=0), "qzeros": _pack_words(z if v2 else z - 1), "scales": s,
                "g_idx": (torch.arange(k) // group).to(torch.int32)}, dense

    tensors, reference = _checkpoint_tensors(hf_model, torch.float16, quantize)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": sym,
          "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    _check(_write(tmp_path, hf_model, tensors, qc), hf_model, reference, "int4", f"int4 g{group}" + ("" if sym else " asym"))


def test_gptq_refusals(tmp_path):
    """Activation order (a permuted g_idx), 8 bits and per-channel scales get clear errors."""
    from localsgl.store.hf import CheckpointError
    from localsgl.store.quantized_checkpoint import gptq_to_quantized, scheme_of

    for qc in ({"bits": 8, "group_size": 128}, {"bits": 4, "group_size": -1}, {"checkpoint_format": "marlin"}):
        with pytest.raises(CheckpointError, match="GPTQ checkpoints"):
            scheme_of({"quantization_config": {"quant_method": "gptq", **qc}})
    k, n = 64, 16
    parts = (_pack_words(torch.zeros(k, n, dtype=torch.int64), dim=0), _pack_words(torch.full((2, n), 7)),
             torch.ones(2, n, dtype=torch.float16))
    perm = torch.arange(k).flip(0) // 32
    with pytest.raises(CheckpointError, match="activation order"):
        gptq_to_quantized("x", *parts, perm.to(torch.int32), 1)
    assert gptq_to_quantized("x", *parts, (torch.arange(k) // 32).to(torch.int32), 1).fmt.symmetric  # z = 7 + 1


@pytest.mark.parametrize("variant", ["int4-sym", "int4-asym", "int8-channel", "int8-group-asym"])
def test_compressed_tensors_int_checkpoint(variant, tmp_path):
    """llm-compressor's W4A16 (pack-quantized, groups) and W8A16 (int-quantized) checkpoints."""
    from test_loader import make_hf_model

    hf_model = make_hf_model("llama", seed=5)
    g = torch.Generator().manual_seed(2)
    bits, group = (4, 32) if variant.startswith("int4") else (8, 0 if variant == "int8-channel" else 32)
    asym = variant.endswith("asym")
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)

    def quantize(w):
        n, k = w.shape
        groups = 1 if group == 0 else k // group
        q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int64)
        s = (torch.rand(n, groups, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
        zp = torch.randint(lo, hi, (n, groups), generator=g) if asym else torch.zeros(n, groups, dtype=torch.int64)
        per = k // groups
        dense = (q - zp.repeat_interleave(per, 1)).float() * s.float().repeat_interleave(per, 1)
        if bits == 4:
            parts = {"weight_packed": _ct_pack(q), "weight_shape": torch.tensor([n, k])}
            zero = _ct_pack(zp, dim=0)
        else:
            parts, zero = {"weight": q.to(torch.int8)}, zp.to(torch.int8)
        return {**parts, "weight_scale": s, **({"weight_zero_point": zero} if asym else {})}, dense

    tensors, reference = _checkpoint_tensors(hf_model, torch.bfloat16, quantize)
    strategy = "group" if group else "channel"
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized" if bits == 4 else "int-quantized",
          "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "num_bits": bits, "type": "int", "strategy": strategy, "group_size": group or None,
              "symmetric": not asym, "dynamic": False}}}}
    label = f"int{bits} " + (f"g{group}" if group else "per-row") + (" asym" if asym else "")
    _check(_write(tmp_path, hf_model, tensors, qc), hf_model, reference, f"int{bits}", label)


def test_compressed_tensors_packing_matches_the_reference_layout():
    """The layout _ct_pack writes (and the loader reads): value j of a row in bits 4j of its word,
    so the words' bytes are quant.py's nibble pairs (value 2i low, 2i + 1 high)."""
    from localsgl.engine.layers.quant import unpack_int4
    from localsgl.store.quantized_checkpoint import _unpack_rows_int4

    v = torch.randint(-8, 8, (16, 24), generator=torch.Generator().manual_seed(3))
    words = _ct_pack(v)
    assert words.shape == (16, 3)
    assert int(words[0, 0]) & 0xFFFFFFFF == sum(int(v[0, j] + 8) << (4 * j) for j in range(8))
    assert torch.equal(unpack_int4(words.view(torch.uint8)).to(torch.int64), v + 8)
    assert torch.equal(_unpack_rows_int4(_ct_pack(v, dim=0), 16), v)


def test_compressed_tensors_padded_int4_is_refused():
    """A weight_shape other than the packed one (in-features padded to a whole word) is an error
    that names the weight, not a silently wrong matrix."""
    from localsgl.engine.layers.quant import WeightFormat
    from localsgl.store.hf import CheckpointError
    from localsgl.store.quantized_checkpoint import _compressed_tensors_int

    t = {"x.weight_packed": _ct_pack(torch.zeros(4, 64, dtype=torch.int64)), "x.weight_scale": torch.ones(4, 2),
         "x.weight_shape": torch.tensor([4, 60])}
    with pytest.raises(CheckpointError, match="x: weight_shape"):
        _compressed_tensors_int(WeightFormat("int4", 32, True), "x", t.__getitem__, t)
    t["x.weight_shape"] = torch.tensor([4, 64])
    assert _compressed_tensors_int(WeightFormat("int4", 32, True), "x", t.__getitem__, t).shape == (4, 64)


def test_unsupported_quantization_is_a_clear_error(tmp_path):
    from localsgl.store.hf import CheckpointError
    from localsgl.store.quantized_checkpoint import scheme_of

    with pytest.raises(CheckpointError, match="bitsandbytes"):
        scheme_of({"quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(CheckpointError, match="only 4-bit GEMM"):
        scheme_of({"quantization_config": {"quant_method": "awq", "version": "gemv"}})
    assert scheme_of({}) is None
    ct = lambda weights, fmt: {"quantization_config": {  # noqa: E731
        "quant_method": "compressed-tensors", "format": fmt, "config_groups": {"g": {"weights": weights}}}}
    with pytest.raises(CheckpointError, match="not supported"):  # int4 per channel
        scheme_of(ct({"num_bits": 4, "type": "int", "strategy": "channel"}, "pack-quantized"))
    with pytest.raises(CheckpointError, match="g_idx"):
        scheme_of(ct({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "actorder": "group"},
                     "pack-quantized"))
    assert scheme_of(ct({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "actorder": "weight"},
                        "pack-quantized")) == "compressed-tensors"
