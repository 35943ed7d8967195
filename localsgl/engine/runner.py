"""ModelRunner: a scheduled batch -> flat tensors -> model forward -> logits of the rows to sample.

Decode-only batches on CUDA replay a CUDA graph captured for the next larger
batch-size bucket (padded rows write their KV to scratch slot 0); everything
else runs eagerly, and so does a decode batch whose bucket is not captured yet
(the small buckets are captured before serving, the rest by ``capture_next_graph``,
which the engine thread calls between steps).  Extend and mixed steps replay graphs around
their eager attention (piecewise_graph.py), padded to a token bucket, for models whose layers
are small enough that launches bound those steps (plan.piecewise_graphs_by_default; the
``piecewise_graphs`` switch forces them on or off).  The runner never decides *what* runs —
that is the scheduler's job — only how.
"""
from __future__ import annotations

import logging
import time

import torch

from .batch import ForwardBatch, ForwardMode
from .kv_pool import KVPool, ReqToTokenPool
from .plan import GPU_CHUNK_SIZE, piecewise_graphs_by_default
from .layers.attention.base import AttentionBackend
from . import debug_switches, host_malloc
from . import prefix_groups as _prefix_groups
from .scheduler import ScheduledBatch

log = logging.getLogger("localsgl.runner")


class ModelRunner:
    def __init__(
        self,
        model,
        kv_pool: KVPool,
        req_pool: ReqToTokenPool,
        attn_backend: AttentionBackend,
        device: torch.device,
        cuda_graph_bs: list[int] | None = None,
        max_step_tokens: int | None = None,
    ):
        self.model = model
        self.kv_pool = kv_pool
        self.req_pool = req_pool
        self.attn = attn_backend
        self.device = device
        if device.type == "cpu":
            host_malloc.keep_freed_memory()  # the steps' tensors reuse pages instead of faulting them in
        self.debug = debug_switches.of(model)  # the engine's switches (EngineCore hands them to the model)
        self.prefix_shape = None  # (groups, rows per group) of cascade decoding, None: off
        if self.debug.cascade:
            cfg = model.config
            self.prefix_shape = attn_backend.prefix_group_shape(cfg.num_heads, cfg.num_kv_heads)
        self.graphs = None
        self.last_path = "eager"  # how the last step ran: "graph", "piecewise" or "eager" (for profiling)
        self.wants_graph = False  # the last decode step ran without the graph planned for it
        if cuda_graph_bs and device.type == "cuda" and attn_backend.supports_cuda_graph:
            from .cuda_graph import CudaGraphRunner
            from .graph_schedule import STARTUP_MAX_BS

            piecewise = None
            wanted = self.debug.piecewise_graphs
            if wanted is None:
                wanted = piecewise_graphs_by_default(model.config)
            if wanted and attn_backend.supports_prestored_kv and getattr(model, "supports_piecewise_graphs", False):
                # a step's tokens: a prefill chunk plus one per running request
                from .piecewise_graph import MAX_TOKENS

                piecewise = min(max_step_tokens or GPU_CHUNK_SIZE + req_pool.max_reqs, MAX_TOKENS)
            t = time.perf_counter()
            startup = {None: STARTUP_MAX_BS, True: max(STARTUP_MAX_BS, 1), False: 0}[self.debug.startup_graph]
            self.graphs = CudaGraphRunner(self, sorted(cuda_graph_bs), startup_max_bs=startup,
                                          piecewise_tokens=piecewise)
            self.graph_capture_seconds = time.perf_counter() - t
            log.info("captured %d of %d CUDA graphs in %.1f s (the rest while serving)", len(self.graphs.graphs),
                     len(self.graphs.graphs) + len(self.graphs.schedule.pending), self.graph_capture_seconds)

    @property
    def graphs_pending(self) -> bool:
        """Whether decode graphs remain to be captured (by ``capture_next_graph``)."""
        return self.graphs is not None and self.graphs.pending

    def capture_next_graph(self, plain_only: bool = False) -> None:
        """Capture one more decode graph.  Engine thread only, with no step in flight."""
        if self.graphs_pending:
            self.graphs.capture_next(plain_only)
        self.wants_graph = False

    def _to_device(self, data, dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def build_batch(self, sb: ScheduledBatch, prev_tokens: torch.Tensor | None = None) -> ForwardBatch:
        ids: list[int] = []
        pos: list[int] = []
        starts: list[int] = []
        seq_lens: list[int] = []
        for r, n, p in zip(sb.reqs, sb.extend_lens, sb.prefix_lens):
            starts.append(len(ids))
            if n == 1:
                ids.append(r.token_at(p))
                pos.append(p)
            else:
                ids.extend(r.all_ids(p + n)[p:])
                pos.extend(range(p, p + n))
            seq_lens.append(p + n)
        i32, i64 = torch.int32, torch.int64
        b = ForwardBatch(
            mode=ForwardMode.DECODE if sb.decode_only else ForwardMode.EXTEND,
            batch_size=len(sb.reqs),
            input_ids=self._to_device(ids, i64),
            positions=self._to_device(pos, i64),
            out_cache_loc=(sb.out_slots.pin_memory() if self.device.type == "cuda" else sb.out_slots).to(
                self.device, non_blocking=True),
            req_pool_indices=self._to_device([r.req_row for r in sb.reqs], i64),
            seq_lens=self._to_device(seq_lens, i32),
            prefix_lens=self._to_device(sb.prefix_lens, i32),
            extend_lens=self._to_device(sb.extend_lens, i32),
            extend_start_loc=self._to_device(starts, i32),
            seq_lens_cpu=seq_lens,
            prefix_lens_cpu=list(sb.prefix_lens),
            extend_lens_cpu=list(sb.extend_lens),
            req_to_token=self.req_pool.table,
            kv_pool=self.kv_pool,
            attn_backend=self.attn,
        )
        nd = sb.num_decode
        if nd and self.req_pool.table is not self.req_pool.host:
            # the decode rows' new slots are in the host table only (the graph path writes
            # them inside the graph); decode rows come first, one token each
            self.req_pool.table[b.req_pool_indices[:nd], b.positions[:nd]] = b.out_cache_loc[:nd].to(torch.int32)
        if prev_tokens is not None and ids and min(ids) < 0:
            # placeholders -(1+j): token j sampled by the step still in flight, read on the device
            ph = b.input_ids < 0
            b.input_ids = torch.where(ph, prev_tokens[(-b.input_ids - 1).clamp(min=0)], b.input_ids)
        if sb.decode_only:
            b.prefix_groups = self._prefix_groups(sb)
        b.extra["sample_index"] = [s + n - 1 for s, n, smp in zip(starts, sb.extend_lens, sb.sample) if smp]
        return b

    def _prefix_groups(self, sb: ScheduledBatch):
        """Shared-prefix groups of a decode-only step (cascade attention), or None."""
        if self.prefix_shape is None or len(sb.reqs) < 2:
            return None
        groups = _prefix_groups.shared_prefix_groups(sb.reqs, *self.prefix_shape)
        if not groups:
            return None
        from localsgl_kernels.decode_attention import PrefixGroups

        return PrefixGroups.build(len(sb.reqs), groups, *self.prefix_shape, self.device)

    @torch.inference_mode()
    def forward(self, sb: ScheduledBatch, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; return fp32 logits [num_sampled_rows, vocab]."""
        if sb.decode_only and self.graphs is not None:
            bs = len(sb.reqs)
            self.wants_graph = self.graphs.schedule.wants_capture(bs)
            if self.graphs.can_run(bs):
                assert sb.num_decode == bs
                self.last_path = "graph"
                return self.graphs.replay(sb, prev_tokens, self._prefix_groups(sb))
        return self._forward_eager(sb, prev_tokens)

    def _forward_eager(self, sb: ScheduledBatch, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        batch = self.build_batch(sb, prev_tokens)
        self.last_path = "eager"
        self.attn.init_forward(batch)
        pw = self.graphs.piecewise if self.graphs is not None else None
        if pw is not None and pw.applies(batch):  # its buckets are captured while the engine idles
            self.last_path = "piecewise"
            hidden = pw.run(batch)
        else:
            hidden = self.model(batch.input_ids, batch.positions, batch)
        idx = batch.extra["sample_index"]
        if len(idx) != hidden.shape[0]:
            hidden = hidden[self._to_device(idx, torch.int64)]  # pinned: no wait for the GPU
        return self.model.compute_logits(hidden)
