"""Debug and A/B switches: each turns one fast path off, to compare it with the path it
replaces or to rule it out while debugging, or turns a profiler on.

They are not configuration: every default is the fast, tested path, and no command-line
flag or config-file key sets them.  An engine reads them from ``LOCALSGL_DEBUG_*``
environment variables when it is built (``DebugSwitches.from_env``; ``Engine(...,
debug_switches=...)`` overrides) and hands them down: the model's layers get them through
``apply_to_model``, the core and the runner through ``CoreConfig.debug``, and the Triton
kernels' PDL setting through ``apply_to_thread`` on the engine's thread.  Nothing reads
them at import, so tests and two engines in one process may differ.  docs/switches.md
lists them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields, replace
from typing import Mapping

log = logging.getLogger("localsgl.engine")

PREFIX = "LOCALSGL_DEBUG_"
_OFF = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class DebugSwitches:
    """Which fast paths run (True: the default path) and whether steps are profiled."""

    kernels: bool = True  # Triton RMSNorm, SiLU·mul and rotary on the GPU (else torch ops)
    fused_decode: bool = True  # the fused one-token GPU forward (layers/fused_decode.py)
    cpu_decode: bool = True  # the lean CPU decode step and bf16 LM head (layers/cpu_decode.py)
    cascade: bool = True  # shared-prefix (cascade) decode attention
    pdl: bool = True  # programmatic dependent launch of the decode chain's kernels (Hopper+)
    compile_ahead: bool = True  # compile the decode graphs' kernels in parallel before capture
    gpu_sampling_kernels: bool = True  # Triton sampling kernels for CUDA logits
    # the batch-1 quantized GEMVs over activations rounded to int8 per 32-column chunk (dp4a,
    # quant_gemv words 3), else over the activations as they are (exact, slower)
    int8_activations: bool = True
    # in the fused one-token step, o_proj / down_proj hand fp32 sums to the next fused kernel, so
    # a quantized GEMV cut in two K halves adds them into its output (no launch to sum them)
    fp32_sums: bool = True
    # in the fused one-token step, the decode attention's merge writes o_proj's int8 activations
    # (quant_gemv words 3) in its epilogue, instead of a preparation launch before o_proj
    attention_int8_epilogue: bool = True
    # fp8 weights' batch-1 GEMVs multiply e4m3 by the activations in fp16 (packed FMAs, fp32 sums
    # of eight products, kernels/gemv.py), else in fp32 (exact products, slower)
    fp16_products: bool = True
    # the L2 prefetches of batch-1 weights by the kernel before their GEMV, where the kernels
    # have them on (l2_prefetch.BEFORE_O_PROJ, quant_gemv.PREP_PREFETCH_BYTES; off until timed)
    l2_prefetch: bool = True
    profile_steps: bool = False  # per-step device/host timing (engine.core.profile)
    # extend/mixed steps replay graphs around eager attention; None: where the model's layers are small
    # enough that launches bound a mixed step (plan.piecewise_graphs_by_default), True/False: forced
    piecewise_graphs: bool | None = None
    # the batch-1 decode graph captured before the engine serves (True) or after the first
    # request's first token, between its steps (False); None: the default rule (graph_schedule.py)
    startup_graph: bool | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DebugSwitches":
        """The switches the ``LOCALSGL_DEBUG_*`` variables set (any value but empty/0/false/no/off
        sets one); unknown ``LOCALSGL_DEBUG_*`` names and the retired names are logged."""
        env = os.environ if environ is None else environ
        values = {}
        for name, (var, _) in _VARIABLES.items():
            raw = env.get(var)
            if getattr(cls, name) is None:  # automatic unless set: 1 forces it on, 0 off
                if raw is not None and raw.strip():
                    values[name] = raw.strip().lower() not in _OFF
            elif raw is not None and raw.strip().lower() not in _OFF:
                values[name] = not getattr(cls, name)
        for var in sorted(k for k in env if k.startswith(PREFIX) and k not in _KNOWN):
            log.warning("%s is not a debug switch (known: %s)", var, ", ".join(sorted(_KNOWN)))
        for name, (var, old) in _VARIABLES.items():
            if old and old in env:
                log.warning("%s is no longer read: set %s=1 instead (docs/switches.md)", old, var)
        return cls(**values)

    def changed(self) -> dict[str, bool]:
        """The switches that differ from the defaults (for logs and benchmark records)."""
        default = DebugSwitches()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}

    def with_(self, **changes: bool) -> "DebugSwitches":
        return replace(self, **changes)


# field -> (its variable, the name it had before the LOCALSGL_DEBUG_ prefix)
_VARIABLES = {
    "kernels": ("LOCALSGL_DEBUG_NO_KERNELS", "LOCALSGL_DISABLE_KERNELS"),
    "fused_decode": ("LOCALSGL_DEBUG_NO_FUSED_DECODE", "LOCALSGL_DISABLE_FUSED_DECODE"),
    "cpu_decode": ("LOCALSGL_DEBUG_NO_CPU_DECODE", "LOCALSGL_DISABLE_CPU_DECODE"),
    "cascade": ("LOCALSGL_DEBUG_NO_CASCADE", "LOCALSGL_DISABLE_CASCADE"),
    "pdl": ("LOCALSGL_DEBUG_NO_PDL", "LOCALSGL_DISABLE_PDL"),
    "compile_ahead": ("LOCALSGL_DEBUG_NO_COMPILE_AHEAD", "LOCALSGL_DISABLE_COMPILE_AHEAD"),
    "gpu_sampling_kernels": ("LOCALSGL_DEBUG_NO_GPU_SAMPLING_KERNELS", "LOCALSGL_GPU_SAMPLING_KERNELS"),
    "int8_activations": ("LOCALSGL_DEBUG_NO_INT8_ACTIVATIONS", None),
    "fp32_sums": ("LOCALSGL_DEBUG_NO_FP32_SUMS", None),
    "attention_int8_epilogue": ("LOCALSGL_DEBUG_NO_ATTENTION_INT8_EPILOGUE", None),
    "fp16_products": ("LOCALSGL_DEBUG_NO_FP16_PRODUCTS", None),
    "l2_prefetch": ("LOCALSGL_DEBUG_NO_L2_PREFETCH", None),
    "profile_steps": ("LOCALSGL_DEBUG_PROFILE_STEPS", "LOCALSGL_PROFILE_STEPS"),
    "piecewise_graphs": ("LOCALSGL_DEBUG_PIECEWISE_GRAPHS", "LOCALSGL_PIECEWISE_GRAPHS"),
    "startup_graph": ("LOCALSGL_DEBUG_STARTUP_GRAPH", None),
}
_KNOWN = {var for var, _ in _VARIABLES.values()}

DEFAULT = DebugSwitches()


def variable(name: str) -> str:
    """The environment variable of switch ``name`` (e.g. 'cpu_decode' -> LOCALSGL_DEBUG_NO_CPU_DECODE)."""
    return _VARIABLES[name][0]


def of(model) -> DebugSwitches:
    """The switches a model runs under (the defaults for a model no engine has configured)."""
    return getattr(model, "debug_switches", DEFAULT)


def apply_to_model(model, switches: DebugSwitches) -> None:
    """Hand the switches to a model: its fast paths read ``of(model)``, every layer with a
    ``use_kernels`` attribute (norms, activations, rotary) takes the ``kernels`` switch, and
    every quantized weight the ``int8_activations``, ``fp16_products`` and ``l2_prefetch`` ones (the
    GEMVs choose their tile, products and prefetches per weight)."""
    from .layers.quant import QuantizedWeight

    model.debug_switches = switches
    for module in model.modules():
        if hasattr(module, "use_kernels"):
            module.use_kernels = switches.kernels
        if isinstance(module, QuantizedWeight):  # a RowStack's parts are modules too
            module.int8_activations = switches.int8_activations
            module.fp16_products = switches.fp16_products
            module.l2_prefetch = switches.l2_prefetch


def apply_to_thread(switches: DebugSwitches, device) -> None:
    """Set what the Triton kernels read per launch (PDL) for launches from the calling thread:
    the engine calls this on the thread that captures graphs and runs steps."""
    if getattr(device, "type", device) != "cuda":
        return
    from localsgl_kernels import pdl

    pdl.set_enabled(switches.pdl)
