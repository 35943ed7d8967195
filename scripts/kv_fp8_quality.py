"""How far an FP8 KV cache moves a model's logits: prefill a fixed slice of English text in
chunks (each chunk attends to the earlier ones through the cache) with the model's own KV
dtype and with the FP8 cache, and compare the logits position by position.

    python scripts/kv_fp8_quality.py [--model smollm2-135m] [--tokens 512] [--chunk 128] [--device cpu]
                                     [--dtype float32] [--load-format auto|dummy]

Prints one JSON line: perplexity with each cache, argmax agreement, mean and largest |Δlogit|
and the logits' standard deviation (for scale)."""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import model_utils  # noqa: E402  (tests/model_utils.py: prefill through the KV pool, no scheduler)

from localsgl.engine.kv_pool import FP8_KV_DTYPE, KVPool  # noqa: E402
from localsgl.engine.models.loader import load_model  # noqa: E402
from localsgl.store.resolve import resolve_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--load-format", default="auto")
    a = p.parse_args()
    import pydoc_data.topics as topics

    src = resolve_model(a.model, load_format=a.load_format, record_use=False)
    model = load_model(src, getattr(torch, a.dtype), torch.device(a.device), a.load_format)
    tok = src.load_tokenizer()
    if tok is not None:
        ids = tok(topics.topics["assignment"][:4000])["input_ids"][: a.tokens]
    else:  # dummy weights: random token ids
        ids = torch.randint(0, model.config.vocab_size, (a.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    chunks = [a.chunk] * (len(ids) // a.chunk) + ([len(ids) % a.chunk] if len(ids) % a.chunk else [])
    full = model_utils.prefill_logits(model, ids, chunks=chunks).float()
    model_utils.KVPool = functools.partial(KVPool, kv_dtype=FP8_KV_DTYPE)
    fp8 = model_utils.prefill_logits(model, ids, chunks=chunks).float()
    target = torch.tensor(ids[1:], device=full.device)[:, None]

    def ppl(logits):
        return float(torch.exp(-logits[:-1].log_softmax(-1).gather(1, target).mean()))

    d = (fp8 - full).abs()
    print(json.dumps({
        "model": a.model, "tokens": len(ids), "chunk": a.chunk, "dtype": a.dtype, "device": a.device,
        "ppl_model_kv": round(ppl(full), 4), "ppl_fp8_kv": round(ppl(fp8), 4),
        "argmax_agreement": round(float((fp8.argmax(-1) == full.argmax(-1)).float().mean()), 4),
        "mean_abs_dlogit": round(float(d.mean()), 4), "max_abs_dlogit": round(float(d.max()), 4),
        "logit_std": round(float(full.std()), 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
