"""GPU correctness: tiny random models of every family in bf16 against transformers'
fp32 reference, greedy parity in fp32, and identical greedy outputs with CUDA graphs
and overlap on or off."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from model_utils import hf_greedy, prefill_logits  # noqa: E402

from localsgl import Engine, SamplingParams  # noqa: E402
from localsgl.engine.debug_switches import DebugSwitches  # noqa: E402
from localsgl.engine.models.loader import load_model  # noqa: E402
from localsgl.store.resolve import resolve_model  # noqa: E402


def _families():
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 128}
    return {
        "llama3": (LlamaConfig(**common, rope_scaling=llama3), LlamaForCausalLM),
        "mistral": (MistralConfig(**common), MistralForCausalLM),
        "qwen2": (Qwen2Config(**common, tie_word_embeddings=True), Qwen2ForCausalLM),
        "qwen3": (Qwen3Config(**common, head_dim=64), Qwen3ForCausalLM),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    torch.manual_seed(0)
    for name, (cfg, cls) in _families().items():
        m = cls(cfg).eval()
        d = tmp_path_factory.mktemp(name)
        m.save_pretrained(d)
        out[name] = (str(d), m)
    return out


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_logits_close_to_fp32_reference(saved, family, backend):
    if backend == "triton":
        pytest.importorskip("localsgl.engine.layers.attention.triton_backend")
    d, hf = saved[family]
    ours = load_model(resolve_model(d), torch.bfloat16, torch.device("cuda"))
    ids = torch.randint(0, 512, (300,)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double()
    got = prefill_logits(ours, ids, backend=backend, chunks=[100, 1, 199]).double().cpu()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 1e-2, rel




def test_fp32_greedy_matches_transformers(saved):
    d, hf = saved["llama3"]
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 40, 130)]
    with Engine(model=d, device="cuda", dtype="float32", attention_backend="torch", kv_memory="64MiB") as e:
        outs = e.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 24)


def test_graphs_and_overlap_do_not_change_greedy(saved):
    """Decode graphs, piecewise graphs and overlap change no token.  In fp32: a graph pads the
    batch to its bucket, and cuBLAS may pick another kernel for the padded shape, whose bf16 sums
    round differently and can flip a near tie of a random model's greedy choice; fp32 sums differ
    by ~1e-7 of that, while a stale input buffer or a replay of the wrong graph changes tokens
    outright."""
    d, _ = saved["qwen3"]
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (3, 17, 64, 200, 9, 33)]
    p = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    results = {}
    for graphs in (True, False):
        for overlap in (True, False):
            with Engine(model=d, device="cuda", dtype="float32", kv_memory="64MiB",
                        disable_cuda_graph=not graphs, disable_overlap=not overlap,
                        debug_switches=DebugSwitches(piecewise_graphs=graphs)) as e:
                results[(graphs, overlap)] = [o.token_ids for o in e.generate(prompts, p)]
    base = results[(False, False)]
    for k, v in results.items():
        assert v == base, k


def test_cascade_decode_matches_plain_decode(saved, monkeypatch):
    """Rows sharing a 600-token cached prefix decode through the shared-prefix stage (checked
    to have fired) and give the same greedy tokens as plain decode and as transformers."""
    import localsgl.engine.prefix_groups as pg

    d, hf = saved["llama3"]
    shared = torch.randint(0, 512, (600,)).tolist()
    prompts = [shared + torch.randint(0, 512, (n,)).tolist() for n in (1, 5, 17, 40, 3, 9, 64, 2)]
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    fired = []
    real = pg.shared_prefix_groups

    def spy(*a, **k):
        out = real(*a, **k)
        fired.append(len(out))
        return out

    monkeypatch.setattr(pg, "shared_prefix_groups", spy)
    results = {}
    for cascade in (True, False):
        fired.clear()
        with Engine(model=d, device="cuda", dtype="float32", kv_memory="256MiB",
                    debug_switches=DebugSwitches(cascade=cascade)) as e:
            results[cascade] = [o.token_ids for o in e.generate(prompts, p)]
        if cascade:
            assert max(fired, default=0) >= 1, "no step used the shared-prefix stage"
    assert results[True] == results[False]
    for prompt, toks in zip(prompts[:3], results[True]):
        assert toks == hf_greedy(hf, prompt, 24)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_fused_one_token_decode_matches_transformers(saved, family, monkeypatch):
    """Batch-1 decodes run the fused one-token forward (checked to have fired, with and
    without CUDA graphs) and give transformers' greedy tokens in fp32; bf16 greedy tokens
    with the path on and off agree on the first steps."""
    import localsgl.engine.layers.fused_decode as fd
    import localsgl.engine.models.llama as llama

    d, hf = saved[family]
    calls = []
    real = fd.forward_one_token
    monkeypatch.setattr(llama, "forward_one_token", lambda *a: calls.append(1) or real(*a))
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (7, 150)]
    for graphs in (True, False):
        calls.clear()
        with Engine(model=d, device="cuda", dtype="float32", kv_memory="64MiB", disable_cuda_graph=not graphs) as e:
            outs = [e.generate([pr], p)[0].token_ids for pr in prompts]  # one at a time: batch 1
        assert calls, "the fused one-token path did not run"
        for pr, o in zip(prompts, outs):
            assert o == hf_greedy(hf, pr, 24)
    res = {}
    for fused in (True, False):
        with Engine(model=d, device="cuda", dtype="bfloat16", kv_memory="64MiB",
                    debug_switches=DebugSwitches(fused_decode=fused)) as e:
            res[fused] = [e.generate([pr], p)[0].token_ids for pr in prompts]
    for a, b in zip(res[True], res[False]):
        assert a[:4] == b[:4]


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_pdl_does_not_change_tokens(saved, family):
    """Programmatic dependent launch only moves launches earlier: bf16 greedy tokens with it
    on and off are identical, at batch 1 (the fused chain, in CUDA graphs and eagerly) and at
    batch 4 (split-KV attention)."""
    from localsgl_kernels import pdl

    if torch.cuda.get_device_capability()[0] >= 9:  # a broken driver-version read would turn PDL off silently
        assert pdl._driver_version() > 0, "could not read the CUDA driver version (libcuda.so.1)"
    if not pdl.enabled(torch.device("cuda")):
        pytest.skip("PDL needs compute capability 9.0, a CUDA 12.3+ driver and a Triton with the launch_pdl option")
    d, _ = saved[family]
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 90, 300, 33)]
    res = {}
    for on in (True, False):
        for graphs in (True, False):
            with Engine(model=d, device="cuda", dtype="bfloat16", kv_memory="64MiB",
                        disable_cuda_graph=not graphs, debug_switches=DebugSwitches(pdl=on)) as e:
                # every bucket's graph first: a step that finds its bucket still being captured in the
                # background runs eagerly or in a larger padded graph, whose bf16 sums may round
                # differently; that timing, not PDL, would then decide a near tie of the random model
                e.wait_graphs()
                one = [e.generate([pr], p)[0].token_ids for pr in prompts]
                batch = [o.token_ids for o in e.generate(prompts, p)]
            res[(on, graphs)] = (one, batch)
    for graphs in (True, False):
        assert res[(True, graphs)] == res[(False, graphs)]


def test_fp8_fp16_products_keep_the_first_tokens(tmp_path, monkeypatch):
    """fp8 weights, batch 1: the dense GEMVs' e4m3 x fp16 products (checked to have run: at hidden
    1,024 every full-K tile gives a thread 16 columns, gemv.fp16_products) give the first greedy
    tokens of their fp32 products (the fp16_products debug switch off) and of the layer path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from localsgl_kernels import gemv as G

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path)
    routes = []
    real = G.fp16_products
    monkeypatch.setattr(G, "fp16_products", lambda *a: routes.append(real(*a)) or routes[-1])
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (7, 150)]
    res = {}
    for name, debug in (("fp16", DebugSwitches()), ("fp32", DebugSwitches(fp16_products=False)),
                        ("layers", DebugSwitches(fused_decode=False))):
        routes.clear()
        with Engine(model=str(tmp_path), device="cuda", dtype="bfloat16", kv_memory="64MiB", quantization="fp8",
                    debug_switches=debug) as e:
            res[name] = [e.generate([pr], p)[0].token_ids for pr in prompts]  # one at a time: batch 1
        if name != "layers":
            assert routes and any(routes) == (name == "fp16"), name
    for a, b, c in zip(res["fp16"], res["fp32"], res["layers"]):
        assert a[:4] == b[:4] == c[:4]


