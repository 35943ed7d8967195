"""Structured decoding benchmark: JSON-schema vs free decoding, decode tok/s at each batch
size, and the host time the grammar masks take per step.

Both runs decode the same number of tokens from random prompts: the free run with
``ignore_eos``, the JSON run under a schema that cannot end before ``--new`` tokens (an array
of at least 10,000 integers), so both take one decode step per token.  A run's decode rate is
the sum over its requests of (tokens - 1) / (finish - first token), from each request's own
metrics, so prefill never enters it.  The free and JSON runs alternate ``--repeats`` times
(the order flipping each round) so a busy machine slows both alike; the table shows medians.
"mask ms/step" is the host time of one step's grammar work (bring the matchers up to date,
fill the bitmasks), whether or not the forward hides it.

A model without a tokenizer (``--load-format dummy``), or ``--tokenizer llama3|embedded``, gets Llama 3's (128,256 tokens, from the
``llama-models`` package's ``llama3/tokenizer.model``, read without importing the package)
when that package is installed, else the embedded model's (SmolLM2, 49,152 tokens); the masks
always cover the model's whole vocabulary (ids past the tokenizer are never allowed).

Usage: .venv/bin/python scripts/bench_structured.py [--model M] [--load-format auto|dummy]
       [--device cuda|cpu] [--batches 1 64] [--new 128] [--prompt-len 128] [--repeats 3]
       [--tokenizer auto|llama3|embedded] [--json]
GPU: bash scripts/device_check.sh none notests structured (Llama-3.1-8B shapes, dummy bf16
weights; llguidance and llama-models travel as wheels in .whl/, see
scripts/device_wheels.sh)."""
from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import re
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LOCALSGL_IN_PROCESS", "1")  # the benchmark reads the core's counters

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99999}, "minItems": 10_000}
ARRAY_PREFIX = re.compile(r"\[((0|[1-9][0-9]{0,4}),)*(0|[1-9][0-9]{0,4})?")  # what SCHEMA allows before its end

# Llama 3's pre-tokenizer split and its 256 special tokens after the 128,000 BPE tokens
# (the names of Llama 3.1's tokenizer.json)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])


def llama3_tokenizer_file() -> Path | None:
    """llama-models' Llama 3 tokenizer file (tiktoken ranks), found without importing the
    package (its imports need more than the tokenizer does)."""
    try:
        spec = importlib.util.find_spec("llama_models")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "llama3" / "tokenizer.model"
        if path.is_file():
            return path
    return None


