"""Linear layers at a handful of rows (decode at small batches): y = x @ W^T (+ bias) in Triton.

At one to eight rows a linear reads its whole weight to produce a few outputs: the step is bound by
the weight's bytes and, for a small model, by its number of kernels. This kernel gives each program
BLOCK_N output features and walks the whole input dimension, BLOCK_K at a time, with plain
multiply-adds in float32 (no tensor cores: there is nothing to reuse); the partial products stay in
registers and are summed once at the end.

Weights are the model dtype, or float8_e4m3fn with one float32 scale per SCALE_BLOCK x SCALE_BLOCK
block (layers/quantization/fp8.py), dequantized in registers: an FP8 weight is read at one byte per
element and the activations stay in the model dtype (no quantization step at these sizes).

A `Prologue` computes the input from what the layer before left: the RMSNorm (with its residual add)
of the decoder layer before qkv and gate_up, SiLU-and-mul before down. Each program reads the whole
row anyway at these sizes, so a norm costs it a second pass over the row from L2, and the separate
norm or activation kernel (and its launch gap) goes (layers/layernorm.PendingNorm, activation.PendingSiluMul).

It is not always faster: cuBLAS (or the FP8 GEMM) wins on large weights, and at two to eight rows
(scripts/bench_skinny.py). `prefer_skinny` decides per weight shape and dtype for one-row inputs by
timing both once, outside CUDA-graph capture (the model runner's warm-up runs a one-token forward for
this). One H200, one row, bf16: Qwen3-0.6B's o_proj 3.5 us against cuBLAS's 12.9, down_proj 4.0 against
7.6, qkv and gate_up within 10% of cuBLAS; Qwen3-8B's o_proj 11.5 against 14.0, the others within 10%.
With FP8 weights it beats the FP8 linear's one-kernel path (quantization/fp8_few_rows.py) on 0.6B's o_proj and
down_proj at one row (4.2 against 5.6 us, 5.4 against 6.5), not on the other shapes.
"""
from typing import Callable, NamedTuple

import torch

from nanovllm.utils.triton_utils import num_sms, tl, triton, use_pdl

MAX_ROWS = 8  # the most rows skinny_linear takes (the layers use it at one row: prefer_skinny)
# (BLOCK_N, BLOCK_K, num_warps, prefetch) per padded row count: the partial products take
# ROWS * BLOCK_N * BLOCK_K / (32 * num_warps) float32 registers per thread.
CONFIGS = {1: (4, 1024, 4, False), 2: (8, 256, 4, False), 4: (4, 256, 4, False), 8: (4, 128, 4, False)}
# one row, few output features (BLOCK_N 4 would give fewer than two programs per SM): a program per feature,
# each prefetching its next tile (H200, scripts/bench_skinny.py: Qwen3-0.6B's o_proj 3.5 against 4.0 us,
# down_proj 4.0 against 5.0 with CONFIGS[1])
CONFIG_FEW_OUTPUTS = (1, 1024, 4, True)
NUM_STAGES = 3
MIN_GAIN = 1.1  # prefer_skinny picks this kernel when it is at least this much faster
# ... or, when it would also run the input's norm or activation (a kernel launch saved), at most this much slower:
# a one-row norm or SiLU kernel takes 1-2 us plus its launch gap on an H200, 10-30% of a one-row linear of a small
# model, a few percent of a large one's
MAX_LOSS_WITH_PROLOGUE = 1.1


