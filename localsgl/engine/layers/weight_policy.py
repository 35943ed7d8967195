"""What a model does with the weights it loads: keep quantized tensors quantized or
dequantize them, and whether to quantize dense linear weights as they arrive.

The loader builds a model inside ``building(policy)``; the Linear layers and the embedding
made there read the policy.  When the policy can produce quantized weights (``defer``),
their weights are not allocated at build time (an 8B model in int4 must never hold its
bf16 weights on an 8 GiB card): each is created by the first tensor loaded into it.
Without a policy (the default) layers allocate dense weights up front, as always.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
from torch import nn

from .quant import QuantizedWeight, WeightFormat, is_quantized

WEIGHTS_MODES = ("keep", "dequantize")


@dataclass(frozen=True)
class WeightPolicy:
    keep_quantized: bool  # quantized tensors stay quantized (else they are dequantized at load)
    quantize: WeightFormat | None  # round-to-nearest quantization of dense linear weights at load
    dtype: torch.dtype  # the model's dtype (dense weights, activations)
    device: torch.device

    @property
    def defer(self) -> bool:
        """Linear weights are created by their first loaded tensor, not at build time."""
        return self.keep_quantized or self.quantize is not None

    def adopt(self, tensor, quantizable: bool = True):
        """A loaded weight as the layer keeps it: a QuantizedWeight (or RowStack) on the device,
        or a dense tensor in the model's dtype.  ``quantizable`` False (the embedding) never
        quantizes a dense tensor."""
        if is_quantized(tensor):
            if self.keep_quantized:
                return tensor.to(self.device)
            return tensor.to(self.device).dequantize(self.dtype)
        t = tensor.to(device=self.device)
        fmt = self.quantize.fitted(t.shape[1]) if quantizable and self.quantize is not None and t.dim() == 2 else None
        if fmt is not None:
            return QuantizedWeight.quantize(t, fmt)
        return t.to(self.dtype)


def default_weights_mode(device_type: str) -> str:
    """keep on a GPU (quantized weights stay quantized), dequantize on the CPU: the file's
    values exactly (keep rounds the fp16 scales to bf16 there), and the fastest start.  keep
    decodes ~1.8x faster there in bf16 with the same perplexity, so long CPU sessions should
    ask for it (bench/RESULTS.md, "Quantized weights on the CPU, quiet box")."""
    return "keep" if device_type == "cuda" else "dequantize"


_current = threading.local()


@contextlib.contextmanager
def building(policy: WeightPolicy | None):
    """Layers constructed inside read ``policy`` (see current())."""
    prev = getattr(_current, "policy", None)
    _current.policy = policy
    try:
        yield
    finally:
        _current.policy = prev


def current() -> WeightPolicy | None:
    return getattr(_current, "policy", None)


class QuantEmbedding(nn.Module):
    """An embedding table kept quantized: a lookup dequantizes the rows it reads, and a tied
    LM head multiplies by ``weight`` (the QuantizedWeight) directly."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.weight = weight
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.embedding(ids, self.dtype)


def make_embedding(num: int, dim: int, dtype, device) -> nn.Module:
    """An nn.Embedding whose table the loader (or init_dummy_weights) fills, so it is left
    uninitialised: nn.Embedding's random init of a 49,152 x 576 table costs 0.1-0.3 s of every
    start, and on the meta device its first call imports torch's meta kernels.  Under a
    deferring policy the table is left unallocated (meta) until loaded."""
    policy = current()
    where = "meta" if policy is not None and policy.defer else device
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim, dtype=dtype, device=where), _freeze=True)


def load_embedding(owner: nn.Module, attr: str, tensor) -> None:
    """Load the table of ``owner.<attr>`` (an nn.Embedding): copied into an allocated table,
    created for an unallocated one, or, for a quantized tensor kept quantized, a QuantEmbedding."""
    emb = getattr(owner, attr)
    policy = current_of(owner)
    if policy is not None:
        value = policy.adopt(tensor, quantizable=False)
        if isinstance(value, QuantizedWeight):
            setattr(owner, attr, QuantEmbedding(value, policy.dtype))
            return
        if emb.weight.is_meta:
            emb.weight = nn.Parameter(value.contiguous(), requires_grad=False)
            return
        tensor = value
    if isinstance(tensor, QuantizedWeight):
        tensor = tensor.dequantize(emb.weight.dtype)
    if tuple(emb.weight.shape) != tuple(tensor.shape):
        raise ValueError(f"embedding: expected {tuple(emb.weight.shape)}, got {tuple(tensor.shape)}")
    emb.weight.data.copy_(tensor)


def current_of(module: nn.Module) -> WeightPolicy | None:
    """The policy a model (or layer) was built under (stored by the loader as ``weight_policy``)."""
    return getattr(module, "weight_policy", None)
