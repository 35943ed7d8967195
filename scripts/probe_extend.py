"""Time the extend attention kernel alone on a GPU at long-prompt chunk shapes, for several
launch configurations, against the tensor-core floor; check every output.

A shape ``P:E`` is one request with P cached tokens extended by E new ones (a chunk of a
long prompt: the plan's chunk size is E).  The kernel's work is
    FLOPs = 4 * Hq * D * sum_{t<E} (P + t + 1)
(QK^T and PV over the causal keys only), so its floor is FLOPs / peak (bf16 matmul rate,
790 TFLOP/s on an H200 by default).  Each output is compared at sampled token rows with a
float32 torch reference over the same paged slots.

Usage (device machine, PYTHONPATH as in scripts/device_check.sh):
    python3 scripts/probe_extend.py [--shapes 0:2048,30720:2048,118000:2048]
        [--configs sweep|default|BM,BN,WARPS,STAGES[,FLAGS];...] [--extra-shapes P:E,...]
        [--top 3] [--slots contiguous|random] [--baseline FILE] [--json FILE]
FLAGS letters: e (V loaded early), x (bf16 exp2), I (64-bit K/V offsets instead of 32-bit).
``--extra-shapes`` are timed for the ``--top`` fastest configs on the heaviest shape only;
``--baseline`` names another copy of kernels/extend_attention.py (e.g. the committed
version) timed with its own default configuration, for an A/B in the same process.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time

import torch
import triton

from localsgl_kernels import extend_attention as ext
from localsgl_kernels.compile_ahead import compile_only

SWEEP = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages, v_early) for head_dim 128, G = 4
    (128, 64, 8, 2, False), (128, 64, 8, 2, True), (128, 64, 8, 3, False), (128, 64, 8, 3, True),
    (128, 64, 8, 4, False), (128, 128, 8, 2, False), (128, 128, 8, 2, True), (128, 128, 8, 3, False),
    (128, 64, 4, 2, False), (128, 64, 4, 3, False), (128, 128, 4, 2, False), (128, 32, 4, 3, False),
    (64, 64, 4, 2, False), (64, 64, 4, 3, False), (64, 128, 4, 2, False), (64, 128, 4, 3, False),
    (256, 64, 8, 2, False), (256, 64, 8, 3, False), (256, 128, 8, 2, False), (256, 32, 8, 3, False),
    (128, 64, 8, 4, True), (128, 32, 8, 4, False), (64, 64, 4, 4, False),
]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in s.split(":")) for s in text.split(",") if s]


def parse_configs(text: str, head_dim: int, group: int, device) -> list[ext.ExtendConfig]:
    """"sweep", "default" (what the engine picks on this device) or "BM,BN,WARPS,STAGES[,FLAGS]", joined by ';'."""
    out = []
    for c in text.split(";"):
        if c == "sweep":
            out += [ext.ExtendConfig(*x) for x in SWEEP]
        elif c == "default":
            out.append(ext.extend_config(head_dim, group, device))
        else:
            f = c.split(",")
            flags = f[4] if len(f) > 4 else ""
            flags = "e" if flags in ("1", "early") else flags
            out.append(ext.ExtendConfig(int(f[0]), int(f[1]), int(f[2]), int(f[3]), "e" in flags, "x" in flags,
                                        offs32="I" not in flags))
    return list(dict.fromkeys(out))


def flops(prefix: int, extend: int, hq: int, d: int) -> float:
    return 4.0 * hq * d * (extend * prefix + extend * (extend + 1) / 2)


class Case:
    """One request (prefix P, extend E) in a paged pool; slots contiguous or shuffled."""

    def __init__(self, prefix, extend, hq, hkv, d, dtype, slots_mode, seed, dev):
        g = torch.Generator(device=dev).manual_seed(seed)
        L = prefix + extend
        self.prefix, self.extend, self.hq, self.hkv, self.d = prefix, extend, hq, hkv, d
        self.k = torch.randn(L + 1, hkv, d, generator=g, device=dev).to(dtype)
        self.v = torch.randn(L + 1, hkv, d, generator=g, device=dev).to(dtype)
        self.q = torch.randn(extend, hq, d, generator=g, device=dev).to(dtype)
        if slots_mode == "random":
            slots = torch.randperm(L, generator=g, device=dev) + 1
        else:
            slots = torch.arange(1, L + 1, device=dev)
        self.table = torch.zeros(2, L, dtype=torch.int32, device=dev)
        self.table[1] = slots.int()
        i32 = dict(dtype=torch.int32, device=dev)
        self.rows = torch.tensor([1], **i32)
        self.prefix_t = torch.tensor([prefix], **i32)
        self.extend_t = torch.tensor([extend], **i32)
        self.start_t = torch.tensor([0], **i32)
        self.scale = d ** -0.5
        # sampled rows: first, near the first token block and the diagonal, last, random
        pick = {0, 1, min(31, extend - 1), extend // 2, max(0, extend - 33), extend - 1}
        pick |= set(torch.randint(0, extend, (10,), generator=g, device=dev).tolist())
        self.sample = sorted(pick)
        self.ref = self._reference()

    def _reference(self) -> torch.Tensor:
        slots = self.table[1].long()
        G = self.hq // self.hkv
        out = []
        for t in self.sample:
            n = self.prefix + t + 1
            kf = self.k[slots[:n]].float()  # [n, Hkv, D]
            vf = self.v[slots[:n]].float()
            qf = self.q[t].float().view(self.hkv, G, self.d)
            s = torch.einsum("hgd,nhd->hgn", qf, kf) * self.scale
            out.append(torch.einsum("hgn,nhd->hgd", s.softmax(-1), vf).reshape(self.hq, self.d))
        return torch.stack(out)

    def run(self, fn, cfg, work, out):
        return fn(self.q, self.k, self.v, self.table, self.rows, self.prefix_t, self.extend_t, self.start_t,
                  self.scale, work, out=out, **({"config": cfg} if cfg is not None else {}))

    def rel_err(self, out) -> float:
        got = out[self.sample].float()
        return float((got - self.ref).norm() / self.ref.norm())


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("extend_attention_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure_peak(dev) -> float:
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    return 2 * 8192**3 / (bench(lambda: a @ b, budget_s=0.3) * 1e-3) / 1e12


def bench(fn, budget_s: float = 0.4) -> float:
    """Median milliseconds of ``fn`` over as many runs as fit in ``budget_s`` (3 to 50), after one warm run."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t
    times = []
    for _ in range(max(3, min(50, int(budget_s / max(first, 1e-6))))):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def time_one(case: Case, fn, cfg, tok: int, peak: float) -> dict:
    dev = case.q.device
    work = ext.build_work([case.extend], [case.prefix], tok, dev)
    out = torch.full_like(case.q, float("nan"))
    try:
        case.run(fn, cfg, work, out)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # e.g. shared memory over the limit for this tile shape
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
    err = case.rel_err(out)
    nan = bool(torch.isnan(out).any())
    ms = bench(lambda: case.run(fn, cfg, work, out))
    tf = flops(case.prefix, case.extend, case.hq, case.d) / (ms * 1e-3) / 1e12
    return {"ms": ms, "tflops": tf, "frac": tf / peak, "rel_err": err, "nan": nan, "items": int(work[0].numel())}


