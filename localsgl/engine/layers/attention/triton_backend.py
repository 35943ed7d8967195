"""The Triton attention backend: paged split-KV decode, extend-with-prefix, CUDA graphs.

Per step, ``init_forward`` picks the kernel once (shared by every layer):
  * DECODE steps, and EXTEND steps whose requests all append one token: the split-KV
    decode kernel (kernels/decode_attention.py).  Its split count depends only on the
    batch size and KV head count, so a captured graph keeps a fixed grid.
  * other EXTEND steps: the ragged extend kernel (kernels/extend_attention.py) over a work
    list of (request, token block) items built on the host from ``extend_lens_cpu`` /
    ``prefix_lens_cpu`` (extend steps run eagerly, never inside a graph).  In a mixed step
    the leading one-token rows (the scheduler puts running decodes first) go to the decode
    kernel instead: the extend kernel would fill a whole token block for each of them
    (~2x slower for 400 decode rows of ~1k context).
Decode steps whose rows share a cached prefix (``batch.prefix_groups``, found by the
runner from the radix paths) run the decode kernel's shared-prefix stage: the prefix is
read once per group of up to 64 // G rows, not once per row (cascade decoding); graphs
are captured in both variants.
Per-step buffers (the decode split workspace, the extend work list) are made by the first
layer's ``forward`` — that is where the query head count becomes known — and reused by
the other layers.  Inside a CUDA-graph capture they are allocated from the graph's
private pool, like every other intermediate, so replays reuse the same addresses.

``forward`` first scatters the new K/V into the pool (kernels/kv_store.py) at
``batch.out_cache_loc``, then attends (``attend``, which the fused one-token path of
layers/fused_decode.py calls directly: its qkv kernel already stored K/V); every key, new
ones included, is read through ``req_to_token``.  Padded rows of a replayed graph
(seq_len 1, request row 0, slot 0) write only KV slot 0 and their own output row.
An FP8 pool (kv_pool.py) is quantized by the KV store and dequantized by both attention
kernels as they read it: every call passes the layer's scale buffers along.
Nothing here syncs with the device.
"""
from __future__ import annotations

import torch

from ...batch import ForwardBatch, ForwardMode
from .base import AttentionBackend


# Shared-prefix groups per decode step (cascade decoding): a fixed count so CUDA graphs keep
# one grid; 4 groups of up to 64 // G rows cover e.g. 64 requests on one system prompt.
PREFIX_GROUPS = 4


class _DecodeMeta:
    __slots__ = ("num_splits", "workspace", "prefix_workspace", "captured")

    def __init__(self, num_splits: int):
        self.num_splits = num_splits
        self.workspace = None  # (partial_out, partial_lse), made by the first layer
        self.prefix_workspace = None  # the same for shared-prefix partials (cascade steps)
        self.captured = False  # a CUDA graph's step: its workspaces are views of the shared scratch


