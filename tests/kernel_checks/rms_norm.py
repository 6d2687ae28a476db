"""The fused residual-add + RMSNorm Triton kernel against the torch layers it replaces
(layers/layernorm: add_rms_norm, rms_norm): the residual sum bit-exact (both round x + residual to
the model dtype once), the normalised output within one rounding of the model dtype (the sums run
in a different order). Rows are strided views, as the model's hidden states can be."""
import torch

from kernel_checks.interpreter_rounding import round_bf16_to_nearest_even
from nanovllm.layers.layernorm import add_rms_norm, rms_norm, rms_norm_triton

round_bf16_to_nearest_even()

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def check(device: str, hidden: int, num_tokens: int = 5, dtypes=("bfloat16", "float32")):
    for name in dtypes:
        dtype = DTYPES[name]
        g = torch.Generator().manual_seed(hidden)
        wide = torch.randn(num_tokens, hidden + 8, generator=g).to(dtype).to(device)
        x = wide[:, 3:3 + hidden]  # strided rows
        residual = (4 * torch.randn(num_tokens, hidden, generator=g)).to(dtype).to(device)
        weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(device)
        eps = 1e-6
        out, none = rms_norm_triton(x, weight, eps)
        assert none is None
        torch.testing.assert_close(out, rms_norm(x, weight, eps), msg=f"rms_norm {name} hidden={hidden}")
        before = (x.clone(), residual.clone())
        out, residual_out = rms_norm_triton(x, weight, eps, residual)
        ref_out, ref_residual = add_rms_norm(x, residual, weight, eps)
        assert torch.equal(residual_out, ref_residual), f"x + residual differs ({name}, hidden={hidden})"
        torch.testing.assert_close(out, ref_out, msg=f"add_rms_norm {name} hidden={hidden}")
        assert torch.equal(x, before[0]) and torch.equal(residual, before[1]), "an input was written"
