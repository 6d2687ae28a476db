"""Rotary position embedding (NeoX style: the two halves of each head rotate together).

cos/sin are precomputed in float32 for every position up to `max_position`; rotation runs in
float32 and is cast back. The inverse frequencies are rescaled as the config's rope scaling says
(type "llama3"); other scaling types are refused. On CUDA the decoder rotates through the fused
QK-norm/RoPE kernel (qk_norm_rope.py), which reads the same `cos_sin_cache`.
"""
import math

import torch
from torch import nn


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, 1, head_dim // 2]
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


def rotate_qk(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor):
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, -1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: wavelengths shorter than
    original_max_position_embeddings / high_freq_factor are kept, those longer than
    original_max_position_embeddings / low_freq_factor are stretched by `factor`, and the band
    between is interpolated linearly in 1 / wavelength (as transformers' `_compute_llama3_parameters`)."""
    missing = [key for key in LLAMA3_SCALING_KEYS if key not in rope_scaling]
    if missing:
        raise ValueError(f"rope_scaling of type 'llama3' lacks {missing} (config rope_scaling={rope_scaling}).")
    factor, low_freq_factor, high_freq_factor, old_context_len = (rope_scaling[k] for k in LLAMA3_SCALING_KEYS)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(head_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies of each rotated pair; `rope_scaling` as a transformers config gives it
    (None or type "default": unscaled). Other types than "default" and "llama3" raise ValueError."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "llama3":
        return llama3_scaled_inv_freq(inv_freq, rope_scaling)
    raise ValueError(f"rope_scaling of type {rope_type!r} is not supported (config rope_scaling={rope_scaling}).")


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table of every position (moved with the model); the rotation itself is
    applied in layers/qk_norm_rope.py (`rotate_qk` on the torch path)."""

    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict | None = None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, base, rope_scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        # [max_position, head_dim]: cos of each pair, then sin of each pair
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), -1), persistent=False)
