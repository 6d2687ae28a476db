"""Linear layers at a handful of rows (decode at small batches): y = x @ W^T (+ bias) in Triton.

At one to eight rows a linear reads its whole weight to produce a few outputs: the step is bound by
the weight's bytes, and for some of these shapes cuBLAS picks a kernel that moves them at a fraction
of the memory bandwidth. This kernel gives each program BLOCK_N output features and walks the whole input
dimension, BLOCK_K at a time, with plain multiply-adds in float32 (no tensor cores: there is
nothing to reuse); the partial products stay in registers and are summed once at the end.

Weights are the model dtype, or float8_e4m3fn with one float32 scale per SCALE_BLOCK x SCALE_BLOCK
block (layers/quantization/fp8.py), dequantized in registers: an FP8 weight is read at one byte per
element and the activations stay in the model dtype (no quantization step at these sizes).

It is not always faster: cuBLAS (or the FP8 GEMM) wins on large weights. `prefer_skinny` decides per
weight shape and dtype for one-row inputs by timing both once, outside CUDA-graph capture (the model
runner's warm-up runs a one-token forward for this), and keeps the faster. One H200, one row: Qwen3-0.6B's
o_proj (2048 -> 1024) 16.1 us with cuBLAS against 8.1 us; Qwen3-8B's linears are faster with cuBLAS.
"""
from typing import Callable

import torch

from nanovllm.utils.triton_utils import tl, triton

MAX_ROWS = 8  # the most rows skinny_linear takes (the layers use it at one row: prefer_skinny)
# (BLOCK_N, BLOCK_K, num_warps) per padded row count: the partial products take
# ROWS * BLOCK_N * BLOCK_K / (32 * num_warps) float32 registers per thread.
CONFIGS = {1: (4, 1024, 4), 2: (8, 256, 4), 4: (4, 256, 4), 8: (4, 128, 4)}
NUM_STAGES = 3
MIN_GAIN = 1.1  # prefer_skinny picks this kernel when it is at least this much faster


if triton is not None:
    @triton.jit
    def _skinny_kernel(x_ptr, x_stride, w_ptr, w_stride, s_ptr, s_stride, b_ptr, y_ptr, y_stride, M, N, K,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                       FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, ROWS)
        n_ok = n < N
        if FP8:
            # k split as (scale block j, column c): a program's BLOCK_N rows share one row of scales
            # (BLOCK_N divides SCALE_BLOCK), so the scales multiply the activations, BLOCK_K / SCALE_BLOCK
            # of them per step, rather than every weight
            j = tl.arange(0, BLOCK_K // SCALE_BLOCK)
            c = tl.arange(0, SCALE_BLOCK)
            s_row = s_ptr + (tl.program_id(0) * BLOCK_N // SCALE_BLOCK) * s_stride
            w_rows = w_ptr + n.to(tl.int64)[:, None, None] * w_stride
            acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K // SCALE_BLOCK, SCALE_BLOCK], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kb = k0 // SCALE_BLOCK + j
                k = kb[:, None] * SCALE_BLOCK + c[None, :]  # [J, SCALE_BLOCK]
                w_mask = n_ok[:, None, None] if EVEN_K else n_ok[:, None, None] & (k < K)[None]
                x_mask = (r < M)[:, None, None] if EVEN_K else (r < M)[:, None, None] & (k < K)[None]
                w = tl.load(w_rows + k[None], mask=w_mask, other=0.0).to(tl.float32)  # [BLOCK_N, J, SCALE_BLOCK]
                scale = tl.load(s_row + kb, mask=kb * SCALE_BLOCK < K, other=0.0)  # [J]
                x = tl.load(x_ptr + r[:, None, None] * x_stride + k[None], mask=x_mask, other=0.0).to(tl.float32)
                acc += (x * scale[None, :, None])[:, None] * w[None]
            y = tl.sum(tl.sum(acc, axis=3), axis=2)  # [ROWS, BLOCK_N]
        else:
            kk = tl.arange(0, BLOCK_K)
            w_rows = w_ptr + n.to(tl.int64)[:, None] * w_stride
            acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + kk
                w_mask = n_ok[:, None] if EVEN_K else n_ok[:, None] & (k < K)[None, :]
                x_mask = (r < M)[:, None] if EVEN_K else (r < M)[:, None] & (k < K)[None, :]
                w = tl.load(w_rows + k[None, :], mask=w_mask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_K]
                x = tl.load(x_ptr + r[:, None] * x_stride + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
                acc += x[:, None, :] * w[None, :, :]
            y = tl.sum(acc, axis=2)  # [ROWS, BLOCK_N]
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + r[:, None] * y_stride + n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(r < M)[:, None] & n_ok[None, :])


_choices: dict[tuple, bool] = {}  # (weight shape, dtypes, scaled, device) -> skinny_linear is faster


def prefer_skinny(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                  default: Callable[[], torch.Tensor]) -> bool:
    """Whether x (one row, on CUDA) @ weight^T should run skinny_linear rather than `default` (the
    layer's usual path for the same inputs). Timed once per weight shape and dtype, on the first call
    outside CUDA-graph capture; False until then."""
    if not x.is_cuda or triton is None or x.numel() != x.shape[-1] or weight.stride(1) != 1:
        return False
    key = (tuple(weight.shape), weight.dtype, x.dtype, weight_scale is not None, x.device)
    choice = _choices.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        skinny = _time_ms(lambda: skinny_linear(x, weight, None, weight_scale))
        choice = _choices[key] = skinny * MIN_GAIN < _time_ms(default)
    return choice


def _time_ms(fn: Callable[[], torch.Tensor], calls: int = 20) -> float:
    """GPU time of one call of fn, from a CUDA graph of `calls` calls (eager launches would time the host)."""
    fn()  # compiles, and warms up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  weight_scale: torch.Tensor | None = None, scale_block: int = 128,
                  config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [..., in] (at most MAX_ROWS rows) @ weight [out, in]^T (+ bias) -> [..., out] in x's dtype.
    weight in x's dtype, or float8_e4m3fn with weight_scale [ceil(out/scale_block), ceil(in/scale_block)]."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and weight.stride(1) == 1
    fp8 = weight_scale is not None
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        rows = triton.next_power_of_2(m)
        block_n, block_k, num_warps = config or CONFIGS[rows]
        assert not fp8 or (scale_block % block_n == 0 and block_k % scale_block == 0)
        scales = weight_scale if fp8 else weight  # an unused pointer without FP8
        _skinny_kernel[(triton.cdiv(n, block_n),)](
            x2, x2.stride(0), weight, weight.stride(0), scales, scales.stride(0), bias if bias is not None else y,
            y, y.stride(0), m, n, k, rows, block_n, block_k, k % block_k == 0, fp8, scale_block, bias is not None,
            num_warps=num_warps, num_stages=NUM_STAGES)
    return y.view(*x.shape[:-1], n)
