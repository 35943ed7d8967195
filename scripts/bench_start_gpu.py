"""GPU start-up: from `echo hi | localsgl run -m DIR --max-tokens 1` to the first stdout byte.

  python3 scripts/bench_start_gpu.py [--dir /tmp/start-llama8b] [--runs 5] [--before ROOT] [--out DIR]
      [--variant NAME:VAR=VALUE[,VAR=VALUE]] [--answer-tokens N]

Writes (once) a random Llama-3.1-8B checkpoint as four safetensors shards with an index, a
byte-level BPE tokenizer of the model's vocabulary size and a chat template, then times the
command several times: one untimed run first (it fills Triton's cache and the page cache),
then ``--runs`` timed ones, median reported.  ``--before ROOT`` times the code under ROOT
(a tree with localsgl/ and kernels/, e.g. an older commit's) in turn with this tree's, run
for run; ``--variant`` does the same for this tree under other environment variables (e.g.
``deferred:LOCALSGL_DEBUG_STARTUP_GRAPH=0``).  ``--answer-tokens N`` also times, once per
tree or variant, a whole answer of N tokens (greedy), which shows what a faster first byte
costs later.  Each run's stderr (``-v`` logs) is kept with the second each line arrived,
which is where the time went.  Finally one in-process engine reports when it served and when
every decode graph was captured (``Engine.graphs_ready_after_weights_seconds``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

SHARDS = 4
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


# ----------------------------------------------------------------------------- checkpoint
def llama_tensors(cfg: dict) -> list[tuple[str, list[int]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", [v, h])]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", [h]), (p + "self_attn.q_proj.weight", [q, h]),
                (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.v_proj.weight", [kv, h]),
                (p + "self_attn.o_proj.weight", [h, q]), (p + "post_attention_layernorm.weight", [h]),
                (p + "mlp.gate_proj.weight", [i, h]), (p + "mlp.up_proj.weight", [i, h]),
                (p + "mlp.down_proj.weight", [h, i])]
    out += [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]
    return out


def write_weights(d: Path, cfg: dict) -> None:
    """bf16 shards with random N(0, 0.02) bytes (one random block reused: load time does not
    depend on the values), norms at one."""
    import torch

    tensors = llama_tensors(cfg)
    nbytes = [2 * _numel(s) for _, s in tensors]
    big = max(nbytes)
    g = torch.Generator().manual_seed(0)
    noise = (torch.randn(big // 2, generator=g) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy()
    ones = torch.ones(cfg["hidden_size"], dtype=torch.bfloat16).view(torch.uint8).numpy()
    per_shard = sum(nbytes) / SHARDS
    shards: list[list[int]] = [[]]
    size = 0
    for k, n in enumerate(nbytes):
        if size >= per_shard * len(shards) and len(shards) < SHARDS:
            shards.append([])
        shards[-1].append(k)
        size += n
    weight_map = {}
    for s, idx in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for k in idx:
            name, shape = tensors[k]
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + nbytes[k]]}
            off += nbytes[k]
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(d / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for k in idx:
                name = tensors[k][0]
                f.write(ones if name.endswith("norm.weight") else noise[:nbytes[k]])
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def write_tokenizer(d: Path, vocab_size: int, seed: int = 0) -> None:
    """A byte-level BPE of ``vocab_size`` tokens (the last 256 special, as Llama 3's): merges
    that extend random short tokens by one byte — as large as the real one to load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = list(pre_tokenizers.ByteLevel.alphabet())
    base.sort()
    vocab = {s: i for i, s in enumerate(base)}
    merges = []
    short = list(base)
    rng = random.Random(seed)
    while len(vocab) < vocab_size - 256:
        a, b = rng.choice(short), rng.choice(base)
        t = a + b
        if t in vocab:
            continue
        vocab[t] = len(vocab)
        merges.append((a, b))
        if len(t) < 8:
            short.append(t)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    specials += [f"<|reserved_special_token_{k}|>" for k in range(256 - len(specials))]
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(d))


