"""RMSNorm, optionally fused with the residual add that precedes it: one Triton kernel per call on
CUDA, torch elsewhere.

Numerics follow transformers' RMSNorm on both paths: the residual add runs in the model dtype, the
normalisation in float32, and the weight multiplies the result cast back to the model dtype (the
Triton kernel rounds at the same points, so it differs from torch only in the order of the sum).
Outputs are new tensors; the inputs are never written.
"""
import torch
from torch import nn

from nanovllm.layers.skinny_gemm import Prologue
from nanovllm.utils.triton_utils import tl, triton, use_pdl


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    x = x + residual
    return rms_norm(x, weight, eps), x


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, x_stride, residual_ptr, residual_stride, out_ptr, residual_out_ptr, weight_ptr,
                         eps, N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # (nanovllm/utils/triton_utils.py) x is the kernel before's output
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:  # h = x + residual, rounded to the model dtype as torch's add does
            residual = tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(residual_out_ptr + row * N + cols, x, mask=mask)
        xf = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
        normed = (xf * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, residual: [num_tokens, hidden] (rows may be strided, last dim contiguous) -> (norm(h),
    h) with h = x + residual, or (norm(x), None) without `residual`. One kernel launch."""
    num_tokens, hidden = x.shape
    assert x.stride(-1) == 1 and weight.shape == (hidden,) and weight.dtype == x.dtype
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    residual_out = None
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
        residual_out = torch.empty_like(out)
    if num_tokens == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden)
    # the residual pointers are unused without a residual: pass x's in their place
    res_in, res_out = (residual, residual_out) if residual is not None else (x, out)
    pdl = use_pdl(x.device)
    _rms_norm_kernel[(num_tokens,)](x, x.stride(0), res_in, res_in.stride(0), out, res_out, weight, eps, hidden,
                                    block, residual is not None, pdl, num_warps=min(max(block // 256, 1), 8),
                                    launch_pdl=pdl)
    return out, residual_out


class RMSNorm(nn.Module):

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual). x: [num_tokens,
        hidden_size] (Triton on CUDA) or any [..., hidden_size] (torch)."""
        if x.is_cuda and triton is not None and x.dim() == 2:
            out, residual_out = rms_norm_triton(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual_out)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


class PendingNorm:
    """`norm(x, residual)`, left to the layer that reads it: a linear running its one-row kernel computes
    the norm in that kernel's prologue (layers/skinny_gemm.py: a launch less per norm), anything else calls
    `value()`. Afterwards `residual` is x + residual (x without one), the stream the decoder carries on."""

    def __init__(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None):
        self.norm, self.x, self.residual_in = norm, x, residual
        self.residual = None
        self.rows = x  # shaped like the value: what a reader decides on

    def value(self) -> torch.Tensor:
        if self.residual_in is None:
            out, self.residual = self.norm(self.x), self.x
        else:
            out, self.residual = self.norm(self.x, self.residual_in)
        return out

    def prologue(self) -> tuple[torch.Tensor, Prologue]:
        """The kernel's input and its prologue (which writes `residual`)."""
        if self.residual_in is None:
            self.residual = self.x
            return self.x, Prologue(self.norm.weight, self.norm.eps)
        self.residual = torch.empty_like(self.x)
        return self.x, Prologue(self.norm.weight, self.norm.eps, self.residual_in, self.residual)
