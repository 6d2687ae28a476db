"""The reference attention backend, in torch: correct anywhere, fast nowhere (the CPU path).

Prefill: a loop over sequences, each attending causally over its keys (this step's k, v when no
prefix is cached, else the paged cache through its block table). Decode: one batched masked
attention over every sequence's cached keys. GQA by repeating the K/V heads.
"""
import torch
import torch.nn.functional as F

from nanovllm.attention.backend import AttentionBackend
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


class TorchBackend(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.block_tables is not None:
            block_size = k_cache.shape[1]
            flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
        if not meta.is_prefill:  # one query per sequence, batched with a length mask
            max_len = int(meta.context_lens.max())
            slots = _cache_slots(meta.block_tables, max_len, block_size)  # [batch, max_len]
            keep = torch.arange(max_len, device=q.device) < meta.context_lens.unsqueeze(1)
            out = _attend(q.unsqueeze(1), flat_k[slots], flat_v[slots], scale, keep[:, None, None, :])
            return out.squeeze(1)
        out = torch.empty_like(q)
        cu_q, cu_k = meta.cu_seqlens_q.tolist(), meta.cu_seqlens_k.tolist()
        for i in range(len(cu_q) - 1):
            n, seq_len = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
            if meta.block_tables is None:
                seq_k, seq_v = k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
            else:
                slots = _cache_slots(meta.block_tables[i], seq_len, block_size)
                seq_k, seq_v = flat_k[slots], flat_v[slots]
            causal = torch.ones(n, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - n)
            out[cu_q[i]:cu_q[i + 1]] = _attend(q[cu_q[i]:cu_q[i + 1]], seq_k, seq_v, scale, causal)
        return out
