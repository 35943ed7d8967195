"""Rotary position embedding (neox / "rotate half" layout, as HF Llama uses).

cos/sin are precomputed in fp32 for every position below max_positions, with
Llama-3 frequency scaling or linear scaling applied to the inverse frequencies.  Nothing
checks a position against the table while a step runs (the Triton kernel reads
``cos_sin[p]`` unguarded): the engine sizes the table from its plan's max_model_len
(``resize``) and checks it (``check_covers``), and requests never reach a position at or
beyond max_model_len.
"""
from __future__ import annotations

import math

import torch

from . import kernels_enabled


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv / float(scaling["factor"])).float()
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, out).float()
    raise ValueError(f"unsupported rope scaling {kind!r}")


class RotaryEmbedding(torch.nn.Module):
    use_kernels = True  # the engine's kernels switch (debug_switches.apply_to_model)

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None, device=None):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", inv_frequencies(head_dim, theta, scaling).to(device), persistent=False)
        self.register_buffer("cos_sin", self._table(max_positions), persistent=False)
        self._cache = None  # (positions, cos, sin) of the current forward (torch path)

    def _table(self, max_positions: int) -> torch.Tensor:
        """[max_positions, R] fp32: cos | sin of every position below max_positions."""
        t = torch.arange(max_positions, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)  # [P, R/2]
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    @property
    def max_positions(self) -> int:
        """Positions the table holds: every position p < max_positions may be rotated."""
        return self.cos_sin.shape[0]

    def resize(self, max_positions: int) -> None:
        """Rebuild the table for exactly ``max_positions`` positions (the engine calls this with its
        final max_model_len before anything captures the table)."""
        if max_positions != self.max_positions:
            self.cos_sin = self._table(max_positions)
            self._cache = None

    def check_covers(self, max_model_len: int) -> None:
        """Raise unless every position a request of max_model_len tokens reaches is in the table."""
        if self.max_positions < max_model_len:
            raise ValueError(
                f"the rotary table holds {self.max_positions:,} positions but max_model_len is "
                f"{max_model_len:,}: positions beyond the table would read past it"
            )

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, Hq, D], k: [T, Hkv, D] -> rotated (new tensors or in place)."""
        if self.use_kernels and kernels_enabled(q, "rotary"):
            from localsgl_kernels.rotary import apply_rotary

            return apply_rotary(q, k, positions, self.cos_sin)
        if q.shape[-1] != self.cos_sin.shape[-1]:  # partial rotary width
            return apply_rotary_ref(q, k, positions, self.cos_sin)
        cos, sin = self._tables(positions)
        return _rotate_full(q, cos, sin), _rotate_full(k, cos, sin)

    def begin_forward(self) -> None:
        """Forget the last step's tables (the model calls this once per forward)."""
        self._cache = None

    def _tables(self, positions: torch.Tensor):
        """[T, 1, D] fp32 cos | cos and −sin | sin for these positions, built by the first
        layer of a forward and reused by the others (they pass the same positions tensor)."""
        cached = self._cache
        if cached is not None and cached[0] is positions:
            return cached[1], cached[2]
        half = self.cos_sin.shape[-1] // 2
        cs = self.cos_sin[positions]
        c, s = cs[:, None, :half], cs[:, None, half:]
        cos, sin = torch.cat([c, c], dim=-1), torch.cat([-s, s], dim=-1)
        self._cache = (positions, cos, sin)
        return cos, sin


def _rotate_full(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin (fp32, one rounding): bit-identical in fp32 to
    apply_rotary_ref (x1·c − x2·s = x1·c + (−x2)·s exactly) with fewer ops."""
    half = x.shape[-1] // 2
    xf = x.float()
    out = xf * cos + torch.cat([xf[..., half:], xf[..., :half]], dim=-1) * sin
    return out.to(x.dtype)


def apply_rotary_ref(q, k, positions, cos_sin):
    half = cos_sin.shape[-1] // 2
    cs = cos_sin[positions]
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]

    def rot(x):
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rot(q), rot(k)
