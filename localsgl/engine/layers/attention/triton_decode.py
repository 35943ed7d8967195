"""A Triton attention backend for decode steps; extend steps use the torch path.

Decode is where launch overhead and KV reads matter, and where CUDA graphs apply:
the paged split-KV kernel reads only device tensors (req_to_token, seq_lens), so a
step is capturable.  Prefill/extend goes through torch's SDPA (flash kernels on GPU).
"""
from __future__ import annotations

import torch

from ...batch import ForwardBatch, ForwardMode
from .torch_backend import TorchAttentionBackend


class TritonDecodeAttentionBackend(TorchAttentionBackend):
    name = "triton"
    supports_cuda_graph = True

    def __init__(self, num_splits: int = 8):
        from localsgl_kernels.paged_decode import decode_attention

        self._decode = decode_attention
        self.num_splits = num_splits
        self._workspace = None

    def init_forward(self, batch: ForwardBatch) -> None:
        """Decode steps need nothing.  Mixed steps: single-token rows go to the decode
        kernel in one launch; only real extends loop through SDPA."""
        if batch.mode == ForwardMode.DECODE:
            batch.attn_meta = None
            return
        singles, multis, starts = [], [], []
        pos = 0
        for i, n in enumerate(batch.extend_lens_cpu):
            starts.append(pos)
            (singles if n == 1 else multis).append(i)
            pos += n
        dev = batch.input_ids.device
        sub = None
        if multis:
            sub = _SubBatch(batch, multis)
            super().init_forward(sub)
        mixed = _Mixed()
        mixed.sub = sub
        mixed.multis = [(starts[i], batch.extend_lens_cpu[i]) for i in multis]
        if singles:
            idx = torch.tensor(singles, dtype=torch.long, device=dev)
            mixed.tok_idx = torch.tensor([starts[i] for i in singles], dtype=torch.long, device=dev)
            mixed.req_idx = batch.req_pool_indices[idx]
            mixed.seq_lens = batch.seq_lens[idx]
        else:
            mixed.tok_idx = None
        batch.attn_meta = mixed

    def init_cuda_graph_state(self, max_bs: int, max_context: int) -> None:
        self._graph_max_bs = max_bs

    def init_forward_for_capture(self, batch: ForwardBatch) -> None:
        batch.attn_meta = None

    def init_forward_for_replay(self, batch: ForwardBatch) -> None:
        batch.attn_meta = None

    def _workspace_for(self, b: int, hq: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        ws = self._workspace
        if ws is None or ws[0].shape[0] < b or ws[0].shape[1] != hq or ws[0].shape[3] != d:
            n = max(b, getattr(self, "_graph_max_bs", 0))
            ws = (torch.empty((n, hq, self.num_splits, d), dtype=torch.float32, device=device),
                  torch.empty((n, hq, self.num_splits), dtype=torch.float32, device=device))
            self._workspace = ws
        return ws

    def forward(self, q, k, v, layer, batch, scale):
        if batch.mode != ForwardMode.DECODE:
            return self._forward_mixed(q, k, v, layer, batch, scale)
        pool = batch.kv_pool
        pool.store(layer, batch.out_cache_loc, k, v)
        b, hq, d = q.shape
        ws = self._workspace_for(b, hq, d, q.device)
        return self._decode(
            q.contiguous(), pool.k_buffer[layer], pool.v_buffer[layer], batch.req_to_token,
            batch.req_pool_indices, batch.seq_lens, scale, num_splits=self.num_splits, workspace=ws,
        )

    def _forward_mixed(self, q, k, v, layer, batch, scale):
        pool = batch.kv_pool
        pool.store(layer, batch.out_cache_loc, k, v)
        m: _Mixed = batch.attn_meta
        out = torch.empty_like(q)
        if m.tok_idx is not None:
            qd = q.index_select(0, m.tok_idx).contiguous()
            ws = self._workspace_for(qd.shape[0], qd.shape[1], qd.shape[2], q.device)
            od = self._decode(qd, pool.k_buffer[layer], pool.v_buffer[layer], batch.req_to_token,
                              m.req_idx, m.seq_lens, scale, num_splits=self.num_splits, workspace=ws)
            out.index_copy_(0, m.tok_idx, od)
        if m.sub is not None:
            k_cache, v_cache = pool.k_buffer[layer], pool.v_buffer[layer]
            gqa = q.shape[1] != k_cache.shape[1]
            for (s, n), (slots, mask) in zip(m.multis, m.sub.attn_meta.rows):
                kk = k_cache[slots].to(q.dtype).transpose(0, 1)[None]
                vv = v_cache[slots].to(q.dtype).transpose(0, 1)[None]
                qq = q[s : s + n].transpose(0, 1)[None]
                if mask is not None and n == slots.numel():  # no cached prefix: plain causal
                    o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)
                else:
                    o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa)
                out[s : s + n] = o[0].transpose(0, 1)
        return out


class _Mixed:
    __slots__ = ("sub", "multis", "tok_idx", "req_idx", "seq_lens")


class _SubBatch:
    """The multi-token rows of a batch, in the shape TorchAttentionBackend.init_forward reads."""

    def __init__(self, batch: ForwardBatch, rows: list[int]):
        self.mode = ForwardMode.EXTEND
        self.batch_size = len(rows)
        self.input_ids = batch.input_ids
        self.seq_lens_cpu = [batch.seq_lens_cpu[i] for i in rows]
        self.prefix_lens_cpu = [batch.prefix_lens_cpu[i] for i in rows]
        self.extend_lens_cpu = [batch.extend_lens_cpu[i] for i in rows]
        self.req_pool_indices = batch.req_pool_indices[torch.tensor(rows, dtype=torch.long, device=batch.input_ids.device)]
        self.req_to_token = batch.req_to_token
        self.attn_meta = None
