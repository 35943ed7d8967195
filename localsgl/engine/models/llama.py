"""The Llama family: Llama (1/2/3, incl. Llama-3 rope scaling), Mistral, Qwen2/2.5
(qkv bias), Qwen3 (q/k RMSNorm), SmolLM — one implementation, switched by ModelConfig.

Input is the flat token dimension of a ragged batch (no padding); attention is
delegated to the batch's backend, which also writes the KV pool.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .. import debug_switches
from ..batch import ForwardBatch
from ..layers.activation import silu_and_mul
from ..layers.cpu_decode import forward_decode as cpu_forward_decode, lowp_logits_on_cpu, mm_lowp, use_cpu_decode
from ..layers.fused_decode import forward_one_token, logits_one_row, use_fused_decode
from ..layers.linear import Linear, MergedLinear, linear
from ..layers.quant import QuantizedWeight, is_quantized
from ..layers.weight_policy import load_embedding, make_embedding
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from .config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype, device):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = MergedLinear(
            cfg.hidden_size,
            {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
            bias=cfg.attention_bias,
            dtype=dtype,
            device=device,
        )
        self.o_proj = Linear(self.q_size, cfg.hidden_size, dtype=dtype, device=device)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype=dtype, device=device)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, batch: ForwardBatch):
        q, k, v = self.project(x, positions, rotary)
        out = batch.attn_backend.forward(q, k, v, self.layer_id, batch, self.scale)
        return self.o_proj(out.reshape(x.shape[0], self.q_size))

    def project(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding):
        """The new tokens' rotated q [T, Hq, D], rotated k and v [T, Hkv, D]."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.contiguous())
            k = self.k_norm(k.contiguous())
        q, k = rotary(positions, q, k)
        return q, k, v


