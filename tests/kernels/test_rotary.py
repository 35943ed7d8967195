"""apply_rotary vs the layer's reference (apply_rotary_ref) computed in fp64: q/k as strided
views of a fused qkv tensor (the model's call), GQA head counts, head_dim 64/128, Llama-3
scaled cos/sin, random positions, and a partial rotary width."""
import pytest
import torch
from kutil import DEV, ELEM_DTYPES, gen, randn, rel_err, tol

from localsgl.engine.layers.rotary import RotaryEmbedding, apply_rotary_ref
from localsgl_kernels.rotary import apply_rotary

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}


@pytest.mark.parametrize("dtype", ELEM_DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(4, 1, 64), (6, 2, 128), (3, 3, 64)])
def test_rotary_on_qkv_views(dtype, hq, hkv, d):
    g = gen(hq * d)
    T, P = 37, 2048
    rope = RotaryEmbedding(d, P, 500000.0, LLAMA3, device=DEV)
    qkv = randn(T, (hq + 2 * hkv) * d, g=g, dtype=dtype)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q = q.reshape(T, hq, d)
    k = k.reshape(T, hkv, d)
    pos = torch.randint(0, P, (T,), generator=g).to(DEV)
    rq, rk = apply_rotary_ref(q.double(), k.double(), pos, rope.cos_sin.double())
    q0 = q.clone()
    oq, ok = apply_rotary(q, k, pos, rope.cos_sin)
    assert oq.shape == q.shape and ok.shape == k.shape
    assert rel_err(oq, rq) < tol(dtype) and rel_err(ok, rk) < tol(dtype)
    assert not torch.equal(oq, q0)


def test_partial_rotary_width():
    g = gen(11)
    T, H, D, R = 9, 2, 64, 32
    cs = torch.randn(100, R, generator=g).to(DEV)
    q = randn(T, H, D, g=g)
    k = randn(T, H, D, g=g)
    pos = torch.randint(0, 100, (T,), generator=g).to(DEV)
    q0, k0 = q.clone(), k.clone()
    rq, rk = apply_rotary_ref(q0[..., :R].double(), k0[..., :R].double(), pos, cs.double())
    oq, ok = apply_rotary(q, k, pos, cs)
    assert rel_err(oq[..., :R], rq) < 1e-6 and rel_err(ok[..., :R], rk) < 1e-6
    assert torch.equal(oq[..., R:], q0[..., R:]) and torch.equal(ok[..., R:], k0[..., R:])


def test_positions_outside_the_table_are_refused_on_the_host():
    """Positions that live on the host are checked before the launch (the kernel reads the
    table unguarded); on the GPU the engine's plan keeps them in range."""
    cs = torch.randn(16, 8, device=DEV)
    q, k = torch.randn(3, 2, 8, device=DEV), torch.randn(3, 1, 8, device=DEV)
    for bad in ([0, 5, 16], [-1, 0, 1]):
        with pytest.raises(IndexError, match=r"\[0, 16\)"):
            apply_rotary(q, k, torch.tensor(bad), cs)
    apply_rotary(q, k, torch.tensor([0, 5, 15], device=DEV), cs)
