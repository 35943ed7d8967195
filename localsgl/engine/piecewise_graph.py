"""Piecewise CUDA graphs for extend and mixed (prefill + decode) steps.

Why: an extend step runs eagerly, about a dozen launches per layer (norms, GEMMs, rotary,
K/V store, SiLU·mul), each costing host time in Python and the launcher.  For a small model
the GPU finishes a layer's work before the host has launched the next layer's, so the step
takes the host's time, not the device's.  Replaying graphs removes those launches; what is
left eager per layer is the attention.

How: a step of T tokens is padded to the next token bucket n >= T.  Per bucket, L + 1 graphs
(L = layers) are captured:
  * piece 0: embedding, then layer 0 up to its attention (norm, qkv, rotary, K/V store);
  * piece i: layer i-1 after its attention (o_proj, residual add + norm, MLP), then layer i
    up to its attention;
  * piece L: the last layer after its attention, then the final norm.
Between pieces the attention runs eagerly on the T real rows only: its work list follows each
request's prefix and extend lengths, which a graph could not keep fixed.  Pieces read and
write fixed buffers (token ids, positions, KV slots, residual, q, attention output, final
hidden).  Every op inside a piece is row-wise, so the padded rows — token 0 at position 0,
their K/V written to scratch slot 0 — never touch a real row.

Buckets are captured largest first while the engine idles (cuda_graph.py drives it); until a
step's own bucket exists it replays a captured one at most a quarter larger, else runs eagerly.
The same pieces run without capture on the CPU (``capture=False``): the tests check the
split, the padding and the fixed buffers against the eager forward there.
"""
from __future__ import annotations

import logging
import time

import torch

from .batch import ForwardBatch, ForwardMode
from .plan import PIECEWISE_MAX_TOKENS

log = logging.getLogger("localsgl.piecewise_graph")


# Steps above this many tokens run eagerly: their GEMMs alone keep the GPU busy longer than
# the host takes to launch them (a 4k-token step of a 1B model is ~10 ms of matmuls on an H200)
MAX_TOKENS = PIECEWISE_MAX_TOKENS


def token_buckets(max_tokens: int) -> list[int]:
    """Padded token counts a step may replay, ascending, the last >= max_tokens.

    Spacing grows with the count so that padding stays a few percent of a step's work:
    16 up to 128, 32 up to 256, 64 up to 1024, then 128."""
    out: list[int] = []
    n = 0
    while n < max_tokens:
        n += 16 if n < 128 else 32 if n < 256 else 64 if n < 1024 else 128
        out.append(n)
    return out


class _EagerPiece:
    """A piece run directly (no capture): the CPU stand-in for a CUDA graph."""

    def __init__(self, fn):
        self._fn = fn

    def replay(self) -> None:
        self._fn()


