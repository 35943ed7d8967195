"""The attention backend interface.

A backend turns (q, k, v) of the new tokens of a ragged batch into attention
outputs: it first stores k and v into the KV pool at ``batch.out_cache_loc``,
then lets each new token attend to its request's cached prefix and causally to
the request's other new tokens.  Backends: ``torch`` (reference, CPU and GPU)
and ``triton`` (GPU kernels).  The scheduler and runner never branch on which
one is active; CUDA-graph hooks are optional capabilities.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ...batch import ForwardBatch


class AttentionBackend(ABC):
    name: str = "base"
    supports_cuda_graph: bool = False
    supports_prestored_kv: bool = False  # has attend(): K/V of the new tokens already stored

    def prefix_group_shape(self, num_heads: int, num_kv_heads: int) -> tuple[int, int] | None:
        """(max groups, max rows per group) of shared-prefix (cascade) decoding, or None
        when this backend reads every row's whole context (ForwardBatch.prefix_groups unused)."""
        return None

    @abstractmethod
    def init_forward(self, batch: ForwardBatch) -> None:
        """Compute per-step metadata (once per model step, shared by every layer)."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        layer: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Store k/v of the new tokens, then attend."""

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch) -> None:
        """Write the new tokens' K/V ([T, Hkv, D]) into the pool at ``batch.out_cache_loc``
        (the first half of ``forward``; piecewise graphs run it inside a captured piece)."""
        batch.kv_pool.store(layer, batch.out_cache_loc, k, v)

    def attend(self, q: torch.Tensor, layer: int, batch: ForwardBatch, scale: float,
               out: torch.Tensor | None = None, int8_row=None, prefetch=()) -> torch.Tensor:
        """Attend when the new tokens' K/V are already in the pool (the fused one-token
        path or ``store_kv`` wrote them), into ``out`` [T, Hq, D] when given; only backends
        with ``supports_prestored_kv`` implement it.  ``int8_row`` (a decode step of one row,
        localsgl_kernels.quant_words.PreparedRow): the backend may also write the output as the
        next GEMV's int8 activations, and marks it filled when it did.  ``prefetch`` (a decode step,
        localsgl_kernels.l2_prefetch.spans): weights of the next GEMV the backend may pull into L2
        while it attends."""
        raise NotImplementedError(f"the {self.name} backend has no attend()")

    # --- CUDA graph hooks (decode only); backends that capture override these ---
    def init_cuda_graph_state(self, max_bs: int, max_context: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def init_forward_for_capture(self, batch: ForwardBatch) -> None:  # pragma: no cover
        raise NotImplementedError

    def init_forward_for_replay(self, batch: ForwardBatch) -> None:  # pragma: no cover
        raise NotImplementedError


def create_backend(name: str, device: torch.device) -> AttentionBackend:
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            try:
                import triton  # noqa: F401

                name = "triton"
            except ImportError as e:  # triton missing: stay correct, if slower
                import logging

                logging.getLogger("localsgl").warning("triton unavailable (%s); using torch attention", e)
    if name == "torch":
        from .torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        if device.type != "cuda":
            from ...params import InvalidRequestError

            raise InvalidRequestError("the triton attention backend needs a CUDA device; use --attention-backend torch",
                                      "attention_backend")
        from .triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}: choose triton or torch")