def make_checkpoint(d: Path, tiny: bool) -> None:
    from localsgl.store.dummy_configs import dummy_config

    done = d / ".complete"
    if done.is_file():
        print(f"checkpoint {d} exists", flush=True)
        return
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    cfg = dummy_config("llama-3.1-8b")
    if tiny:  # a quick check of this script on any machine
        cfg.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64)
    cfg["torch_dtype"] = "bfloat16"
    t = time.perf_counter()
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer(d, cfg["vocab_size"])
    t_tok = time.perf_counter() - t
    write_weights(d, cfg)
    done.touch()
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    print(f"wrote {d}: {size / 1e9:.2f} GB of safetensors in {time.perf_counter() - t:.1f} s "
          f"(tokenizer {t_tok:.1f} s)", flush=True)


# ----------------------------------------------------------------------------- timing
def _env(root: Path) -> dict:
    """PYTHONPATH for the tree at ``root``: localsgl from it, localsgl_kernels from its kernels/."""
    link = Path("/tmp") / f"klink-{hashlib.md5(str(root).encode()).hexdigest()[:8]}"
    link.mkdir(exist_ok=True)
    target = link / "localsgl_kernels"
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(root / "kernels")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(link)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                                   if p and "klink" not in p])
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("PYTHONUNBUFFERED", None)
    if PYCACHE_PREFIX:
        env["PYTHONPYCACHEPREFIX"] = PYCACHE_PREFIX
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


PYCACHE_PREFIX = ""  # set by main() when the installed packages carry no bytecode


def bytecode_missing(module: str = "torch") -> bool:
    """Whether ``module``'s package has no compiled bytecode next to its sources.  pip writes
    .pyc files at install, so a user's start never compiles torch; an image whose
    site-packages has none (and may be read-only) would add seconds of compiling to each start."""
    import importlib.util
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return False
    return not Path(importlib.util.cache_from_source(spec.origin)).exists()


def time_run(root: Path, ckpt: Path, extra: list[str], log_path: Path | None, python_flags: tuple = (),
             env: dict | None = None, tokens: int = 1) -> dict:
    """One `echo hi | localsgl -v run -m ckpt --max-tokens 1` (or ``tokens``): seconds to the
    first stdout byte and to exit; stderr lines stamped with their arrival."""
    cmd = [sys.executable, *python_flags, "-m", "localsgl.cli", "-v", "run", "-m", str(ckpt),
           "--max-tokens", str(tokens), *extra]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**_env(root), **(env or {})}, cwd="/tmp")
    lines: list[str] = []

    def drain():
        for raw in p.stderr:
            lines.append(f"{time.perf_counter() - t0:7.2f} {raw.decode(errors='replace').rstrip()}")

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    p.stdin.write(b"hi\n")
    p.stdin.close()
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = p.stdout.read()
    rc = p.wait()
    t_exit = time.perf_counter() - t0
    reader.join(5)
    if log_path is not None:
        log_path.write_text("\n".join(lines) + "\n")
    ok = rc == 0 and bool(first)
    if not ok:
        print(f"  run failed (rc {rc}); stderr tail:\n" + "\n".join(lines[-15:]), flush=True)
    return {"first_byte_s": t_first if first else None, "exit_s": t_exit, "rc": rc,
            "answer": (first + rest).decode(errors="replace")[:40]}


def import_profile(root: Path, ckpt: Path, out: Path, top: int = 25) -> list[str]:
    """One more run under ``python -X importtime``: the imports with the largest cumulative
    time (µs), written to out/importtime.txt; the slowest few are returned for the report."""
    log = out / "importtime-raw.log"
    time_run(root, ckpt, [], log, python_flags=("-X", "importtime"))
    rows = []
    for line in log.read_text().splitlines():
        parts = line.split("import time:", 1)
        if len(parts) == 2 and "|" in parts[1]:
            fields = [f.strip() for f in parts[1].split("|")]
            if fields[1].isdigit():
                rows.append((int(fields[1]), fields[2]))
    rows.sort(reverse=True)
    text = [f"{us / 1e6:7.3f} s  {name}" for us, name in rows[:top]]
    (out / "importtime.txt").write_text("\n".join(text) + "\n")
    log.unlink()
    return text[:8]


