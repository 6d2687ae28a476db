"""RMSNorm, optionally fused with the residual add that precedes it.

Numerics follow transformers' RMSNorm: the residual add runs in the model dtype, the
normalisation in float32, and the weight multiplies the result cast back to the model dtype.
"""
import torch
from torch import nn

from nanovllm.layers.compilable import CompilableOp, compiled


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    x = x + residual
    return rms_norm(x, weight, eps), x


class RMSNorm(CompilableOp):
    kernel = staticmethod(rms_norm)

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.add_impl = add_rms_norm

    def use_compiled(self):
        super().use_compiled()
        self.add_impl = compiled(add_rms_norm)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is None:
            return self.impl(x, self.weight, self.eps)
        return self.add_impl(x, residual, self.weight, self.eps)
