"""ModelSource -> a model on the target device with its weights loaded (or random for dummy)."""
from __future__ import annotations

import logging
import time

import torch

from ..layers.linear import use_cpu_weight_layout
from ..layers.quant import WeightFormat, parse_format
from ..layers.weight_policy import WEIGHTS_MODES, WeightPolicy, building, default_weights_mode
from .config import ModelConfig
from .registry import model_class

log = logging.getLogger(__name__)


def load_model(source, dtype: torch.dtype, device, load_format: str = "auto", max_positions: int | None = None,
               weights: str | None = None, quantization=None):
    """Build the model for ``source`` (a localsgl.store.resolve.ModelSource) on ``device``.

    Parameters are allocated uninitialised on the device and filled tensor by tensor
    from ``source.iter_weights`` — or with random values when ``load_format == "dummy"``
    or the source is a dummy config. Unsupported architectures raise the registry's
    UnsupportedModelError.

    ``weights`` ("keep" | "dequantize", default keep on a GPU, dequantize on the CPU): whether
    quantized source tensors stay quantized.  ``quantization`` ("int4" | "int8" | "fp8" or a
    WeightFormat): quantize dense linear weights round-to-nearest as they load (dummy
    weights are drawn in that format)."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be auto or dummy, got {load_format!r}")
    device = torch.device(device)
    t0 = time.perf_counter()
    cfg = ModelConfig.from_hf(source.config)
    cls = model_class(cfg)
    dummy = load_format == "dummy" or source.kind == "dummy"
    policy = weight_policy_for(source, dtype, device, weights, quantization, dummy)
    with torch.device(device), building(policy):
        model = cls(cfg, dtype, device, max_positions=max_positions)
    model.weight_policy = policy
    if dummy:
        model.init_dummy_weights()
    else:
        model.load_weights(_weights(source, dtype, device, policy is not None and policy.keep_quantized))
    model.eval()
    if device.type == "cpu":
        use_cpu_weight_layout(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    log.info(
        "loaded %s (%s, %.1fM params, %s) on %s in %.2f s%s",
        source.name,
        cfg.architecture,
        cfg.num_params / 1e6,
        str(dtype).removeprefix("torch."),
        device,
        time.perf_counter() - t0,
        " [dummy weights]" if dummy else "",
    )
    return model


def weight_policy_for(source, dtype, device, weights: str | None, quantization, dummy: bool) -> WeightPolicy | None:
    """The weight policy of a load; None (dense layers allocated up front, as always) when
    nothing quantized can come: no quantization asked for and a dense source (or dummy)."""
    mode = weights or default_weights_mode(torch.device(device).type)
    if mode not in WEIGHTS_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS_MODES)}, got {weights!r}")
    fmt = quantization if isinstance(quantization, WeightFormat) or quantization is None else parse_format(quantization)
    quantized_source = not dummy and source.has_quantized_weights
    if fmt is None and not quantized_source:
        return None
    return WeightPolicy(keep_quantized=mode == "keep", quantize=fmt, dtype=dtype, device=torch.device(device))


def _weights(source, dtype: torch.dtype, device: torch.device, keep_quantized: bool = False):
    """The source's tensors in dtype on device: a checkpoint directory bound for a GPU streams
    through pinned buffers (store/safetensors_stream.py), anything else through its own reader."""
    if keep_quantized or source.has_quantized_weights:
        return source.iter_weights(dtype, device, quantized=keep_quantized)
    if device.type == "cuda" and source.kind == "hf":
        from ...store import hf
        from ...store.safetensors_stream import UnsupportedShardError, iter_to_device

        try:
            return iter_to_device(hf.safetensors_files(source.path), dtype, device)
        except UnsupportedShardError as e:
            log.info("streaming loader declined (%s); reading through safetensors", e)
    return source.iter_weights(dtype, device)
