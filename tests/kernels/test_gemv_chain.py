"""The one-launch layer tail (kernels/gemv_chain.py) against the separate one-row kernels
of kernels/gemv.py run one after another (themselves checked against fp64 references in
test_gemv.py): o_proj → add+norm+gate_up → down, with and without the next layer's
add+norm+qkv+rotary+KV store; and a launch's counters end at every stage's program count."""
import pytest
import torch
from kutil import DEV, ELEM_DTYPES, ON_GPU, gen, randn, rel_err, tol

from localsgl.engine.layers.rotary import RotaryEmbedding
from localsgl_kernels import gemv as G
from localsgl_kernels import gemv_chain as C

# (hq, hkv, d, hidden, intermediate)
SHAPES = [(4, 2, 16, 64, 96), (6, 2, 16, 96, 64)] if not ON_GPU else [(32, 8, 128, 4096, 14336), (12, 2, 64, 1536, 8960)]


def _weights(hq, hkv, d, h, i, dtype, g, bias):
    s = lambda k: k**-0.5  # noqa: E731
    return dict(
        a=randn(1, hq * d, g=g, dtype=dtype), res=randn(1, h, g=g, dtype=dtype),
        wo=randn(h, hq * d, g=g, dtype=dtype, scale=s(hq * d)), ln2=(1 + 0.1 * randn(h, g=g)).to(dtype),
        wgu=randn(2 * i, h, g=g, dtype=dtype, scale=s(h)), wd=randn(h, i, g=g, dtype=dtype, scale=s(i)),
        ln1=(1 + 0.1 * randn(h, g=g)).to(dtype), wqkv=randn((hq + 2 * hkv) * d, h, g=g, dtype=dtype, scale=s(h)),
        bias=randn((hq + 2 * hkv) * d, g=g, dtype=dtype, scale=0.1) if bias else None,
    )


@pytest.mark.parametrize("dtype", ELEM_DTYPES)
@pytest.mark.parametrize("hq,hkv,d,h,i", SHAPES)
@pytest.mark.parametrize("with_next,bias", [(False, False), (True, False), (True, True)])
def test_layer_tail_matches_separate_kernels(dtype, hq, hkv, d, h, i, with_next, bias):
    g = gen(hq * 100 + h + with_next * 3 + bias)
    w = _weights(hq, hkv, d, h, i, dtype, g, bias)
    assert C.layer_tail_supported(h, hq * d, i, d, torch.device(DEV).type)
    rope = RotaryEmbedding(d, 300, 10000.0, None, device=DEV)
    pos = torch.tensor([123], device=DEV)
    loc = torch.tensor([3], device=DEV)
    kc, vc = randn(6, hkv, d, g=g, dtype=dtype), randn(6, hkv, d, g=g, dtype=dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()

    hh = G.gemv(w["a"], w["wo"])
    act, r_mid = G.norm_gate_up(hh, w["res"], w["ln2"], 1e-5, w["wgu"])
    x = G.gemv(act, w["wd"])
    cnt = torch.zeros(4, dtype=torch.int32, device=DEV)
    nxt = None
    if with_next:
        q_ref, r_ref = G.norm_qkv(x, r_mid, w["ln1"], 1e-6, w["wqkv"], w["bias"], rope.cos_sin, pos, loc,
                                  kc_ref, vc_ref, hq, hkv)
        nxt = (w["ln1"], 1e-6, w["wqkv"], w["bias"], rope.cos_sin, pos, loc, kc, vc, hq, hkv)
    out, r = C.layer_tail(w["a"], w["res"], w["wo"], w["ln2"], 1e-5, w["wgu"], w["wd"], cnt, nxt)
    t = 2 * tol(dtype)
    if with_next:
        assert out.shape == (1, hq, d) and r.shape == (1, h)
        assert rel_err(out, q_ref) < t and rel_err(r, r_ref) < t
        assert rel_err(kc, kc_ref) < t and rel_err(vc, vc_ref) < t
    else:
        assert out.shape == (1, h) and r.shape == (1, h)
        assert rel_err(out, x) < t and rel_err(r, r_mid) < t
    t_o, t_gu, t_d = (C._tile(k, n, kk, torch.device(DEV).type) for k, n, kk in
                      (("gemv", h, hq * d), ("gate_up", i, h), ("gemv", h, i)))
    n_o, n_gu, n_d = h // (2 * t_o.block_r), i // t_gu.block_r, h // (2 * t_d.block_r)
    n_qkv = (hq + 2 * hkv) * d // (2 * C._tile("qkv", d // 2, h, torch.device(DEV).type).block_r) if with_next else 0
    assert cnt.tolist() == [n_o + n_gu + n_d + n_qkv, n_o, n_gu, n_d if with_next else 0]
