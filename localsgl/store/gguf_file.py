"""GGUF files (llama.cpp's format): header -> HF-style config, tensors -> HF names + dense weights.

(Named gguf_file, not gguf, so the ``gguf`` package stays importable.)

Config: ``{arch}.*`` metadata keys map to config.json fields; the vocabulary size is
the token list's length (or the embedding's row count when they differ); embeddings
are tied when the file has no ``output.weight``; Llama-3 rope scaling, which llama.cpp
stores only as a ``rope_freqs`` tensor of per-frequency divisors, is recovered by
matching that tensor against the llama3 formula.

Weights: quantized blocks are dequantized straight to the run dtype and device
(gguf_dequant.py); with ``iter_weights(..., quantized=True)`` (``--weights keep``) the
types gguf_repack.py handles come as QuantizedWeights instead, repacked on the device
and never dense.

llama.cpp's converter permutes the rows of q_proj/k_proj for the ``llama``
architecture (it wants interleaved rotary pairs; HF uses rotate-half); we undo it,
as transformers' GGUF loader does. Qwen2/Qwen3 files are not permuted.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import convert_cache
from .gguf_dequant import can_dequantize, dequantize_tensor, gguf_version

log = logging.getLogger(__name__)

# GGUF architecture -> HF architectures entry
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_PERMUTED_ARCHS = {"llama", "mistral"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_SKIPPED = {"rope_freqs.weight"}  # folded into the config (rope scaling)


class GGUFError(ValueError):
    """A GGUF file we cannot read or do not support."""


def _magic(path) -> bytes:
    """The file's first four bytes (b"GGUF" for a GGUF file), or b"" where it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def hf_tensor_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF name; None for tensors that are not weights (rope_freqs)."""
    if gguf_name in _SKIPPED:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise GGUFError(f"unsupported tensor {gguf_name!r} in GGUF file")


# ----------------------------------------------------------------------------- reading


