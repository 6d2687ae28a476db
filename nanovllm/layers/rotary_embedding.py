"""Rotary position embedding (NeoX style: the two halves of each head rotate together).

cos/sin are precomputed in float32 for every position up to `max_position`; rotation runs in
float32 and is cast back.
"""
import torch
from torch import nn

from nanovllm.layers.compilable import CompilableOp


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, 1, head_dim // 2]
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


def rotate_qk(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor):
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, -1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def rope_inv_freq(head_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies of each rotated pair; `rope_scaling` as a transformers config gives it."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    raise ValueError(f"rope_scaling of type {rope_type!r} is not supported (config rope_scaling={rope_scaling}).")


class RotaryEmbedding(CompilableOp):
    kernel = staticmethod(rotate_qk)

    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict | None = None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, base, rope_scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        # [max_position, head_dim]: cos of each pair, then sin of each pair
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), -1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self.impl(positions, q, k, self.cos_sin_cache)
