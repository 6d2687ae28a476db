"""Kernels of the FP8 linear: activation quantization and the block-scaled GEMM, in Triton, and
cuBLAS's block-scaled GEMM where torch and the GPU have it.

- `per_token_group_quant_fp8`: each token's activations, in groups of GROUP_SIZE (128) columns,
  become float8_e4m3fn values and one float32 scale per group (scale = amax / 448).
- `fp8_block_matmul`: C = A @ W.T with A and W in FP8, accumulating in float32; each K block of
  128 columns is rescaled by a_scale[m, k-block] * w_scale[n-block, k-block] (w_scale is the
  checkpoint's `weight_scale_inv`, one per 128x128 block of W).
Both run without host syncs and with output sizes known from the inputs' shapes, so they can be
captured in CUDA graphs. Tiles come from `gemm_config`, a small heuristic on M: batch-1 decode is
bound by reading the weights, so small M gets small tiles and split-K to fill every SM.
- `cublas_block_matmul`: the same product in cuBLAS (torch._scaled_mm with 1x128 / 128x128 block
  scales, sm_90, CUDA >= 12.9), taken by `use_cublas` at larger batches.
"""
import functools
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanovllm.utils.triton_utils import num_sms

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
GROUP_SIZE = 128  # activation group = weight block along K: one scale pair per K block
AMAX_FLOOR = 1e-10  # an all-zero group gets a tiny scale instead of a division by zero
QUANT_GROUPS_PER_PROGRAM = 8  # 1,024 columns: 16-byte loads for every thread of 4 warps


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_sm, stride_sg, num_groups,
                      GROUP: tl.constexpr, GROUPS: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr):
    # one row's GROUPS groups of GROUP columns per program, as a [GROUPS, GROUP] tile
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    real_cols = tl.where(row < M, K, 0)  # padding rows (row >= M) read as zeros
    x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < real_cols, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), FLOOR) / QMAX  # [GROUPS]
    q = tl.clamp(x / scale[:, None], -QMAX, QMAX)
    tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)
    tl.store(s_ptr + row * stride_sm + groups * stride_sg, scale, mask=groups < num_groups)


