"""FP8 kernels against torch: the per-token-group activation quantization, the block-scaled GEMM
(float64 reference on the same FP8 operands, for the heuristic's tiles and for `configs`), and
the whole FP8 linear against F.linear on the dequantized weight. Outputs are poisoned first.

Activations are made exactly representable (FP8 values times a power of two per group, each
group holding a +-448), so that their quantization is exact and checked for equality. Triton's
interpreter rounds float -> FP8 wrongly where rounding up crosses a power of two (it drops the
carry), so random activations, checked to half an FP8 step, run on the GPU only.
"""
import os

import torch
import torch.nn.functional as F

from nanovllm.layers.quantization.fp8 import apply, dequantize_weight_blockwise
from nanovllm.layers.quantization.fp8_few_rows import MAX_ROWS, _tile_counts, fp8_few_rows_matmul
from nanovllm.layers.quantization.fp8_kernels import (FP8_DTYPE, FP8_MAX, GROUP_SIZE, Fp8GemmConfig,
                                                      cublas_block_matmul, cublas_supported, fp8_block_matmul,
                                                      per_token_group_quant_fp8)

FP8_HALF_ULP = 2.0 ** -4  # e4m3: 3 mantissa bits, round to nearest
FP8_MIN_SUBNORMAL = 2.0 ** -9


def _expand(scale: torch.Tensor, rows: int, cols: int, row_block: int) -> torch.Tensor:
    return scale.repeat_interleave(row_block, 0).repeat_interleave(GROUP_SIZE, 1)[:rows, :cols].double()


