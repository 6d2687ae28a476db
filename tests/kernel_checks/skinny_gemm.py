"""The skinny linear (layers/skinny_gemm.py) against a float64 reference on the same operands: model-dtype
and FP8 block-scaled weights, every row count up to MAX_ROWS, an input width that is not a multiple of the
tile (masked K) and one that is, with and without a bias, an output width that leaves a partial tile. Its
prologues against the torch norm and activation followed by the same product: the residual sum exactly."""
import torch

from kernel_checks.interpreter_rounding import round_bf16_to_nearest_even
from nanovllm.layers.activation import silu_and_mul
from nanovllm.layers.layernorm import add_rms_norm, rms_norm
from nanovllm.layers.quantization.fp8 import dequantize_weight_blockwise, quantize_weight_blockwise
from nanovllm.layers.skinny_gemm import CONFIGS, MAX_ROWS, Prologue, skinny_linear

round_bf16_to_nearest_even()

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def check(device: str, n: int = 200, ks=(256, 320), rows=tuple(range(1, MAX_ROWS + 1)), dtypes=("bfloat16",),
          configs=(), prologue_rows=(1, 3)):
    """prologue_rows: the row counts the prologues are checked at, with the last of `ks` and of `configs` and the
    default config (empty: not at all)."""
    if prologue_rows:
        check_prologues(device, n, ks[-1:], prologue_rows, dtypes, configs[-1:])
    g = torch.Generator().manual_seed(n)
    for name in dtypes:
        dtype = DTYPES[name]
        for k in ks:
            w = torch.randn(n, k, generator=g).to(dtype)
            bias = torch.randn(n, generator=g).to(dtype)
            w_fp8, scale = quantize_weight_blockwise(w.float(), [128, 128])
            w_deq = dequantize_weight_blockwise(w_fp8, scale, [128, 128], torch.float64)
            for m in rows:
                x = torch.randn(m, k, generator=g).to(dtype)
                for b in (None, bias):
                    want = x.double() @ w.double().T + (0 if b is None else b.double())
                    for config in (None, *configs):
                        got = skinny_linear(x.to(device), w.to(device), None if b is None else b.to(device),
                                            config=config).cpu()
                        assert got.dtype == dtype and got.shape == (m, n)
                        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * k ** 0.5,
                                                   msg=f"skinny {name} m={m} k={k} bias={b is not None} {config}")
                    want8 = x.double() @ w_deq.T + (0 if b is None else b.double())
                    for config in (None, *(c for c in configs if 128 % c[0] == 0 and c[1] % 128 == 0)):
                        got8 = skinny_linear(x.to(device), w_fp8.to(device), None if b is None else b.to(device),
                                             weight_scale=scale.to(device), config=config).cpu()
                        torch.testing.assert_close(got8.double(), want8, rtol=tol, atol=tol * k ** 0.5,
                                                   msg=f"skinny fp8 {name} m={m} k={k} bias={b is not None} {config}")
    assert set(CONFIGS) == {1, 2, 4, 8}


def check_prologues(device: str, n: int, ks, rows, dtypes, configs):
    g = torch.Generator().manual_seed(n + 1)
    for name in dtypes:
        dtype = DTYPES[name]
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        for k in ks:
            w = torch.randn(n, k, generator=g).to(dtype)
            w_fp8, scale = quantize_weight_blockwise(w.float(), [128, 128])
            weights = [(w, None, w.double())]
            weights.append((w_fp8, scale, dequantize_weight_blockwise(w_fp8, scale, [128, 128], torch.float64)))
            norm_weight = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype)
            for m in rows:
                x, res = torch.randn(m, k, generator=g).to(dtype), torch.randn(m, k, generator=g).to(dtype)
                gate_up = torch.randn(m, 2 * k, generator=g).to(dtype)
                normed, h = add_rms_norm(x, res, norm_weight, 1e-6)
                cases = [  # (input, prologue, the input the product should see, the residual sum)
                    (x, Prologue(norm_weight.to(device), 1e-6), rms_norm(x, norm_weight, 1e-6), None),
                    (x, Prologue(norm_weight.to(device), 1e-6, res.to(device), torch.empty_like(x, device=device)),
                     normed, h),
                    (gate_up, Prologue(silu_mul=True), silu_and_mul(gate_up), None)]
                for weight, weight_scale, w_ref in weights:
                    fp8 = weight_scale is not None
                    for config in (None, *(c for c in configs if not fp8 or (128 % c[0] == 0 and c[1] % 128 == 0))):
                        for inp, prologue, want_in, want_sum in cases:
                            got = skinny_linear(inp.to(device), weight.to(device), None,
                                                None if weight_scale is None else weight_scale.to(device),
                                                config=config, prologue=prologue).cpu()
                            what = (f"skinny prologue {'fp8' if fp8 else name} m={m} k={k} {config} "
                                    f"norm={prologue.norm_weight is not None} residual={want_sum is not None} "
                                    f"silu_mul={prologue.silu_mul}")
                            assert got.dtype == dtype and got.shape == (m, n), what
                            torch.testing.assert_close(got.double(), want_in.double() @ w_ref.T, rtol=tol,
                                                       atol=tol * k ** 0.5, msg=what)
                            if want_sum is not None:
                                assert torch.equal(prologue.residual_out.cpu(), want_sum), what
