"""Device detection and the memory plan: how many bytes go to weights, activations,
CUDA graphs and the KV cache, and what follows (KV tokens, max running requests,
max model length, prefill chunk size, CUDA-graph batch buckets).

Everything here is computed from config.json and the device *before* loading, so
``localsgl info`` can show it; the engine calls ``make_plan`` again after loading with
``free_memory_after_weights`` (measured) to size the KV pool on a GPU.

GPU budget (per device):
    budget    = min(total, free at start, --gpu-memory cap)
    usable    = budget - weights - activation reserve - graph reserve - safety margin
                (margin = max(5% of budget, 512 MiB))
    KV bytes  = --kv-memory if given (must fit in usable), else usable - req_to_token table
CPU:
    KV bytes  = --kv-memory, else min(max(16384 tokens, --max-model-len), 4 GiB, 25% of RAM,
                what max_running x max_model_len needs)
Context:
    max_model_len = --max-model-len, else min(max_position_embeddings, KV tokens, sliding window);
    the engine sizes the rotary table from the final plan's max_model_len.  A model whose
    layers slide (the engine attends to the whole context) is capped at its window, and a
    --max-model-len beyond the window is refused.
"""
from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

GiB = 1 << 30
MiB = 1 << 20

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

GPU_CHUNK_SIZE = 2048
CPU_CHUNK_SIZE = 512
CPU_MAX_RUNNING = 64
CPU_KV_DEFAULT = 4 * GiB  # cap of the default CPU KV pool
CPU_KV_TOKENS = 16384  # default CPU KV pool: e.g. 64 requests of 256 tokens
MAX_GRAPH_BUCKETS = 40


class PlanError(ValueError):
    """The model or the requested sizes do not fit the device: a usage error."""


@dataclass
class DeviceInfo:
    kind: str  # "cuda" | "cpu"
    name: str
    total_memory: int  # bytes (GPU memory, or RAM for the CPU)
    free_memory: int | None = None  # bytes free now (GPU) / available (CPU)
    index: int = 0
    sm_count: int | None = None
    capability: tuple[int, int] | None = None
    cores: int | None = None
    bf16: bool = False  # native bf16 support (GPU: sm80+; CPU: avx512_bf16 / amx_bf16)
    count: int = 1  # devices of this kind visible

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.capability is not None:
            d["capability"] = f"{self.capability[0]}.{self.capability[1]}"
        return d

    def describe(self) -> str:
        from ..config import format_size

        if self.kind == "cuda":
            cap = f"sm_{self.capability[0]}{self.capability[1]}" if self.capability else "?"
            return f"{self.name} ({format_size(self.total_memory)}, {self.sm_count} SMs, {cap})"
        return f"{self.name} ({self.cores} cores, {format_size(self.total_memory)} RAM, bf16 {'yes' if self.bf16 else 'no'})"


