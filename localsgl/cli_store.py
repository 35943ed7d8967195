"""The model store commands: `localsgl pull`, `list`, `show`, `quantize` and `rm`, with
their table and report printers.  The work is done in localsgl.store.
"""
import functools
import json
import sys
from typing import Annotated, Optional

import typer

from .cli_common import UsageError, _err, _guard, _paint, _stdin_is_terminal
from .config import format_size


def pull(
    model: Annotated[str, typer.Argument(help="An alias or a hub repo: org/name, org/name:QUANT (one GGUF file, e.g. :Q4_K_M), org/name@REVISION")],
    file: Annotated[Optional[str], typer.Option("--file", help="The .gguf file to fetch from a GGUF repo")] = None,
) -> None:
    """Download a model into the Hugging Face cache; prints the name to run it by."""

    def body():
        from .store.manage import pull as pull_model

        print(pull_model(model, file=file), flush=True)

    _guard(body)


def list_models_command(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Models that run without a download: name, format, size, parameters, source, last use."""

    def body():
        from .store.manage import scan

        models, incomplete = scan()
        if json_output:
            print(json.dumps([m.to_dict() for m in models], indent=2))
        else:
            _print_models(models)
        for d in incomplete:
            _err(f"note: {d.name} is an incomplete download ({d.problem}): `localsgl pull {d.name}` "
                 f"finishes it, `localsgl rm {d.name}` removes it")

    _guard(body)


def _print_models(models) -> None:
    from .store.manage import describe_last_used, format_params

    rows = [("NAME", "FORMAT", "SIZE", "PARAMS", "SOURCE", "LAST USED")]
    for m in models:
        name = m.name + (f" ({', '.join(a for a in m.aliases if a != m.name)})" if set(m.aliases) - {m.name} else "")
        fmt = m.format + ("" if m.supported else f" [unsupported: {m.architecture}]")
        rows.append((name, fmt, format_size(m.size_bytes), format_params(m.params), m.source, describe_last_used(m.last_used)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = sys.stdout
    for i, r in enumerate(rows):
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        out.write((_paint(line, "1", out) if i == 0 else line) + "\n")


def show(
    model: Annotated[str, typer.Argument(help="A listed model, an alias, a path or a cached hub repo")],
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """A model's architecture, parameters, context length, chat template, files and memory plan."""

    def body():
        from .store.manage import show_model

        report = show_model(model)
        if json_output:
            print(json.dumps(report, indent=2, default=str))
        else:
            _print_show(report)

    _guard(body)


def _print_show(r: dict) -> None:
    from .store.manage import describe_last_used, format_params

    out = sys.stdout
    head = lambda s: _paint(s, "1", out)  # noqa: E731
    aliases = [a for a in r["aliases"] if a != r["name"]]
    rev = f", revision {r['revision']}" if r.get("revision") else ""
    template = "yes" if r["chat_template"] else "no"
    if r["chat_template"]:
        template += ", takes tools" if r["tool_calls"] else ", no tools"
    lines = [
        head("Model"),
        f"  name                {r['name']}" + (f" (alias {', '.join(aliases)})" if aliases else ""),
        f"  source              {r['source']}{rev}",
        f"  path                {r['path']}",
        f"  format              {r['format'] or '-'}, {format_size(r['size_bytes'])} on disk",
        f"  architecture        {r['architecture']}: {r['layers']} layers, hidden {r['hidden_size']}, "
        f"{r['heads']} heads / {r['kv_heads']} KV heads x {r['head_dim']}, vocab {r['vocab_size']}",
        f"  parameters          {format_params(r['params'])}",
        f"  context length      {r['context_length']:,}" + (f" (sliding window {r['sliding_window']:,})" if r.get("sliding_window") else ""),
        f"  chat template       {template}",
        f"  last used           {describe_last_used(r['last_used'])}",
        head("Files"),
    ]
    width = max([len(f["name"]) for f in r["files"]] + [18])
    lines += [f"  {f['name']:<{width}}  {format_size(f['size'])}" for f in r["files"]]
    sampling = r.get("sampling") or {}
    if "error" not in sampling:
        lines.append(head("Sampling defaults"))
        lines += [f"  {k:<19} {d['value']!s:<8} {d['source']}" for k, d in sampling.items()]
    plan = r.get("plan")
    if plan:
        lines.append(head("Memory plan") + " (as `localsgl info` would make it here)")
        if "error" in plan:
            lines.append(f"  cannot plan: {plan['error']}")
        else:
            lines += [
                f"  device              {plan['device']} ({plan['dtype']})",
                f"  KV cache            {plan['kv_tokens']:,} tokens ({format_size(plan['kv_bytes'])})",
                f"  max running         {plan['max_running']}",
                f"  max model len       {plan['max_model_len']:,}",
            ]
    out.write("\n".join(lines) + "\n")


def quantize(
    model: Annotated[str, typer.Argument(help="The model to quantize (alias, directory, .gguf file, hub repo)")],
    method: Annotated[str, typer.Option("--method", help="int4 | int8 | fp8")],
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Inputs per scale (default: int4 128, int8/fp8 one scale per row: 0)")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Name of the quantized model (default: SOURCE-METHOD)")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Where to quantize: cuda | cpu", show_default="cuda if present")] = None,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="GPTQ over a short shipped calibration text instead of round-to-nearest (int4/int8; slower)")] = False,
) -> None:
    """Round a model's linear weights to int4 / int8 / fp8 and save it as a local model; prints its name."""

    def body():
        from .store.quantize import QuantizeError, quantize_model

        try:
            result = _run_quantize(functools.partial(quantize_model, calibrate=calibrate), model, method, group_size,
                                   output, device)
        except QuantizeError as e:
            raise UsageError(str(e)) from None
        _err(f"quantized {model} -> {result.name}: {result.quantized} linear weights {result.method}"
             f"{f' group {result.group_size}' if result.group_size else ''}, {format_size(result.bytes)} "
             f"in {result.seconds:.1f} s ({result.path})")
        print(result.name, flush=True)

    _guard(body)


def _run_quantize(fn, model, method, group_size, output, device):
    """quantize_model with a rich progress bar on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        return fn(model, method, group_size, output, device)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("quantizing {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(model, total=None)

        def progress(done, total, name):
            bar.update(task, completed=done, total=total or None)

        return fn(model, method, group_size, output, device, progress=progress)


def rm(
    model: Annotated[str, typer.Argument(help="A listed model (name, alias or path)")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking")] = False,
) -> None:
    """Delete a model's files from the Hugging Face cache (or a quantized output); prints what it freed."""

    def body():
        from .store.manage import IncompleteDownload, find_removable, remove

        target = find_removable(model)
        what = (f"{target.name} (incomplete download, {target.path})" if isinstance(target, IncompleteDownload)
                else f"{target.name} ({format_size(target.size_bytes)}, {target.path})")
        if not yes:
            if not _stdin_is_terminal():
                raise UsageError(f"rm asks before deleting {target.name}; pass --yes to remove it without asking")
            if not typer.confirm(f"Remove {what}?", default=False, err=True):
                _err(f"kept {target.name}")
                return
        freed = remove(model)
        print(f"removed {target.name}: {format_size(freed)} freed")

    _guard(body)