def llama3_tokenizer(path: Path):
    """A transformers fast tokenizer of Llama 3 built from its tiktoken rank file."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class RankFile(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(file) -> dict[bytes, int]:  # "base64-token rank" lines; no tiktoken needed
            ranks = {}
            with open(file, "rb") as f:
                for line in f:
                    if line.strip():
                        token, rank = line.split()
                        ranks[base64.b64decode(token)] = int(rank)
            return ranks

    backend = RankFile(vocab_file=str(path), pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIAL).converted()
    if backend.get_vocab_size() != 128_256:
        raise RuntimeError(f"{path}: {backend.get_vocab_size()} tokens, expected Llama 3's 128,256")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def stand_in_tokenizer(choice: str):
    """(tokenizer, its eos ids, a note) for a model loaded without one."""
    path = llama3_tokenizer_file() if choice in ("auto", "llama3") else None
    if path is not None:
        tok = llama3_tokenizer(path)
        eos = [tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")]
        return tok, eos, f"Llama 3's ({len(tok)} tokens, llama-models)"
    if choice == "llama3":
        raise SystemExit("--tokenizer llama3: the llama-models package is not installed")
    from localsgl.store.resolve import resolve_model

    tok = resolve_model("smollm2-135m").load_tokenizer()
    return tok, [tok.eos_token_id], f"the embedded model's ({len(tok)} tokens)"


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
    ap.add_argument("--tokenizer", choices=["auto", "llama3", "embedded"], default="auto",
                    help="whose tokenizer the grammars use: auto = the model's, else (dummy weights) Llama 3's "
                         "when llama-models is installed, else the embedded model's")
    ap.add_argument("--masks-only", action="store_true",
                    help="no model: time one step's grammar work (matchers advanced, bitmasks filled) at each "
                         "batch size, with the model's tokenizer (or --tokenizer's) over --new steps")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if args.masks_only:
        return masks_only(args)

    import torch

    from localsgl import Engine, SamplingParams
    from localsgl.engine.grammar import GrammarBackend

    engine = Engine(model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
                    max_running=max(args.batches), max_model_len=args.prompt_len + args.new + 16)
    engine.wait_graphs()
    tokenizer = engine.tokenizer
    tok_note = "the model's"
    if tokenizer is None or args.tokenizer != "auto":
        tokenizer, eos, note = stand_in_tokenizer(args.tokenizer)
        engine.grammar_backend = GrammarBackend(tokenizer, engine.config.vocab_size, eos)
        tok_note = f"{note}; model vocabulary {engine.config.vocab_size}"
    engine.grammar_backend.ll_tokenizer  # built once, before timing
    rng = torch.Generator().manual_seed(0)
    top = min(len(tokenizer), engine.config.vocab_size)
    core = engine.core

    def run(batch: int, constrained: bool) -> tuple[float, float]:
        """(decode tok/s, mask ms per step) of one generation of --new tokens per request."""
        prompts = [torch.randint(100, top, (args.prompt_len,), generator=rng).tolist() for _ in range(batch)]
        if constrained:
            params = SamplingParams(json_schema=SCHEMA, temperature=0, max_tokens=args.new)
        else:
            params = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
        core.cache.reset()
        masks = core.masks
        m0, f0 = (masks.seconds, masks.fills) if masks is not None else (0.0, 0)
        outs = engine.generate(prompts, params)
        assert all(len(o.token_ids) == args.new for o in outs), [len(o.token_ids) for o in outs]
        if constrained:  # every answer is the start of the schema's array
            for o in outs:
                text = tokenizer.decode(o.token_ids)
                assert ARRAY_PREFIX.fullmatch(text), text[:200]
        masks = core.masks
        m1, f1 = (masks.seconds, masks.fills) if masks is not None else (0.0, 0)
        rate = sum((args.new - 1) / max(o.metrics.total_time - o.metrics.time_to_first_token, 1e-9) for o in outs)
        return rate, 1e3 * (m1 - m0) / max(f1 - f0, 1)

    rows = []
    for batch in args.batches:
        run(batch, False)  # warm-up (graphs, kernels, the grammar's lexer)
        run(batch, True)
        free, cons, masks = [], [], []
        for k in range(args.repeats):
            for constrained in ((False, True) if k % 2 == 0 else (True, False)):
                r, m = run(batch, constrained)
                print(f"batch {batch} {'json' if constrained else 'free'}: {r:.1f} tok/s"
                      + (f", mask {m:.3f} ms/step" if constrained else ""), file=sys.stderr, flush=True)
                (cons if constrained else free).append(r)
                if constrained:
                    masks.append(m)
        f, c = statistics.median(free), statistics.median(cons)
        rows.append({"batch": batch, "free_tok_s": f, "json_tok_s": c, "slowdown_pct": 100 * (f / c - 1),
                     "mask_ms_per_step": statistics.median(masks), "free_runs": free, "json_runs": cons})

    device = engine.device_info.name if hasattr(engine, "device_info") else str(engine.device)
    head = {"model": engine.model_name, "load_format": args.load_format, "device": device,
            "dtype": str(engine.dtype).replace("torch.", ""), "tokenizer": tok_note, "prompt_len": args.prompt_len,
            "new": args.new, "repeats": args.repeats, "overlap": core.overlap}
    engine.shutdown()
    if args.json:
        print(json.dumps({**head, "rows": rows}, indent=2))
        return 0
    print(" ".join(f"{k}={v}" for k, v in head.items()))
    print(f"{'batch':>5} {'free tok/s':>11} {'json tok/s':>11} {'slower':>7} {'mask ms/step':>13}  runs (free | json)")
    for r in rows:
        runs = " ".join(f"{x:.1f}" for x in r["free_runs"]) + " | " + " ".join(f"{x:.1f}" for x in r["json_runs"])
        print(f"{r['batch']:>5} {r['free_tok_s']:>11.1f} {r['json_tok_s']:>11.1f} {r['slowdown_pct']:>6.1f}% "
              f"{r['mask_ms_per_step']:>13.3f}  {runs}")
    return 0


def masks_only(args) -> int:
    """The grammar work of a decode step without the forward: ``batch`` matchers of SCHEMA,
    each step filling their bitmasks (MaskFiller, as the engine does) and feeding each a
    random token its mask allows.  Median ms per step over --new steps, --repeats times."""
    import random
    import time

    import torch

    from localsgl import SamplingParams
    from localsgl.engine.grammar import GrammarBackend, MaskFiller

    if args.tokenizer == "auto":
        from localsgl.store.resolve import resolve_model

        tokenizer = resolve_model(args.model).load_tokenizer()
        eos, note = [tokenizer.eos_token_id], f"{args.model}'s ({len(tokenizer)} tokens)"
    else:
        tokenizer, eos, note = stand_in_tokenizer(args.tokenizer)
    backend = GrammarBackend(tokenizer, len(tokenizer), eos)
    backend.ll_tokenizer
    compiled = backend.compile(SamplingParams(json_schema=SCHEMA))
    filler = MaskFiller(backend.words, torch.device("cpu"))
    rng = random.Random(0)
    print(f"masks only: tokenizer {note}, {args.new} steps, mask threads {max(1, min(8, os.cpu_count() or 2))}")
    print(f"{'batch':>5} {'mask ms/step':>13}  runs")
    for batch in args.batches:
        runs = []
        for _ in range(args.repeats):
            states = [compiled.new_state() for _ in range(batch)]
            picked: list[int] = []
            times = []
            for _ in range(args.new):
                t0 = time.perf_counter()  # the engine's per-step work: feed last tokens, forced tokens, fill
                for g, tok in zip(states, picked):
                    g.consume([tok])
                    g.matcher.compute_ff_tokens()
                host, _ = filler.fill(states, {}, eos[0])
                times.append(time.perf_counter() - t0)
                picked = []
                for row in host:
                    words = row.to(torch.int64) & 0xFFFFFFFF
                    picked.append(rng.choice([32 * w + j for w in torch.nonzero(words).flatten().tolist()
                                              for j in range(32) if (int(words[w]) >> j) & 1]))
            runs.append(1e3 * statistics.median(times))
        print(f"{batch:>5} {statistics.median(runs):>13.3f}  " + " ".join(f"{x:.3f}" for x in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
