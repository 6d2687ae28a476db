"""The attention layer: store this step's K/V into the paged cache (unless the caller has, fused
with RoPE), then attend over it.

`cache` (LayerKVCache) and `backend` are bound by the model runner (`bind`) once the cache is
allocated; before that (the warm-up forward, or a model built outside an engine) nothing is stored
and the backend (torch until bound) attends over this step's K/V alone.
"""
import torch
from torch import nn

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.kv_store import LayerKVCache, store_kvcache
from nanovllm.attention.metadata import get_attention_metadata
from nanovllm.attention.torch_backend import TorchBackend


class Attention(nn.Module):

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.backend: AttentionBackend = TorchBackend()
        self.cache: LayerKVCache | None = None

    def bind(self, backend: AttentionBackend, cache: LayerKVCache | None = None):
        """Attend with `backend` over `cache` from now on (None: no cache, nothing stored)."""
        self.backend, self.cache = backend, cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_stored: bool = False) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].
        `kv_stored`: the caller has already written k, v into `cache` at the step's slot mapping."""
        meta = get_attention_metadata()
        if self.cache is not None and not kv_stored:
            cache = self.cache
            store_kvcache(k, v, cache.k, cache.v, meta.slot_mapping, cache.k_scales, cache.v_scales)
        return self.backend.forward(q, k, v, self.cache, meta, self.scale)
