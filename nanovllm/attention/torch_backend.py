"""The reference attention backend, in torch: correct anywhere, fast nowhere (the CPU path).

Prefill: a loop over sequences, each attending causally over its keys (this step's k, v when no
prefix is cached, else the paged cache through its block table). Decode: one batched masked
attention over every sequence's cached keys. GQA by repeating the K/V heads. An FP8 cache is
dequantized (float32 values times their scales) as it is gathered, then cast to q's dtype.
Not CUDA-graph capturable (host syncs): on CUDA it needs enforce_eager=True.
"""
import torch
import torch.nn.functional as F

from nanovllm.attention.backend import AttentionBackend, CacheSpec
from nanovllm.attention.kv_store import LayerKVCache
from nanovllm.attention.metadata import AttentionMetadata


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            mask: torch.Tensor) -> torch.Tensor:
    """q: [..., n, H, D]; k, v: [..., L, KvH, D]; mask broadcastable to [..., H, n, L] (True = keep)."""
    group = q.shape[-2] // k.shape[-2]
    k, v = k.repeat_interleave(group, -2), v.repeat_interleave(group, -2)
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(-3, -2)


def _cache_slots(block_table: torch.Tensor, num_positions: int, block_size: int) -> torch.Tensor:
    positions = torch.arange(num_positions, device=block_table.device)
    return block_table[..., positions // block_size] * block_size + positions % block_size


def _gather(cache: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cached rows `slots` ([...]) of one cache -> [..., num_kv_heads, head_dim] in `dtype`."""
    rows = cache.flatten(0, 1)[slots]
    if scales is not None:  # FP8: value * its (token, head) scale
        rows = rows.float() * scales.flatten(0, 1)[slots].unsqueeze(-1)
    return rows.to(dtype)


class TorchBackend(AttentionBackend):
    name = "torch"
    default_block_size = 16

    @classmethod
    def unsupported(cls, spec: CacheSpec) -> str | None:
        if spec.cuda_graphs:
            return "it is not CUDA-graph capturable; pass enforce_eager=True"
        return None

    def forward(self, q, k, v, cache: LayerKVCache | None, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.block_tables is not None:
            block_size = cache.k.shape[1]
        if not meta.is_prefill:  # one query per sequence, batched with a length mask
            max_len = int(meta.context_lens.max())
            slots = _cache_slots(meta.block_tables, max_len, block_size)  # [batch, max_len]
            keep = torch.arange(max_len, device=q.device) < meta.context_lens.unsqueeze(1)
            out = _attend(q.unsqueeze(1), _gather(cache.k, cache.k_scales, slots, q.dtype),
                          _gather(cache.v, cache.v_scales, slots, q.dtype), scale, keep[:, None, None, :])
            return out.squeeze(1)
        out = torch.empty_like(q)
        cu_q, cu_k = meta.cu_seqlens_q.tolist(), meta.cu_seqlens_k.tolist()
        for i in range(len(cu_q) - 1):
            n, seq_len = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
            if meta.block_tables is None:
                seq_k, seq_v = k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
            else:
                slots = _cache_slots(meta.block_tables[i], seq_len, block_size)
                seq_k = _gather(cache.k, cache.k_scales, slots, q.dtype)
                seq_v = _gather(cache.v, cache.v_scales, slots, q.dtype)
            causal = torch.ones(n, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - n)
            out[cu_q[i]:cu_q[i + 1]] = _attend(q[cu_q[i]:cu_q[i + 1]], seq_k, seq_v, scale, causal)
        return out
