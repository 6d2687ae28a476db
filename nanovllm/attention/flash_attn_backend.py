"""The flash-attn backend (CUDA): `flash_attn_varlen_func` for prefill, reading the paged cache
through `block_table` when a prefix is cached, and `flash_attn_with_kvcache` for decode.
flash-attn's paged cache takes only blocks of a multiple of 256 tokens and bf16/fp16 caches.
"""
import torch

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.metadata import AttentionMetadata

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    HAS_FLASH_ATTN = True
except ImportError:
    HAS_FLASH_ATTN = False

FLASH_ATTN_BLOCK_MULTIPLE = 256


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"

    @classmethod
    def unsupported(cls, device_type: str, block_size: int) -> str | None:
        if not HAS_FLASH_ATTN:
            return "flash-attn is not installed (pip install flash-attn)"
        if device_type != "cuda":
            return "flash-attn runs on CUDA only"
        if block_size % FLASH_ATTN_BLOCK_MULTIPLE:
            return f"flash-attn's paged KV cache needs a block_size that is a multiple of 256, got {block_size}"
        return None

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.is_prefill:
            if meta.block_tables is not None:
                k, v = k_cache, v_cache
            return flash_attn_varlen_func(q, k, v, cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=meta.cu_seqlens_k,
                                          max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k,
                                          softmax_scale=scale, causal=True, block_table=meta.block_tables)
        out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                      block_table=meta.block_tables, softmax_scale=scale, causal=True)
        return out.squeeze(1)
