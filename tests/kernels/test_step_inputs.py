"""The decode step's device-side inputs (kernels/step_inputs.py) vs the torch reference:
placeholders resolved from the in-flight step's tokens, seq lens, the slot-table writes,
and padded graph rows (row 0, position 0, slot 0)."""
import pytest
import torch
from kutil import DEV, gen

from localsgl_kernels.step_inputs import decode_inputs, decode_inputs_ref


@pytest.mark.parametrize("B,pad", [(1, 0), (5, 3), (300, 20)])
def test_decode_inputs_match_reference(B, pad):
    g = gen(B)
    n = B + pad
    prev = torch.randint(0, 50000, (B + 4,), generator=g)
    raw = torch.randint(0, 50000, (n,), generator=g)
    placeholder = torch.rand(B, generator=g) < 0.5
    raw[:B][placeholder] = -1 - torch.randint(0, B + 4, (int(placeholder.sum()),), generator=g)
    positions = torch.randint(0, 64, (n,), generator=g)
    rows = torch.randperm(B, generator=g) + 1  # distinct requests
    rows = torch.cat([rows, torch.zeros(pad, dtype=torch.long)])
    slots = torch.randint(1, 10**6, (n,), generator=g)
    raw[B:], positions[B:], slots[B:] = 0, 0, 0  # padded rows
    args = [t.to(DEV) for t in (raw, prev, positions, slots, rows)]
    table = torch.randint(0, 10**6, (B + 1, 64), generator=g, dtype=torch.int32).to(DEV)
    table[0, 0] = 0
    t_ref = table.clone()
    ids, seq = torch.empty(n, dtype=torch.int64, device=DEV), torch.empty(n, dtype=torch.int32, device=DEV)
    ids_ref, seq_ref = ids.clone(), seq.clone()
    decode_inputs(*args, table, ids, seq)
    decode_inputs_ref(*args, t_ref, ids_ref, seq_ref)
    assert torch.equal(ids, ids_ref) and torch.equal(seq, seq_ref) and torch.equal(table, t_ref)
    assert (ids >= 0).all()
