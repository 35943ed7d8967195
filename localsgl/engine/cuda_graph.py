"""CUDA graphs for decode: one graph per batch-size bucket, replayed with padding.

A decode step of a small model is dominated by kernel-launch gaps (hundreds of
launches per token); replaying a captured graph removes them.  The graph
reads static input buffers; a real batch of size b fills the first b rows of
the smallest bucket >= b, the padded rows point at request row 0 and scratch
KV slot 0, so they compute garbage nobody reads.

Per step the host packs the raw token ids (overlap placeholders included),
positions, new KV slots and request rows into one pinned buffer and uploads it
with one copy; the graph's first kernel (kernels/step_inputs.py) resolves the
placeholders, derives the sequence lengths and writes the slot-table entries.
At batch 1 the separate copies and small ops this replaces cost ~65 µs a step.
"""
from __future__ import annotations

import logging
import time

import torch
from localsgl_kernels.compile_ahead import compile_only
from localsgl_kernels.step_inputs import decode_inputs

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
        # uploaded per step: for bucket bs, four runs of bs values (raw ids | positions |
        # KV slots | request rows) at the front of `packed`
        self.packed = torch.zeros(4 * n, dtype=torch.int64, device=dev)
        self._staging = [torch.zeros(4 * n, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._staged = [torch.cuda.Event() for _ in range(2)]
        self._turn = 0
        self.prev_tokens = torch.zeros(n, dtype=torch.int64, device=dev)  # the in-flight step's tokens
        # derived on the device by the graph's first kernel
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
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

    def _packed_views(self, bs: int) -> tuple[torch.Tensor, ...]:
        """(raw ids, positions, KV slots, request rows) of bucket bs inside ``packed``."""
        return tuple(self.packed[i * bs:(i + 1) * bs] for i in range(4))

    def _static_batch(self, bs: int, cascade: bool) -> ForwardBatch:
        _, positions, slots, rows = self._packed_views(bs)
        groups = None
        if cascade:
            from localsgl_kernels.decode_attention import PrefixGroups

            groups = PrefixGroups(self.prefix.start[:bs], self.prefix.pos[:bs], self.prefix.rows)
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=positions,
            out_cache_loc=slots,
            req_pool_indices=rows,
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

    def _run_step(self, batch: ForwardBatch) -> torch.Tensor:
        """The captured step: inputs resolved on the device, the forward, the logits."""
        raw = self._packed_views(batch.batch_size)[0]
        decode_inputs(raw, self.prev_tokens, batch.positions, batch.out_cache_loc, batch.req_pool_indices,
                      batch.req_to_token, batch.input_ids, batch.seq_lens)
        h = self.model(batch.input_ids, batch.positions, batch)
        return self.model.compute_logits(h)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        stream = torch.cuda.Stream(self.device)
        keys = [(bs, False) for bs in self.batch_sizes]
        if self.prefix is not None:
            keys += [(bs, True) for bs in self.batch_sizes if bs >= 2]
        keys.sort(key=lambda k: (-k[0], k[1]))
        batches = {key: self._static_batch(*key) for key in keys}
        # a cold Triton cache: compile every bucket's kernels together, in parallel, first
        t = time.perf_counter()
        with compile_only(enabled=self.runner.debug.compile_ahead) as dry:
            if dry:
                for key in keys:
                    self.attn.init_forward_for_capture(batches[key])
                    self._run_step(batches[key])
        torch.cuda.synchronize(self.device)
        self.compile_ahead_seconds = time.perf_counter() - t if dry else None
        if dry:
            log.info("compiled the decode graphs' kernels in %.1f s", self.compile_ahead_seconds)
        for key in keys:  # largest first: later graphs reuse its memory pool
            batch = batches[key]
            self.attn.init_forward_for_capture(batch)
            torch.cuda.synchronize(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run_step(batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, stream=stream):
                out = self._run_step(batch)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[key] = g
            self.outputs[key] = out
            self.batches[key] = batch
        torch.cuda.synchronize(self.device)

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.max_bs

    def replay(self, sb, prev_tokens: torch.Tensor | None, groups=None) -> torch.Tensor:
        """Run the decode-only scheduled batch ``sb`` (every row: one new token at position
        prefix_len, KV slot out_slots[i]); placeholders -(1+j) in its ids read token j of
        ``prev_tokens``.  Returns fp32 logits [bs, V'] (a view into the graph's output)."""
        bs = len(sb.reqs)
        padded = next(b for b in self.batch_sizes if b >= bs)
        pad = [0] * (padded - bs)
        ids = [r.token_at(p) for r, p in zip(sb.reqs, sb.prefix_lens)]
        vals = ids + pad + list(sb.prefix_lens) + pad + sb.out_slots.tolist() + pad + [r.req_row for r in sb.reqs] + pad
        turn = self._turn
        self._turn ^= 1
        host = self._staging[turn]
        self._staged[turn].synchronize()  # its last upload (two steps ago) has left
        host[:4 * padded] = torch.tensor(vals, dtype=torch.int64)
        self.packed[:4 * padded].copy_(host[:4 * padded], non_blocking=True)
        self._staged[turn].record()
        if min(ids) < 0:
            if prev_tokens is None:
                raise RuntimeError("decode step has placeholder ids but no in-flight tokens")
            self.prev_tokens[:prev_tokens.shape[0]].copy_(prev_tokens, non_blocking=True)
        key = (padded, groups is not None and (padded, True) in self.graphs)
        if key[1]:
            if padded > bs:
                self.prefix.start[bs:padded].zero_()
                self.prefix.pos[bs:padded].fill_(-1)
            self.prefix.start[:bs].copy_(groups.start, non_blocking=True)
            self.prefix.pos[:bs].copy_(groups.pos, non_blocking=True)
            self.prefix.rows.copy_(groups.rows, non_blocking=True)
        static = self.batches[key]
        static.seq_lens_cpu = [p + 1 for p in sb.prefix_lens] + [1] * (padded - bs)
        self.attn.init_forward_for_replay(static)
        self.graphs[key].replay()
        return self.outputs[key][:bs]
