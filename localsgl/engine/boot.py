"""Building an engine core: resolve the model, plan memory, load the weights, make the EngineCore.

``boot_core`` runs on the thread (or in the child process, core_process.py) that will run the
core's loop, and fills in the attributes an Engine shows (source, config, plan, tokenizer, core,
timings); the tokenizer loads on a background thread while the weights stream in.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import torch

from .params import InvalidRequestError

log = logging.getLogger("localsgl")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InvalidRequestError(f"unknown dtype {dtype!r}: choose float32, bfloat16 or float16", "dtype") from None


def boot_core(host, model, device, dtype, max_model_len, kv_memory, gpu_memory, max_running, chunk_size,
              attention_backend, disable_cuda_graph, disable_overlap, disable_radix_cache, load_format,
              weights, quantization, schedule_policy, seed, max_queue, debug_switches, source=None,
              kv_cache_dtype=None) -> None:
    """Resolve, plan, load and build the core on ``host`` (the Engine, or core_process's stand-in
    for it), setting the attributes an Engine shows: source, config, plan, tokenizer, core, ...
    Runs on the thread that will run the core's loop."""
    from ..store.resolve import resolve_model
    from .core import CoreConfig, EngineCore
    from .debug_switches import DebugSwitches
    from .models.config import ModelConfig
    from .models.loader import load_model
    from .plan import default_dtype, detect_device, dtype_name, make_plan, plan_options
    from .weight_estimate import estimate as estimate_weights

    t0 = time.perf_counter()
    host.debug_switches = debug_switches or DebugSwitches.from_env()
    if host.debug_switches.changed():
        log.warning("debug switches: %s", host.debug_switches.changed())
    host.source = source or resolve_model(model, load_format=load_format)
    host.model_name = host.source.name
    host.config = ModelConfig.from_hf(host.source.config)
    t_resolved = time.perf_counter()
    host.device_info = detect_device(device)  # on a GPU: the CUDA context starts here
    host.device = torch.device(host.device_info.torch_device)
    t_device = time.perf_counter()
    host.dtype = parse_dtype(dtype) or default_dtype(host.device_info, host.config)
    host.weights_estimate = estimate_weights(host.source, host.config, dtype_name(host.dtype), host.device.type,
                                             weights, quantization)
    plan_kwargs = plan_options(dict(
        max_model_len=max_model_len, kv_memory=kv_memory, gpu_memory=gpu_memory,
        max_running=max_running, chunk_size=chunk_size, disable_cuda_graph=disable_cuda_graph,
        kv_cache_dtype=kv_cache_dtype,
    ), host.weights_estimate)
    pre_plan = make_plan(host.config, host.device_info, host.dtype, **plan_kwargs)
    tokenizer = in_background(host.source.load_tokenizer)  # transformers' import overlaps the weights
    t_planned = time.perf_counter()
    host.model = load_model(host.source, host.dtype, host.device, load_format, max_positions=pre_plan.max_model_len,
                            weights=weights, quantization=quantization)
    free_after = None
    if host.device.type == "cuda":
        torch.cuda.synchronize(host.device)
        free_after, _ = torch.cuda.mem_get_info(host.device)
    t_weights = time.perf_counter()
    host.plan = make_plan(host.config, host.device_info, host.dtype, free_memory_after_weights=free_after, **plan_kwargs)
    host.max_model_len = host.plan.max_model_len
    host.model.rotary.resize(host.max_model_len)  # the pre-load plan's guess may differ
    host.tokenizer = tokenizer()
    from .reasoning import reasoning_tags

    # the tags a reasoning model thinks in (None for other models, or with reasoning off)
    host.reasoning_tags = None if host.reasoning == "off" else reasoning_tags(host.tokenizer)
    eos = list(host.config.eos_token_ids)
    if host.tokenizer is not None and host.tokenizer.eos_token_id is not None:
        eos.append(int(host.tokenizer.eos_token_id))
    eos += _generation_config_eos(host.source)
    host.max_queue = max_queue
    graphs = None if (disable_cuda_graph or host.device.type != "cuda") else list(host.plan.cuda_graph_bs)
    host.core = EngineCore(
        host.model,
        host.tokenizer,
        eos,
        host.device,
        CoreConfig(
            kv_tokens=host.plan.kv_tokens,
            max_running=host.plan.max_running,
            chunk_size=host.plan.chunk_size,
            max_model_len=host.plan.max_model_len,
            attention_backend=attention_backend,
            disable_radix_cache=disable_radix_cache,
            cuda_graph_bs=graphs,
            schedule_policy=schedule_policy,
            seed=seed,
            kv_cache_dtype=host.plan.kv_cache_dtype,
            debug=host.debug_switches,
        ),
        overlap=not disable_overlap and host.device.type == "cuda",
        start_thread=False,
    )
    t_ready = time.perf_counter()
    host.load_seconds = t_ready - t0
    # from weights on the device to serving (the small decode graphs captured; the rest
    # follow while serving: graphs_ready_after_weights_seconds)
    host.ready_after_weights_seconds = t_ready - t_weights
    host._t_weights = t_weights
    # the stages before the weights: where a slow start goes (`run -v` prints this line)
    log.info("engine ready in %.1f s (resolve %.2f s, device %.2f s, plan %.2f s, weights %.2f s, then %.1f s "
             "after the weights): %s", host.load_seconds, t_resolved - t0, t_device - t_resolved,
             t_planned - t_device, t_weights - t_planned, host.ready_after_weights_seconds, host.plan.describe())


def in_background(fn):
    """Start ``fn()`` on a thread now; the returned callable waits for it and returns its
    result (or raises its exception)."""
    box: list = []

    def work():
        try:
            box.append((True, fn()))
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            box.append((False, e))

    t = threading.Thread(target=work, name="localsgl-background", daemon=True)
    t.start()

    def result():
        t.join()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    return result


def _generation_config_eos(source) -> list[int]:
    path = getattr(source, "path", None)
    if not path or not os.path.isdir(str(path)):
        return []
    f = os.path.join(str(path), "generation_config.json")
    if not os.path.exists(f):
        return []
    import json

    try:
        eos = json.load(open(f)).get("eos_token_id")
    except Exception:
        return []
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else [int(e) for e in eos]
