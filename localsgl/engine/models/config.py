"""ModelConfig: the few numbers the engine needs, read from an HF config.json dict.

One dataclass serves Llama, Mistral, Qwen2/2.5, Qwen3 and SmolLM: they differ
only in qkv bias, q/k RMSNorm, rope scaling and tied embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class UnsupportedModelError(ValueError):
    pass


@dataclass
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # tokens a sliding layer attends to; None: every layer sees all
    torch_dtype: str | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        emb = v * h
        head = 0 if self.tie_word_embeddings else v * h
        return self.num_layers * per_layer + emb + head + h

    @property
    def streamed_params_per_token(self) -> int:
        """Parameters read per decode step: everything but the embedding lookup
        (a tied embedding is still read once, as the LM head)."""
        emb = self.vocab_size * self.hidden_size
        return self.num_params - (0 if self.tie_word_embeddings else emb)

    def shape(self) -> dict[str, Any]:
        """The architecture and sizes as plain values: what `info` and `show` print."""
        return {"architecture": self.architecture, "params": self.num_params, "layers": self.num_layers,
                "hidden_size": self.hidden_size, "heads": self.num_heads, "kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "vocab_size": self.vocab_size}

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            mt = cfg.get("model_type")
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            if not archs and mt in by_type:
                arch = by_type[mt]
            else:
                raise UnsupportedModelError(
                    f"unsupported architecture {archs or mt!r}; supported: "
                    + ", ".join(SUPPORTED_ARCHITECTURES)
                )
        family = SUPPORTED_ARCHITECTURES[arch]
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") not in ("default", None):
            rope_scaling = dict(rope_params)
        if rope_scaling is not None:
            rs = dict(rope_scaling)
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if rtype == "default":
                rope_scaling = None
            elif rtype not in ("llama3", "linear"):
                raise UnsupportedModelError(f"unsupported rope scaling {rtype!r} (supported: llama3, linear)")
            else:
                rs["rope_type"] = rtype
                rope_scaling = rs
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            hidden_act=cfg.get("hidden_act", "silu"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=sliding_window_of(cfg, family),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            raw=dict(cfg),
        )


def sliding_window_of(cfg: dict[str, Any], family: str) -> int | None:
    """The attention window some layer of this model uses, read as transformers reads it, or None.

    Mistral slides every layer when ``sliding_window`` is set; Qwen2/Qwen3 slide only with
    ``use_sliding_window``, and then the layers from ``max_window_layers`` on; an explicit
    ``layer_types`` list (Gemma-style) names the sliding layers; Llama never slides.  The
    engine attends to the whole context, so the plan caps the context at this window."""
    qwen = family in ("qwen2", "qwen3")
    if family == "llama" or (qwen and not cfg.get("use_sliding_window", False)):
        return None
    window = cfg.get("sliding_window", 4096 if qwen else None)
    if not window:
        return None
    types = cfg.get("layer_types")
    if types is not None:
        sliding = "sliding_attention" in types
    elif qwen:
        sliding = int(cfg.get("max_window_layers", 28)) < int(cfg["num_hidden_layers"])
    else:
        sliding = True
    return int(window) if sliding else None
