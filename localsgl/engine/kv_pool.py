"""Preallocated KV tensors and O(1) slot allocators.

KVPool holds, per layer, K and V of shape [num_slots + 1, num_kv_heads, head_dim].
Slot 0 is a scratch slot that is never handed out: padded rows of a CUDA-graph
batch write their KV there.  Slots are token-granular: one slot = one token of
one layer stack, so a prefix shared by the radix cache costs nothing extra.

An FP8 pool (``kv_dtype=torch.float8_e4m3fn``) stores each token's K and V per KV head
as e4m3 values plus one fp32 scale per (token, head), chosen when the token is stored:
    s = max(amax(|x|), tiny) / 448,   q = round_e4m3(clamp(x / s, -448, 448)),   x ≈ q · s
so any head's range fits without calibration and a row's relative error is that of e4m3
(3 mantissa bits).  Scales are kept head-major, [Hkv, num_slots + 1], so a kernel reading
one KV head of consecutive slots reads consecutive scales.  A token then costs
2·L·Hkv·(D + 4) bytes instead of 2·L·Hkv·D·2 (bf16): 0.52x at D = 128.

ReqToTokenPool is the table [max_reqs, max_context] mapping each running
request's token positions to KV slots; attention kernels read it directly.
"""
from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
FP8_MIN_SCALE = 1e-12  # an all-zero row gets this scale (its values stay 0)


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H, D] -> (e4m3 values [T, H, D], fp32 scales [T, H]) with x ≈ values · scale."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / FP8_MAX).clamp_min(FP8_MIN_SCALE)
    q = (xf / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)
    return q, scale


def fp8_dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 values [..., H, D] and their scales [..., H] -> values in ``dtype`` (fp32 multiply)."""
    return (q.float() * scale[..., None]).to(dtype)


def kv_cache_torch_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's storage dtype for --kv-cache-dtype ``name`` (None/"auto": the model's)."""
    if name in (None, "auto"):
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return FP8_KV_DTYPE
    raise ValueError(f"unknown KV cache dtype {name!r}: choose auto or fp8")


class SlotAllocator:
    """A stack of free integer ids in a preallocated tensor: alloc/free are O(1) per id.

    The stack's top holds the smallest free id and ``alloc`` hands ids out in ascending
    order (``free`` pushes them back reversed, so a freed run comes back as the same run):
    a request that allocates its prompt and then one slot per decode step owns one
    ascending run of KV slots, which the CPU decode step attends over as a view of the
    pool instead of gathering it (layers/cpu_decode.py)."""

    def __init__(self, ids: torch.Tensor):
        self._stack = ids.flip(0).to(torch.int64)
        self.capacity = int(ids.numel())
        self._top = self.capacity  # number of free ids; free ids are _stack[:_top]

    @property
    def num_free(self) -> int:
        return self._top

    def alloc(self, n: int) -> torch.Tensor | None:
        """Return n ids (int64 CPU tensor), or None if fewer than n are free."""
        if n > self._top:
            return None
        self._top -= n
        return self._stack[self._top : self._top + n].flip(0)

    def free(self, ids: torch.Tensor) -> None:
        n = int(ids.numel())
        if n == 0:
            return
        if self._top + n > self.capacity:
            raise RuntimeError("double free: more ids returned than were allocated")
        self._stack[self._top : self._top + n] = ids.reshape(-1).to("cpu", torch.int64).flip(0)
        self._top += n