class _ExtendMeta:
    __slots__ = ("tok", "work", "num_decode", "decode")

    def __init__(self, num_decode: int = 0, decode: "_DecodeMeta | None" = None):
        self.tok = 0  # tokens per work item the list was built for
        self.work = None
        self.num_decode = num_decode  # leading one-token rows, handled by the decode kernel
        self.decode = decode


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graph = True
    supports_prestored_kv = True

    def __init__(self, num_sms: int | None = None):
        from localsgl_kernels import decode_attention as dec
        from localsgl_kernels import extend_attention as ext
        from localsgl_kernels.kv_store import store_kv

        self._dec = dec
        self._ext = ext
        self._store = store_kv
        self._num_sms = num_sms
        self.graph_max_bs = 0
        self._graph_scratch: dict[str, torch.Tensor] = {}

    def prefix_group_shape(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        return PREFIX_GROUPS, self._dec.prefix_group_rows(num_heads // num_kv_heads)

    def _sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            if device.type == "cuda":
                self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
            else:
                self._num_sms = 4  # interpreter runs (tests): few splits
        return self._num_sms

    def _decode_meta(self, batch: ForwardBatch, rows: int | None = None) -> _DecodeMeta:
        pool = batch.kv_pool
        n = batch.batch_size if rows is None else rows
        return _DecodeMeta(self._dec.choose_num_splits(n, pool.num_kv_heads, self._sms(pool.device)))

    # ------------------------------------------------------------------ per step
    def init_forward(self, batch: ForwardBatch) -> None:
        if batch.mode == ForwardMode.DECODE or batch.max_extend_len <= 1:
            batch.attn_meta = self._decode_meta(batch)
        else:
            n = 0
            for e in batch.extend_lens_cpu:
                if e != 1:
                    break
                n += 1
            batch.attn_meta = _ExtendMeta(n, self._decode_meta(batch, n) if n else None)

    def forward(self, q, k, v, layer, batch, scale):
        self.store_kv(k, v, layer, batch)
        return self.attend(q, layer, batch, scale)

    def store_kv(self, k, v, layer, batch):
        pool = batch.kv_pool
        self._store(pool.k_buffer[layer], pool.v_buffer[layer], batch.out_cache_loc, k, v, *pool.scales(layer))

    def attend(self, q, layer, batch, scale, out=None, int8_row=None, prefetch=()):
        pool = batch.kv_pool
        k_cache = pool.k_buffer[layer]
        v_cache = pool.v_buffer[layer]
        k_scale, v_scale = pool.scales(layer)
        meta = batch.attn_meta
        T, hq, d = q.shape
        if isinstance(meta, _DecodeMeta):
            ws = meta.workspace
            if ws is None or ws[0].shape[0] < T or ws[0].shape[1] != hq or ws[0].shape[3] != d:
                ws = meta.workspace = (self._graph_workspace(T, hq, d, meta.num_splits, pool) if meta.captured
                                       else self._dec.alloc_workspace(T, hq, d, meta.num_splits, q.device))
            groups = batch.prefix_groups
            pws = None
            if groups is not None:
                pws = meta.prefix_workspace
                if pws is None:
                    pws = meta.prefix_workspace = (
                        self._graph_prefix_workspace(groups.num_groups * groups.max_rows, hq, d, pool.device)
                        if meta.captured else
                        self._dec.alloc_prefix_workspace(groups.num_groups, groups.max_rows, hq, d, q.device))
            return self._dec.decode_attention(
                q, k_cache, v_cache, batch.req_to_token, batch.req_pool_indices, batch.seq_lens, scale,
                out=out, num_splits=meta.num_splits, workspace=ws, groups=groups, prefix_workspace=pws,
                k_scale=k_scale, v_scale=v_scale, int8_row=int8_row, prefetch=prefetch,
            )
        tok = self._ext.tokens_per_block(d, hq // k_cache.shape[1], q.device)
        nd = meta.num_decode
        if meta.work is None or meta.tok != tok:
            meta.work = self._ext.build_work(batch.extend_lens_cpu, batch.prefix_lens_cpu, tok, q.device, first=nd)
            meta.tok = tok
        if out is None:
            out = torch.empty((T, hq, d), dtype=q.dtype, device=q.device)
        if nd:  # rows 0..nd-1 hold one token each, at flat rows 0..nd-1
            dm = meta.decode
            if dm.workspace is None:
                dm.workspace = self._dec.alloc_workspace(nd, hq, d, dm.num_splits, q.device)
            self._dec.decode_attention(
                q[:nd], k_cache, v_cache, batch.req_to_token, batch.req_pool_indices[:nd], batch.seq_lens[:nd], scale,
                out=out[:nd], num_splits=dm.num_splits, workspace=dm.workspace, k_scale=k_scale, v_scale=v_scale,
            )
        return self._ext.extend_attention(
            q, k_cache, v_cache, batch.req_to_token, batch.req_pool_indices, batch.prefix_lens, batch.extend_lens,
            batch.extend_start_loc, scale, meta.work, out=out, k_scale=k_scale, v_scale=v_scale,
        )

    # ------------------------------------------------------------------ CUDA graphs
    def init_cuda_graph_state(self, max_bs: int, max_context: int) -> None:
        # The decode kernels read only the runner's static tensors (req_to_token, seq_lens,
        # req_pool_indices, out_cache_loc); their scratch is made by the first captured step.
        self.graph_max_bs = max_bs

    def init_forward_for_capture(self, batch: ForwardBatch) -> None:
        if batch.mode != ForwardMode.DECODE:
            raise ValueError("the triton backend captures decode steps only")
        batch.attn_meta = self._decode_meta(batch)
        batch.attn_meta.captured = True

    def _scratch(self, name: str, numel: int, device) -> torch.Tensor:
        """The captured steps' shared fp32 scratch ``name``: graphs replay one at a time, so one
        buffer serves them all, where a workspace kept per graph would hold the sum over the
        buckets for the engine's life.  Grown if a step needs more (the views earlier graphs
        hold keep the old buffer alive)."""
        buf = self._graph_scratch.get(name)
        if buf is None or buf.numel() < numel:
            buf = self._graph_scratch[name] = torch.empty(numel, dtype=torch.float32, device=device)
        return buf

    def _graph_workspace(self, rows: int, hq: int, d: int, splits: int, pool):
        """alloc_workspace's (partial_out, partial_lse) as views of the shared scratch, sized at
        first for the largest bucket's need (rows x splits peaks there or at batch 1)."""
        most = max(b * self._dec.choose_num_splits(b, pool.num_kv_heads, self._sms(pool.device))
                   for b in range(1, max(rows, self.graph_max_bs) + 1))
        flat = self._scratch("decode", most * hq * (d + 1), pool.device)
        n = rows * hq * splits * d
        return flat[:n].view(rows, hq, splits, d), flat[n:n + rows * hq * splits].view(rows, hq, splits)

    def _graph_prefix_workspace(self, rows: int, hq: int, d: int, device):
        """alloc_prefix_workspace's pair as views of the shared scratch (its size is fixed by the
        prefix groups' shape)."""
        s = self._dec.PREFIX_SPLITS
        flat = self._scratch("prefix", rows * hq * s * (d + 1), device)
        n = rows * hq * s * d
        return flat[:n].view(rows, hq, s, d), flat[n:n + rows * hq * s].view(rows, hq, s)

    def init_forward_for_replay(self, batch: ForwardBatch) -> None:
        # The captured kernels already hold this bucket's split count and workspace;
        # replay reads seq_lens etc. from the static tensors the runner refilled.
        if not isinstance(batch.attn_meta, _DecodeMeta):
            batch.attn_meta = self._decode_meta(batch)
