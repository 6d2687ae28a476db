"""The attention layer: store this step's K/V into the paged cache, then attend over it.

`k_cache` / `v_cache` ([num_blocks, block_size, num_kv_heads, head_dim]) and `backend` are bound by
the model runner (`bind`) once the cache is allocated; before that (the warm-up pass) nothing is
stored and the torch backend attends over this step's K/V alone.
"""
import torch
from torch import nn

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.kv_store import store_kvcache
from nanovllm.attention.metadata import get_attention_metadata
from nanovllm.attention.torch_backend import TorchBackend


class Attention(nn.Module):

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.k_cache = self.v_cache = torch.tensor([])
        self.backend: AttentionBackend = TorchBackend()

    def bind(self, backend: AttentionBackend, k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None):
        """Attend with `backend` over these caches from now on (None: no cache, nothing stored)."""
        self.backend = backend
        self.k_cache = torch.tensor([]) if k_cache is None else k_cache
        self.v_cache = torch.tensor([]) if v_cache is None else v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        meta = get_attention_metadata()
        if self.k_cache.numel():
            store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
