"""Shared bits of the kernel tests (the interpreter switch lives in conftest.py)."""
import torch

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
# dtypes whose tl.dot the interpreter gets right; the GPU covers bf16 too
DOT_DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32, torch.float16]
ELEM_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g, dtype=torch.float32, scale=1.0):
    """Fresh normal draws made on the CPU (same numbers on every device), moved to DEV."""
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def tol(dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def scattered_table(g: torch.Generator, seqs: list[int], slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A page table for requests of ``seqs`` tokens in shuffled pool rows (two spare rows) whose
    slots are scattered over 1..slots: (table [B + 2, max + 7] int32, rows [B]) on the CPU."""
    B = len(seqs)
    table = torch.zeros(B + 2, max(seqs) + 7, dtype=torch.int32)
    rows = torch.randperm(B + 2, generator=g)[:B]
    perm = torch.randperm(slots, generator=g) + 1
    used = 0
    for i in range(B):
        table[rows[i], : seqs[i]] = perm[used : used + seqs[i]].int()
        used += seqs[i]
    return table, rows


def assert_route_declines(monkeypatch, module, w, rows: int, untileable: tuple) -> None:
    """A tuned route (quant_rows / quant_a8: ``module.tuned_config`` behind ``module.lookup``) is
    not taken on CUDA for a weight whose activations must stay exact, for a tuned tile that does not
    tile the weight (``untileable``), nor without an entry."""
    from types import SimpleNamespace

    cuda = SimpleNamespace(type="cuda")
    w.int8_activations = False  # LOCALSGL_DEBUG_NO_INT8_ACTIVATIONS: the exact GEMM instead
    assert module.tuned_config(w, rows, cuda) is None
    w.int8_activations = True
    monkeypatch.setattr(module, "lookup", lambda *a: untileable)
    assert module.tuned_config(w, rows, cuda) is None
    monkeypatch.setattr(module, "lookup", lambda *a: None)
    assert module.tuned_config(w, rows, cuda) is None