class PiecewiseGraphs:
    """The fixed buffers and per-bucket piece graphs of one model (see the module docstring)."""

    def __init__(self, model, attn_backend, kv_pool, device: torch.device, max_tokens: int, capture: bool = True):
        cfg = model.config
        self.model = model
        self.attn = attn_backend
        self.kv_pool = kv_pool
        self.device = device
        self.capture_graphs = capture
        self.buckets = token_buckets(max_tokens)
        n = self.buckets[-1]
        dt = model.dtype
        self.q_size = cfg.num_heads * cfg.head_dim
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.loc = torch.zeros(n, dtype=torch.int64, device=device)  # KV slots; padded rows: scratch slot 0
        self.residual = torch.zeros(n, cfg.hidden_size, dtype=dt, device=device)
        self.hidden = torch.zeros(n, cfg.hidden_size, dtype=dt, device=device)  # final-normed output
        self.q = torch.zeros(n, self.q_size, dtype=dt, device=device)
        self.attn_out = torch.zeros(n, self.q_size, dtype=dt, device=device)
        self.graphs: dict[int, list] = {}
        # captured largest first: the memory pool's blocks then serve the smaller buckets too
        self.pending: list[int] = sorted(self.buckets, reverse=True)
        self.capture_seconds = 0.0

    # ------------------------------------------------------------------ which bucket
    def planned_bucket(self, num_tokens: int) -> int | None:
        """The bucket a step of this many tokens replays once every bucket is captured."""
        for b in self.buckets:
            if b >= num_tokens:
                return b
        return None

    def bucket_for(self, num_tokens: int) -> int | None:
        """The smallest captured bucket that holds num_tokens, unless it pads the step by more
        than a quarter beyond its own bucket (a 20-token prefill does not run 2,560 rows of
        GEMMs while the small buckets wait for capture); None: the step runs eagerly."""
        planned = self.planned_bucket(num_tokens)
        if planned is None:
            return None
        best = None
        for b in self.graphs:
            if b >= num_tokens and (best is None or b < best):
                best = b
        return best if best is not None and best <= planned + max(64, planned // 4) else None

    def applies(self, batch: ForwardBatch) -> bool:
        return batch.mode == ForwardMode.EXTEND and 0 < batch.num_tokens and self.bucket_for(batch.num_tokens) is not None

    # ------------------------------------------------------------------ the pieces
    def _static_batch(self, n: int) -> ForwardBatch:
        """What the pieces read of a batch: the KV pool, the slots, the backend."""
        z = self.loc[:n]
        return ForwardBatch(
            mode=ForwardMode.EXTEND, batch_size=n, input_ids=self.ids[:n], positions=self.positions[:n],
            out_cache_loc=z, req_pool_indices=z, seq_lens=z, prefix_lens=z, extend_lens=z, extend_start_loc=z,
            seq_lens_cpu=[], prefix_lens_cpu=[], extend_lens_cpu=[], req_to_token=z, kv_pool=self.kv_pool,
            attn_backend=self.attn,
        )

    def _piece(self, k: int, n: int, batch: ForwardBatch) -> None:
        """Piece k of bucket n, on the fixed buffers' first n rows."""
        m = self.model
        layers = m.layers
        m.rotary.begin_forward()  # no rotary tables carried from one piece to the next
        res = self.residual[:n]
        if k == 0:
            x, r = m.embed_tokens(self.ids[:n]), None
        else:
            x, r = layers[k - 1].attention_output(self.attn_out[:n], res)
        if k < len(layers):
            q, r = layers[k].attention_input(x, r, self.positions[:n], m.rotary, batch)
            self.q[:n].view(q.shape).copy_(q)  # one strided copy out of the qkv output
        else:
            h, r = m.norm(x, r)
            self.hidden[:n].copy_(h)
        if r.data_ptr() != res.data_ptr():  # the fused norms add in place; the torch path does not
            res.copy_(r)

    # ------------------------------------------------------------------ capture
    def reset_inputs(self) -> None:
        """Zero the fixed inputs (after the steps already queued): a capture's warm-up run
        then writes K/V only to scratch slot 0."""
        self.ids.zero_()
        self.positions.zero_()
        self.loc.zero_()

    @torch.inference_mode()
    def capture(self, n: int, stream=None, pool=None):
        """Capture (or, without capture, prepare) bucket n's pieces; returns the memory pool
        the graphs allocate from (to share with the next capture)."""
        t = time.perf_counter()
        batch = self._static_batch(n)
        count = len(self.model.layers) + 1
        if not self.capture_graphs:
            self.graphs[n] = [_EagerPiece(lambda k=k: self._piece(k, n, batch)) for k in range(count)]
        else:
            self.reset_inputs()
            cur = torch.cuda.current_stream(self.device)
            stream.wait_stream(cur)
            with torch.cuda.stream(stream):  # warm-up: compile and pick kernels outside the capture
                for k in range(count):
                    self._piece(k, n, batch)
            cur.wait_stream(stream)
            torch.cuda.synchronize(self.device)
            graphs = []
            for k in range(count):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    self._piece(k, n, batch)
                if pool is None:
                    pool = g.pool()
                graphs.append(g)
            torch.cuda.synchronize(self.device)
            self.graphs[n] = graphs
        if n in self.pending:
            self.pending.remove(n)
        self.capture_seconds += time.perf_counter() - t
        return pool

    def abandon(self) -> None:
        """Capture nothing more (a capture failed): uncaptured sizes run eagerly."""
        self.pending.clear()

    # ------------------------------------------------------------------ replay
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """The final-normed hidden states [T, H] of an extend batch whose backend metadata is
        set (``init_forward``); a view of a fixed buffer, valid until the next step."""
        T = batch.num_tokens
        n = self.bucket_for(T)
        pieces = self.graphs[n]
        self.ids[:T].copy_(batch.input_ids, non_blocking=True)
        self.positions[:T].copy_(batch.positions, non_blocking=True)
        self.loc[:T].copy_(batch.out_cache_loc, non_blocking=True)
        if n > T:
            self.loc[T:n].zero_()  # padded rows write their K/V to scratch slot 0, never a live slot
        q = self.q[:T].view(T, -1, self.model.config.head_dim)
        out = self.attn_out[:T].view(q.shape)
        for i, layer in enumerate(self.model.layers):
            pieces[i].replay()
            attn = layer.self_attn
            o = self.attn.attend(q, attn.layer_id, batch, attn.scale, out=out)
            if o is not out:
                out.copy_(o)
        pieces[-1].replay()
        return self.hidden[:T]
