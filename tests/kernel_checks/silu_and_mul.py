"""The SiLU-and-mul Triton kernel against torch's `F.silu(gate) * up` (layers/activation.py), in
bfloat16 and float32, with a width that leaves a partial last block of columns."""
import torch

from kernel_checks.interpreter_rounding import round_bf16_to_nearest_even
from nanovllm.layers.activation import silu_and_mul, silu_and_mul_triton

round_bf16_to_nearest_even()

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def check(device: str, d: int, num_tokens: int = 3, dtypes=("bfloat16", "float32")):
    for name in dtypes:
        g = torch.Generator().manual_seed(d)
        x = (3 * torch.randn(num_tokens, 2 * d, generator=g)).to(DTYPES[name]).to(device)
        out = silu_and_mul_triton(x)
        assert out.shape == (num_tokens, d)
        torch.testing.assert_close(out, silu_and_mul(x), msg=f"silu_and_mul {name} d={d}")
