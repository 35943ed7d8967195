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
    """Build the model for ``source`` (a localsgl.store.resolve.ModelSource) on ``device``,
    its weights loaded (start_model_load's arguments)."""
    model, in_flight = start_model_load(source, dtype, device, load_format, max_positions, weights, quantization)
    if in_flight is not None:
        in_flight.wait()
    return model


def start_model_load(source, dtype: torch.dtype, device, load_format: str = "auto", max_positions: int | None = None,
                     weights: str | None = None, quantization=None, background_bytes: int = 0):
    """Build the model for ``source`` (a localsgl.store.resolve.ModelSource) on ``device``;
    returns (model, WeightsInFlight or None).

    Parameters are allocated uninitialised on the device and filled tensor by tensor
    from ``source.iter_weights`` — or with random values when ``load_format == "dummy"``
    or the source is a dummy config. Unsupported architectures raise the registry's
    UnsupportedModelError.

    ``weights`` ("keep" | "dequantize", default keep on a GPU, dequantize on the CPU): whether
    quantized source tensors stay quantized.  ``quantization`` ("int4" | "int8" | "fp8" or a
    WeightFormat): quantize dense linear weights round-to-nearest as they load (dummy
    weights are drawn in that format).

    ``background_bytes`` > 0: where the weights stream from safetensors shards into dense
    parameters (a GPU, no quantization) and at most this many device bytes are in flight
    while they load (store/safetensors_stream.py's bound), they load on a thread of their own
    and a WeightsInFlight is returned: every parameter exists, at its final address, before
    the first byte arrives, so the caller may size memory and capture CUDA graphs meanwhile,
    and must call its ``wait()`` before running the model."""
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
    model.eval()

    def loaded(how: str = "") -> None:
        log.info("loaded %s (%s, %.1fM params, %s) on %s in %.2f s%s", source.name, cfg.architecture,
                 cfg.num_params / 1e6, str(dtype).removeprefix("torch."), device, time.perf_counter() - t0,
                 " [dummy weights]" if dummy else how)

    if dummy:
        model.init_dummy_weights()
    else:
        stream = None
        if background_bytes > 0 and policy is None:
            stream = _streamed(source, dtype, device, background_bytes)
        if stream is not None:
            return model, WeightsInFlight(model, stream, device, lambda: loaded(" (beside the engine's start)"))
        model.load_weights(_weights(source, dtype, device, policy is not None and policy.keep_quantized))
    if device.type == "cpu":
        use_cpu_weight_layout(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    loaded()
    return model, None


class WeightsInFlight:
    """A model's weights streaming into its parameters on a thread and a CUDA stream of their
    own.  What the engine does meanwhile (its memory plan, the KV pool, the first decode graph,
    whose warm-up runs read whatever has arrived) overlaps the load; ``wait`` joins it and
    orders the caller's stream after its copies, re-raising a failed load."""

    def __init__(self, model, weights, device: torch.device, on_done):
        import threading

        self.device = device
        self.stream = torch.cuda.Stream(device)  # non-blocking: never waits for a capture's stream
        self.error: BaseException | None = None
        self._on_done = on_done

        def run() -> None:
            try:
                with torch.cuda.device(device), torch.cuda.stream(self.stream):
                    model.load_weights(weights)
                self.stream.synchronize()
            except BaseException as e:  # noqa: BLE001  (re-raised by wait)
                self.error = e

        self._thread = threading.Thread(target=run, name="weights", daemon=True)
        self._thread.start()

    def join_quietly(self) -> None:
        """Wait for the thread and its copies, dropping its error (the caller is failing already)."""
        self._thread.join()
        try:
            self.stream.synchronize()
        except RuntimeError:  # pragma: no cover  (a broken device: the caller's error says more)
            pass

    def wait(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        torch.cuda.synchronize(self.device)
        self._on_done()


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


def _streamed(source, dtype: torch.dtype, device: torch.device, max_in_flight: int):
    """The streaming reader's iterator over a dense checkpoint bound for a GPU when its bytes
    in flight stay within max_in_flight, else None (the caller loads in the foreground)."""
    if device.type != "cuda" or source.kind != "hf" or source.has_quantized_weights:
        return None
    from ...store import hf
    from ...store.safetensors_stream import UnsupportedShardError, device_bytes_in_flight, iter_to_device

    files = hf.safetensors_files(source.path)
    try:
        if not files or device_bytes_in_flight(files, dtype) > max_in_flight:
            return None
        return iter_to_device(files, dtype, device)
    except UnsupportedShardError:
        return None


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