# ----------------------------------------------------------------------------- devices


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    text = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_bf16(flags: set[str]) -> bool:
    """avx512_bf16 or AMX-BF16 (x86), or bf16 (aarch64 'Features')."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)


def _cpu_name(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "CPU"


def _meminfo() -> dict[str, int]:
    out = {}
    for line in _read("/proc/meminfo").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover
        return os.cpu_count() or 1


def detect_cpu() -> DeviceInfo:
    info = _read("/proc/cpuinfo")
    mem = _meminfo()
    total = mem.get("MemTotal")
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # pragma: no cover
            total = 0
    return DeviceInfo(
        kind="cpu",
        name=_cpu_name(info),
        total_memory=int(total),
        free_memory=mem.get("MemAvailable"),
        cores=_cpu_count(),
        bf16=cpu_has_bf16(cpu_flags(info)),
    )


def detect_cuda(index: int = 0) -> DeviceInfo:
    import torch

    props = torch.cuda.get_device_properties(index)
    try:
        free, total = torch.cuda.mem_get_info(index)
    except RuntimeError:  # pragma: no cover
        free, total = None, props.total_memory
    cap = (props.major, props.minor)
    return DeviceInfo(
        kind="cuda",
        name=props.name,
        total_memory=int(total),
        free_memory=None if free is None else int(free),
        index=index,
        sm_count=props.multi_processor_count,
        capability=cap,
        bf16=cap >= (8, 0),
        count=torch.cuda.device_count(),
    )


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def detect_device(device: str | None = None) -> DeviceInfo:
    """None/'auto' -> the first CUDA device if there is one, else the CPU; 'cuda[:N]' or 'cpu'."""
    if device in (None, "", "auto"):
        return detect_cuda(0) if cuda_available() else detect_cpu()
    if device == "cpu":
        return detect_cpu()
    if device.startswith("cuda"):
        if not cuda_available():
            raise PlanError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
        _, _, idx = device.partition(":")
        return detect_cuda(int(idx or 0))
    raise PlanError(f"unknown device {device!r} (use cuda, cuda:N or cpu)")


def default_dtype(device_info: DeviceInfo, config=None):
    """cuda: bfloat16 where supported (sm80+), else float16.  cpu: bfloat16 where the CPU has
    it (avx512_bf16/AMX) and torch multiplies it natively in this process (oneDNN; see
    layers/cpu_routes.py), else float32 -- unless the model's fp32 weights would take more
    than half the RAM, then bfloat16.  Returns a torch.dtype (use dtype_name for the string).

    Why: with native bf16 matmul the CPU decodes bf16 about 1.5-2x faster than fp32.  Without
    it, torch's bf16 kernels are emulated: an fp32 decode step of a small model is about as
    fast at one row and faster at 32 (the widened bf16 GEMMs convert every weight they read),
    and its logits are exact to fp32 (bench/RESULTS.md, "CPU decode routes").  fp32 weights
    take twice the memory, so a model that would crowd the RAM stays in bf16."""
    import torch

    if device_info.kind == "cuda":
        return torch.bfloat16 if device_info.bf16 else torch.float16
    from .layers.cpu_routes import native_matmul

    if device_info.bf16 and native_matmul(torch.bfloat16):
        return torch.bfloat16
    if config is not None and 2 * weights_bytes_for(config, "float32") > device_info.total_memory:
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype) -> str:
    """torch.bfloat16 / 'bf16' / 'bfloat16' -> 'bfloat16' (one of DTYPE_BYTES)."""
    s = str(dtype).lower().removeprefix("torch.")
    s = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(s, s)
    if s not in DTYPE_BYTES:
        raise PlanError(f"unsupported dtype {dtype!r} (use {', '.join(DTYPE_BYTES)})")
    return s


# ----------------------------------------------------------------------------- plan


@dataclass
class MemoryPlan:
    device: str
    dtype: str
    budget_bytes: int  # memory the plan may use on one device
    weights_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int
    kv_tokens: int
    max_running: int
    max_model_len: int
    chunk_size: int
    cuda_graph_bs: list[int]
    activation_reserve_bytes: int
    graph_reserve_bytes: int
    req_to_token_bytes: int
    safety_margin_bytes: int
    tp: int = 1
    context_limit: str | None = None  # why max_model_len stops short of the model's positions, when it must
    kv_cache_dtype: str | None = None  # "fp8": e4m3 K/V with a scale per token and head; None: the model's dtype
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        from ..config import format_size

        graphs = (
            f"{len(self.cuda_graph_bs)} graph buckets ({self.cuda_graph_bs[0]}..{self.cuda_graph_bs[-1]})"
            if self.cuda_graph_bs
            else "no CUDA graphs"
        )
        tp = f" per GPU (tp={self.tp})" if self.tp > 1 else ""
        return (
            f"{self.device} {self.dtype}: weights {format_size(self.weights_bytes)}{tp}, "
            f"KV {self.kv_tokens:,} tokens ({format_size(self.kv_bytes)}, "
            f"{format_size(self.kv_bytes_per_token)}/token{', fp8' if self.kv_cache_dtype else ''}), max_running {self.max_running}, "
            f"max_model_len {self.max_model_len:,}, chunk {self.chunk_size}, {graphs}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def graph_buckets(max_bs: int, limit: int = MAX_GRAPH_BUCKETS) -> list[int]:
    """CUDA-graph batch sizes: 1,2,4,8, then steps of 8 to 64, 16 to 128, 32 to 256, 64 beyond;
    capped at max_bs (always included) and at ``limit`` buckets."""
    if max_bs < 1:
        return []
    out = [1, 2, 4, 8]
    b = 8
    while b < max_bs:
        b += 8 if b < 64 else 16 if b < 128 else 32 if b < 256 else 64
        out.append(b)
    out = [x for x in out if x < max_bs] + [max_bs]
    if len(out) > limit:  # keep the small ones dense, thin the large ones
        head = out[: limit // 2]
        tail = out[limit // 2 :]
        step = math.ceil(len(tail) / (limit - len(head)))
        tail = tail[::-1][::step][::-1]
        if tail[-1] != max_bs:
            tail.append(max_bs)
        out = head + tail
    return out


def _activation_bytes(cfg, tokens: int, logit_rows: int, dsize: int, tp: int) -> int:
    """Peak transient memory of one forward over ``tokens`` tokens, ``logit_rows`` of which
    produce logits: a few hidden-sized buffers, the fused qkv and gate/up outputs, and fp32
    logits plus sampling scratch (probabilities, a sort with int64 indices) over the vocab."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_heads * cfg.head_dim // tp
    kv = max(1, cfg.num_kv_heads // tp) * cfg.head_dim
    per_token = (4 * h + 3 * (i // tp) + q + 2 * kv) * dsize
    logits = logit_rows * cfg.vocab_size * (4 + 4 + 12)
    return tokens * per_token + logits


def dequant_copy_bytes(cfg, chunk: int, dsize: int, tp: int) -> int:
    """The dense copy a prefill chunk of quantized weights makes on a GPU: from
    DEQUANT_MIN_ROWS rows the GEMM dequantizes a weight (at most DEQUANT_MAX_BYTES of it at a
    time) for cuBLAS; the largest is gate/up."""
    from localsgl_kernels.quant_gemm import DEQUANT_MAX_BYTES, DEQUANT_MIN_ROWS

    if chunk < DEQUANT_MIN_ROWS:
        return 0
    return min(DEQUANT_MAX_BYTES, 2 * (cfg.intermediate_size // tp) * cfg.hidden_size * dsize)


def kv_cache_dtype_name(name: str | None) -> str | None:
    """--kv-cache-dtype as the plan records it: None (the model's dtype) or "fp8"."""
    if name in (None, "auto"):
        return None
    if name in ("fp8", "fp8_e4m3"):
        return "fp8"
    raise PlanError(f"unknown KV cache dtype {name!r}: choose auto or fp8")


def kv_bytes_per_token(cfg, dtype: str, tp: int = 1, kv_cache_dtype: str | None = None) -> int:
    """K and V bytes of one token over all layers; an fp8 cache stores one byte per value
    plus an fp32 scale per KV head (engine/kv_pool.py)."""
    kv_heads = max(1, math.ceil(cfg.num_kv_heads / tp))
    if kv_cache_dtype_name(kv_cache_dtype) == "fp8":
        return 2 * cfg.num_layers * kv_heads * (cfg.head_dim + 4)
    return 2 * cfg.num_layers * kv_heads * cfg.head_dim * DTYPE_BYTES[dtype]


def weights_bytes_for(cfg, dtype: str, tp: int = 1) -> int:
    return math.ceil(cfg.num_params * DTYPE_BYTES[dtype] / tp)


def gpu_running_cap(budget: int) -> int:
    """Most requests a GPU of this budget runs at once, when --max-running does not say: it
    also sizes the logits reserve (fp32 logits and sampling scratch per running row: 2.5 MiB
    a row for a 128k vocabulary), which on a small card would otherwise take KV room that
    so many requests could never use."""
    if budget >= 40 * GiB:
        return 512
    if budget >= 20 * GiB:
        return 256
    if budget >= 12 * GiB:
        return 128
    return 64


def _default_max_running(kv_tokens: int, cap: int) -> int:
    # room for requests of ~32 tokens each at the start; retraction absorbs growth
    return max(1, min(cap, kv_tokens // 32 if kv_tokens >= 32 else 1))


def plan_options(flags: dict[str, Any], weights=None) -> dict[str, Any]:
    """make_plan's keywords for engine flags (snake_case, as Engine and the CLI take them) and
    the load's weight estimate (weight_estimate.estimate; None: dense, the plan's own estimate).
    The engine, ``localsgl info`` and ``localsgl show`` all plan through this, so the same flags
    and model give the same plan in each."""
    options = dict(
        max_model_len=flags.get("max_model_len"),
        kv_memory=flags.get("kv_memory"),
        gpu_memory=flags.get("gpu_memory"),
        max_running=flags.get("max_running"),
        chunk_size=flags.get("chunk_size"),
        cuda_graph=not flags.get("disable_cuda_graph"),
        tp=flags.get("tp") or 1,
        kv_cache_dtype=flags.get("kv_cache_dtype"),
    )
    if weights is not None:
        options.update(weights_bytes=weights.total_bytes, weights_quantized=weights.quantized)
    return options


def plan_unloaded(source, config, device_info: DeviceInfo, flags: dict[str, Any]):
    """(dtype name, weight estimate or None, MemoryPlan) of ``source`` for these flags, as the
    engine would make them, without loading the weights: ``localsgl info`` and ``localsgl show``
    report through this, so the two never plan a model differently."""
    from .weight_estimate import estimate

    raw = flags.get("dtype")
    dtype = dtype_name(raw) if raw not in (None, "auto") else dtype_name(default_dtype(device_info, config))
    weights = estimate(source, config, dtype, device_info.kind, flags.get("weights"), flags.get("quantization"))
    return dtype, weights, make_plan(config, device_info, dtype, **plan_options(flags, weights))


def sliding_window_limit(window: int) -> str:
    """Why a sliding-window model's context stops at its window (for errors and notes)."""
    return (f"the model's sliding window of {window:,} tokens (sliding-window attention is not "
            "implemented, so the engine serves no more context than the window)")


# Piecewise CUDA graphs for extend and mixed steps (piecewise_graph.py) are on by default where a
# layer holds at most this many GEMM parameters: there an eager mixed step waits on its launches
# (llama-3.2-1b, 61M per layer), while larger layers keep the GPU busy through them and the graphs'
# padding costs more than they save (llama-3.1-8b, 218M): bench/RESULTS.md, "Piecewise graphs for
# mixed steps". The plan reserves their memory where this default turns them on.
PIECEWISE_MAX_LAYER_PARAMS = 120_000_000
PIECEWISE_MAX_TOKENS = 4096  # the largest token bucket of the piecewise graphs


def layer_gemm_params(config) -> int:
    """The parameters of one layer's matmuls (q/k/v/o projections and the gated MLP)."""
    h = config.hidden_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size


def piecewise_graphs_by_default(config) -> bool:
    return layer_gemm_params(config) <= PIECEWISE_MAX_LAYER_PARAMS


def piecewise_reserve_bytes(config, tokens: int, dsize: int) -> int:
    """Device memory of the piecewise graphs at ``tokens`` tokens: their fixed hidden-state
    buffers (5 x hidden) and the graph pool, about one piece's largest intermediates (gate/up
    and the activation, 3 x intermediate), in the activations' dtype."""
    return tokens * (5 * config.hidden_size + 3 * config.intermediate_size) * dsize


def make_plan(
    config,
    device_info: DeviceInfo,
    dtype,
    *,
    max_model_len: int | None = None,
    kv_memory: int | None = None,
    gpu_memory: int | None = None,
    max_running: int | None = None,
    chunk_size: int | None = None,
    free_memory_after_weights: int | None = None,
    cuda_graph: bool = True,
    tp: int = 1,
    weights_bytes: int | None = None,
    weights_quantized: bool = False,
    kv_cache_dtype: str | None = None,
) -> MemoryPlan:
    """Size everything for ``config`` (a ModelConfig) on ``device_info`` at ``dtype``
    (a torch.dtype or its name).

    Sizes are bytes (or strings such as "8GiB"). ``free_memory_after_weights``: memory free on the GPU once the weights
    are loaded (the engine's second call); ``weights_bytes`` overrides the estimate
    (quantized weights); ``weights_quantized``: some weights stay quantized, so a long prefill chunk's
    GEMMs dequantize into a dense copy; ``kv_cache_dtype`` "fp8" sizes an e4m3 KV cache. Raises PlanError when the model or the requested sizes do not fit."""
    from ..config import ConfigError, format_size, parse_size

    dtype = dtype_name(dtype)
    try:
        kv_memory = None if kv_memory is None else parse_size(kv_memory)
        gpu_memory = None if gpu_memory is None else parse_size(gpu_memory)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    for name, v in (("max_model_len", max_model_len), ("max_running", max_running), ("chunk_size", chunk_size)):
        if v is not None and v < 1:
            raise PlanError(f"{name} must be at least 1, got {v}")
    if tp < 1:
        raise PlanError(f"tp must be at least 1, got {tp}")
    notes: list[str] = []
    dsize = DTYPE_BYTES[dtype]
    gpu = device_info.kind == "cuda"
    w_bytes = weights_bytes if weights_bytes is not None else weights_bytes_for(config, dtype, tp)
    kv_cache_dtype = kv_cache_dtype_name(kv_cache_dtype)
    bpt = kv_bytes_per_token(config, dtype, tp, kv_cache_dtype)
    max_pos = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if max_model_len is not None and window and max_model_len > window:
        raise PlanError(f"--max-model-len {max_model_len:,} is beyond {sliding_window_limit(window)}")
    if max_model_len is not None and max_model_len > max_pos:
        notes.append(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {max_pos}")
    chunk = chunk_size or (GPU_CHUNK_SIZE if gpu else CPU_CHUNK_SIZE)
    total = device_info.total_memory
    budget = total
    if gpu:
        if device_info.free_memory is not None and free_memory_after_weights is None:
            budget = min(budget, device_info.free_memory)
            if device_info.free_memory < 0.9 * total:
                notes.append(f"only {format_size(device_info.free_memory)} of {format_size(total)} free at start")
        if gpu_memory is not None:
            if gpu_memory > total:
                notes.append(f"--gpu-memory {format_size(gpu_memory)} exceeds the card's {format_size(total)}")
            budget = min(budget, gpu_memory)
    elif gpu_memory is not None:
        notes.append("--gpu-memory ignored on the CPU")
    run_cap = gpu_running_cap(budget) if gpu else CPU_MAX_RUNNING
    act = _activation_bytes(config, chunk, max_running or run_cap, dsize, tp)
    if gpu and weights_quantized:
        act += dequant_copy_bytes(config, chunk, dsize, tp)

    if gpu:
        margin = max(int(0.05 * budget), 512 * MiB)
        if w_bytes + margin > budget:
            raise PlanError(
                f"the weights need {format_size(w_bytes)} "
                f"{'as loaded' if weights_bytes is not None else f'at {dtype}'} but only {format_size(budget)} "
                f"is available on {device_info.name} (less a {format_size(margin)} safety margin); "
                "use a smaller or quantized model (--quantization int4, `localsgl quantize`, a GGUF file), "
                "a larger --gpu-memory, or --tp"
            )
        if cuda_graph:
            max_bs_guess = max_running or run_cap
            # the graphs' pool (their steps' activations), and the logits every graph writes:
            # one fp32 buffer they share (cuda_graph.py) plus the largest step's own in dtype
            graph_reserve = 128 * MiB + 4 * MiB * len(graph_buckets(max_bs_guess)) + _activation_bytes(
                config, max_bs_guess, 0, dsize, tp
            ) + max_bs_guess * config.vocab_size * (4 + dsize)
            if piecewise_graphs_by_default(config):
                graph_reserve += piecewise_reserve_bytes(config, min(chunk + max_bs_guess, PIECEWISE_MAX_TOKENS), dsize)
        else:
            graph_reserve = 0
        usable = budget - w_bytes - act - graph_reserve - margin
        if free_memory_after_weights is not None:
            cap_left = free_memory_after_weights
            if gpu_memory is not None:
                cap_left = min(cap_left, gpu_memory - w_bytes)
            usable = min(usable, cap_left - act - graph_reserve - margin)
        if kv_memory is not None:
            if kv_memory > usable:
                raise PlanError(
                    f"--kv-memory {format_size(kv_memory)} does not fit: {format_size(max(usable, 0))} is left on "
                    f"{device_info.name} after weights ({format_size(w_bytes)}), activations and reserves"
                )
            kv_total = kv_memory
        else:
            kv_total = usable
        if kv_total < bpt * 16:
            raise PlanError(
                f"no room for the KV cache: {format_size(max(kv_total, 0))} left after weights "
                f"({format_size(w_bytes)}) on {device_info.name}; lower --chunk-size / --max-running or raise --gpu-memory"
            )
    else:
        graph_reserve = 0
        margin = 0
        if kv_memory is not None:
            kv_total = kv_memory
        else:
            # Sized for the work, not the machine: CPU_KV_TOKENS (or one --max-model-len
            # request, if longer), never more than running x length needs, within the caps.
            # Every byte is zeroed at start-up, so a pool sized by RAM costs seconds per start.
            want_len = max_model_len or min(max_pos, window or max_pos)
            want_running = max_running or run_cap
            need = want_running * want_len * bpt
            default = max(CPU_KV_TOKENS, max_model_len or 0) * bpt
            kv_total = min(CPU_KV_DEFAULT, total // 4, need, default)
        if w_bytes + kv_total + act > 0.9 * total:
            advice = ["a smaller --kv-memory"] if kv_memory is not None else []
            if act > max(w_bytes, kv_total):  # sized by --chunk-size and --max-running
                advice.append("a smaller --chunk-size or --max-running")
            if dtype == "float32":
                advice.append("--dtype bfloat16")
            advice.append("a smaller model")
            raise PlanError(
                f"the weights ({format_size(w_bytes)} at {dtype}), KV cache ({format_size(kv_total)}) and "
                f"activations ({format_size(act)}) do not fit in {format_size(total)} of RAM; "
                f"use {' or '.join(advice)}"
            )

    kv_tokens = int(kv_total // bpt)

    def derive(kv_tokens: int) -> tuple[int, int]:
        mml = max_model_len or min(max_pos, kv_tokens, window or max_pos)
        mr = max_running or _default_max_running(kv_tokens, run_cap)
        return mml, mr

    mml, mr = derive(kv_tokens)
    # the request -> token table (int32, one row per running request + a spare)
    r2t = (mr + 1) * mml * 4
    if gpu and kv_memory is None:
        kv_total -= r2t
        kv_tokens = int(kv_total // bpt)
        mml, mr = derive(kv_tokens)
        r2t = (mr + 1) * mml * 4
    if max_model_len is not None and max_model_len > kv_tokens:
        raise PlanError(
            f"--max-model-len {max_model_len} needs {format_size(max_model_len * bpt)} of KV cache but the plan has "
            f"{kv_tokens:,} tokens ({format_size(kv_total)}); lower it or give more --kv-memory"
        )
    if max_running is None and kv_tokens < mml:
        notes.append("the KV cache holds less than one full-length request")
    chunk = max(1, min(chunk, kv_tokens))
    if not gpu:
        buckets: list[int] = []
    elif not cuda_graph:
        buckets = []
        notes.append("CUDA graphs disabled")
    else:
        buckets = graph_buckets(mr)
    kv_total = kv_tokens * bpt
    context_limit = sliding_window_limit(window) if window and mml >= window else None
    if context_limit and max_model_len is None and window < min(max_pos, kv_tokens):
        notes.append(f"max_model_len capped at {context_limit}")
    return MemoryPlan(
        device=device_info.kind,
        dtype=dtype,
        budget_bytes=int(budget),
        weights_bytes=int(w_bytes),
        kv_bytes_per_token=int(bpt),
        kv_bytes=int(kv_total),
        kv_tokens=int(kv_tokens),
        max_running=int(mr),
        max_model_len=int(mml),
        chunk_size=int(chunk),
        cuda_graph_bs=buckets,
        activation_reserve_bytes=int(act),
        graph_reserve_bytes=int(graph_reserve),
        req_to_token_bytes=int(r2t),
        safety_margin_bytes=int(margin),
        tp=tp,
        context_limit=context_limit,
        kv_cache_dtype=kv_cache_dtype,
        notes=notes,
    )
