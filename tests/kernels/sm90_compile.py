"""Compile Triton kernels for sm_90 on a machine without a GPU (Triton's bundled ptxas), so
errors that only compiled Triton raises (the interpreter runs Python and type-checks less) show
up in CI.  It runs as its own process (``compile_all``): the kernel tests' conftest switches on
the interpreter, under which ``triton.jit`` makes functions that cannot be compiled.
Pointers and integer arguments whose name says stride are marked 16-divisible, as the JIT's
specialization marks the usual ones."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys


def can_compile() -> bool:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(ptxas)


def compile_all(specs: list[dict], timeout: float = 600) -> list[dict]:
    """Each spec: {"kernel": "module:function", "pointers": {...}, "constexprs": {...},
    "scalars": {...}, "div16": [int args known 16-divisible], "num_warps": n, "num_stages": n, "sass_mix": bool,
    "arch": the target's compute capability as an int, default 90}.
    Returns per spec {"ok", "error", "ptx_has": {needle: bool}, "shared": bytes of shared memory a program
    needs, "resources", "sass_has", and with sass_mix
    "sass_mix": {opcode: count}} in a fresh interpreter-free process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], input=json.dumps(specs), capture_output=True, text=True,
                         env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"sm90 compile process failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _compile(spec: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from localsgl_kernels.options import FMA  # as every launch compiles them

    mod, name = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(mod), name)
    constexprs, pointers, scalars = spec["constexprs"], spec["pointers"], spec.get("scalars", {})
    # a constexpr the spec leaves out takes its default, as a launch that does not pass it would
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in pointers:
            sig[arg] = pointers[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[arg] = scalars.get(arg, "i32")
            if sig[arg] == "i32" and (arg.startswith("stride") or arg in spec.get("div16", ())):
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", spec.get("arch", 90), 32),
                           options={"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 2),
                                    **FMA})
    except Exception as e:  # noqa: BLE001  (reported to the test)
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[-3000:], "ptx_has": {}}
    ptx = k.asm["ptx"]
    return {"ok": True, "error": None, "ptx_has": {n: n in ptx for n in spec.get("ptx_needles", [])},
            "shared": k.metadata.shared,
            "resources": _resources(k.asm["cubin"]),
            "sass_has": _sass_has(k.asm["cubin"], spec.get("sass_needles", [])),
            **({"sass_mix": _sass_mix(k.asm["cubin"])} if spec.get("sass_mix") else {})}


def _sass_has(cubin: bytes, needles: list[str]) -> dict:
    """Whether the kernel's SASS holds each needle (e.g. HGMMA: Hopper's warpgroup MMA)."""
    if not needles:
        return {}
    out = _cuobjdump(cubin, "--dump-sass") or ""
    return {n: n in out for n in needles}


def _sass_mix(cubin: bytes) -> dict:
    """How many SASS instructions of each opcode (without its modifiers) the kernel holds."""
    mix: dict = {}
    for line in (_cuobjdump(cubin, "--dump-sass") or "").splitlines():
        parts = line.split("*/", 1)
        if len(parts) == 2 and parts[0].strip().startswith("/*") and parts[1].strip():
            words = parts[1].split()
            op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]  # skip a predicate
            op = op.split(".")[0].rstrip(";")
            if op.isupper():
                mix[op] = mix.get(op, 0) + 1
    return mix


def _cuobjdump(cubin: bytes, flag: str) -> str | None:
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def _resources(cubin: bytes) -> str | None:
    """cuobjdump's register / stack / shared-memory line for the kernel (None without cuobjdump)."""
    out = _cuobjdump(cubin, "--dump-resource-usage")
    if out is None:
        return None
    line = next((ln.strip() for ln in out.splitlines() if "REG:" in ln), None)
    return " ".join(line.split()[:4]) if line else None


if __name__ == "__main__":
    print(json.dumps([_compile(s) for s in json.loads(sys.stdin.read())]))
