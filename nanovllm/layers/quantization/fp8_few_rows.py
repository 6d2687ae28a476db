"""The FP8 linear at a few rows (decode at small batches) in one kernel: the activations' quantization,
the block-scaled product on tensor cores and the sum of the K splits.

At one to sixteen rows an FP8 linear is bound by reading its weights, and the general path
(fp8_kernels.py) spends three kernels on it: the activation quantization, the GEMM (split along K to
fill the SMs) and the sum of the splits. Here each program quantizes the 128-column groups of the rows
it multiplies itself (the arithmetic of `per_token_group_quant_fp8`, on a few rows read from L2), and
multiplies them with its BLOCK_N x 128 weight tiles on tensor cores (the rows padded to 16, the
smallest tl.dot). When the K blocks are split among programs, each writes its partial sums, and the
last program of an output tile to finish (an atomic count per tile) adds them up, stores the output
and sets the count back to zero for the next call.

Outputs equal the general path's up to the order of the float32 sums.
"""
import functools

import torch
import triton
import triton.language as tl

from nanovllm.layers.quantization.fp8_kernels import AMAX_FLOOR, FP8_MAX, GROUP_SIZE, load_k_block
from nanovllm.utils.triton_utils import num_sms, use_pdl

MAX_ROWS = 16  # rows of one tl.dot tile: at most this many take the kernel
BLOCK_N = 64  # output features per program
MAX_TILES = 1 << 16  # output tiles with a count of their own (the counts: 256 KB per device)
PROGRAMS_PER_SM = 4  # K is split until the programs reach this many per SM
NUM_STAGES = 3  # H200: 3 at least as fast as 4 and 6 on Qwen3-0.6B's and 8B's linears, up to 1 us faster on 8B's


def use_few_rows(M: int, N: int, device: torch.device) -> bool:
    """Whether `fp8_few_rows_matmul` takes an [M, K] x [N, K]^T product: at most MAX_ROWS rows, and too few output
    tiles to fill the SMs twice (the general GEMM splits K then too, and pays a kernel to sum the splits). With
    more tiles the general GEMM, whose loop streams FP8 tiles of both operands, reads the weights faster (H200,
    Qwen3-8B's gate_up at one row: 31.2 against 41.0 us; docs/PERF.md)."""
    return M <= MAX_ROWS and triton.cdiv(N, BLOCK_N) < 2 * num_sms(device)


def few_rows_config(N: int, K: int, sm_count: int) -> tuple[int, int]:
    """(BLOCK_N, split_k) for a product of at most MAX_ROWS rows with an [N, K] weight: K split (down to one
    128-column block per program) until the programs fill the SMs PROGRAMS_PER_SM times."""
    tiles, k_blocks = triton.cdiv(N, BLOCK_N), triton.cdiv(K, GROUP_SIZE)
    return BLOCK_N, min(k_blocks, triton.cdiv(PROGRAMS_PER_SM * sm_count, tiles))


@functools.lru_cache(maxsize=None)
def _tile_counts(device: torch.device) -> torch.Tensor:
    """[MAX_TILES] int32 zeros on `device`: each split kernel counts its finished splits per output tile
    here, and leaves the counts at zero. Shared by every call on the device, which the engine makes from one
    stream (two of these kernels running at once would mix their counts)."""
    return torch.zeros(MAX_TILES, dtype=torch.int32, device=device)


@triton.jit
def _fp8_few_rows_kernel(x_ptr, stride_xm, w_ptr, stride_wn, ws_ptr, stride_wsn, y_ptr, stride_ym,
                         part_ptr, count_ptr, M, N, K, num_k_blocks, k_blocks_per_split, split_k,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tile, split = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BLOCK_M, 1]
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn  # [1, BLOCK_N]: W is [N, K], K-major
    ws_cols = ws_ptr + (offs_n // BLOCK_K) * stride_wsn  # [BLOCK_N]: one scale per 128 x 128 block
    if PDL:  # x is the output of the kernel before
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kb_start = split * k_blocks_per_split
    kb_end = tl.minimum(kb_start + k_blocks_per_split, num_k_blocks)
    for kb in range(kb_start, kb_end):
        x, w = load_k_block(x_rows, w_cols, kb * BLOCK_K + offs_k, K, m_mask, n_mask, EVEN_K)
        x = x.to(tl.float32)
        x_scale = tl.maximum(tl.max(tl.abs(x), axis=1), FLOOR) / QMAX  # [BLOCK_M]
        a = tl.clamp(x / x_scale[:, None], -QMAX, QMAX).to(w.dtype)
        w_scale = tl.load(ws_cols + kb, mask=n_mask, other=0.0)
        acc += tl.dot(a, w) * x_scale[:, None] * w_scale[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if split_k == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        parts = part_ptr + offs_m[:, None] * N + offs_n[None, :]  # [split_k, M, N] float32
        tl.store(parts + split * M * N, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial sums are written before the count says so
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if done == split_k - 1:  # the tile's last split: the others' sums are visible
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, split_k):
                total += tl.load(parts + s * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.store(count_ptr + tile, 0)


def fp8_few_rows_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                        config: tuple[int, int] | None = None, num_warps: int = 4, num_stages: int = NUM_STAGES
                        ) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, the model dtype, rows may be strided) @ (w [N, K] float8_e4m3fn times its
    block scales w_scale [ceil(N/128), ceil(K/128)])^T -> [M, N] in x's dtype, x quantized per row and 128
    columns as `per_token_group_quant_fp8` does. `config`: (BLOCK_N, split_k) (None: `few_rows_config`)."""
    M, K = x.shape
    N = w.shape[0]
    assert M <= MAX_ROWS and x.stride(1) == 1 and w.shape[1] == K and w.stride(1) == 1
    k_blocks = triton.cdiv(K, GROUP_SIZE)
    assert w_scale.shape == (triton.cdiv(N, GROUP_SIZE), k_blocks) and w_scale.stride(1) == 1
    block_n, split_k = config or few_rows_config(N, K, num_sms(x.device))
    assert GROUP_SIZE % block_n == 0
    tiles = triton.cdiv(N, block_n)
    if tiles > MAX_TILES:
        split_k = 1
    per_split = triton.cdiv(k_blocks, split_k)
    split_k = triton.cdiv(k_blocks, per_split)  # no empty splits
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    parts = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device) if split_k > 1 else y
    pdl = use_pdl(x.device)
    _fp8_few_rows_kernel[(tiles, split_k)](
        x, x.stride(0), w, w.stride(0), w_scale, w_scale.stride(0), y, y.stride(0), parts, _tile_counts(x.device),
        M, N, K, k_blocks, per_split, split_k, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=GROUP_SIZE,
        EVEN_K=K % GROUP_SIZE == 0, QMAX=FP8_MAX, FLOOR=AMAX_FLOOR, PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl)
    return y
