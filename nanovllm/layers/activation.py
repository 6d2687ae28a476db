"""SiluAndMul: the gated activation of a merged gate/up projection."""
import torch
import torch.nn.functional as F

from nanovllm.layers.compilable import CompilableOp


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)  # [num_tokens, 2 * d] -> 2 x [num_tokens, d]
    return F.silu(gate) * up


class SiluAndMul(CompilableOp):
    kernel = staticmethod(silu_and_mul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x)
