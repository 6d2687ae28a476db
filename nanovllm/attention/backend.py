"""The attention backend interface, and the choice of a backend for an engine.

A backend computes attention for one layer over the paged KV cache, after the layer has stored
this step's K/V there (`kv_store`). Backends hold no per-step state: everything a step needs
comes in `AttentionMetadata`. `select_attention_backend` resolves the user's `attention_backend`
option once, at construction; a backend that cannot serve the engine's settings is refused there
with the reason, never mid-run.
"""
import torch

from nanovllm.attention.metadata import AttentionMetadata


class AttentionBackend:
    name: str

    @classmethod
    def unsupported(cls, device_type: str, block_size: int) -> str | None:
        """Why this backend cannot serve these settings; None when it can."""
        return None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] (this
        step's, already in the cache); caches [num_blocks, block_size, num_kv_heads, head_dim].
        Returns [num_tokens, num_heads, head_dim]."""
        raise NotImplementedError


def backend_classes() -> dict[str, type[AttentionBackend]]:
    from nanovllm.attention.flash_attn_backend import FlashAttnBackend
    from nanovllm.attention.torch_backend import TorchBackend
    return {cls.name: cls for cls in (FlashAttnBackend, TorchBackend)}


ATTENTION_BACKENDS = ("auto", "flash_attn", "torch")


def select_attention_backend(name: str, device_type: str, block_size: int) -> AttentionBackend:
    """The backend `name` ("auto": flash-attn where it can serve, else torch) for an engine on
    `device_type` with KV blocks of `block_size` tokens. ValueError when it cannot serve them."""
    classes = backend_classes()
    if name == "auto":
        candidates = ["flash_attn", "torch"] if device_type == "cuda" else ["torch"]
        name = next(n for n in candidates if classes[n].unsupported(device_type, block_size) is None)
    if name not in classes:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}.")
    reason = classes[name].unsupported(device_type, block_size)
    if reason is not None:
        raise ValueError(f"attention_backend={name!r} cannot serve this engine: {reason}.")
    return classes[name]()
