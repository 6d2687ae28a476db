"""SiluAndMul: the gated activation of a merged gate/up projection, silu(gate) * up; one Triton
kernel on CUDA, torch elsewhere.

Numerics follow torch's `F.silu(gate) * up` in the model dtype: silu in float32, rounded to the
model dtype, then the product in float32, rounded again (the Triton kernel rounds at the same
points). The output is a new tensor.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.skinny_gemm import Prologue
from nanovllm.utils.triton_utils import tl, triton, use_pdl

SILU_BLOCK = 1024  # columns of the output per Triton program


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)  # [num_tokens, 2 * d] -> 2 x [num_tokens, d]
    return F.silu(gate) * up


if triton is not None:
    @triton.jit
    def _silu_and_mul_kernel(x_ptr, x_stride, out_ptr, d, BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # (nanovllm/utils/triton_utils.py) x is the kernel before's output
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * d + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] (rows may be strided, last dim contiguous) -> [num_tokens, d]."""
    num_tokens, width = x.shape
    assert x.stride(-1) == 1 and width % 2 == 0
    d = width // 2
    out = torch.empty((num_tokens, d), dtype=x.dtype, device=x.device)
    if num_tokens:
        pdl = use_pdl(x.device)
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(d, SILU_BLOCK))](x, x.stride(0), out, d, SILU_BLOCK, pdl,
                                                                      num_warps=4, launch_pdl=pdl)
    return out


class SiluAndMul(nn.Module):

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and triton is not None and x.dim() == 2:
            return silu_and_mul_triton(x)
        return silu_and_mul(x)


class PendingSiluMul:
    """`silu_and_mul(gate_up)`, left to the layer that reads it (see layernorm.PendingNorm): computed in the
    prologue of a one-row linear kernel, or by `value()`."""

    def __init__(self, act: SiluAndMul, gate_up: torch.Tensor):
        self.act, self.gate_up = act, gate_up
        self.rows = gate_up[..., :gate_up.shape[-1] // 2]  # shaped like the value: what a reader decides on

    def value(self) -> torch.Tensor:
        return self.act(self.gate_up)

    def prologue(self) -> tuple[torch.Tensor, Prologue]:
        return self.gate_up, Prologue(silu_mul=True)