class MLP(nn.Module):
    use_kernels = True  # the engine's kernels switch (debug_switches.apply_to_model)

    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        if cfg.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported activation {cfg.hidden_act!r}")
        i = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate": i, "up": i}, dtype=dtype, device=device)
        self.down_proj = Linear(i, cfg.hidden_size, dtype=dtype, device=device)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.use_kernels))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype, device):
        super().__init__()
        self.self_attn = Attention(cfg, layer_id, dtype, device)
        self.mlp = MLP(cfg, dtype, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, x, residual, positions, rotary, batch):
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rotary, batch)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    # The layer cut at its attention, for piecewise CUDA graphs (piecewise_graph.py): everything
    # but the attention itself runs inside captured graphs; forward() is the same computation.
    def attention_input(self, x, residual, positions, rotary, batch):
        """Norm, qkv projection, rotary, K/V into the pool: returns (q [T, Hq, D], residual)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        attn = self.self_attn
        q, k, v = attn.project(h, positions, rotary)
        batch.attn_backend.store_kv(k, v, attn.layer_id, batch)
        return q, residual

    def attention_output(self, attn_out: torch.Tensor, residual: torch.Tensor):
        """o_proj, residual add + norm, MLP on the attention's output [T, Hq*D]: (x, residual)."""
        h = self.self_attn.o_proj(attn_out)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    # its layers cut at the attention (DecoderLayer.attention_input / attention_output)
    supports_piecewise_graphs = True

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = make_embedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype, device) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, device=device)
        self.lm_head_weight_cpu: torch.Tensor | None = None  # set by use_cpu_weight_layout
        self.rotary = RotaryEmbedding(
            cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, device=device
        )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Return the final-normed hidden states [T, H]."""
        if use_fused_decode(self, input_ids, batch):
            return forward_one_token(self, input_ids, positions, batch)
        if use_cpu_decode(self, input_ids, batch):
            return cpu_forward_decode(self, input_ids, positions, batch)
        self.rotary.begin_forward()
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary, batch)
        x, _ = self.norm(x, residual)
        return x

    def logits_width(self) -> int:
        """Columns of compute_logits' output: the LM head's rows."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return w.out_features if isinstance(w, QuantizedWeight) else w.shape[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of ``hidden``'s rows; into ``out`` [rows, logits_width()] when given (the
        buffer every captured decode graph shares), or a new tensor.  The one-row GEMV path
        returns its own."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.lm_head_weight_cpu is not None and not hidden.is_cuda:
            w = self.lm_head_weight_cpu  # input-major copy of a tied head (use_cpu_weight_layout)
        one_row = logits_one_row(self, hidden, w)
        if one_row is not None:
            return one_row
        if debug_switches.of(self).cpu_decode and lowp_logits_on_cpu(hidden) and not isinstance(w, QuantizedWeight):
            # bf16 rows on the CPU: widen the head's columns, fp32 GEMM
            y = mm_lowp(hidden, w.t()).to(hidden.dtype)
        else:
            y = linear(hidden, w)
        return y.float() if out is None else out.copy_(y)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused parameters (casting on the fly).  A tensor may
        be a QuantizedWeight; the layer keeps or dequantizes it as its weight policy says."""
        params = dict(self.named_parameters())
        seen: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding serves as head
            is_bias = name.endswith(".bias")
            for hf, (ours, shard) in _STACKED.items():
                if f".{hf}." in f".{name}":
                    target = name.replace(hf, ours)
                    mod = self.get_submodule(target.rsplit(".", 1)[0])
                    mod.load_shard(shard, tensor, is_bias=is_bias)
                    seen.add(f"{target}#{shard}")
                    break
            else:
                owner_name, _, attr = name.rpartition(".")
                owner = self.get_submodule(owner_name) if attr == "weight" and owner_name in self._linear_names() else None
                if owner is not None:
                    try:
                        owner.set_weight(tensor)
                    except ValueError as e:
                        raise ValueError(f"weight {name}: {e}") from None
                    seen.add(name)
                    continue
                if name == "embed_tokens.weight":
                    load_embedding(self, "embed_tokens", tensor)
                    seen.add(name)
                    continue
                if name not in params:
                    raise KeyError(f"unexpected weight {name!r} in checkpoint")
                p = params[name]
                if is_quantized(tensor):
                    tensor = tensor.dequantize(p.dtype)
                if tuple(p.shape) != tuple(tensor.shape):
                    raise ValueError(f"weight {name}: expected {tuple(p.shape)}, got {tuple(tensor.shape)}")
                p.data.copy_(tensor)
                seen.add(name)
        missing = [n for n in self.expected_weight_keys() if n not in seen]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def expected_weight_keys(self) -> list[str]:
        keys = []
        for n, m in self._linears():  # by module: a deferred or quantized weight is no Parameter
            keys += [f"{n}.weight#{s}" for s in m.offsets] if isinstance(m, MergedLinear) else [f"{n}.weight"]
        linear_names = self._linear_names()
        for name, _ in self.named_parameters():
            mod_name = name.rsplit(".", 1)[0]
            if mod_name in linear_names and name.endswith(".weight"):
                continue
            mod = self.get_submodule(mod_name)
            if isinstance(mod, MergedLinear):
                keys += [f"{name}#{s}" for s in mod.offsets]
            else:
                keys.append(name)
        if "embed_tokens.weight" not in keys:
            keys.append("embed_tokens.weight")  # a quantized or not yet allocated table
        return keys

    def _linears(self):
        return [(n, m) for n, m in self.named_modules() if isinstance(m, Linear)]

    def _linear_names(self) -> set[str]:
        names = getattr(self, "_linear_name_set", None)
        if names is None:
            names = self._linear_name_set = {n for n, _ in self._linears()}
        return names

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights for benchmarks: N(0, 0.02) linears, unit norms."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        for _, mod in self._linears():
            if mod.weight is None:  # deferred by the weight policy: made in its format
                mod.init_random(g)
        if self.embed_tokens.weight.is_meta:
            # an unallocated table (deferring policy): allocated here, filled below
            load_embedding(self, "embed_tokens", torch.empty(self.embed_tokens.weight.shape, device=self.norm.weight.device))
        for name, p in self.named_parameters():
            if "norm" in name:
                p.data.fill_(1.0)
            elif name.endswith("bias"):
                p.data.zero_()
            else:
                if p.is_cuda:
                    p.data.normal_(0.0, 0.02)
                else:
                    p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))


# HF projection name -> (our fused module name, shard)
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}
