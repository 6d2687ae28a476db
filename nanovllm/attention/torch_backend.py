"""The reference attention backend, in torch: correct anywhere, fast nowhere (the CPU path).

Prefill: a loop over sequences, each attending causally over its keys (this step's k, v when no
prefix is cached, else the paged cache through its block table). Decode: one batched masked
attention over every sequence's cached keys. GQA by repeating the K/V heads. An FP8 cache is
dequantized (float32 values times their scales) as it is gathered, then cast to q's dtype.
Cascade decode (shared prefixes, AttentionMetadata.cascade): each group's prefix keys are gathered once
and attended by all its rows, each row's suffix keys by that row; the two results are merged by their
log-sum-exp, in float32.
Not CUDA-graph capturable (host syncs): on CUDA it needs enforce_eager=True.
"""
import torch
import torch.nn.functional as F

from nanovllm.attention.backend import AttentionBackend, CacheSpec
from nanovllm.attention.kv_store import LayerKVCache
from nanovllm.attention.metadata import AttentionMetadata, CascadeMetadata


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


def _attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [n, H, D]; k, v: [n or 1, L, KvH, D]; keep [n or 1, L]. (out [n, H, D], lse [n, H]) in float32,
    natural log; a row that keeps nothing gives zeros and lse -inf."""
    group = q.shape[-2] // k.shape[-2]
    k, v = k.float().repeat_interleave(group, -2), v.float().repeat_interleave(group, -2)
    scores = torch.einsum("nhd,nlhd->nhl", q.float(), k.expand(q.shape[0], *k.shape[1:])) * scale
    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    lse = scores.logsumexp(-1)  # [n, H]
    probs = (scores - lse.unsqueeze(-1)).exp().nan_to_num(0.0)
    return torch.einsum("nhl,nlhd->nhd", probs, v.expand(q.shape[0], *v.shape[1:])), lse


def _cascade_decode(q: torch.Tensor, cache: LayerKVCache, c: CascadeMetadata, scale: float) -> torch.Tensor:
    """Decode attention as the LSE-merge of the shared-prefix pass and the suffix pass."""
    block_size = cache.k.shape[1]
    max_len = max(int(c.suffix_lens.max()), 1)
    slots = _cache_slots(c.suffix_block_tables, max_len, block_size)  # [num_seqs, max_len]
    keep = torch.arange(max_len, device=q.device) < c.suffix_lens.unsqueeze(1)
    out, lse = _attend_lse(q, _gather(cache.k, cache.k_scales, slots, torch.float32),
                           _gather(cache.v, cache.v_scales, slots, torch.float32), scale, keep)
    cu = c.cu_group_rows.tolist()
    for g, prefix_len in enumerate(c.prefix_lens.tolist()):
        if cu[g] == cu[g + 1]:  # room for a group the step does not use (a CUDA graph's metadata)
            continue
        rows = c.group_rows[cu[g]:cu[g + 1]].long()
        slots = _cache_slots(c.prefix_block_tables[g], prefix_len, block_size).unsqueeze(0)  # [1, prefix_len]
        keep = torch.ones(1, prefix_len, dtype=torch.bool, device=q.device)
        prefix_out, prefix_lse = _attend_lse(q[rows], _gather(cache.k, cache.k_scales, slots, torch.float32),
                                             _gather(cache.v, cache.v_scales, slots, torch.float32), scale, keep)
        m = torch.maximum(lse[rows], prefix_lse)  # finite: the prefix is never empty
        w_suffix, w_prefix = (lse[rows] - m).exp(), (prefix_lse - m).exp()
        out[rows] = (out[rows] * w_suffix.unsqueeze(-1) + prefix_out * w_prefix.unsqueeze(-1)) \
            / (w_suffix + w_prefix).unsqueeze(-1)
    return out.to(q.dtype)


class TorchBackend(AttentionBackend):
    name = "torch"
    default_block_size = 16
    supports_cascade = True

    @classmethod
    def unsupported(cls, spec: CacheSpec) -> str | None:
        if spec.cuda_graphs:
            return "it is not CUDA-graph capturable; pass enforce_eager=True"
        return None

    def forward(self, q, k, v, cache: LayerKVCache | None, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.cascade is not None:
            return _cascade_decode(q, cache, meta.cascade, scale)
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
