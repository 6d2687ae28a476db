"""Paged attention: store this step's K/V into the cache, then attend over the cache.

Cache layout per layer: k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads, head_dim];
token slot `s` is row `s % block_size` of block `s // block_size` (the slot mapping).

Kernels: on CUDA, the Triton `store_kvcache` kernel and flash-attn (`flash_attn_varlen_func` for
prefill, reading the paged cache through `block_table` when a prefix is cached;
`flash_attn_with_kvcache` for decode). Elsewhere (CPU), torch reference versions of the same
operations over the same paged cache.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.context import PAD_SLOT_ID, AttentionMetadata, get_attention_metadata

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs may lack Triton; the torch path covers them
    triton = None

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    HAS_FLASH_ATTN = True
except ImportError:
    HAS_FLASH_ATTN = False


if triton is not None:
    PAD_SLOT_ID_CONST = tl.constexpr(PAD_SLOT_ID)

    @triton.jit
    def _store_kvcache_kernel(key_ptr, key_stride, value_ptr, value_stride, k_cache_ptr, v_cache_ptr,
                              slot_mapping_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr):
        token = tl.program_id(0)
        slot = tl.load(slot_mapping_ptr + token)
        if slot == PAD_SLOT_ID_CONST:
            return
        offsets = tl.arange(0, BLOCK_D)
        mask = offsets < D
        key = tl.load(key_ptr + token * key_stride + offsets, mask=mask)
        value = tl.load(value_ptr + token * value_stride + offsets, mask=mask)
        tl.store(k_cache_ptr + slot * D + offsets, key, mask=mask)
        tl.store(v_cache_ptr + slot * D + offsets, value, mask=mask)


def store_kvcache_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """key, value: [num_tokens, num_kv_heads, head_dim], rows may be strided; caches contiguous."""
    num_tokens, num_heads, head_dim = key.shape
    D = num_heads * head_dim
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    assert key.stride(1) == head_dim and value.stride(1) == head_dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.numel() == num_tokens
    _store_kvcache_kernel[(num_tokens,)](key, key.stride(0), value, value.stride(0), k_cache, v_cache,
                                         slot_mapping, D, triton.next_power_of_2(D))


def store_kvcache_torch(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor):
    keep = slot_mapping != PAD_SLOT_ID
    slots = slot_mapping[keep]
    k_cache.view(-1, *key.shape[1:])[slots] = key[keep]
    v_cache.view(-1, *value.shape[1:])[slots] = value[keep]


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


def attention_torch(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Reference attention over the paged cache (or over this step's k, v when nothing is cached)."""
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


class Attention(nn.Module):
    """Attention of one layer over its paged K/V cache. `k_cache`/`v_cache` are bound by the
    model runner once the cache is allocated; before that (the warm-up pass) nothing is stored."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.k_cache = self.v_cache = torch.tensor([])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        meta = get_attention_metadata()
        k_cache, v_cache = self.k_cache, self.v_cache
        use_cuda_kernels = q.is_cuda and HAS_FLASH_ATTN
        if k_cache.numel():
            store = store_kvcache_triton if q.is_cuda and triton is not None else store_kvcache_torch
            store(k, v, k_cache, v_cache, meta.slot_mapping)
        if not use_cuda_kernels:
            return attention_torch(q, k, v, k_cache, v_cache, meta, self.scale)
        if meta.is_prefill:
            if meta.block_tables is not None:
                k, v = k_cache, v_cache
            return flash_attn_varlen_func(q, k, v, cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=meta.cu_seqlens_k,
                                          max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k,
                                          softmax_scale=self.scale, causal=True, block_table=meta.block_tables)
        out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                      block_table=meta.block_tables, softmax_scale=self.scale, causal=True)
        return out.squeeze(1)