def compiled_resources() -> list[str]:
    """Shared memory, registers and spills of every compiled extend-kernel variant (best effort:
    the cache layout is Triton's own)."""
    lines = []
    try:
        for caches in ext._extend_kernel.device_caches.values():
            for k in caches[0].values():
                names = getattr(getattr(k.src, "fn", None), "arg_names", [])
                c = {}
                for key, v in getattr(k.src, "constants", {}).items():
                    idx = key[0] if isinstance(key, tuple) and key else key
                    c[names[idx] if isinstance(idx, int) and idx < len(names) else idx] = v
                tile = "x".join(str(c.get(n, "?")) for n in ("BLOCK_M", "BLOCK_N")) if c else "?"
                tile += "".join(f" {n}={c[n]}" for n in ("V_EARLY", "EXP16", "OFFS32") if c.get(n))
                lines.append(f"{tile} w{k.metadata.num_warps} s{k.metadata.num_stages}: smem {k.metadata.shared} B, "
                             f"regs {getattr(k, 'n_regs', '?')}, spills {getattr(k, 'n_spills', '?')}")
    except Exception as e:  # noqa: BLE001 - diagnostics only
        lines.append(f"(no resource report: {type(e).__name__}: {e})")
    return lines


def cfg_name(cfg) -> str:
    if cfg is None:
        return "baseline(default)"
    flags = "".join(f for f, on in ((" early", cfg.v_early), (" exp16", cfg.exp16), (" offs64", not cfg.offs32)) if on)
    return f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}{flags}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0:2048,30720:2048,118000:2048")
    ap.add_argument("--extra-shapes", default="")
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--configs", default="sweep")
    ap.add_argument("--slots", choices=["contiguous", "random"], default="contiguous")
    ap.add_argument("--baseline", default="")
    ap.add_argument("--heads", default="32,8,128", help="Hq,Hkv,D (Llama-3.1-8B by default)")
    ap.add_argument("--peak", type=float, default=790.0, help="bf16 matmul TFLOP/s the fractions are of")
    ap.add_argument("--json", default="")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script under TRITON_INTERPRET=1")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hq, hkv, d = (int(x) for x in a.heads.split(","))
    G = hq // hkv
    configs = parse_configs(a.configs, d, G, dev)
    base = load_baseline(a.baseline) if a.baseline else None
    if dev.type == "cuda":
        print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  heads {hq}/{hkv}/{d}  slots {a.slots}")
        print(f"measured bf16 matmul 8192^3: {measure_peak(dev):.0f} TFLOP/s (fractions below are of {a.peak:.0f})")

    shapes = parse_shapes(a.shapes)
    extra = parse_shapes(a.extra_shapes)
    cases = {s: Case(*s, hq, hkv, d, dtype, a.slots, seed=i, dev=dev) for i, s in enumerate(shapes + extra)}
    entries = [(None, base.extend_attention, base.tokens_per_block(d, G, dev.type))] if base else []
    entries += [(c, ext.extend_attention, c.block_m // G) for c in configs]

    try:  # compile every variant in parallel (a dry pass), then run
        with compile_only():
            for cfg, fn, tok in entries:
                c = cases[shapes[0]]
                try:
                    c.run(fn, cfg, ext.build_work([c.extend], [c.prefix], tok, dev), torch.empty_like(c.q))
                except Exception:
                    pass
    except Exception as e:
        print("compile-ahead:", type(e).__name__, str(e).splitlines()[0][:100])

    rows = []
    for cfg, fn, tok in entries:
        for s in shapes:
            r = {"config": cfg_name(cfg), "prefix": s[0], "extend": s[1], **time_one(cases[s], fn, cfg, tok, a.peak)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    heavy = max(shapes, key=lambda s: flops(*s, hq, d))
    ranked = sorted((r for r in rows if (r["prefix"], r["extend"]) == heavy and "ms" in r), key=lambda r: r["ms"])
    top = [r["config"] for r in ranked[: a.top]]
    for cfg, fn, tok in entries:
        if cfg_name(cfg) in top or cfg is None:
            for s in extra:
                r = {"config": cfg_name(cfg), "prefix": s[0], "extend": s[1], **time_one(cases[s], fn, cfg, tok, a.peak)}
                rows.append(r)
                print(json.dumps(r), flush=True)
    print("\n".join(compiled_resources()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)

    print(f"\n{'config':<24}" + "".join(f"{f'{p}:{e}':>16}" for p, e in shapes + extra) + "   (TFLOP/s, fraction of peak)")
    bad = 0
    for cfg, _, _ in entries:
        name = cfg_name(cfg)
        line = f"{name:<24}"
        for s in shapes + extra:
            r = next((r for r in rows if r["config"] == name and (r["prefix"], r["extend"]) == s), None)
            if r is None:
                line += f"{'':>16}"
            elif "error" in r:
                line += f"{'error':>16}"
            else:
                ok = r["rel_err"] < 1.6e-2 and not r["nan"]
                bad += not ok
                line += f"{r['tflops']:>9.0f} {r['frac']:.2f}{'' if ok else '!'}"
        print(line)
    print("('!' = output off the reference by more than bf16 rounding)" if bad else "all outputs match the reference")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
