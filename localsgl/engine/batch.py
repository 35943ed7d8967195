"""ForwardBatch: the flat tensors one model step consumes.

Every step is described as a ragged batch of *extends*: request i already has
``prefix_lens[i]`` tokens in the KV pool and appends ``extend_lens[i]`` new ones
(a decode is an extend of length 1).  The attention backend reads the KV slots
of request i from ``req_to_token[req_pool_indices[i], :seq_lens[i]]``.
Keeping one description for prefill, decode and mixed steps is what lets the
scheduler stay ignorant of which attention backend runs.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .kv_pool import KVPool
    from .layers.attention.base import AttentionBackend


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill chunks, possibly mixed with decodes (extend_len 1)
    DECODE = "decode"  # every request appends exactly one token


@dataclass
class ForwardBatch:
    mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [T] int64, device
    positions: torch.Tensor  # [T] int64, device
    out_cache_loc: torch.Tensor  # [T] int64, device: KV slot written by each new token
    req_pool_indices: torch.Tensor  # [B] int64, device: row in req_to_token
    seq_lens: torch.Tensor  # [B] int32, device: prefix + extend
    prefix_lens: torch.Tensor  # [B] int32, device
    extend_lens: torch.Tensor  # [B] int32, device
    extend_start_loc: torch.Tensor  # [B] int32, device: start of request i in the flat token dim
    seq_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    req_to_token: torch.Tensor  # [max_reqs, max_context] int32, device (owned by ReqToTokenPool)
    kv_pool: "KVPool"
    attn_backend: "AttentionBackend"
    # Decode rows that share a cached prefix (kernels' PrefixGroups), set by the runner when
    # the backend supports cascade decoding; None: every row attends over its whole context.
    prefix_groups: Any = None
    # Filled by the backend's init_forward (kernel metadata); opaque to everyone else.
    attn_meta: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu) if self.seq_lens_cpu else 0

    @property
    def max_extend_len(self) -> int:
        return max(self.extend_lens_cpu) if self.extend_lens_cpu else 0
