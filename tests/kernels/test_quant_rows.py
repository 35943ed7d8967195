"""The few-row int8-activation matmul (kernels/quant_rows.py): each row's activations prepared as
the one-row GEMV prepares them (the same int8 words and chunk scales), and the kernel against
the fp64 product of the dequantized weight with x̂ read back from the preparation, where dp4a's
integer sums leave only the fp32 scaling's rounding; against x itself, off by x̂'s rounding."""
from types import SimpleNamespace

import pytest
import torch
from kutil import DEV, ON_GPU, assert_route_declines, gen, randn, rel_err
from test_quant_int8act import DTYPE, FORMATS, IDS, TOL, _qw
from test_quant_int8act import _xhat as _xhat_row

from localsgl.engine.layers.quant import WeightFormat
from localsgl_kernels import quant_gemm as QM
from localsgl_kernels import quant_rows as QR
from localsgl_kernels import quant_words as QW


def _xhat(w, xq, xs, k, bk):
    """x̂ [M, k] in fp64: each row's int8 words and chunk scales read back as the one-row test reads them."""
    return torch.stack([_xhat_row(w, xq[m], xs[m], k, bk) for m in range(xq.shape[0])])


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_preparation_equals_the_one_row_gemvs(fmt):
    """Row m of the few-row preparation is, word for word, what the one-row GEMV's preparation
    makes of that row alone."""
    g = gen(71)
    k, bk = (512, 128) if not ON_GPU else (4096, 512)
    w = _qw(8, k, fmt, g)
    x = randn(3, k, g=g, dtype=DTYPE) * torch.linspace(0.1, 4, k, device=DEV)
    x[1, 64:96] = 0  # an all-zero chunk
    xq, xs = QR.prepare(x, w, bk)
    for m in range(3):
        q1, s1 = QW.prepare_activations(w, x[m].contiguous(), None, None, 0.0, None, bk, int8=True)
        assert torch.equal(xq[m], q1) and torch.equal(xs[m], s1)


# and the rest of the group offsets' cases: int4 g128 symmetric (-8·s), int4 g32 with mins (GGUF Q4_K),
# int8 g32 with mins (a Q5_K part)
ROWS_FORMATS = FORMATS + [WeightFormat("int4", 128, True), WeightFormat("int4", 32, False),
                          WeightFormat("int8", 32, False)]


@pytest.mark.parametrize("fmt", ROWS_FORMATS, ids=[f.label().replace(" ", "-") for f in ROWS_FORMATS])
@pytest.mark.parametrize("rows", [2, 3, 5, 8])
def test_matmul(fmt, rows):
    g = gen(73 + rows)
    n, k = (64, 256) if not ON_GPU else (4096, 14336)
    w = _qw(n, k, fmt, g)
    x = randn(rows, k, g=g, dtype=DTYPE)
    # the last two load the weight words one and two steps ahead (num_stages 2 / 3)
    cfgs = ((QR.Config(8, 128), QR.Config(16, 256, 8), QR.Config(8, 128, 4, 2), QR.Config(8, 64, 4, 3)) if not ON_GPU
            else (QR.Config(16, 512), QR.Config(4, 1024), QR.Config(16, 512, 4, 2), QR.Config(8, 1024, 8, 3)))
    for cfg in cfgs:
        assert QR.applies(w, rows, cfg)
        y = QR.matmul(x, w, cfg)
        assert y.shape == (rows, n) and y.dtype == DTYPE
        xq, xs = QR.prepare(x, w, cfg.block_k)
        ref = _xhat(w, xq, xs, k, cfg.block_k).to(DEV) @ w.dequantize(torch.float64).t()
        assert rel_err(y, ref) < TOL, cfg
        # against the unquantized activations: off by the activations' rounding only
        assert rel_err(y, x.double() @ w.dequantize(torch.float64).t()) < 2e-2
        # each row as the one-row int8-activation GEMV computes it (same x̂, same weight words)
        y1 = QR.matmul(torch.cat([x[:1], x[:1]]), w, cfg)
        assert torch.equal(y1[0], y1[1]) and rel_err(y1[0], ref[0]) < TOL


def test_applies():
    g = gen(79)
    w4 = _qw(64, 256, WeightFormat("int4", 128, False), g)
    cfg = QR.Config(8, 128)
    assert QR.applies(w4, 2, cfg) and QR.applies(w4, 8, cfg)
    assert not QR.applies(w4, 1, cfg) and not QR.applies(w4, 9, cfg)  # one row: the GEMV; more than 8: the GEMM
    assert not QR.applies(w4, 4, None)
    assert not QR.applies(w4, 4, QR.Config(48, 128))  # 64 rows are not whole blocks of 48
    assert not QR.applies(w4, 4, QR.Config(8, 512))  # K = 256 is not whole steps of 512
    assert not QR.applies(_qw(64, 256, WeightFormat("fp8", 0, True), g), 4, cfg)
    assert not QR.applies(_qw(64, 256, WeightFormat("int4", 16, True), g), 4, QR.Config(8, 128))  # g16 < a chunk


def test_tuned_config_routes_only_where_an_entry_applies(monkeypatch):
    """The route is taken on CUDA where the tuned file has a "rows" entry at the batch's bucket
    (2, 4, 8) that applies, and never for a weight whose activations must stay exact."""
    g = gen(83)
    w = _qw(64, 256, WeightFormat("int4", 128, False), g)
    asked = []

    def lookup(kind, weight, m, device):
        asked.append((kind, m))
        return (8, 128, 4, 1)

    monkeypatch.setattr(QR, "lookup", lookup)
    cuda = SimpleNamespace(type="cuda")
    assert QR.tuned_config(w, 3, cuda) == QR.Config(8, 128, 4, 1) and asked[-1] == ("rows", 4)
    assert QR.tuned_config(w, 5, cuda) is not None and asked[-1] == ("rows", 8)
    assert QR.tuned_config(w, 2, cuda) is not None and asked[-1] == ("rows", 2)
    assert QR.tuned_config(w, 1, cuda) is None and QR.tuned_config(w, 9, cuda) is None
    assert QR.tuned_config(w, 4, SimpleNamespace(type="cpu")) is None
    assert_route_declines(monkeypatch, QR, w, 4, (48, 128, 4, 1))  # 48 rows do not tile 64


@pytest.mark.skipif(not ON_GPU, reason="the route is CUDA's")
def test_matmul_route(monkeypatch):
    """quant_gemm.matmul takes the few-row kernel where a tuned entry names it, the GEMM else."""
    g = gen(89)
    w = _qw(4096, 4096, WeightFormat("int4", 128, False), g)
    x = randn(4, 4096, g=g, dtype=DTYPE)
    via_gemm = QM.gemm(x, w)  # the 16-row GEMM itself: this GPU's tuned file may name a rows tile here
    monkeypatch.setattr(QR, "lookup", lambda *a: None)
    assert torch.equal(QM.matmul(x, w), via_gemm)
    monkeypatch.setattr(QR, "lookup", lambda *a: (16, 512, 4, 1))
    via_rows = QM.matmul(x, w)
    assert torch.equal(via_rows, QR.matmul(x, w, QR.Config(16, 512)))
    assert rel_err(via_rows, via_gemm) < 2e-2
