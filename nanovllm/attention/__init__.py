"""Attention over the paged KV cache: the layer, its per-step metadata, the cache store, and the
backends (flash-attn, Triton, torch)."""
from nanovllm.attention.backend import (ATTENTION_BACKENDS, AttentionBackend, CacheSpec, backend_class,
                                        resolve_attention_backend)
from nanovllm.attention.kv_store import FP8_DTYPE, PAD_SLOT_ID, LayerKVCache
from nanovllm.attention.layer import Attention
from nanovllm.attention.metadata import AttentionMetadata, CascadeMetadata, forward_context

__all__ = ["ATTENTION_BACKENDS", "Attention", "AttentionBackend", "AttentionMetadata", "CacheSpec", "CascadeMetadata",
           "FP8_DTYPE", "LayerKVCache", "PAD_SLOT_ID", "backend_class", "forward_context", "resolve_attention_backend"]
