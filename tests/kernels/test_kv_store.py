"""store_kv: rows land exactly at their slots (bit-exact, with a dtype cast when the cache
dtype differs), other slots untouched, k/v as strided views."""
import pytest
import torch
from kutil import DEV, ON_GPU, gen, randn

from localsgl_kernels.kv_store import store_kv


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                               (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("hkv,d", [(1, 64), (3, 128), (2, 80)])
def test_store_kv(dtype, cache_dtype, hkv, d):
    g = gen(hkv * d)
    T, slots = 37, 200
    kc = randn(slots + 1, hkv, d, g=g, dtype=cache_dtype)
    vc = randn(slots + 1, hkv, d, g=g, dtype=cache_dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    kv = randn(T, 2 * hkv * d + 8, g=g, dtype=dtype)
    k = kv[:, : hkv * d].reshape(T, hkv, d)
    v = kv[:, hkv * d : 2 * hkv * d].reshape(T, hkv, d)
    loc = (torch.randperm(slots, generator=g)[:T] + 1).to(DEV)
    store_kv(kc, vc, loc, k, v)
    if ON_GPU or dtype == cache_dtype:
        assert torch.equal(kc[loc], k.to(cache_dtype)) and torch.equal(vc[loc], v.to(cache_dtype))
    else:  # the interpreter rounds fp32 -> bf16 by truncation: allow one ulp
        assert torch.allclose(kc[loc].float(), k.to(cache_dtype).float(), rtol=2**-7, atol=0)
        assert torch.allclose(vc[loc].float(), v.to(cache_dtype).float(), rtol=2**-7, atol=0)
    other = torch.ones(slots + 1, dtype=torch.bool, device=DEV)
    other[loc] = False
    assert torch.equal(kc[other], kc0[other]) and torch.equal(vc[other], vc0[other])
