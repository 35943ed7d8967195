"""Structured decoding benchmark: JSON-schema vs free decoding, decode tok/s at each batch
size, and the host time the grammar masks take per step.

Both runs decode the same random prompts for the same number of tokens: the free run with
``ignore_eos``, the JSON run under a schema that cannot end before ``--new`` tokens (an array
of at least 10,000 integers), so both take one decode step per token.  Decode rate =
batch * (new - 1) / (time(new tokens) - time(1 token)), as scripts/bench_cpu.py; the two runs
alternate ``--repeats`` times (the order flipping each round) so a busy machine slows both
alike, and the table shows medians.

A model without a tokenizer (``--load-format dummy``) gets the embedded model's (SmolLM2,
49,152 tokens) for its grammars; the masks still cover the model's whole vocabulary (a larger
one: the ids past the tokenizer are never allowed).

Usage: .venv/bin/python scripts/bench_structured.py [--model M] [--load-format auto|dummy]
       [--device cuda|cpu] [--batches 1 64] [--new 128] [--prompt-len 128] [--repeats 3] [--json]
GPU (the coordinator's command): .venv/bin/python scripts/bench_structured.py --model llama-3.1-8b
       --load-format dummy --device cuda"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99999}, "minItems": 10_000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    import torch

    from localsgl import Engine, SamplingParams
    from localsgl.engine.grammar import GrammarBackend

    engine = Engine(model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
                    max_running=max(args.batches), max_model_len=args.prompt_len + args.new + 16)
    engine.wait_graphs()
    tokenizer = engine.tokenizer
    tok_note = "the model's"
    if tokenizer is None:
        from localsgl.store.resolve import resolve_model

        tokenizer = resolve_model("smollm2-135m").load_tokenizer()
        engine.grammar_backend = GrammarBackend(tokenizer, engine.config.vocab_size, [tokenizer.eos_token_id])
        tok_note = f"the embedded model's ({len(tokenizer)} tokens; model vocabulary {engine.config.vocab_size})"
    engine.grammar_backend.ll_tokenizer  # built once, before timing
    rng = torch.Generator().manual_seed(0)
    top = min(len(tokenizer), engine.config.vocab_size)
    core = engine.core

    def run(batch: int, n: int, constrained: bool) -> tuple[float, float, int]:
        """(seconds, mask seconds, steps) of one generation of n tokens per request."""
        prompts = [torch.randint(100, top, (args.prompt_len,), generator=rng).tolist() for _ in range(batch)]
        if constrained:
            params = SamplingParams(json_schema=SCHEMA, temperature=0, max_tokens=n)
        else:
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        core.cache.reset()
        m0 = core.masks.seconds if core.masks is not None else 0.0
        s0 = core.steps
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        dt = time.perf_counter() - t0
        assert all(len(o.token_ids) == n for o in outs), [len(o.token_ids) for o in outs]
        m1 = core.masks.seconds if core.masks is not None else 0.0
        return dt, m1 - m0, core.steps - s0

    def rate(batch: int, constrained: bool) -> tuple[float, float]:
        """(decode tok/s, mask ms per decode step)."""
        t1, _, _ = run(batch, 1, constrained)
        tn, mask, steps = run(batch, args.new, constrained)
        decode = max(tn - t1, 1e-9)
        return batch * (args.new - 1) / decode, 1e3 * mask / max(steps, 1)

    rows = []
    for batch in args.batches:
        rate(batch, False)  # warm-up (graphs, kernels, the grammar's lexer)
        rate(batch, True)
        free, cons, masks = [], [], []
        for k in range(args.repeats):
            order = (False, True) if k % 2 == 0 else (True, False)
            for constrained in order:
                r, m = rate(batch, constrained)
                (cons if constrained else free).append(r)
                if constrained:
                    masks.append(m)
        f, c = statistics.median(free), statistics.median(cons)
        rows.append({"batch": batch, "free_tok_s": f, "json_tok_s": c, "slowdown_pct": 100 * (f / c - 1),
                     "mask_ms_per_step": statistics.median(masks), "free_runs": free, "json_runs": cons})

    device = engine.device_info.name if hasattr(engine, "device_info") else str(engine.device)
    head = {"model": engine.model_name, "load_format": args.load_format, "device": device,
            "dtype": str(engine.dtype).replace("torch.", ""), "tokenizer": tok_note, "prompt_len": args.prompt_len,
            "new": args.new, "repeats": args.repeats, "overlap": engine.core.overlap}
    engine.shutdown()
    if args.json:
        print(json.dumps({**head, "rows": rows}, indent=2))
        return 0
    print(" ".join(f"{k}={v}" for k, v in head.items()))
    print(f"{'batch':>5} {'free tok/s':>11} {'json tok/s':>11} {'slower':>7} {'mask ms/step':>13}")
    for r in rows:
        print(f"{r['batch']:>5} {r['free_tok_s']:>11.1f} {r['json_tok_s']:>11.1f} {r['slowdown_pct']:>6.1f}% "
              f"{r['mask_ms_per_step']:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
