"""Attention over the paged KV cache: the layer, its per-step metadata, and the backends."""
from nanovllm.attention.backend import AttentionBackend, select_attention_backend
from nanovllm.attention.kv_store import PAD_SLOT_ID
from nanovllm.attention.layer import Attention
from nanovllm.attention.metadata import AttentionMetadata, forward_context

__all__ = ["Attention", "AttentionBackend", "AttentionMetadata", "PAD_SLOT_ID", "forward_context",
           "select_attention_backend"]