def test_attention_int8_epilogue_does_not_change_tokens(saved, monkeypatch):
    """int4 weights, batch 1: o_proj's int8 activations written by the decode attention's merge
    (checked to have been used) give the greedy tokens of their own preparation launch, with CUDA
    graphs and eagerly."""
    from localsgl_kernels import quant_gemv as QG

    d, _ = saved["llama3"]
    filled = []
    real = QG.gemv
    monkeypatch.setattr(QG, "gemv", lambda *a, prepared=None, **k: filled.append(bool(prepared and prepared.filled))
                        or real(*a, prepared=prepared, **k))
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    torch.manual_seed(2)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (6, 200)]
    res = {}
    for on in (True, False):
        for graphs in (True, False):
            filled.clear()
            with Engine(model=d, device="cuda", dtype="bfloat16", kv_memory="64MiB", quantization="int4",
                        disable_cuda_graph=not graphs,
                        debug_switches=DebugSwitches(attention_int8_epilogue=on)) as e:
                res[on, graphs] = [e.generate([pr], p)[0].token_ids for pr in prompts]
            assert any(filled) == on, (on, graphs)
    assert res[True, True] == res[False, True] and res[True, False] == res[False, False]


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_l2_prefetch_does_not_change_tokens(saved, monkeypatch, quantization):
    """Batch 1: the decode attention prefetching o_proj's weights into L2 (l2_prefetch.BEFORE_O_PROJ
    on; checked to have been asked for, all of o_proj's bytes) gives the greedy tokens of the step
    without it (the l2_prefetch debug switch off), bit for bit (a prefetch moves no value), with
    CUDA graphs and eagerly."""
    from localsgl_kernels import decode_attention as dec
    from localsgl_kernels import l2_prefetch

    monkeypatch.setattr(l2_prefetch, "BEFORE_O_PROJ", True)

    d, _ = saved["llama3"]
    asked = []
    real = dec.decode_attention
    monkeypatch.setattr(dec, "decode_attention", lambda *a, prefetch=(), **k: asked.append(
        sum(n for _, n in prefetch)) or real(*a, prefetch=prefetch, **k))
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    torch.manual_seed(4)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (6, 200)]
    res = {}
    for on in (True, False):
        for graphs in (True, False):
            asked.clear()
            with Engine(model=d, device="cuda", dtype="bfloat16", kv_memory="64MiB", quantization=quantization,
                        disable_cuda_graph=not graphs, debug_switches=DebugSwitches(l2_prefetch=on),
                        in_process=True) as e:  # in process: the patched kernel module and e.model
                w = e.model.layers[0].self_attn.o_proj.weight
                size = sum(t.numel() * t.element_size() for t in ((w.qweight, w.scales, w.mins) if quantization
                                                                   else (w,)) if t is not None)
                res[on, graphs] = [e.generate([pr], p)[0].token_ids for pr in prompts]
            assert (size in asked) == on and all(n in (0, size) for n in asked), (on, graphs, size, set(asked))
    assert res[True, True] == res[False, True] and res[True, False] == res[False, False]
