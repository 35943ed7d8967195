"""CUDA graphs for decode: one graph per batch-size bucket, replayed with padding.

A decode step of a small model is dominated by kernel-launch gaps (hundreds of
launches per token); replaying a captured graph removes them.  The graph
reads static input buffers; a real batch of size b is copied into the first
b rows of the smallest bucket >= b, the padded rows point at request row 0
and scratch KV slot 0, so they compute garbage nobody reads.
"""
from __future__ import annotations

import logging

import torch

from .batch import ForwardBatch, ForwardMode

log = logging.getLogger("localsgl.cuda_graph")


class CudaGraphRunner:
    def __init__(self, runner, batch_sizes: list[int]):
        self.runner = runner
        self.model = runner.model
        self.attn = runner.attn
        self.device = runner.device
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_bs = self.batch_sizes[-1]
        dev = self.device
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(n, dtype=torch.int64, device=dev)
        self.req_pool_indices = torch.zeros(n, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.prefix_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.extend_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.extend_start_loc = torch.arange(n, dtype=torch.int32, device=dev)
        self.attn.init_cuda_graph_state(n, runner.req_pool.table.shape[1])
        # cascade (shared-prefix) variants: the same step plus the prefix stage, reading its
        # groups from these static tensors; captured for every bucket >= 2
        self.prefix = None
        if runner.prefix_shape is not None:
            from localsgl_kernels.decode_attention import PrefixGroups

            ng, rows = runner.prefix_shape
            self.prefix = PrefixGroups(torch.zeros(n, dtype=torch.int32, device=dev),
                                       torch.full((n,), -1, dtype=torch.int32, device=dev),
                                       torch.full((ng, rows), -1, dtype=torch.int32, device=dev))
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.batches: dict[tuple[int, bool], ForwardBatch] = {}
        self.pool = None
        self._capture_all()

    def _static_batch(self, bs: int, cascade: bool) -> ForwardBatch:
        groups = None
        if cascade:
            from localsgl_kernels.decode_attention import PrefixGroups

            groups = PrefixGroups(self.prefix.start[:bs], self.prefix.pos[:bs], self.prefix.rows)
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            prefix_lens=self.prefix_lens[:bs],
            extend_lens=self.extend_lens[:bs],
            extend_start_loc=self.extend_start_loc[:bs],
            seq_lens_cpu=[1] * bs,
            prefix_lens_cpu=[0] * bs,
            extend_lens_cpu=[1] * bs,
            req_to_token=self.runner.req_pool.table,
            kv_pool=self.runner.kv_pool,
            attn_backend=self.attn,
            prefix_groups=groups,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        stream = torch.cuda.Stream(self.device)
        keys = [(bs, False) for bs in self.batch_sizes]
        if self.prefix is not None:
            keys += [(bs, True) for bs in self.batch_sizes if bs >= 2]
        keys.sort(key=lambda k: (-k[0], k[1]))
        for key in keys:  # largest first: later graphs reuse its memory pool
            bs, cascade = key
            batch = self._static_batch(bs, cascade)
            self.attn.init_forward_for_capture(batch)

            def run():
                h = self.model(batch.input_ids, batch.positions, batch)
                return self.model.compute_logits(h)

            torch.cuda.synchronize(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    run()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, stream=stream):
                out = run()
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[key] = g
            self.outputs[key] = out
            self.batches[key] = batch
        torch.cuda.synchronize(self.device)

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.batch_size <= self.max_bs

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        bs = batch.batch_size
        padded = next(b for b in self.batch_sizes if b >= bs)
        if padded > bs:
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
            self.out_cache_loc[bs:padded].zero_()
            self.req_pool_indices[bs:padded].zero_()
            self.seq_lens[bs:padded].fill_(1)
        self.input_ids[:bs].copy_(batch.input_ids, non_blocking=True)
        self.positions[:bs].copy_(batch.positions, non_blocking=True)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc, non_blocking=True)
        self.req_pool_indices[:bs].copy_(batch.req_pool_indices, non_blocking=True)
        self.seq_lens[:bs].copy_(batch.seq_lens, non_blocking=True)
        key = (padded, batch.prefix_groups is not None and (padded, True) in self.graphs)
        if key[1]:
            pg = batch.prefix_groups
            if padded > bs:
                self.prefix.start[bs:padded].zero_()
                self.prefix.pos[bs:padded].fill_(-1)
            self.prefix.start[:bs].copy_(pg.start, non_blocking=True)
            self.prefix.pos[:bs].copy_(pg.pos, non_blocking=True)
            self.prefix.rows.copy_(pg.rows, non_blocking=True)
        static = self.batches[key]
        static.seq_lens_cpu = list(batch.seq_lens_cpu) + [1] * (padded - bs)
        self.attn.init_forward_for_replay(static)
        self.graphs[key].replay()
        return self.outputs[key][:bs]
