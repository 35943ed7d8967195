"""The int4 x int8-activation GEMM (kernels/quant_a8.py): the preparation against torch's
rounding of each group, and the kernel against the fp64 product of the dequantized weight with
x̂ read back from that preparation (the int8 dots' integer sums leave only the fp32 scaling's
rounding); against x itself, off by x̂'s rounding."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kutil import DEV, ON_GPU, assert_route_declines, gen, randn, rel_err
from test_quant_int8act import DTYPE, TOL, _qw

from localsgl.engine.layers.quant import WeightFormat
from localsgl_kernels import quant_a8 as QA
from localsgl_kernels import quant_gemm as QM

FORMATS = [WeightFormat("int4", 128, False), WeightFormat("int4", 128, True), WeightFormat("int4", 64, False)]
IDS = [f.label().replace(" ", "-") for f in FORMATS]
ROOT = Path(__file__).resolve().parents[2]


def _xhat(xq, dx, group):
    """x̂ [M, K] in fp64 from the preparation: each group's even-column plane, then its odd one."""
    M, K = xq.shape
    planes = xq.double().cpu().view(M, K // group, 2, group // 2)
    q = torch.stack([planes[:, :, 0], planes[:, :, 1]], dim=-1).reshape(M, K // group, group)
    return (q * dx.double().cpu()[:, :, None]).reshape(M, K)


@pytest.mark.parametrize("group", [64, 128])
def test_preparation(group):
    g = gen(101)
    k = 512 if not ON_GPU else 4096
    x = randn(5, k, g=g, dtype=DTYPE) * torch.linspace(0.1, 4, k, device=DEV)
    x[1, group: 2 * group] = 0  # an all-zero group
    xq, dx, xsum = QA.prepare(x, group)
    xg = x.double().cpu().view(5, k // group, group)
    amax = xg.abs().amax(-1)
    assert torch.allclose(dx.double().cpu(), amax / 127, rtol=1e-6) and float(dx[1, 1]) == 0
    xh = _xhat(xq, dx, group)
    q = xh.view(5, k // group, group) / dx.double().cpu().clamp_min(1e-30)[:, :, None]
    # round to nearest: every q within half a step of x / dx (a tie or the last ulp may go either way)
    want = xg / dx.double().cpu().clamp_min(1e-30)[:, :, None]
    assert float((q - want).abs().max()) <= 0.5 + 1e-4 and float(q.abs().max()) <= 127
    assert torch.allclose(xsum.double().cpu(), xh.view(5, k // group, group).sum(-1), rtol=1e-5, atol=1e-6)
    # scripts/int8act_quality.py --chunk rounds as this preparation does (what its figures measure)
    spec = importlib.util.spec_from_file_location("int8act_quality", ROOT / "scripts" / "int8act_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    script = mod.round_chunks(x.float().cpu(), group).double()
    if not ON_GPU:  # the GPU's fp32 division is correct to 2 ulp, and a tie may round the other way there
        assert torch.equal(script, xh.float().double())  # q·dx rounded as an fp32 product is


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("rows", [16, 37])
def test_matmul(fmt, rows):
    g = gen(103 + rows)
    n, k = (64, 512) if not ON_GPU else (4096, 14336)
    w = _qw(n, k, fmt, g)
    x = randn(rows, k, g=g, dtype=DTYPE)
    configs = ((QA.Config(16, 32), QA.Config(32, 64, swap_ab=1, split_k=2)) if not ON_GPU else
               (QA.Config(64, 64), QA.Config(16, 128, swap_ab=1), QA.Config(64, 64, 8, 3, 1, 4)))
    xq, dx, _ = QA.prepare(x, w.group)
    ref = _xhat(xq, dx, w.group).to(DEV) @ w.dequantize(torch.float64).t()
    for cfg in configs:
        assert QA.applies(w, rows, cfg)
        y = QA.matmul(x, w, cfg)
        assert y.shape == (rows, n) and y.dtype == DTYPE
        assert rel_err(y, ref) < TOL, cfg
        # against the unquantized activations: off by the activations' rounding only
        assert rel_err(y, x.double() @ w.dequantize(torch.float64).t()) < 2e-2


def test_applies():
    g = gen(107)
    w = _qw(64, 256, WeightFormat("int4", 128, False), g)
    cfg = QA.Config(16, 32)
    assert QA.applies(w, 16, cfg) and QA.applies(w, 300, cfg)
    assert not QA.applies(w, 8, cfg)  # fewer than 16 rows: the few-row kernel or the GEMM
    assert not QA.applies(w, 16, None)
    assert not QA.applies(w, 16, QA.Config(16, 48))  # 64 rows are not whole blocks of 48
    assert not QA.applies(w, 16, QA.Config(16, 32, split_k=4))  # 2 groups do not cut in 4
    assert not QA.applies(_qw(64, 256, WeightFormat("int4", 32, False), g), 16, cfg)  # half dots of K = 16
    assert not QA.applies(_qw(64, 256, WeightFormat("int8", 128, True), g), 16, cfg)


def test_tuned_config_routes_only_where_an_entry_applies(monkeypatch):
    """The route is taken on CUDA where the tuned file has an "a8" entry at the batch's bucket
    (16, 64) that applies, and never for a weight whose activations must stay exact."""
    g = gen(109)
    w = _qw(64, 256, WeightFormat("int4", 128, False), g)
    asked = []

    def lookup(kind, weight, m, device):
        asked.append((kind, m))
        return (16, 32, 4, 3, 0, 1)

    monkeypatch.setattr(QA, "lookup", lookup)
    cuda = SimpleNamespace(type="cuda")
    assert QA.tuned_config(w, 16, cuda) == QA.Config(16, 32) and asked[-1] == ("a8", 16)
    assert QA.tuned_config(w, 17, cuda) is not None and asked[-1] == ("a8", 64)
    assert QA.tuned_config(w, 64, cuda) is not None and asked[-1] == ("a8", 64)
    assert QA.tuned_config(w, 65, cuda) is None and len(asked) == 3  # past 64 rows: no entry was timed there
    assert QA.tuned_config(w, 8, cuda) is None
    assert QA.tuned_config(w, 64, SimpleNamespace(type="cpu")) is None
    assert_route_declines(monkeypatch, QA, w, 64, (16, 48, 4, 3, 0, 1))  # 48 rows do not tile 64 weight rows


@pytest.mark.skipif(not ON_GPU, reason="the route is CUDA's")
def test_matmul_route(monkeypatch):
    """quant_gemm.matmul takes this kernel where a tuned entry names it, the GEMM else."""
    g = gen(113)
    w = _qw(4096, 4096, WeightFormat("int4", 128, False), g)
    x = randn(64, 4096, g=g, dtype=DTYPE)
    via_gemm = QM.gemm(x, w)
    monkeypatch.setattr(QA, "lookup", lambda *a: None)
    assert torch.equal(QM.matmul(x, w), via_gemm)
    monkeypatch.setattr(QA, "lookup", lambda *a: (64, 64, 4, 3, 0, 1))
    via_a8 = QM.matmul(x, w)
    assert torch.equal(via_a8, QA.matmul(x, w, QA.Config(64, 64)))
    assert rel_err(via_a8, via_gemm) < 2e-2
