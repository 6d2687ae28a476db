"""The attention backend interface, and the choice of a backend for an engine.

A backend computes attention for one layer over the paged KV cache, after the layer has stored
this step's K/V there (`kv_store`). Backends hold no per-step state: everything a step needs comes
in `AttentionMetadata`. `resolve_attention_backend` turns the user's `attention_backend`,
`block_size` and `kv_cache_dtype` into a backend and a block size once, at construction: a backend
that cannot serve the engine's settings is refused there with the reason, never mid-run.
"""
from dataclasses import dataclass

import torch

from nanovllm.attention.kv_store import LayerKVCache
from nanovllm.attention.metadata import AttentionMetadata

ATTENTION_BACKENDS = ("auto", "flash_attn", "triton", "torch")


@dataclass(frozen=True)
class CacheSpec:
    """What the engine asks of its attention backend."""
    device_type: str        # "cuda" or "cpu"
    block_size: int | None  # tokens per KV block; None: the backend's default
    fp8_cache: bool         # kv_cache_dtype is FP8 (e4m3)
    head_dim: int
    cuda_graphs: bool       # decode steps are captured as CUDA graphs


class AttentionBackend:
    name: str
    default_block_size: int
    supports_cascade = False  # forward reads AttentionMetadata.cascade (shared-prefix decode)

    @classmethod
    def unsupported(cls, spec: CacheSpec) -> str | None:
        """Why this backend cannot serve `spec`; None when it can."""
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache | None,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] (this
        step's, already stored in `cache`; None before the cache exists, in the warm-up forward).
        Returns [num_tokens, num_heads, head_dim]."""
        raise NotImplementedError


def _backend_classes() -> dict[str, type[AttentionBackend]]:
    from nanovllm.attention.flash_attn_backend import FlashAttnBackend
    from nanovllm.attention.torch_backend import TorchBackend
    from nanovllm.attention.triton_backend import TritonBackend
    return {cls.name: cls for cls in (FlashAttnBackend, TritonBackend, TorchBackend)}


def backend_class(name: str) -> type[AttentionBackend]:
    """The class of a backend resolved before (`resolve_attention_backend`), by its name."""
    return _backend_classes()[name]


def resolve_attention_backend(name: str, spec: CacheSpec) -> tuple[type[AttentionBackend], int]:
    """(backend class, block size) for `name` ("auto": Triton on CUDA, flash-attn where Triton
    cannot serve; torch on the CPU). ValueError naming the value when `name` is unknown or the backend
    cannot serve `spec`."""
    classes = _backend_classes()
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}.")
    if name == "auto":
        candidates = ("triton", "flash_attn") if spec.device_type == "cuda" else ("torch",)
        name = next((n for n in candidates if classes[n].unsupported(spec) is None), candidates[-1])
    cls = classes[name]
    reason = cls.unsupported(spec)
    if reason is not None:
        raise ValueError(f"attention_backend={name!r} cannot serve this engine: {reason}.")
    return cls, spec.block_size or cls.default_block_size
