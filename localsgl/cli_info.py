"""`localsgl info`: the device, dtype, model shape and memory plan, computed as the engine
would plan without loading the weights, printed as text or JSON.
"""
import json
import sys
from typing import Annotated

import typer

from .cli_common import _guard, _paint, engine_options
from .config import format_size, resolve_engine_kwargs


@engine_options
def info(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    *,
    flags: dict,
) -> None:
    """Device, dtype, model and the memory plan, computed without loading the weights."""

    def body():
        report = _info_report(resolve_engine_kwargs(flags))
        if json_output:
            print(json.dumps(report, indent=2, default=str))
        else:
            _print_info(report)

    _guard(body)


def _info_report(kwargs: dict) -> dict:
    from . import __version__
    from .engine.models.config import ModelConfig
    from .engine.plan import detect_device, plan_unloaded
    from .engine.sampling_defaults import defaults_as_dict, model_sampling_defaults
    from .store.resolve import resolve_model

    dev = detect_device(kwargs.get("device"))
    source = resolve_model(kwargs["model"], load_format=kwargs.get("load_format", "auto"), record_use=False)
    cfg = ModelConfig.from_hf(source.config)
    dtype, weights, plan = plan_unloaded(source, cfg, dev, kwargs)  # as the engine plans
    versions = {"localsgl": __version__, "python": sys.version.split()[0]}
    for mod in ("torch", "transformers", "triton"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    device = {**dev.to_dict(), "torch_device": dev.torch_device}
    if dev.kind == "cuda":  # the quantized kernels' tiles: tuned for this GPU, or the built-in ones
        from localsgl_kernels.quant_tiles import tiles_summary

        device["quant_tiles"] = tiles_summary(dev.index)
    return {
        "device": device,
        "dtype": dtype,
        "model": {
            "name": getattr(source, "name", kwargs["model"]),
            "kind": getattr(source, "kind", None),
            "path": str(getattr(source, "path", "")) or None,
            **cfg.shape(),
            "max_position_embeddings": cfg.max_position_embeddings,
            "weights_bytes": plan.weights_bytes,
            "weights_format": weights.by_format if weights is not None else {dtype: plan.weights_bytes},
            "kv_bytes_per_token": plan.kv_bytes_per_token,
        },
        "plan": plan.to_dict(),
        "sampling": defaults_as_dict(model_sampling_defaults(source, kwargs.get("default_sampling"))),
        "versions": versions,
    }


def _print_info(r: dict) -> None:
    out = sys.stdout
    head = lambda s: _paint(s, "1", out)  # noqa: E731
    d, m, p = r["device"], r["model"], r["plan"]
    lines = [head("Device")]
    if d["kind"] == "cuda":
        lines += [
            f"  name                {d['name']} ({d['torch_device']}, {d['count']} visible)",
            f"  memory              {format_size(d['total_memory'])} total, {format_size(d['free_memory'])} free",
            f"  SMs                 {d['sm_count']}",
            f"  compute capability  {d['capability']}",
            "  quantized tiles     " + (f"{d['quant_tiles']['file']} ({d['quant_tiles']['entries']} entries)"
                                         if d["quant_tiles"]["file"] else
                                         "built-in (no tuned file for this GPU: scripts/tune_tiles.sh writes one, "
                                         "LOCALSGL_QUANT_TILES names it)"),
        ]
    else:
        lines += [
            f"  name                {d['name']}",
            f"  cores               {d['cores']}",
            f"  RAM                 {format_size(d['total_memory'])} total, {format_size(d['free_memory'])} available",
        ]
    lines.append(f"  bf16                {'yes' if d['bf16'] else 'no'}")
    lines.append(f"  dtype               {r['dtype']}")
    lines += [
        head("Model"),
        f"  name                {m['name']} ({m['kind']})",
        f"  path                {m['path']}",
        f"  architecture        {m['architecture']}: {m['layers']} layers, hidden {m['hidden_size']}, "
        f"{m['heads']} heads / {m['kv_heads']} KV heads x {m['head_dim']}, vocab {m['vocab_size']}",
        f"  parameters          {m['params'] / 1e9:.3f} B",
        f"  weights             {format_size(m['weights_bytes'])} " + (
            f"at {r['dtype']}" if list(m.get("weights_format") or {r['dtype']: 0}) == [r['dtype']] else
            "(" + ", ".join(f"{k} {format_size(v)}" for k, v in sorted(m["weights_format"].items(), key=lambda kv: -kv[1])) + ")"),
        f"  KV per token        {format_size(m['kv_bytes_per_token'])}" + (" (fp8)" if r["plan"].get("kv_cache_dtype") else ""),
        f"  max positions       {m['max_position_embeddings']:,}",
        head("Memory plan"),
    ]
    if p["device"] == "cuda":
        lines.append(f"  budget              {format_size(p['budget_bytes'])} (margin {format_size(p['safety_margin_bytes'])})")
        lines.append(f"  activations         {format_size(p['activation_reserve_bytes'])}, CUDA graphs {format_size(p['graph_reserve_bytes'])}")
    graphs = ", ".join(map(str, p["cuda_graph_bs"])) if p["cuda_graph_bs"] else "none"
    if p["cuda_graph_bs"]:
        from .engine.graph_schedule import capture_order

        first, later = capture_order(p["cuda_graph_bs"], cascade=False)
        if later:
            graphs += f" ({', '.join(str(k.batch_size) for k in reversed(first))} captured before serving, the rest while serving)"
    lines += [
        f"  KV cache            {p['kv_tokens']:,} tokens ({format_size(p['kv_bytes'])})",
        f"  max running         {p['max_running']}",
        f"  max model len       {p['max_model_len']:,}",
        f"  chunk size          {p['chunk_size']}",
        f"  graph buckets       {graphs}",
    ]
    lines += [f"  note                {n}" for n in p["notes"]]
    lines.append(head("Sampling defaults") + " (for fields a request leaves unset)")
    for name, d in r.get("sampling", {}).items():
        lines.append(f"  {name:<19} {d['value']:<8} {d['source']}")
    out.write("\n".join(lines) + "\n")

