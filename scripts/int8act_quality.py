"""What rounding the activations to int8 costs a real model: the batch-1 GEMVs over int8
activations (quant_gemv ``words == 3``) compute exactly x̂·W, where x̂ rounds each chunk of 32
columns (16 for int8 weights) to dx·round(x / dx) with dx = amax / 127.  This script runs the
embedded model (SmolLM2-135M, its Q4_1 weights kept as int4 g32) on the CPU twice, the second
time with every quantized linear's input rounded that way, and compares perplexity on a fixed
slice of pydoc_data.topics, argmax agreement and the logits' change.

    python scripts/int8act_quality.py [--model smollm2-135m] [--tokens 512] [--weights keep] [--chunk 128]

``--chunk N``: N columns a scale instead (the largest power of two <= N that divides K): 128 is
the 16-64-row int4 x int8 GEMM's rounding (quant_a8, one scale a weight group of 128).

Prints one JSON line.  CPU only, a few seconds."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import model_utils  # noqa: E402  (tests/model_utils.py: prefill through the KV pool, no scheduler)

from localsgl.engine.layers import linear as linear_mod  # noqa: E402
from localsgl.engine.layers.quant import RowStack, is_quantized  # noqa: E402
from localsgl.engine.models.loader import load_model  # noqa: E402
from localsgl.store.resolve import resolve_model  # noqa: E402


def round_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """x̂ = dx·q per ``chunk`` consecutive columns, q = round(x·127 / amax), dx = amax / 127, in
    fp32 with the operations of quant_words._store_int8 (tests/kernels/test_quant_int8act.py
    checks that they agree)."""
    shape = x.shape
    c = x.float().reshape(-1, shape[-1] // chunk, chunk)
    amax = c.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax.clamp_min(1e-30), 0.0)
    q = torch.floor(c * inv + 0.5).clamp(-127, 127)
    return (q * (amax / 127.0)).reshape(shape).to(x.dtype)


def chunk_of(w, k: int = 0, chunk: int = 0) -> int:
    """Columns a scale: the batch-1 GEMVs' 32 (int4) or 16 (int8), or with ``chunk`` the largest
    power of two <= chunk that divides k."""
    fmt = (w.parts[0] if isinstance(w, RowStack) else w).fmt
    if not chunk:
        return 32 if fmt.kind == "int4" else 16
    while k % chunk:
        chunk //= 2
    return chunk


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--weights", default="keep")
    p.add_argument("--chunk", type=int, default=0, help="columns a scale (default: the batch-1 GEMVs' 32 / 16)")
    a = p.parse_args()
    import pydoc_data.topics as topics

    src = resolve_model(a.model, record_use=False)
    model = load_model(src, torch.float32, torch.device("cpu"), weights=a.weights)
    tok = src.load_tokenizer()
    text = topics.topics["assignment"] + topics.topics["assert"]
    ids = tok(text)["input_ids"][: a.tokens]
    exact = model_utils.prefill_logits(model, ids).double()

    original = linear_mod.quant_matmul
    calls = {"rounded": 0}
    chunks = set()

    def rounded(x, w, bias=None):
        if is_quantized(w):
            calls["rounded"] += 1
            chunk = chunk_of(w, x.shape[-1], a.chunk)
            chunks.add(chunk)
            x = round_chunks(x, chunk)
        return original(x, w, bias)

    linear_mod.quant_matmul = rounded
    try:
        approx = model_utils.prefill_logits(model, ids).double()
    finally:
        linear_mod.quant_matmul = original
    if not calls["rounded"]:
        raise SystemExit("no quantized linear ran: use --weights keep with a quantized model")
    target = torch.tensor(ids[1:])[:, None]

    def ppl(logits):
        return math.exp(float(-logits[:-1].log_softmax(-1).gather(1, target).mean()))

    d = (approx - exact).abs()
    print(json.dumps({
        "model": a.model, "tokens": len(ids), "quantized_matmuls": calls["rounded"], "chunks": sorted(chunks),
        "ppl_exact_activations": round(ppl(exact), 4), "ppl_int8_activations": round(ppl(approx), 4),
        "ppl_ratio": round(ppl(approx) / ppl(exact), 5),
        "argmax_agreement": round(float((approx.argmax(-1) == exact.argmax(-1)).float().mean()), 4),
        "mean_abs_dlogit": round(float(d.mean()), 4), "max_abs_dlogit": round(float(d.max()), 4),
        "logit_std": round(float(exact.std()), 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