class GGUFModel:
    """One GGUF file's header, tensors and derived HF config.

    With a conversion-cache entry (convert_cache.py) that holds this file's config, the
    header is not parsed at all: ``reader``, ``fields`` and ``tensors`` open the file on
    first use."""

    def __init__(self, path: str | os.PathLike, cache: convert_cache.CacheEntry | None = None):
        self.path = Path(path)
        self.cache = cache
        self._reader = None
        self._config: dict | None = None
        self._weight_specs: list[tuple[str, tuple[int, ...]]] | None = None
        self._name: str | None = None
        self._tensor_index: list | None = None
        meta = cache.read_meta() if cache is not None else None
        if meta is not None:
            self._config = meta["config"]
            self._name = meta.get("name")
            self._weight_specs = [(n, tuple(shape)) for n, shape in meta["weights"]]
            self._tensor_index = meta.get("tensors")
        else:
            self._open()  # an unreadable file fails here, not mid-load

    def _open(self) -> None:
        from gguf import GGUFReader

        try:
            reader = GGUFReader(str(self.path), "r")
        except (ValueError, OSError, IndexError) as e:
            magic = _magic(self.path)
            hint = " (truncated, or still downloading?)" if magic == b"GGUF" else ""
            raise GGUFError(f"{self.path}: not a readable GGUF file{hint}: {e}") from None
        self._reader = reader
        if self.get("general.architecture") is None:
            raise GGUFError(f"{self.path}: GGUF file has no general.architecture")

    @property
    def reader(self):
        if self._reader is None:
            self._open()
        return self._reader

    @property
    def fields(self):
        return self.reader.fields

    @functools.cached_property
    def tensors(self) -> dict:
        return {t.name: t for t in self.reader.tensors}

    @property
    def gguf_arch(self) -> str:
        if self._reader is None and self._config is not None:
            return self._config["gguf"]["architecture"]
        return self.get("general.architecture")

    # metadata ------------------------------------------------------------------
    def get(self, key: str, default=None):
        f = self.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception:  # noqa: BLE001 - malformed field: treat as absent
            return default

    def aget(self, key: str, default=None):
        """An architecture-scoped key: ``{arch}.{key}``."""
        return self.get(f"{self.gguf_arch}.{key}", default)

    def array_len(self, key: str) -> int | None:
        f = self.fields.get(key)
        return None if f is None else len(f.data)

    @property
    def name(self) -> str:
        if self._name is None:
            self._name = self.get("general.name") or self.path.stem
        return self._name

    @property
    def chat_template(self) -> str | None:
        return self.get("tokenizer.chat_template")

    @property
    def config(self) -> dict:
        if self._config is None:
            self._config = self._build_config()
            self._write_meta()
        return self._config

    def _write_meta(self) -> None:
        """Record the config, the weight specs and the tensor index in the cache (needs the reader)."""
        if self.cache is not None and self.weight_specs is not None:
            self._tensor_index = tensor_index(self.reader)
            self.cache.write_meta(self.config, self.name, self.weight_specs, self._tensor_index)

    def file_tensors(self) -> list:
        """The file's tensors (gguf ReaderTensors, data memory-mapped): from the cached tensor
        index when the header has not been parsed (parsing the embedded model's header, its
        49,152-token vocabulary above all, takes ~4 s on a 2-core CPU), else the reader's."""
        if self._reader is None and self._tensor_index:
            try:
                return tensors_from_index(self.path, self._tensor_index)
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.debug("tensor index of %s unusable (%s); parsing the header", self.path, e)
                self._tensor_index = None  # written anew below
        if not self._tensor_index:
            self._write_meta()  # an older cache entry, or a broken index: write it anew
        return self.reader.tensors

    @property
    def weight_specs(self) -> list[tuple[str, tuple[int, ...]]] | None:
        """(HF name, HF shape) of every weight in file order; None when some tensor is not
        one we can load (iter_weights then raises with its name)."""
        if self._weight_specs is None:
            try:
                self._weight_specs = [
                    (name, tuple(int(x) for x in reversed(t.shape)))
                    for t in self.reader.tensors
                    if (name := hf_tensor_name(t.name)) is not None
                ]
            except GGUFError:
                return None
        return self._weight_specs

    def _build_config(self) -> dict:
        arch = self.gguf_arch
        name = self.get("general.name") or ""
        hf_arch = GGUF_ARCHITECTURES.get(arch)
        if hf_arch is None:
            raise GGUFError(
                f"{self.path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )
        if arch == "llama" and "mistral" in name.lower():
            hf_arch = "MistralForCausalLM"  # llama.cpp files Mistral under llama

        def need(key):
            v = self.aget(key)
            if v is None:
                raise GGUFError(f"{self.path}: GGUF metadata lacks {arch}.{key}")
            return v

        hidden = int(need("embedding_length"))
        heads = int(need("attention.head_count"))
        kv_heads = self.aget("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per-layer list in some files
            kv_heads = max(kv_heads)
        head_dim = self.aget("attention.key_length") or self.aget("rope.dimension_count") or hidden // heads
        ffn = self.aget("feed_forward_length")
        if ffn is None and "blk.0.ffn_gate.weight" in self.tensors:
            ffn = int(self.tensors["blk.0.ffn_gate.weight"].shape[1])
        if isinstance(ffn, list):
            ffn = max(ffn)

        vocab = self.array_len("tokenizer.ggml.tokens") or self.aget("vocab_size")
        emb = self.tensors.get("token_embd.weight")
        if emb is not None:
            rows = int(emb.shape[1])  # GGUF shapes are [in, out]
            if vocab != rows:
                vocab = rows
        if vocab is None:
            raise GGUFError(f"{self.path}: cannot tell the vocabulary size")

        theta = float(self.aget("rope.freq_base", 10000.0))
        cfg: dict = {
            "architectures": [hf_arch],
            "model_type": hf_arch.removesuffix("ForCausalLM").lower(),
            "hidden_size": hidden,
            "intermediate_size": int(ffn) if ffn is not None else None,
            "num_hidden_layers": int(need("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "head_dim": int(head_dim),
            "vocab_size": int(vocab),
            "max_position_embeddings": int(self.aget("context_length", 4096)),
            "rms_norm_eps": float(self.aget("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": theta,
            "rope_scaling": self._rope_scaling(int(head_dim), theta),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "hidden_act": "silu",
            "_name_or_path": str(self.path),
        }
        if arch == "qwen2" or "blk.0.attn_q.bias" in self.tensors:
            cfg["attention_bias"] = "blk.0.attn_q.bias" in self.tensors
        if hf_arch == "MistralForCausalLM":
            sw = self.aget("attention.sliding_window")
            cfg["sliding_window"] = int(sw) if sw else None
        for key, out in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
            v = self.get(f"tokenizer.ggml.{key}")
            if v is not None:
                cfg[out] = int(v)
        eos = [
            int(v)
            for k in ("eos_token_id", "eot_token_id", "eom_token_id")
            if (v := self.get(f"tokenizer.ggml.{k}")) is not None
        ]
        eos = list(dict.fromkeys(eos))
        if eos:
            cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        file_type = self.get("general.file_type")
        cfg["torch_dtype"] = {0: "float32", 1: "float16", 32: "bfloat16"}.get(file_type)
        cfg["gguf"] = {
            "architecture": arch,
            "file_type": file_type,
            "tensor_types": sorted({t.tensor_type.name for t in self.reader.tensors}),
        }
        self._check_types()
        return cfg

    def _rope_scaling(self, head_dim: int, theta: float) -> dict | None:
        kind = self.aget("rope.scaling.type")
        factor = self.aget("rope.scaling.factor")
        if kind in (None, "none") and "rope_freqs.weight" in self.tensors:
            freqs = dequantize_tensor(self.tensors["rope_freqs.weight"], torch.float32, "cpu")
            return infer_llama3_scaling(freqs, head_dim, theta, self.path)
        if kind in (None, "none") or factor in (None, 0.0, 1.0):
            return None
        rs = {"rope_type": str(kind), "factor": float(factor)}
        orig = self.aget("rope.scaling.original_context_length")
        if orig:
            rs["original_max_position_embeddings"] = int(orig)
        return rs  # ModelConfig rejects kinds the engine cannot run (e.g. yarn) with a clear error

    def _check_types(self) -> None:
        bad = sorted({t.tensor_type.name for t in self.reader.tensors if not can_dequantize(t.tensor_type)})
        if bad:
            raise GGUFError(f"{self.path}: unsupported tensor types {', '.join(bad)} (gguf {gguf_version()})")

    # weights -------------------------------------------------------------------
    def iter_weights(self, dtype: torch.dtype, device, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, dense tensor in dtype on device). On the CPU the dequantized weights come
        from the conversion cache when it has them, and go into it when it does not (on a GPU
        dequantization runs on the device and is faster than reading a dense copy).
        ``quantized``: tensors of the types gguf_repack.py maps onto a kernel format come as
        QuantizedWeights instead (repacked on the device, never dense)."""
        device = torch.device(device)
        if quantized:
            return self._repacked(dtype, device)
        run_dtype = str(dtype).removeprefix("torch.")
        specs = self.weight_specs if self.cache is not None and device.type == "cpu" else None
        if specs is None or run_dtype not in ("float32", "bfloat16", "float16"):
            return self._dequantized(dtype, device)
        cached = self.cache.load_weights(run_dtype, specs)
        if cached is not None:
            log.info("weights of %s from the conversion cache (%s)", self.path.name, self.cache.dir)
            return iter(cached.items())
        return self.cache.store_while_yielding(run_dtype, specs, self._dequantized(dtype, device))

    def _dequantized(self, dtype: torch.dtype, device) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.config
        permute = self.gguf_arch in _PERMUTED_ARCHS
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        for t in self.reader.tensors:
            name = hf_tensor_name(t.name)
            if name is None:
                continue
            w = dequantize_tensor(t, dtype, device)
            if permute and (".q_proj." in name or ".k_proj." in name):
                w = unpermute_qk(w, heads if ".q_proj." in name else kv_heads)
            yield name, w
            del w


    def _repacked(self, dtype: torch.dtype, device) -> Iterator[tuple[str, object]]:
        from .gguf_repack import can_repack, repack

        cfg = self.config
        permute = self.gguf_arch in _PERMUTED_ARCHS
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        for t in self.file_tensors():
            name = hf_tensor_name(t.name)
            if name is None:
                continue
            shape = tuple(int(x) for x in reversed(t.shape))
            if can_repack(t.tensor_type.name, shape):
                data = torch.from_numpy(np.array(t.data, copy=True)).to(device)
                w = repack(t.tensor_type.name, data, shape)
                del data
                if permute and (".q_proj." in name or ".k_proj." in name):
                    n = heads if ".q_proj." in name else kv_heads
                    w = type(w)(w.fmt, unpermute_qk(w.qweight, n), unpermute_qk(w.scales, n),
                                None if w.mins is None else unpermute_qk(w.mins, n), w.in_features)
            else:
                w = dequantize_tensor(t, dtype, device)
                if permute and (".q_proj." in name or ".k_proj." in name):
                    w = unpermute_qk(w, heads if ".q_proj." in name else kv_heads)
            yield name, w
            del w


def tensor_index(reader) -> list:
    """[name, type number, shape, elements, bytes, data offset, numpy dtype, data shape] of each
    tensor of a parsed GGUF file: what tensors_from_index needs to map them without the header."""
    return [[t.name, int(t.tensor_type), [int(x) for x in t.shape], int(t.n_elements), int(t.n_bytes),
             int(t.data_offset), t.data.dtype.str, [int(x) for x in t.data.shape]] for t in reader.tensors]


def tensors_from_index(path: Path, index: list) -> list:
    """ReaderTensors of ``path`` from its tensor_index, each a view of one read-only memory map."""
    from gguf import GGMLQuantizationType
    from gguf.gguf_reader import ReaderTensor

    whole = np.memmap(path, dtype=np.uint8, mode="r")
    out = []
    for name, qtype, shape, n_elements, n_bytes, offset, dtype, data_shape in index:
        dt = np.dtype(dtype)
        if offset + n_bytes > whole.size or n_bytes != int(np.prod(data_shape)) * dt.itemsize:
            raise ValueError(f"tensor {name}: its index entry does not match the file")
        data = whole[offset : offset + n_bytes].view(dt).reshape(data_shape)
        out.append(ReaderTensor(name=name, tensor_type=GGMLQuantizationType(qtype),
                                shape=np.array(shape, dtype=np.uint64), n_elements=n_elements, n_bytes=n_bytes,
                                data_offset=offset, data=data, field=None))
    return out


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (per head: interleaved pairs -> two halves).

    llama.cpp: ``w.reshape(n, 2, d/2, ...).swapaxes(1, 2)`` (d = rows per head);
    the inverse reads rows as (n, d/2, 2) and swaps back."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows (for writing test files)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, orig: int) -> torch.Tensor:
    """The per-frequency divisors llama.cpp writes as rope_freqs for Llama-3 scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < high_wl, torch.ones_like(inv), torch.where(wavelen > low_wl, torch.full_like(inv, factor), mid))
    return out.float()


def infer_llama3_scaling(freqs: torch.Tensor, head_dim: int, theta: float, path=None) -> dict | None:
    """Recover Llama-3 rope scaling from llama.cpp's rope_freqs tensor (per-frequency divisors).

    The published parameter sets are tried first. Otherwise the divisors are fitted: in
    the llama3 formula the smoothing weight s = (orig/wavelen - low)/(high - low) is
    linear in 1/wavelen and clamped to [0, 1], so only its two ends matter (the
    wavelengths where s = 0 and s = 1); we report them as low = 1, orig = the s = 0
    wavelength, high = orig / (the s = 1 wavelength), which gives identical frequencies."""
    freqs = freqs.double().flatten().cpu()
    if torch.allclose(freqs, torch.ones_like(freqs)):
        return None
    factor = float(freqs.max())

    def result(low, high, orig):
        orig = round(orig) if abs(orig - round(orig)) < 1e-6 * orig else orig
        high = round(high, 6)
        ref = llama3_rope_factors(head_dim, theta, factor, low, high, orig).double()
        if ref.shape == freqs.shape and torch.allclose(ref, freqs, rtol=1e-3, atol=1e-4):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": float(low),
                "high_freq_factor": float(high),
                "original_max_position_embeddings": orig,
            }
        return None

    for orig in (8192, 4096, 16384, 32768):
        for low, high in ((1.0, 4.0), (1.0, 8.0), (2.0, 8.0), (1.0, 2.0)):
            if (r := result(low, high, orig)) is not None:
                return r
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / inv
    if wavelen.shape == freqs.shape and factor > 1.0:
        tol = 1e-4 * factor
        ones, full = freqs <= 1.0 + tol, freqs >= factor - tol
        mid = ~(ones | full)
        s = (1.0 / freqs - 1.0 / factor) / (1.0 - 1.0 / factor)  # the smoothing weight
        x = 1.0 / wavelen
        wl0 = wl1 = None  # wavelengths where s = 0 and s = 1
        if int(mid.sum()) >= 2:
            A = torch.stack([x[mid], torch.ones_like(x[mid])], dim=1)
            a, b = torch.linalg.lstsq(A, s[mid].unsqueeze(1)).solution.flatten().tolist()
            if a > 0:
                wl0, wl1 = a / -b if b < 0 else None, a / (1.0 - b)
        elif int(full.sum()) > 0:
            wl0 = float(wavelen[full].min())
            if int(mid.sum()) == 1:  # s = (wl0/w - 1)/(high - 1) through the one point
                sm, wm = float(s[mid]), float(wavelen[mid])
                wl1 = wl0 / (1.0 + (wl0 / wm - 1.0) / sm)
            elif int(ones.sum()) > 0:
                wl1 = float(wavelen[ones].max())
        if wl0 and wl1 and wl0 > wl1 > 0:
            if (r := result(1.0, wl0 / wl1, wl0)) is not None:
                return r
    raise GGUFError(f"{path}: rope_freqs tensor does not match Llama-3 rope scaling; cannot run this rope variant")


# ----------------------------------------------------------------------------- caches

_lock = threading.Lock()
_models: dict[tuple[str, float], GGUFModel] = {}
_tokenizers: dict[tuple[str, float], object] = {}


def _key(path) -> tuple[str, float]:
    p = Path(path).resolve()
    try:
        return str(p), p.stat().st_mtime
    except OSError:
        raise GGUFError(f"{path}: no such GGUF file") from None


def open_gguf(path) -> GGUFModel:
    """The parsed file, cached per path within the process and, across processes, through
    the conversion cache (parsing a header with a large vocabulary takes seconds)."""
    key = _key(path)
    with _lock:
        m = _models.get(key)
    if m is None:
        m = GGUFModel(key[0], cache=convert_cache.CacheEntry.for_file(key[0]))
        with _lock:
            _models[key] = m
    return m


def load_tokenizer(path):
    """The file's tokenizer and chat template (cached per path).

    transformers converts the GGUF vocabulary once; its saved files go to the conversion
    cache and every load reads them with LightTokenizer, so a start with a warm cache
    imports neither transformers nor huggingface_hub."""
    key = _key(path)
    with _lock:
        tok = _tokenizers.get(key)
    if tok is None:
        tok = _load_tokenizer(Path(key[0]))
        with _lock:
            _tokenizers[key] = tok
    return tok


def _load_tokenizer(path: Path):
    from .light_tokenizer import LightTokenizer

    entry = open_gguf(path).cache
    if entry is not None and entry.has_tokenizer():
        try:
            return LightTokenizer.from_dir(entry.tokenizer_dir)
        except Exception as e:  # noqa: BLE001 - a damaged cache entry: convert again
            log.warning("rebuilding the cached tokenizer of %s: %s", path.name, e)
    files = _converted_tokenizer_files(path)
    if "tokenizer.json" not in files:  # not a tokenizers-backed conversion: use transformers'
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if entry is not None and entry.write_tokenizer(files):
        return LightTokenizer.from_dir(entry.tokenizer_dir)
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        return LightTokenizer.from_dir(d)


def _converted_tokenizer_files(path: Path) -> dict[str, bytes]:
    """The files transformers saves for the tokenizer it builds from a GGUF file."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
