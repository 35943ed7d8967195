"""The decode step's inputs, completed on the device inside the CUDA graph.

A decode step at batch 1 is ~4 ms of weight streaming; what the step does outside its
graph (one small copy or kernel each for the ids, positions, slots, lengths, the slot-table
entry and the overlap placeholders) cost ~65 µs on an H200.  The runner now uploads one
packed host buffer, and this kernel, the graph's first, derives the rest.  For row b:
    ids[b]      = raw[b]            if raw[b] >= 0
                = prev[-raw[b] - 1] otherwise (a token sampled by the step still in flight)
    seq_lens[b] = positions[b] + 1  (decode: the new token is the last one)
    table[rows[b], positions[b]] = slots[b]   (the request's new KV slot)
Floor: a few dozen bytes per row; one launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import FMA


@triton.jit(do_not_specialize=["B"])
def _decode_inputs_kernel(Raw, Prev, Pos, Slots, Rows, Table, Ids, SeqLens, B, stride_t, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < B
    raw = tl.load(Raw + offs, mask=m, other=0)
    placeholder = raw < 0
    prev = tl.load(Prev + tl.where(placeholder, -raw - 1, 0), mask=m & placeholder, other=0)
    tl.store(Ids + offs, tl.where(placeholder, prev.to(raw.dtype), raw), mask=m)
    pos = tl.load(Pos + offs, mask=m, other=0)
    tl.store(SeqLens + offs, (pos + 1).to(SeqLens.dtype.element_ty), mask=m)
    row = tl.load(Rows + offs, mask=m, other=0).to(tl.int64)
    slot = tl.load(Slots + offs, mask=m, other=0)
    tl.store(Table + row * stride_t + pos, slot.to(Table.dtype.element_ty), mask=m)


def decode_inputs(raw, prev, positions, slots, rows, table, ids_out, seq_lens_out) -> None:
    """raw, positions, slots, rows: [B] int; prev: [>= max placeholder] int; table: [R, C] int32;
    writes ids_out [B], seq_lens_out [B] and table[rows, positions].  Padded graph rows
    (row 0, position 0, slot 0) write the reserved row 0."""
    B = raw.shape[0]
    if B == 0:
        return
    # one tile size for every batch bucket: one compile, not one per graph bucket (engine start-up)
    _decode_inputs_kernel[(triton.cdiv(B, 128),)](
        raw, prev, positions, slots, rows, table, ids_out, seq_lens_out, B, table.stride(0), BLOCK=128,
        num_warps=4,
        **FMA,
    )


def decode_inputs_ref(raw, prev, positions, slots, rows, table, ids_out, seq_lens_out) -> None:
    """Torch reference of :func:`decode_inputs` (same outputs, several ops)."""
    ph = raw < 0
    ids_out.copy_(torch.where(ph, prev[(-raw - 1).clamp(min=0)].to(raw.dtype), raw))
    seq_lens_out.copy_((positions + 1).to(seq_lens_out.dtype))
    table[rows.long(), positions.long()] = slots.to(table.dtype)
