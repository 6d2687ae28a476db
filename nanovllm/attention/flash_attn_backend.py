"""The flash-attn backend (CUDA): `flash_attn_varlen_func` for prefill, reading the paged cache
through `block_table` when a prefix is cached, and `flash_attn_with_kvcache` for decode.
flash-attn's paged cache takes only blocks of a multiple of 256 tokens and bf16/fp16 caches.
"""
import torch

from nanovllm.attention.backend import AttentionBackend, CacheSpec
from nanovllm.attention.kv_store import LayerKVCache
from nanovllm.attention.metadata import AttentionMetadata

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    HAS_FLASH_ATTN = True
except ImportError:
    HAS_FLASH_ATTN = False

FLASH_ATTN_BLOCK_MULTIPLE = 256


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    default_block_size = 256

    @classmethod
    def unsupported(cls, spec: CacheSpec) -> str | None:
        if not HAS_FLASH_ATTN:
            return "flash-attn is not installed (pip install flash-attn)"
        if spec.device_type != "cuda":
            return "flash-attn runs on CUDA only"
        if spec.fp8_cache:
            return "flash-attn reads bf16/fp16 caches only (kv_cache_dtype='fp8' needs attention_backend='triton')"
        if spec.block_size is not None and spec.block_size % FLASH_ATTN_BLOCK_MULTIPLE:
            return f"its paged KV cache needs a block_size that is a multiple of 256, got {spec.block_size}"
        return None

    def forward(self, q, k, v, cache: LayerKVCache | None, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.is_prefill:
            if meta.block_tables is not None:
                k, v = cache.k, cache.v
            return flash_attn_varlen_func(q, k, v, cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=meta.cu_seqlens_k,
                                          max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k,
                                          softmax_scale=scale, causal=True, block_table=meta.block_tables)
        out = flash_attn_with_kvcache(q.unsqueeze(1), cache.k, cache.v, cache_seqlens=meta.context_lens,
                                      block_table=meta.block_tables, softmax_scale=scale, causal=True)
        return out.squeeze(1)
