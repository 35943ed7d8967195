"""The memory plan with quantized weights: an 8B model in int4 under --gpu-memory 8GiB plans
at least 8k tokens of KV (the bf16 one is refused with advice that is now true), the estimate
of a GGUF Q4_K_M layout kept quantized stays within 1.2x of the file's tensor bytes, and
`info` shows the format and the bytes."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from localsgl import cli
from localsgl.engine.layers import quant
from localsgl.engine.models.config import ModelConfig
from localsgl.engine.plan import DeviceInfo, PlanError, gpu_running_cap, make_plan
from localsgl.engine.weight_estimate import _total, estimate
from localsgl.store.gguf_repack import REPACKED
from localsgl.store.resolve import resolve_model

GiB = 1 << 30
H200 = DeviceInfo(kind="cuda", name="H200", total_memory=140 * GiB, free_memory=139 * GiB, sm_count=132,
                  capability=(9, 0), bf16=True)


@pytest.fixture(scope="module")
def llama8b():
    src = resolve_model("llama-3.1-8b", load_format="dummy", record_use=False)
    return src, ModelConfig.from_hf(src.config)


def test_8b_int4_fits_8gib_with_8k_tokens_of_kv(llama8b):
    src, cfg = llama8b
    est = estimate(src, cfg, "bfloat16", "cuda", "keep", "int4")
    assert 4.3 * GiB < est.total_bytes < 5 * GiB  # int4 g128 layers + the bf16 embedding
    plan = make_plan(cfg, H200, "bfloat16", gpu_memory="8GiB", weights_bytes=est.total_bytes, weights_quantized=est.quantized)
    assert plan.kv_tokens >= 8192 and plan.max_running == gpu_running_cap(8 * GiB) == 64
    assert plan.weights_bytes + plan.kv_bytes + plan.activation_reserve_bytes < 8 * GiB
    with pytest.raises(PlanError, match="quantization int4"):
        make_plan(cfg, H200, "bfloat16", gpu_memory="8GiB")  # bf16: 15 GiB of weights


def test_the_plan_counts_the_prefill_dense_copy_of_quantized_weights(llama8b):
    """From DEQUANT_MIN_ROWS rows a quantized GEMM dequantizes the weight for cuBLAS: the
    activation reserve holds the largest such copy (gate/up, 224 MiB for 8B) when a prefill chunk
    is that long, and nothing for dense weights or shorter chunks."""
    from localsgl.engine.plan import _activation_bytes

    src, cfg = llama8b
    est = estimate(src, cfg, "bfloat16", "cuda", "keep", "int4")
    plan = make_plan(cfg, H200, "bfloat16", gpu_memory="8GiB", weights_bytes=est.total_bytes, weights_quantized=est.quantized)
    base = _activation_bytes(cfg, plan.chunk_size, plan.max_running, 2, 1)
    assert plan.chunk_size >= 1024 and plan.activation_reserve_bytes - base == 2 * 14336 * 4096 * 2
    short = make_plan(cfg, H200, "bfloat16", gpu_memory="8GiB", weights_bytes=est.total_bytes, weights_quantized=est.quantized, chunk_size=512)
    assert short.activation_reserve_bytes == _activation_bytes(cfg, 512, short.max_running, 2, 1)
    dense = make_plan(cfg, H200, "bfloat16", gpu_memory="24GiB")
    assert dense.activation_reserve_bytes == _activation_bytes(cfg, dense.chunk_size, dense.max_running, 2, 1)
    # the flag, not the byte count, says the weights stay quantized
    assert est.quantized and not _total([("model.norm.weight", (4096,), None)], None, 2, "bfloat16").quantized
    unflagged = make_plan(cfg, H200, "bfloat16", gpu_memory="8GiB", weights_bytes=est.total_bytes)
    assert unflagged.activation_reserve_bytes == base
    # the graphs' logits: the shared fp32 buffer and the largest step's own bf16 ones, per vocabulary entry
    import copy

    wide = copy.copy(cfg)
    wide.vocab_size = cfg.vocab_size + 1000
    for kw in (dict(gpu_memory="8GiB", weights_bytes=est.total_bytes, weights_quantized=est.quantized), dict(gpu_memory="24GiB")):
        a, b = make_plan(cfg, H200, "bfloat16", **kw), make_plan(wide, H200, "bfloat16", **kw)
        assert a.max_running == b.max_running
        assert b.graph_reserve_bytes - a.graph_reserve_bytes == a.max_running * 1000 * (4 + 2)
    assert make_plan(cfg, H200, "bfloat16", gpu_memory="24GiB", cuda_graph=False).graph_reserve_bytes == 0


def _q4_k_m_entries(cfg):
    """llama.cpp's Q4_K_M choice of types for a Llama model: Q4_K, with attn_v and ffn_down in
    Q6_K for the first and last eighth of the layers and every third one between, output Q6_K."""
    h, i, d, L = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
    more = lambda j: j < L // 8 or j >= 7 * L // 8 or (j - L // 8) % 3 == 2  # noqa: E731
    out = [("model.embed_tokens.weight", (cfg.vocab_size, h), "Q4_K"), ("lm_head.weight", (cfg.vocab_size, h), "Q6_K")]
    for j in range(L):
        p = f"model.layers.{j}."
        big = "Q6_K" if more(j) else "Q4_K"
        out += [(p + "self_attn.q_proj.weight", (cfg.num_heads * d, h), "Q4_K"),
                (p + "self_attn.k_proj.weight", (cfg.num_kv_heads * d, h), "Q4_K"),
                (p + "self_attn.v_proj.weight", (cfg.num_kv_heads * d, h), big),
                (p + "self_attn.o_proj.weight", (h, cfg.num_heads * d), "Q4_K"),
                (p + "mlp.gate_proj.weight", (i, h), "Q4_K"), (p + "mlp.up_proj.weight", (i, h), "Q4_K"),
                (p + "mlp.down_proj.weight", (h, i), big)]
    return out


def test_q4_k_m_kept_quantized_stays_close_to_its_tensor_bytes(llama8b, monkeypatch):
    """Llama-3.1-8B in Q4_K_M: 4.91 GB of tensors, 5.78 GB kept quantized here (1.18x; the issue
    asks for <= 1.2x).  The excess: 4.5-bit Q4_K -> 5-bit int4 g32 with fp16 scale and offset
    (+0.38 GB) and 6.6-bit Q6_K -> 9-bit int8 g16 (+0.45 GB).  The 16 layers whose v is Q6_K
    keep q/k in int4 and v in int8 (a row stack); joined, q/k/v would all take int8 g16 with
    offsets (+0.26 GB, 1.22x)."""
    _, cfg = llama8b
    entries = _q4_k_m_entries(cfg)
    file_bytes = sum(n * k // REPACKED[t][1] * REPACKED[t][0] for _, (n, k), t in entries)
    ours = _total([(name, shape, REPACKED[t][2]) for name, shape, t in entries], None, 2, "bfloat16")
    assert set(ours.by_format) == {"int4 g32 asym", "int8 g16"}  # a Q6_K v does not widen q/k
    assert 1.1 < ours.total_bytes / file_bytes <= 1.2, ours.total_bytes / file_bytes
    # a checkpoint's own order (safetensors lists names sorted: k_proj before q_proj) changes nothing
    shuffled = sorted(((name, shape, REPACKED[t][2]) for name, shape, t in entries), key=lambda e: e[0])
    assert _total(shuffled, None, 2, "bfloat16") == ours
    # q/k/v joined instead (a joined format may cost any overhead): over the bound
    monkeypatch.setattr(quant, "_JOIN_OVERHEAD", float("inf"))
    joined = _total([(name, shape, REPACKED[t][2]) for name, shape, t in entries], None, 2, "bfloat16")
    assert "int8 g16 asym" in joined.by_format and joined.total_bytes / file_bytes > 1.2


def test_info_shows_the_format_and_bytes():
    r = CliRunner().invoke(cli.app, ["info", "-m", "llama-3.1-8b", "--load-format", "dummy", "--device", "cpu",
                                     "--quantization", "int4", "--dtype", "bfloat16", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["model"]
    assert m["weights_bytes"] == sum(m["weights_format"].values()) and "int4 g128 asym" in m["weights_format"]
    r = CliRunner().invoke(cli.app, ["info", "-m", "llama-3.1-8b", "--load-format", "dummy", "--device", "cpu",
                                     "--quantization", "int4", "--dtype", "bfloat16"])
    assert "int4 g128 asym" in r.stdout


def test_show_plans_quantized_weights_as_info_and_the_engine_do(monkeypatch):
    """`localsgl show`, `localsgl info` and the engine plan through plan_options with the load's
    weight estimate: on a GPU the embedded Q4_1 file stays quantized (the default there), so
    `show` counts its quantized bytes, not a dense copy's, and its plan is info's."""
    import localsgl.engine.plan as plan_mod
    from localsgl.cli_info import _info_report
    from localsgl.store.manage import show_model

    from localsgl_kernels import quant_tiles

    monkeypatch.setattr(plan_mod, "detect_device", lambda device=None: H200)
    monkeypatch.setattr(quant_tiles, "tiles_summary", lambda index: {})  # no GPU to ask here
    shown = show_model("smollm2-135m")["plan"]
    src = resolve_model("smollm2-135m", record_use=False)
    cfg = ModelConfig.from_hf(src.config)
    est = estimate(src, cfg, "bfloat16", "cuda")
    assert est is not None and est.quantized and shown["dtype"] == "bfloat16"
    assert shown["weights_bytes"] == est.total_bytes < plan_mod.weights_bytes_for(cfg, "bfloat16")
    info = _info_report(dict(model="smollm2-135m"))["plan"]
    assert shown == info
