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

Which buckets exist when is graph_schedule.py's business: the small ones are captured
here at start-up, the rest later by ``capture_next`` (called by the engine thread between
steps); a batch without its bucket replays a larger captured one or runs eagerly.  When
piecewise graphs for extend steps are on (piecewise_graph.py), their token buckets are
captured after every decode graph, into the same memory pool, while the engine idles
(an extend step never waits for a capture).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch
from localsgl_kernels.compile_ahead import CompileRecord, compile_only
from localsgl_kernels.step_inputs import decode_inputs

from .batch import ForwardBatch, ForwardMode
from .graph_schedule import STARTUP_MAX_BS, GraphKey, GraphSchedule
from .piecewise_graph import PiecewiseGraphs

log = logging.getLogger("localsgl.cuda_graph")


class CudaGraphRunner:
    def __init__(self, runner, batch_sizes: list[int], startup_max_bs: int = STARTUP_MAX_BS,
                 piecewise_tokens: int | None = None):
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
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        # every graph writes its logits into the first rows of this one buffer (graphs replay one
        # at a time and a step's logits are sampled before the next step): an output kept per
        # graph would hold fp32 logits for the sum of all buckets' rows (~290 MiB for buckets up
        # to 64 at a 128k vocabulary, GiBs up to 512)
        self.logits = torch.empty((n, self.model.logits_width()), dtype=torch.float32, device=dev)
        self.outputs: dict[GraphKey, torch.Tensor] = {}
        self.batches: dict[GraphKey, ForwardBatch] = {}
        self.pool = None
        self._stream = torch.cuda.Stream(self.device)
        self.schedule = GraphSchedule(self.batch_sizes, self.prefix is not None, startup_max_bs)
        # extend/mixed steps of up to piecewise_tokens tokens: graphs around the attention
        self.piecewise = (PiecewiseGraphs(self.model, self.attn, runner.kv_pool, dev, piecewise_tokens)
                          if piecewise_tokens else None)
        self.done = threading.Event()  # set once no capture is pending (any thread may wait)
        self.done_at: float | None = None  # perf_counter() when that happened
        self.compile_ahead_seconds: float | None = None  # the start-up dry pass (None: skipped)
        self._later_compiled = False
        self._capture(self.schedule.startup)
        self.compile_ahead_seconds = self._last_compile_seconds
        self._check_done()

    @property
    def pending(self) -> bool:
        return not self.schedule.done or bool(self.piecewise is not None and self.piecewise.pending)

    @torch.inference_mode()
    def capture_next(self, plain_only: bool = False) -> None:
        """Capture the next pending graph (``plain_only``: skip cascade variants).  Runs on the
        engine thread between steps; the first call compiles every later graph's kernels
        ahead, in one parallel window.  A failed capture stops further ones: the sizes left
        run eagerly (or padded into a captured bucket)."""
        key = self.schedule.next_key(plain_only)
        if key is None:
            self._capture_next_piecewise()
            self._check_done()
            return
        try:
            self._reset_static_inputs()
            if not self.graphs:  # none was captured before serving: this one's kernels alone first
                self._compile_ahead([key])
            elif not self._later_compiled:
                self._later_compiled = True
                self._compile_ahead(self.schedule.pending)
            self._capture([key], compile_ahead=False)
        except Exception:  # noqa: BLE001  (serving goes on without the graph)
            log.warning("capturing the decode graph %s failed; %d bucket(s) stay uncaptured", key,
                        len(self.schedule.pending), exc_info=True)
            self.schedule.abandon()
        self._check_done()

    def _capture_next_piecewise(self) -> None:
        """Capture the largest pending token bucket of the piecewise (extend) graphs."""
        pw = self.piecewise
        if pw is None or not pw.pending:
            return
        n = pw.pending[0]
        try:
            self.pool = pw.capture(n, self._stream, self.pool)
        except Exception:  # noqa: BLE001  (extend steps of the sizes left run eagerly)
            log.warning("capturing the piecewise graphs of %d tokens failed; %d bucket(s) stay uncaptured", n,
                        len(pw.pending), exc_info=True)
            pw.abandon()
            return
        if not pw.pending:
            log.info("captured the piecewise graphs of %d token buckets in %.1f s", len(pw.graphs), pw.capture_seconds)

    def _check_done(self) -> None:
        if not self.pending and not self.done.is_set():
            self.done_at = time.perf_counter()
            self.done.set()
            log.info("all %d decode graphs captured", len(self.graphs))

    def _reset_static_inputs(self) -> None:
        """Put every static input back to its start-up value (row 0, position 0, scratch slot
        0, no prefix groups), after the steps already queued: a capture's eager warm-up runs
        must write only the scratch row and slot, never a live request's."""
        self.packed.zero_()
        self.prev_tokens.zero_()
        self.input_ids.zero_()
        self.seq_lens.fill_(1)
        if self.prefix is not None:
            self.prefix.start.zero_()
            self.prefix.pos.fill_(-1)
            self.prefix.rows.fill_(-1)

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
        return self.model.compute_logits(h, out=self.logits[:batch.batch_size])

    def _signature(self, keys: list[GraphKey]) -> str:
        cfg = self.model.config
        shape = (type(self.model).__name__, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
                 cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, str(self.model.dtype), self.prefix is not None)
        return f"decode graphs {shape} {sorted(keys)}"

    def _compile_ahead(self, keys: list[GraphKey]) -> float | None:
        """Compile the kernels of ``keys``' steps together, in parallel, unless this Triton cache
        is recorded to hold them already.  Returns the seconds spent (None: nothing to do)."""
        if not keys:
            return None
        record = CompileRecord(self._signature(keys), self.device, (Path(__file__).resolve().parent,))
        if record.exists():
            return None
        batches = {key: self._static_batch(*key) for key in keys}
        t = time.perf_counter()
        with compile_only(enabled=self.runner.debug.compile_ahead) as dry:
            if dry:
                for key in keys:
                    self.attn.init_forward_for_capture(batches[key])
                    self._run_step(batches[key])
        torch.cuda.synchronize(self.device)
        if not dry:
            return None
        seconds = time.perf_counter() - t
        record.write()
        log.info("compiled the kernels of %d decode graphs in %.1f s", len(keys), seconds)
        return seconds

    @torch.inference_mode()
    def _capture(self, keys: list[GraphKey], compile_ahead: bool = True) -> None:
        """Capture ``keys`` in order (largest first: later graphs reuse the shared pool's blocks)."""
        self._last_compile_seconds = self._compile_ahead(keys) if compile_ahead else None
        stream = self._stream
        for key in keys:
            batch = self._static_batch(*key)
            self.attn.init_forward_for_capture(batch)
            torch.cuda.synchronize(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run_step(batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            # thread_local: a CUDA call on another thread (a server's, the caller's) during a
            # capture between steps neither breaks the capture nor fails itself
            with torch.cuda.graph(g, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
                out = self._run_step(batch)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[key] = g
            self.outputs[key] = out
            self.batches[key] = batch
            self.schedule.mark_captured(key)
        torch.cuda.synchronize(self.device)

    def can_run(self, batch_size: int) -> bool:
        return self.schedule.bucket_for(batch_size) is not None

    def replay(self, sb, prev_tokens: torch.Tensor | None, groups=None) -> torch.Tensor:
        """Run the decode-only scheduled batch ``sb`` (every row: one new token at position
        prefix_len, KV slot out_slots[i]); placeholders -(1+j) in its ids read token j of
        ``prev_tokens``.  Returns fp32 logits [bs, V'] (a view into the graph's output)."""
        bs = len(sb.reqs)
        key = self.schedule.key_for(bs, groups is not None)
        padded = key.batch_size
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
        if key.cascade:
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
