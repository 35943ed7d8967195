"""The CPU fast paths of the model layers against their references: fused fp32 RMSNorm and
the one-table rotary give the reference's exact bits; input-major Linear weights keep
names, shapes and results; the tied-head copy is used for logits."""
import sys

import torch

from localsgl.engine.layers.linear import Linear, MergedLinear, linear, use_cpu_weight_layout
from localsgl.engine.layers.norm import RMSNorm, rms_norm_ref
from localsgl.engine.layers.rotary import RotaryEmbedding, apply_rotary_ref

sys.path.insert(0, "tests")


def test_rmsnorm_fp32_bits_equal_reference():
    g = torch.Generator().manual_seed(0)
    for h in (64, 576, 960):
        norm = RMSNorm(h, 1e-5)
        norm.weight.data = torch.randn(h, generator=g)
        for scale in (1e-3, 1.0, 1e3):
            x = torch.randn(5, h, generator=g) * scale
            r = torch.randn(5, h, generator=g)
            assert torch.equal(norm(x), rms_norm_ref(x, norm.weight, 1e-5))
            y, s = norm(x, r)
            assert torch.equal(s, x + r) and torch.equal(y, rms_norm_ref(x + r, norm.weight, 1e-5))
    nb = RMSNorm(64, 1e-5, dtype=torch.bfloat16)  # other dtypes: the reference itself
    xb = torch.randn(3, 64, generator=g).bfloat16()
    assert torch.equal(nb(xb), rms_norm_ref(xb, nb.weight, 1e-5))


def test_rotary_tables_bits_equal_reference():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    rope = RotaryEmbedding(64, 512, 500000.0, llama3)
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, 512, (7,), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(7, 6, 64, generator=g).to(dtype)
        k = torch.randn(7, 2, 64, generator=g).to(dtype)
        rope.begin_forward()
        oq, ok = rope(pos, q, k)
        rq, rk = apply_rotary_ref(q, k, pos, rope.cos_sin)
        assert torch.equal(oq, rq) and torch.equal(ok, rk)
    # the tables are rebuilt for a new positions tensor, and after begin_forward
    pos2 = pos + 1
    q = torch.randn(7, 6, 64, generator=g)
    k = torch.randn(7, 2, 64, generator=g)
    assert torch.equal(rope(pos2, q, k)[0], apply_rotary_ref(q, k, pos2, rope.cos_sin)[0])


def test_input_major_linear_weights():
    g = torch.Generator().manual_seed(2)
    lin = Linear(48, 80, bias=True)
    merged = MergedLinear(48, {"a": 16, "b": 32})
    for p in (lin.weight, lin.bias, merged.weight):
        p.data = torch.randn(p.shape, generator=g)
    x1, x8 = torch.randn(1, 48, generator=g), torch.randn(8, 48, generator=g)
    before = [m(x) for m in (lin, merged) for x in (x1, x8)]
    model = torch.nn.ModuleDict({"lin": lin, "merged": merged})
    use_cpu_weight_layout(model)
    assert lin.weight.shape == (80, 48) and lin.weight.stride() == (1, 80)
    after = [m(x) for m in (lin, merged) for x in (x1, x8)]
    for a, b in zip(before, after):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(linear(x8, lin.weight, lin.bias), x8 @ lin.weight.t() + lin.bias, atol=1e-5)


def _tied_model():
    from tiny import tiny_model

    from localsgl.engine.models.llama import LlamaForCausalLM

    cfg = tiny_model(vocab=96, hidden=32).config
    cfg.tie_word_embeddings = True
    torch.manual_seed(3)
    m = LlamaForCausalLM(cfg, torch.float32, "cpu")
    for p in m.parameters():
        p.data.copy_(torch.randn(p.shape) * 0.3)
    return m


def test_tied_head_copy_gives_same_logits():
    m = _tied_model()
    assert m.lm_head is None
    h = torch.randn(3, 32)
    ref = m.compute_logits(h)
    use_cpu_weight_layout(m)
    assert m.lm_head_weight_cpu is not None and m.lm_head_weight_cpu.stride() == (1, 96)
    assert torch.allclose(m.compute_logits(h), ref, atol=1e-5)
    m2 = _tied_model()
    use_cpu_weight_layout(m2, max_head_copy_bytes=0)  # too big to copy: the embedding serves
    assert m2.lm_head_weight_cpu is None and torch.allclose(m2.compute_logits(h), ref, atol=1e-5)


def test_loader_applies_the_cpu_layout():
    """load_model on the CPU leaves every Linear input-major and gives a tied head its copy."""
    from localsgl.engine.models.loader import load_model
    from localsgl.store.resolve import resolve_model

    m = load_model(resolve_model("smollm2-135m"), torch.float32, "cpu")
    lins = [mod for mod in m.modules() if isinstance(mod, Linear)]
    assert lins and all(mod.weight.stride(0) == 1 for mod in lins)
    assert m.lm_head is None and m.lm_head_weight_cpu is not None
    assert torch.equal(m.lm_head_weight_cpu, m.embed_tokens.weight)
