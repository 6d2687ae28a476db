"""The skinny linear (layers/skinny_gemm.py) against a float64 reference on the same operands: model-dtype
and FP8 block-scaled weights, every row count up to MAX_ROWS, an input width that is not a multiple of the
tile (masked K) and one that is, with and without a bias, an output width that leaves a partial tile."""
import torch

from nanovllm.layers.quantization.fp8 import dequantize_weight_blockwise, quantize_weight_blockwise
from nanovllm.layers.skinny_gemm import CONFIGS, MAX_ROWS, skinny_linear

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def check(device: str, n: int = 200, ks=(256, 320), rows=tuple(range(1, MAX_ROWS + 1)), dtypes=("bfloat16",),
          configs=()):
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
