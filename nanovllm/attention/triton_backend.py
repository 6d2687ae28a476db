"""The Triton backend (CUDA; the CPU under TRITON_INTERPRET=1): varlen prefill over the paged cache
(`triton_prefill`) and split-KV paged decode (`triton_decode`), for any power-of-two block size
from 16 and bf16/fp16/FP8 caches (FP8 dequantized in registers). Decode is CUDA-graph capturable;
cascade decode (shared prefixes read once per group, `triton_cascade`) runs eagerly.
"""
import os

import torch

from nanovllm.attention.backend import AttentionBackend, CacheSpec
from nanovllm.attention.kv_store import LayerKVCache
from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.utils.triton_utils import triton

HEAD_DIMS = (64, 128, 256)


class TritonBackend(AttentionBackend):
    name = "triton"
    default_block_size = 16  # docs/PERF.md: decode runs at the same speed at every block size
    supports_cascade = True

    @classmethod
    def unsupported(cls, spec: CacheSpec) -> str | None:
        if triton is None:
            return "Triton is not installed"
        if spec.device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1)"
        if spec.head_dim not in HEAD_DIMS:
            return f"head_dim must be one of {HEAD_DIMS}, got {spec.head_dim}"
        size = spec.block_size
        if size is not None and (size < 16 or size & (size - 1)):
            return f"block_size must be a power of two >= 16, got {size}"
        return None

    def forward(self, q, k, v, cache: LayerKVCache | None, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        from nanovllm.attention.triton_decode import paged_decode
        from nanovllm.attention.triton_prefill import paged_prefill
        if meta.is_prefill:
            if meta.block_tables is None or cache is None:  # no cached prefix: this step's K/V suffice
                return paged_prefill(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, scale)
            return paged_prefill(q, cache.k, cache.v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, scale,
                                 meta.block_tables, cache.k_scales, cache.v_scales)
        if meta.cascade is not None:
            from nanovllm.attention.triton_cascade import cascade_decode
            return cascade_decode(q, cache.k, cache.v, meta.cascade, scale, cache.k_scales, cache.v_scales)
        return paged_decode(q, cache.k, cache.v, meta.block_tables, meta.context_lens, scale, cache.k_scales,
                            cache.v_scales)