if triton is not None:
    @triton.jit
    def _row_sum(x_ptr, x_stride, res_ptr, res_stride, offs, r, k, mask):
        """x + residual at rows r, columns k (offsets offs into x), rounded to the model dtype as torch's add."""
        x = tl.load(x_ptr + r * x_stride + offs, mask=mask, other=0.0)
        res = tl.load(res_ptr + r * res_stride + offs, mask=mask, other=0.0)
        return (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)

    @triton.jit
    def _inv_rms(x_ptr, x_stride, res_ptr, res_stride, sum_ptr, r, M, K, eps, BLOCK_K: tl.constexpr,
                 RESIDUAL: tl.constexpr):
        """[ROWS] 1 / rms of each row of x (+ residual); the first program stores the sum at sum_ptr."""
        squares = tl.zeros([r.shape[0]], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = (r < M)[:, None] & (k < K)[None, :]
            if RESIDUAL:
                h = _row_sum(x_ptr, x_stride, res_ptr, res_stride, k[None, :], r[:, None], k, mask)
                if tl.program_id(0) == 0:
                    tl.store(sum_ptr + r[:, None] * K + k[None, :], h, mask=mask)
            else:
                h = tl.load(x_ptr + r[:, None] * x_stride + k[None, :], mask=mask, other=0.0)
            hf = h.to(tl.float32)
            squares += tl.sum(hf * hf, axis=1)
        return tl.rsqrt(squares / K + eps)

    @triton.jit
    def _columns(k0, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        """Columns k0 .. k0 + BLOCK_K as (scale group j, column c): j [J] and k [J, GROUP]."""
        j = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        return j, j[:, None] * GROUP + tl.arange(0, GROUP)[None, :]

    @triton.jit
    def _weights(w_rows, k0, n_ok, K, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr):
        """The weight tile at columns k0.., as stored: [BLOCK_N, J, GROUP]."""
        _, k = _columns(k0, BLOCK_K, GROUP)
        return tl.load(w_rows + k[None], mask=n_ok[:, None, None] if EVEN_K else n_ok[:, None, None] & (k < K)[None],
                       other=0.0)

    @triton.jit
    def _inputs(x_ptr, x_stride, res_ptr, res_stride, norm_ptr, inv_rms, s_row, k0, r, M, K, BLOCK_K: tl.constexpr,
                GROUP: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr, NORM: tl.constexpr,
                RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr):
        """The inputs at columns k0.. in float32 [ROWS, 1, J, GROUP], after the prologue and with FP8 times the
        weight scale of their group (a program's BLOCK_N rows share one row of scales: BLOCK_N divides the
        scale block), so that J scales multiply inputs rather than every weight. The prologue: the input as
        it is; with NORM its RMSNorm (inv_rms), of its sum with the residual with RESIDUAL; with SILU_MUL,
        SiLU of its first K columns (gate) times the next K (up). Each rounds where its own kernel does
        (layers/layernorm.py, activation.py)."""
        j, k = _columns(k0, BLOCK_K, GROUP)
        rows = r[:, None, None]
        mask = (r < M)[:, None, None] if EVEN_K else (r < M)[:, None, None] & (k < K)[None]
        if RESIDUAL:
            h = _row_sum(x_ptr, x_stride, res_ptr, res_stride, k[None], rows, k, mask)
        else:
            h = tl.load(x_ptr + rows * x_stride + k[None], mask=mask, other=0.0)
        dtype = h.dtype
        x = h.to(tl.float32)
        if SILU_MUL:  # h is the gate; the up half follows it, K columns on
            up = tl.load(x_ptr + rows * x_stride + K + k[None], mask=mask, other=0.0).to(tl.float32)
            x = ((x / (1.0 + tl.exp(-x))).to(dtype).to(tl.float32) * up).to(dtype).to(tl.float32)
        if NORM:
            normed = (x * inv_rms[:, None, None]).to(dtype).to(tl.float32)
            norm_weight = tl.load(norm_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            x = (norm_weight[None] * normed).to(dtype).to(tl.float32)
        if FP8:
            x = x * tl.load(s_row + j, mask=j * GROUP < K, other=0.0)[None, :, None]
        return x[:, None]

    @triton.jit
    def _skinny_kernel(x_ptr, x_stride, w_ptr, w_stride, s_ptr, s_stride, b_ptr, y_ptr, y_stride, M, N, K,
                       res_ptr, res_stride, norm_ptr, sum_ptr, eps,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                       PREFETCH: tl.constexpr, FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                       HAS_BIAS: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
                       SILU_MUL: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        GROUP: tl.constexpr = SCALE_BLOCK if FP8 else BLOCK_K
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, ROWS)
        n_ok = n < N
        w_rows = w_ptr + n.to(tl.int64)[:, None, None] * w_stride
        s_row = s_ptr + (tl.program_id(0) * BLOCK_N // SCALE_BLOCK) * s_stride  # FP8 only
        w = _weights(w_rows, 0, n_ok, K, BLOCK_K, GROUP, EVEN_K)  # in flight while the norm's pass runs ...
        if PDL:  # ... and while the kernel before finishes (x is its output)
            tl.extra.cuda.gdc_wait()
        inv_rms = tl.zeros([ROWS], tl.float32)
        if NORM:  # every program reads the whole rows for their norms
            inv_rms = _inv_rms(x_ptr, x_stride, res_ptr, res_stride, sum_ptr, r, M, K, eps, BLOCK_K, RESIDUAL)
        x = _inputs(x_ptr, x_stride, res_ptr, res_stride, norm_ptr, inv_rms, s_row, 0, r, M, K, BLOCK_K, GROUP, EVEN_K,
                    FP8, NORM, RESIDUAL, SILU_MUL)
        acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K // GROUP, GROUP], tl.float32)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            if PREFETCH:  # the next tile's loads go out before this tile's multiply-adds wait for their own
                w_next = _weights(w_rows, k0, n_ok, K, BLOCK_K, GROUP, EVEN_K)
                x_next = _inputs(x_ptr, x_stride, res_ptr, res_stride, norm_ptr, inv_rms, s_row, k0, r, M, K,
                                 BLOCK_K, GROUP, EVEN_K, FP8, NORM, RESIDUAL, SILU_MUL)
                acc += x * w.to(tl.float32)[None]
                w, x = w_next, x_next
            else:
                acc += x * w.to(tl.float32)[None]
                w = _weights(w_rows, k0, n_ok, K, BLOCK_K, GROUP, EVEN_K)
                x = _inputs(x_ptr, x_stride, res_ptr, res_stride, norm_ptr, inv_rms, s_row, k0, r, M, K, BLOCK_K,
                            GROUP, EVEN_K, FP8, NORM, RESIDUAL, SILU_MUL)
        acc += x * w.to(tl.float32)[None]
        y = tl.sum(tl.sum(acc, axis=3), axis=2)  # [ROWS, BLOCK_N]
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + r[:, None] * y_stride + n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(r < M)[:, None] & n_ok[None, :])


_ratios: dict[tuple, float] = {}  # (weight shape, dtypes, scaled, device) -> skinny_linear's time / the usual's


def prefer_skinny(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                  default: Callable[[], torch.Tensor], prologue: bool = False) -> bool:
    """Whether x (one row, on CUDA) @ weight^T should run skinny_linear rather than `default` (the
    layer's usual path for the same inputs): when it is MIN_GAIN times faster, or with a `prologue` to run
    (which the usual path needs a kernel of its own for) no more than MAX_LOSS_WITH_PROLOGUE times slower.
    Timed once per weight shape and dtype, on the first call outside CUDA-graph capture; False until then."""
    if not x.is_cuda or triton is None or x.numel() != x.shape[-1] or weight.stride(1) != 1:
        return False
    key = (tuple(weight.shape), weight.dtype, x.dtype, weight_scale is not None, x.device)
    ratio = _ratios.get(key)
    if ratio is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        skinny = _time_ms(lambda: skinny_linear(x, weight, None, weight_scale))
        ratio = _ratios[key] = skinny / _time_ms(default)
    return ratio <= (MAX_LOSS_WITH_PROLOGUE if prologue else 1 / MIN_GAIN)


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


class Prologue(NamedTuple):
    """What skinny_linear's kernel makes of its input x before the product: RMSNorm with `norm_weight` and
    `eps`, of x + `residual` when given (the sum written to `residual_out`, the caller's [rows, in]); or
    SiLU of x's first `in` columns (gate) times the next `in` (up), x being [rows, 2 * in]."""
    norm_weight: torch.Tensor | None = None
    eps: float = 0.0
    residual: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None
    silu_mul: bool = False


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  weight_scale: torch.Tensor | None = None, scale_block: int = 128,
                  config: tuple[int, int, int, bool] | None = None, prologue: Prologue = Prologue()) -> torch.Tensor:
    """x [..., in] (at most MAX_ROWS rows) @ weight [out, in]^T (+ bias) -> [..., out] in x's dtype, x first
    transformed by `prologue`. weight in x's dtype, or float8_e4m3fn with weight_scale
    [ceil(out/scale_block), ceil(in/scale_block)]."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n, k = x2.shape[0], weight.shape[0], weight.shape[1]
    assert m <= MAX_ROWS and x2.shape[1] == (2 * k if prologue.silu_mul else k) and weight.stride(1) == 1
    norm, residual = prologue.norm_weight is not None, prologue.residual is not None
    if residual:
        assert norm and prologue.residual.shape == x2.shape and prologue.residual.stride(-1) == 1
        assert prologue.residual_out.shape == x2.shape and prologue.residual_out.is_contiguous()
    fp8 = weight_scale is not None
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        rows = triton.next_power_of_2(m)
        if config is None:
            few = rows == 1 and triton.cdiv(n, CONFIGS[1][0]) < 2 * num_sms(x.device)
            config = CONFIG_FEW_OUTPUTS if few else CONFIGS[rows]
        block_n, block_k, num_warps, prefetch = config
        assert not fp8 or (scale_block % block_n == 0 and block_k % scale_block == 0)
        scales = weight_scale if fp8 else weight  # unused pointers are passed as some tensor of the call
        res_in = prologue.residual if residual else x2
        pdl = use_pdl(x.device)
        _skinny_kernel[(triton.cdiv(n, block_n),)](
            x2, x2.stride(0), weight, weight.stride(0), scales, scales.stride(0), bias if bias is not None else y,
            y, y.stride(0), m, n, k, res_in, res_in.stride(0), prologue.norm_weight if norm else x2,
            prologue.residual_out if residual else y, prologue.eps, rows, block_n, block_k, k % block_k == 0, prefetch,
            fp8, scale_block, bias is not None, norm, residual, prologue.silu_mul, pdl,
            num_warps=num_warps, num_stages=NUM_STAGES, launch_pdl=pdl)
    return y.view(*x.shape[:-1], n)