def per_token_group_quant_fp8(x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                              row_multiple: int = 1, column_major_scales: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (rows may be strided) -> (q float8_e4m3fn [M', K], scale float32 [M', ceil(K / 128)]),
    x ~= q * scale of its group, M' = M rounded up to `row_multiple` (padding rows are zeros, with
    the floor's scale). `column_major_scales`: scale is a [M', groups] view of [groups, M'] storage,
    the layout cuBLAS's block-scaled GEMM reads. `out`: contiguous (q, scale) to write into; None
    allocates them."""
    assert x.dim() == 2 and x.stride(1) == 1
    M, K = x.shape
    rows = -(-M // row_multiple) * row_multiple
    num_groups = triton.cdiv(K, GROUP_SIZE)
    if out is None:
        q = torch.empty(rows, K, dtype=FP8_DTYPE, device=x.device)
        scale = (torch.empty(num_groups, rows, dtype=torch.float32, device=x.device).t() if column_major_scales
                 else torch.empty(rows, num_groups, dtype=torch.float32, device=x.device))
        out = q, scale
    q, scale = out
    assert q.shape == (rows, K) and scale.shape == (rows, num_groups) and q.is_contiguous()
    if rows:
        groups = min(QUANT_GROUPS_PER_PROGRAM, triton.next_power_of_2(num_groups))
        _act_quant_kernel[(rows, triton.cdiv(num_groups, groups))](
            x, q, scale, M, K, x.stride(0), scale.stride(0), scale.stride(1), num_groups,
            GROUP=GROUP_SIZE, GROUPS=groups, QMAX=FP8_MAX, FLOOR=AMAX_FLOOR)
    return q, scale


@dataclass(frozen=True)
class Fp8GemmConfig:
    block_m: int
    block_n: int
    split_k: int  # K blocks are shared out among this many programs per output tile, summed after
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # output tiles are visited GROUP_M rows of tiles at a time (L2 reuse of W)


def gemm_config(M: int, N: int, K: int, sm_count: int) -> Fp8GemmConfig:
    """Tiles for an [M, K] x [K, N] product. Up to 64 rows the product is weight-bandwidth bound:
    small tiles (tl.dot needs 16 rows at least) and, when the output tiles cannot fill the SMs
    twice, split-K. Past that, large tiles and no split (the partial sums would cost traffic)."""
    if M <= 64:
        block_m = 16 if M <= 16 else 32 if M <= 32 else 64
        config = dict(block_m=block_m, block_n=64, num_warps=4, num_stages=4)
    elif M <= 256:
        config = dict(block_m=64, block_n=128, num_warps=4, num_stages=3)
    else:
        config = dict(block_m=128, block_n=128, num_warps=8, num_stages=3)
    split_k = 1
    tiles = triton.cdiv(M, config["block_m"]) * triton.cdiv(N, config["block_n"])
    if M <= 64 and tiles < 2 * sm_count:
        k_blocks = triton.cdiv(K, GROUP_SIZE)
        per_split = triton.cdiv(k_blocks, min(k_blocks, triton.cdiv(2 * sm_count, tiles)))
        split_k = triton.cdiv(k_blocks, per_split)
    return Fp8GemmConfig(split_k=split_k, **config)


@triton.jit
def load_k_block(a_rows, b_cols, k, K, m_mask, n_mask, EVEN_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] tile of A's rows `a_rows` ([BLOCK_M, 1] pointers) and the [BLOCK_K, BLOCK_N] tile of
    W^T's columns `b_cols` ([1, BLOCK_N] pointers to W's K-major rows) at columns `k`; zeros past M, N and K."""
    if EVEN_K:
        a = tl.load(a_rows + k[None, :], mask=m_mask[:, None], other=0.0)
        b = tl.load(b_cols + k[:, None], mask=n_mask[None, :], other=0.0)
    else:
        k_mask = k < K
        a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
    return a, b


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, num_k_blocks, k_blocks_per_split,
                     stride_am, stride_bn, stride_bsn, stride_cs, stride_cm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SCALE_BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    pid, split = tl.program_id(0), tl.program_id(1)
    # grouped order: GROUP_M rows of output tiles share the W tiles they read while in L2
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am  # [BLOCK_M, 1]
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn  # [1, BLOCK_N]: W is [N, K], K-major
    as_rows = as_ptr + offs_m * num_k_blocks  # [BLOCK_M]
    bs_cols = bs_ptr + (offs_n // SCALE_BLOCK_N) * stride_bsn  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kb_start = split * k_blocks_per_split
    kb_end = tl.minimum(kb_start + k_blocks_per_split, num_k_blocks)
    for kb in range(kb_start, kb_end):
        a, b = load_k_block(a_rows, b_cols, kb * BLOCK_K + offs_k, K, m_mask, n_mask, EVEN_K)
        a_scale = tl.load(as_rows + kb, mask=m_mask, other=0.0)
        b_scale = tl.load(bs_cols + kb, mask=n_mask, other=0.0)
        acc += tl.dot(a, b) * a_scale[:, None] * b_scale[None, :]  # [BLOCK_M, BLOCK_N]

    c = c_ptr + split * stride_cs + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fp8_block_matmul(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                     out_dtype: torch.dtype, config: Fp8GemmConfig | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] fp8, a_scale [M, ceil(K/128)], w [N, K] fp8, w_scale [ceil(N/128), ceil(K/128)]
    -> [M, N] in out_dtype. `config`: tiles; None picks them with `gemm_config`. `out`: a
    contiguous [M, N] tensor of out_dtype to write into; None allocates it."""
    M, K = a.shape
    N = w.shape[0]
    k_blocks = triton.cdiv(K, GROUP_SIZE)
    assert w.shape[1] == K and a.stride(1) == 1 and w.stride(1) == 1
    assert a_scale.shape == (M, k_blocks) and a_scale.is_contiguous()
    assert w_scale.shape == (triton.cdiv(N, GROUP_SIZE), k_blocks) and w_scale.stride(1) == 1
    config = config or gemm_config(M, N, K, num_sms(a.device))
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    assert out.shape == (M, N) and out.dtype == out_dtype and out.is_contiguous()
    if M == 0:
        return out
    per_split = triton.cdiv(k_blocks, config.split_k)
    # [split_k, M, N] float32 partial sums, or the output itself
    c = out if config.split_k == 1 else torch.empty(config.split_k, M, N, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n), config.split_k)
    _fp8_gemm_kernel[grid](a, a_scale, w, w_scale, c, M, N, K, k_blocks, per_split,
                           a.stride(0), w.stride(0), w_scale.stride(0), c.stride(0) if config.split_k > 1 else 0,
                           c.stride(-2), BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=GROUP_SIZE,
                           SCALE_BLOCK_N=GROUP_SIZE, GROUP_M=config.group_m, EVEN_K=K % GROUP_SIZE == 0,
                           num_warps=config.num_warps, num_stages=config.num_stages)
    if config.split_k > 1:
        torch.sum(c, 0, out=out)
    return out


# ---- cuBLAS ----------------------------------------------------------------------------------------
# From CUDA 12.9 cuBLAS multiplies FP8 matrices with per-(1 x 128) activation scales and per-(128 x 128)
# weight scales on sm_90, which torch exposes through torch._scaled_mm. At larger row counts it is
# faster than the Triton GEMM above; `use_cublas` decides per call.
CUBLAS_MIN_ROWS = 65  # fewer rows: the Triton GEMM's small tiles and split-K win (scripts/bench_fp8_gemm.py)


def use_cublas(M: int, N: int, K: int, device: torch.device) -> bool:
    """Whether `cublas_block_matmul` takes this product: enough rows, whole 128-blocks along N, and
    K blocks in multiples of 4 (cuBLAS's layout for the weight scales, which are then used as stored)."""
    return M >= CUBLAS_MIN_ROWS and N % GROUP_SIZE == 0 and K % (4 * GROUP_SIZE) == 0 and cublas_supported(device)


@functools.lru_cache(maxsize=None)
def cublas_supported(device: torch.device) -> bool:
    """Whether this GPU and torch build run the block-scaled FP8 product (sm_90 with CUDA >= 12.9):
    tried once on a small product and checked against the Triton GEMM; a warning says why not on sm_90."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    # explicit dtypes: the model loader sets the default dtype to the model's
    a = torch.randn(8, 512, device=device, dtype=torch.float32)
    w = (torch.randn(256, 512, device=device, dtype=torch.float32) * 64).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    w_scale = torch.rand(2, 4, device=device, dtype=torch.float32) + 0.5
    want = fp8_block_matmul(*per_token_group_quant_fp8(a), w, w_scale, torch.float32)
    try:
        got = cublas_block_matmul(a, w, w_scale, torch.float32)
    except (RuntimeError, NotImplementedError, TypeError) as error:
        logger.warning("FP8 linears use the Triton GEMM only: cuBLAS's block-scaled FP8 GEMM failed (%s)", error)
        return False
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item()):
        logger.warning("FP8 linears use the Triton GEMM only: cuBLAS's block-scaled FP8 GEMM disagreed with it")
        return False
    return True


def cublas_block_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
                        ) -> torch.Tensor:
    """x [M, K] (model dtype) quantized per token and 128 columns, times w [N, K] FP8 with w_scale
    [N / 128, K / 128] (K / 128 a multiple of 4) -> [M, N] in out_dtype, in cuBLAS. Rows are padded
    to a multiple of 4 for cuBLAS; the result is a view of the first M."""
    M = x.shape[0]
    q, scale = per_token_group_quant_fp8(x, row_multiple=4, column_major_scales=True)
    # w.t() is column-major [K, N]; w_scale.t() is [K / 128, N / 128] with strides (1, K / 128)
    y = torch._scaled_mm(q, w.t(), scale_a=scale, scale_b=w_scale.t(), out_dtype=out_dtype)
    return y[:M]