def in_process_report(ckpt: Path) -> dict:
    """When an engine of this tree serves, and when its last decode graph is captured."""
    from localsgl import Engine

    t = time.perf_counter()
    e = Engine(model=str(ckpt), device="cuda")
    serve = time.perf_counter() - t
    try:
        e.wait_graphs(300)
        return {"engine_s": serve, "load_s": e.load_seconds, "ready_after_weights_s": e.ready_after_weights_seconds,
                "graphs_ready_after_weights_s": e.graphs_ready_after_weights_seconds,
                "graphs": len(e.core.runner.graphs.graphs) if e.core.runner.graphs is not None else 0}
    finally:
        e.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/start-llama8b")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--before", default=None, help="another tree (localsgl/, kernels/) to time in turn")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/bench-start")
    ap.add_argument("--tiny", action="store_true", help="a tiny model with the 8B's vocabulary (checks the script)")
    ap.add_argument("--no-in-process", action="store_true")
    ap.add_argument("--importtime", action="store_true", help="also one run under -X importtime (out/importtime.txt)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                    help="this tree under other environment variables, timed in turn with the others")
    ap.add_argument("--answer-tokens", type=int, default=0, help="also time one whole answer of this many tokens each")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="time starts as they are even where the packages carry no .pyc")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(a.dir)
    free = shutil.disk_usage(ckpt.parent if ckpt.parent.exists() else "/").free
    print(f"free disk at {ckpt.parent}: {free / 2**30:.1f} GiB", flush=True)
    make_checkpoint(ckpt, a.tiny)
    global PYCACHE_PREFIX
    if bytecode_missing() and not a.no_bytecode_cache:
        PYCACHE_PREFIX = "/tmp/localsgl-pycache"
        print(f"torch has no .pyc here (pip writes them at install): bytecode cached under {PYCACHE_PREFIX}, "
              "written by the warm-up run", flush=True)
    trees = {"after": (HERE, {})}  # name -> (tree, environment overrides)
    if a.before:
        trees = {"before": (Path(a.before).resolve(), {}), **trees}
    for spec in a.variant:
        name, _, assigns = spec.partition(":")
        trees[name] = (HERE, dict(kv.split("=", 1) for kv in assigns.split(",") if kv))
    for name, (root, env) in trees.items():  # untimed: Triton's cache and the page cache
        r = time_run(root, ckpt, [], out / f"{name}-warmup.log", env=env)
        print(f"{name} warm-up: first byte {r['first_byte_s']} s, exit {r['exit_s']:.1f} s", flush=True)
    results: dict[str, list[dict]] = {n: [] for n in trees}
    for k in range(a.runs):
        for name, (root, env) in trees.items():
            r = time_run(root, ckpt, [], out / f"{name}-{k}.log" if k == 0 else None, env=env)
            results[name].append(r)
            fb = r["first_byte_s"]
            print(f"{name} run {k}: first byte {'FAILED' if fb is None else f'{fb:.2f} s'}, exit {r['exit_s']:.2f} s",
                  flush=True)
    summary = {}
    for name, rs in results.items():
        fb = [r["first_byte_s"] for r in rs if r["first_byte_s"] is not None]
        summary[name] = {"median_first_byte_s": statistics.median(fb) if fb else None,
                         "first_byte_s": fb, "median_exit_s": statistics.median(r["exit_s"] for r in rs)}
    for name, (root, env) in trees.items() if a.answer_tokens else ():
        r = time_run(root, ckpt, ["--temperature", "0"], None, env=env, tokens=a.answer_tokens)
        summary[name][f"answer_{a.answer_tokens}_tokens"] = {"first_byte_s": r["first_byte_s"], "exit_s": r["exit_s"]}
        print(f"{name}: {a.answer_tokens}-token answer, first byte {r['first_byte_s']} s, exit {r['exit_s']:.2f} s",
              flush=True)
    if a.importtime:
        summary["slowest_imports"] = import_profile(HERE, ckpt, out)
    if not a.no_in_process:
        try:
            summary["in_process"] = in_process_report(ckpt)
        except Exception as e:  # noqa: BLE001
            summary["in_process"] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(summary, indent=1), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
