"""Reference attention over the paged KV pool with torch ops (CPU and GPU).

Math: for the new token t of request r at absolute position p,
out_t = softmax(q_t · K_r[:p+1]^T * scale) · V_r[:p+1], where K_r/V_r are
gathered from the pool through req_to_token (dequantized by the pool when it stores
FP8: KVPool.gather).  Decode-only steps run as one
padded, masked SDPA call over the batch; extend steps loop over requests
(one SDPA each), which is fine since prefill is compute-bound anyway.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...batch import ForwardBatch, ForwardMode
from .base import AttentionBackend


class _Meta:
    __slots__ = ("slot_index", "mask", "rows")


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def init_forward(self, batch: ForwardBatch) -> None:
        meta = _Meta()
        device = batch.input_ids.device
        if batch.mode == ForwardMode.DECODE:
            max_len = batch.max_seq_len
            rows = batch.req_to_token[batch.req_pool_indices, :max_len].to(torch.int64)  # [B, L]
            meta.rows = None
            if min(batch.seq_lens_cpu) == max_len:  # no padding (e.g. batch 1): no mask at all
                meta.slot_index = rows
                meta.mask = None
                batch.attn_meta = meta
                return
            ar = torch.arange(max_len, device=device)
            valid = ar[None, :] < batch.seq_lens[:, None].to(torch.int64)
            meta.slot_index = torch.where(valid, rows, torch.zeros_like(rows))
            # additive mask [B, 1, 1, L] in the pool's read dtype (the queries' in every model we
            # load), made once per step instead of converted in every layer
            meta.mask = torch.zeros(valid.shape, dtype=batch.kv_pool.read_dtype, device=device)
            meta.mask.masked_fill_(~valid, float("-inf"))
            meta.mask = meta.mask[:, None, None, :]
        else:
            meta.rows = []
            for i in range(batch.batch_size):
                seq = batch.seq_lens_cpu[i]
                pre = batch.prefix_lens_cpu[i]
                ext = batch.extend_lens_cpu[i]
                slots = batch.req_to_token[batch.req_pool_indices[i], :seq].to(torch.int64)
                mask = None
                if ext > 1:
                    qpos = torch.arange(pre, pre + ext, device=device)[:, None]
                    kpos = torch.arange(seq, device=device)[None, :]
                    mask = kpos <= qpos  # [ext, seq] boolean
                meta.rows.append((slots, mask))
            meta.slot_index = None
            meta.mask = None
        batch.attn_meta = meta

    def forward(self, q, k, v, layer, batch, scale):
        pool = batch.kv_pool
        pool.store(layer, batch.out_cache_loc, k, v)
        meta: _Meta = batch.attn_meta
        num_heads = q.shape[1]
        num_kv = pool.num_kv_heads
        gqa = num_heads != num_kv
        if batch.mode == ForwardMode.DECODE:
            # index_select (in gather), not advanced indexing: ~2x faster gathers on the CPU
            B, L = meta.slot_index.shape
            kk, vv = pool.gather(layer, meta.slot_index.view(-1))
            kk = kk.view(B, L, num_kv, -1).to(q.dtype).transpose(1, 2)  # [B, Hkv, L, D]
            vv = vv.view(B, L, num_kv, -1).to(q.dtype).transpose(1, 2)
            qq = q[:, :, None, :]  # [B, H, 1, D]
            mask = meta.mask
            if mask is not None and mask.dtype != q.dtype:
                mask = mask.to(q.dtype)
            out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa)
            return out[:, :, 0, :]
        out = torch.empty_like(q)
        starts = [0]
        for n in batch.extend_lens_cpu[:-1]:
            starts.append(starts[-1] + n)
        for i, (slots, mask) in enumerate(meta.rows):
            s = starts[i]
            e = s + batch.extend_lens_cpu[i]
            kk, vv = pool.gather(layer, slots)
            kk = kk.to(q.dtype).transpose(0, 1)[None]  # [1, Hkv, L, D]
            vv = vv.to(q.dtype).transpose(0, 1)[None]
            qq = q[s:e].transpose(0, 1)[None]  # [1, H, ext, D]
            if mask is not None and batch.prefix_lens_cpu[i] == 0:  # plain causal: flash kernels apply
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)
            else:
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa)
            out[s:e] = o[0].transpose(0, 1)
        return out
