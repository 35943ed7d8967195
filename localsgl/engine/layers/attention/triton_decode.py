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
        if batch.mode == ForwardMode.DECODE:
            batch.attn_meta = None
        else:
            super().init_forward(batch)

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
            return super().forward(q, k, v, layer, batch, scale)
        pool = batch.kv_pool
        pool.store(layer, batch.out_cache_loc, k, v)
        b, hq, d = q.shape
        ws = self._workspace_for(b, hq, d, q.device)
        return self._decode(
            q.contiguous(), pool.k_buffer[layer], pool.v_buffer[layer], batch.req_to_token,
            batch.req_pool_indices, batch.seq_lens, scale, num_splits=self.num_splits, workspace=ws,
        )