class KVPool:
    """``dtype`` is the dtype reads return (the model's); ``kv_dtype`` the storage dtype
    (default ``dtype``; FP8_KV_DTYPE adds the per-(token, head) scale buffers).
    Attributes: ``dtype`` (storage, the buffers' dtype), ``read_dtype``, ``quantized``,
    ``k_scale`` / ``v_scale`` (per layer, [Hkv, num_slots + 1] fp32; None unless quantized)."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_dtype: torch.dtype | None = None,
    ):
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.read_dtype = dtype
        self.dtype = kv_dtype or dtype
        if self.dtype.is_floating_point and self.dtype.itemsize == 1 and self.dtype != FP8_KV_DTYPE:
            raise ValueError(f"unsupported KV cache dtype {self.dtype}: the 8-bit pool stores {FP8_KV_DTYPE}")
        self.quantized = self.dtype == FP8_KV_DTYPE
        self.device = torch.device(device)
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.k_buffer = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(num_layers)]
        self.v_buffer = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(num_layers)]
        self.k_scale = self.v_scale = None
        if self.quantized:
            sshape = (num_kv_heads, num_slots + 1)
            self.k_scale = [torch.ones(sshape, dtype=torch.float32, device=self.device) for _ in range(num_layers)]
            self.v_scale = [torch.ones(sshape, dtype=torch.float32, device=self.device) for _ in range(num_layers)]
        self.allocator = SlotAllocator(torch.arange(1, num_slots + 1))

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V bytes of one token over all layers, scales included for FP8_KV_DTYPE."""
        if dtype == FP8_KV_DTYPE:
            return 2 * num_layers * num_kv_heads * (head_dim + 4)
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k_scale, v_scale) of a layer: [Hkv, num_slots + 1] fp32, or (None, None)."""
        if not self.quantized:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    def release(self) -> None:
        """Drop every buffer so its memory can go back."""
        for bufs in (self.k_buffer, self.v_buffer, self.k_scale, self.v_scale):
            if bufs is not None:
                bufs.clear()

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def alloc(self, n: int) -> torch.Tensor | None:
        return self.allocator.alloc(n)

    def free(self, slots: torch.Tensor) -> None:
        self.allocator.free(slots)

    def store(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the new tokens' K and V ([T, Hkv, D]) into their slots (quantized in an FP8 pool)."""
        if not self.quantized:
            self.k_buffer[layer][loc] = k.to(self.dtype)
            self.v_buffer[layer][loc] = v.to(self.dtype)
            return
        for buf, sbuf, x in ((self.k_buffer, self.k_scale, k), (self.v_buffer, self.v_scale, v)):
            q, s = fp8_quantize_rows(x)
            buf[layer].view(torch.uint8)[loc] = q.view(torch.uint8)  # byte views: indexing kernels for every torch
            sbuf[layer][:, loc] = s.t()

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``slots`` (1-D int64) as [N, Hkv, D] in ``read_dtype`` (dequantized)."""
        if not self.quantized:
            k = self.k_buffer[layer].index_select(0, slots)
            v = self.v_buffer[layer].index_select(0, slots)
            return k.to(self.read_dtype), v.to(self.read_dtype)
        k = self.k_buffer[layer].view(torch.uint8).index_select(0, slots).view(FP8_KV_DTYPE)
        v = self.v_buffer[layer].view(torch.uint8).index_select(0, slots).view(FP8_KV_DTYPE)
        ks = self.k_scale[layer].index_select(1, slots).t()
        vs = self.v_scale[layer].index_select(1, slots).t()
        return fp8_dequantize_rows(k, ks, self.read_dtype), fp8_dequantize_rows(v, vs, self.read_dtype)


class ReqToTokenPool:
    """Rows 1..max_reqs are handed out; row 0 stays all-zero (scratch slot 0), so the
    padded rows of a CUDA-graph batch can point at it.

    On a GPU the table lives on the device (the attention kernels read it) and a host
    mirror answers the scheduler's reads (``slots``): reading the device table would wait
    for the step in flight and undo the overlap of scheduling with GPU work.  Writes go
    through pinned memory without waiting either."""

    def __init__(self, max_reqs: int, max_context: int, device: torch.device | str):
        self.max_reqs = max_reqs
        self.max_context = max_context
        self.table = torch.zeros((max_reqs + 1, max_context), dtype=torch.int32, device=device)
        self.host = self.table if self.table.device.type == "cpu" else torch.zeros(
            (max_reqs + 1, max_context), dtype=torch.int32)
        self.allocator = SlotAllocator(torch.arange(1, max_reqs + 1))

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def alloc(self) -> int | None:
        ids = self.allocator.alloc(1)
        return None if ids is None else int(ids[0])

    def free(self, row: int) -> None:
        self.allocator.free(torch.tensor([row]))

    def slots(self, row: int, start: int, end: int) -> torch.Tensor:
        """KV slots of positions start..end-1 of a row (CPU int64), without touching the device."""
        return self.host[row, start:end].to(torch.int64)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        n = int(slots.numel())
        if not n:
            return
        s32 = slots.to("cpu", torch.int32)
        if self.host is not self.table:
            self.host[row, start : start + n] = s32
            s32 = self._to_table_device(s32)
        self.table[row, start : start + n] = s32

    def _to_table_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.table.is_cuda:
            t = t.pin_memory()
        return t.to(self.table.device, non_blocking=True)

    def write_many(self, rows: list[int], positions: list[int], slots: torch.Tensor, device: bool = True) -> None:
        """One slot per (row, position): a single scatter instead of one copy per request.
        ``device=False`` writes the host mirror only: the caller writes the device table
        itself (the decode step does, inside its graph)."""
        if not rows:
            return
        r = torch.tensor(rows, dtype=torch.long)
        p = torch.tensor(positions, dtype=torch.long)
        s32 = slots.to("cpu", torch.int32)
        if self.host is not self.table:
            self.host[r, p] = s32
            if not device:
                return
            r, p, s32 = self._to_table_device(r), self._to_table_device(p), self._to_table_device(s32)
        self.table[r, p] = s32