def representable_activations(M: int, K: int, device) -> torch.Tensor:
    """[M, K] float32: FP8 values times 2^-e per 128-column group, each group holding a +-448."""
    groups = -(-K // GROUP_SIZE)
    q = (torch.randn(M, K, device=device) * 64).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
    q[:, ::GROUP_SIZE] = FP8_MAX * torch.sign(torch.randn(M, groups, device=device))
    exponents = torch.randint(4, 12, (M, groups), device=device).float()
    return q * _expand(2.0 ** -exponents, M, K, 1).float()


def check_act_quant(x: torch.Tensor, exact: bool):
    M, K = x.shape
    groups = -(-K // GROUP_SIZE)
    q = torch.full((M, K), float("nan"), device=x.device).to(FP8_DTYPE)
    scale = torch.full((M, groups), float("nan"), device=x.device)
    per_token_group_quant_fp8(x, out=(q, scale))
    padded = F.pad(x.double(), (0, groups * GROUP_SIZE - K)).view(M, groups, GROUP_SIZE)
    ref_scale = padded.abs().amax(-1).clamp(min=1e-10) / FP8_MAX  # [M, groups]
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6, atol=0)
    unrounded = (x.double() / _expand(ref_scale, M, K, 1)).clamp(-FP8_MAX, FP8_MAX)
    assert not torch.isnan(q.double()).any()
    if exact:
        assert torch.equal(q.double(), unrounded), (q.double() - unrounded).abs().max()
    else:
        error = (q.double() - unrounded).abs()
        assert (error <= 1.01 * FP8_HALF_ULP * unrounded.abs() + FP8_MIN_SUBNORMAL).all(), error.max()


def check_padded_column_major(x: torch.Tensor):
    """Rows padded to a multiple of 4 and scales stored column-major (cuBLAS's operands): the same
    values as the plain layout, zeros in the padding rows."""
    M, K = x.shape
    q, scale = per_token_group_quant_fp8(x)
    q4, scale4 = per_token_group_quant_fp8(x, row_multiple=4, column_major_scales=True)
    rows = -(-M // 4) * 4
    assert q4.shape == (rows, K) and scale4.shape == (rows, scale.shape[1]) and scale4.stride() == (1, rows)
    assert torch.equal(q4[:M].view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale4[:M], scale)
    assert (q4[M:].float() == 0).all() and (scale4[M:] > 0).all() and torch.isfinite(scale4).all()


def check_cublas(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor):
    """cuBLAS's block-scaled product against float64 on the same FP8 operands."""
    M, K = x.shape
    N = w.shape[0]
    a, a_scale = per_token_group_quant_fp8(x)
    ref = (a.double() * _expand(a_scale, M, K, 1)) @ (w.double() * _expand(w_scale, N, K, GROUP_SIZE)).T
    for out_dtype, rtol in ((torch.float32, 1e-3), (torch.bfloat16, 1e-2)):
        out = cublas_block_matmul(x, w, w_scale, out_dtype)
        assert out.shape == (M, N) and out.dtype == out_dtype
        torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item())


def random_fp8_weight(N: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 [N, K], scale [ceil(N/128), ceil(K/128)]): values spread over the FP8 range."""
    w = (torch.randn(N, K, device=device) * 64).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    scale = torch.rand(-(-N // GROUP_SIZE), -(-K // GROUP_SIZE), device=device) * 1e-3 + 1e-4
    return w, scale


def check_gemm(a, a_scale, w, w_scale, config: Fp8GemmConfig | None, out_dtype: torch.dtype):
    M, K = a.shape
    N = w.shape[0]
    ref = (a.double() * _expand(a_scale, M, K, 1)) @ (w.double() * _expand(w_scale, N, K, GROUP_SIZE)).T
    out = torch.full((M, N), float("nan"), dtype=out_dtype, device=a.device)
    fp8_block_matmul(a, a_scale, w, w_scale, out_dtype, config=config, out=out)
    assert not torch.isnan(out).any(), f"unwritten outputs with {config}"
    # float32 sums of exact products (the GPU's FP8 MMA accumulates a little more coarsely)
    tol = dict(rtol=1e-3, atol=1e-3 * ref.abs().max().item()) if out_dtype == torch.float32 else \
        dict(rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    torch.testing.assert_close(out.double(), ref, **tol, msg=lambda m: f"{config}, {out_dtype}: {m}")


def check_few_rows(x, w, w_scale, config: tuple[int, int] | None):
    """The one-kernel few-rows product on `x` (quantized inside it) against float64 on the FP8 operands of
    `per_token_group_quant_fp8(x)`, twice (the second call reuses the split counts the first left at zero)."""
    M, K = x.shape
    N = w.shape[0]
    a, a_scale = per_token_group_quant_fp8(x)
    ref = (a.double() * _expand(a_scale, M, K, 1)) @ (w.double() * _expand(w_scale, N, K, GROUP_SIZE)).T
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 1e-2)):
        for _ in range(2):
            out = fp8_few_rows_matmul(x.to(dtype), w, w_scale, config)
            assert out.shape == (M, N) and out.dtype == dtype
            torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item(),
                                       msg=lambda m: f"few rows, {config}, {dtype}: {m}")
            assert not _tile_counts(x.device).any(), "split counts left behind"


def check(device: str, M: int, N: int, K: int, configs: list[list[int]] = (), few_rows_configs=()):
    """`configs`: [block_m, block_n, split_k] tiles checked besides the heuristic's own; `few_rows_configs`:
    [block_n, split_k] of the few-rows kernel (M <= its MAX_ROWS) besides its heuristic's."""
    torch.manual_seed(0)
    x = torch.empty(M, K + 8, device=device)[:, :K]  # strided rows, as a view of a wider buffer
    x.copy_(representable_activations(M, K, device))
    if M > 1:
        x[1] = 0.0  # an all-zero token: tiny scale, zero values
    for dtype in (torch.float32, torch.bfloat16):
        check_act_quant(x.to(dtype), exact=True)
        if os.environ.get("TRITON_INTERPRET") != "1":
            check_act_quant(torch.randn(M, K, device=device, dtype=dtype) * 3, exact=False)
    check_padded_column_major(x)
    a, a_scale = per_token_group_quant_fp8(x)
    w, w_scale = random_fp8_weight(N, K, device)
    if N % GROUP_SIZE == 0 and K % (4 * GROUP_SIZE) == 0 and cublas_supported(torch.device(device)):
        check_cublas(x, w, w_scale)
    for config in [None, *(Fp8GemmConfig(block_m=bm, block_n=bn, split_k=sk) for bm, bn, sk in configs)]:
        check_gemm(a, a_scale, w, w_scale, config, torch.float32)
    check_gemm(a, a_scale, w, w_scale, None, torch.bfloat16)
    if M <= MAX_ROWS:
        for config in [None, *map(tuple, few_rows_configs)]:
            check_few_rows(x, w, w_scale, config)

    # the FP8 linear, on activations it quantizes exactly: bfloat16 rounding of the output only
    bias = torch.randn(N, device=device).to(torch.bfloat16)
    y = apply(x.to(torch.bfloat16).view(1, M, K), w, w_scale, bias)
    dequantized = dequantize_weight_blockwise(w, w_scale, (GROUP_SIZE, GROUP_SIZE), torch.float32)
    ref = F.linear(x.float(), dequantized, bias.float())
    assert y.dtype == torch.bfloat16 and y.shape == (1, M, N)
    torch.testing.assert_close(y[0].float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())

