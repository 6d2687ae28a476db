"""Varlen causal prefill attention in Triton, over contiguous K/V or the paged cache.

Causality as flash_attn_varlen_func defines it: query i of a sequence with Lq queries and Lk keys sits at
key position Lk - Lq + i and attends keys 0..that position (a cached prefix or an earlier chunk makes
Lq < Lk). One program per (query tile of BLOCK_M tokens, sequence, query head), flash-attention style: key
tiles wholly below the diagonal first, without masks, then the diagonal tiles, masked; online softmax in
float32, base 2. Paged K/V are read through the block table (any power-of-two block_size >= 16) and an
FP8 cache is dequantized in registers, as in triton_decode. The grid uses max_seqlen_q, a host int.
"""
import torch
import triton
import triton.language as tl

from nanovllm.attention.kv_store import FP8_DTYPE
from nanovllm.attention.triton_tiles import LOG2E, cache_rows, check_attention_inputs, dot_precision

# Tunables per head_dim (scripts/bench_attention.py sweeps them): BLOCK_M, BLOCK_N, num_warps, num_stages.
PREFILL_CONFIGS = {64: (128, 64, 4, 3), 128: (64, 64, 4, 3), 256: (64, 32, 8, 2)}


@triton.jit
def _attend_tile(q, m, l, acc, k_ptr, k_stride, v_ptr, v_stride, k_scales_ptr, v_scales_ptr, table_row, k_start,
                 k_len, kv_head, tile, q_pos, qk_scale, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, FP8: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One key tile (positions tile..tile+BLOCK_N-1) folded into the running (m, l, acc) of the query tile."""
    n = tile + tl.arange(0, BLOCK_N)  # key positions
    d = tl.arange(0, HEAD_DIM)
    if PAGE == 0:  # contiguous [total_k, KV_HEADS, HEAD_DIM]
        rows = k_start + n.to(tl.int64)
    else:
        rows = cache_rows(table_row, tile, k_len, PAGE, BLOCK_N)
    k_ptrs = k_ptr + rows[:, None] * k_stride + kv_head * HEAD_DIM + d[None, :]  # [BLOCK_N, HEAD_DIM]
    v_ptrs = v_ptr + rows[:, None] * v_stride + kv_head * HEAD_DIM + d[None, :]
    if MASK:
        valid = n < k_len
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    if FP8:
        k_scale = tl.load(k_scales_ptr + rows * KV_HEADS + kv_head, mask=n < k_len, other=0.0)
        s = s * (k_scale * qk_scale)[None, :]
    else:
        s = s * qk_scale
    if MASK:  # causal diagonal and the sequence's end
        s = tl.where((n[None, :] <= q_pos[:, None]) & (n < k_len)[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: key 0 is in every query's first tile
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if FP8:
        v_scale = tl.load(v_scales_ptr + rows * KV_HEADS + kv_head, mask=n < k_len, other=0.0)
        p = p * v_scale[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return m_new, l, acc


@triton.jit(do_not_specialize=["table_stride"])  # the table width varies with the batch
def _prefill_kernel(q_ptr, q_stride_t, q_stride_h, k_ptr, k_stride, v_ptr, v_stride, k_scales_ptr, v_scales_ptr,
                    block_tables_ptr, table_stride, cu_seqlens_q_ptr, cu_seqlens_k_ptr, out_ptr, qk_scale,
                    NUM_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, FP16_DOT: tl.constexpr,
                    PRECISION: tl.constexpr):
    tile_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest (last) query tiles start first
    seq, head = tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile_m * BLOCK_M >= q_len:
        return
    k_start = tl.load(cu_seqlens_k_ptr + seq).to(tl.int64)
    k_len = tl.load(cu_seqlens_k_ptr + seq + 1) - k_start.to(tl.int32)
    kv_head = head // (NUM_HEADS // KV_HEADS)
    table_row = block_tables_ptr + seq.to(tl.int64) * table_stride

    i = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * q_stride_t + head * q_stride_h + d[None, :],
                mask=(i < q_len)[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    if FP16_DOT:  # an FP8 cache: e4m3 -> fp16 is one instruction, e4m3 -> bf16 is not
        q = q.to(tl.float16)
    q_pos = k_len - q_len + i  # key position of each query; padded rows (i >= q_len) see keys < k_len
    first_pos = k_len - q_len + tile_m * BLOCK_M
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys before it are visible to every query of the tile
    end = tl.minimum(k_len, first_pos + BLOCK_M)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for tile in range(0, full_end, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_ptr, k_stride, v_ptr, v_stride, k_scales_ptr, v_scales_ptr,
                                 table_row, k_start, k_len, kv_head, tile, q_pos, qk_scale, KV_HEADS, HEAD_DIM,
                                 PAGE, BLOCK_N, False, FP8, PRECISION)
    for tile in range(full_end, end, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_ptr, k_stride, v_ptr, v_stride, k_scales_ptr, v_scales_ptr,
                                 table_row, k_start, k_len, kv_head, tile, q_pos, qk_scale, KV_HEADS, HEAD_DIM,
                                 PAGE, BLOCK_N, True, FP8, PRECISION)
    out = acc / l[:, None]
    tl.store(out_ptr + (q_rows[:, None] * NUM_HEADS + head) * HEAD_DIM + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(i < q_len)[:, None])


def paged_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, max_seqlen_q: int, scale: float, block_tables: torch.Tensor | None = None,
                  k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None, *,
                  out: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Varlen causal attention (flash_attn_varlen_func's causality, see the module docstring).

    q [total_q, num_heads, head_dim] (any row stride, last dim contiguous); cu_seqlens_q, cu_seqlens_k
    [num_seqs + 1] int32 cumulative query / key lengths (Lk >= Lq per sequence); max_seqlen_q: the longest Lq.
    block_tables None: k, v are contiguous [total_k, num_kv_heads, head_dim] of q's dtype. block_tables
    [num_seqs, max_blocks] int32: k, v are the paged caches [num_blocks, block_size, num_kv_heads, head_dim]
    holding all Lk keys, of q's dtype or float8_e4m3fn (then k_scales / v_scales are required). Returns
    [total_q, num_heads, head_dim] in q's dtype, written into `out` (contiguous) when given. Tunables None:
    PREFILL_CONFIGS[head_dim].
    Raises ValueError for an unsupported head_dim, dtype or head count."""
    check_attention_inputs(q, k, v, k_scales, v_scales)
    total_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[-2]
    num_seqs = cu_seqlens_q.shape[0] - 1
    config = PREFILL_CONFIGS[head_dim]
    block_m, block_n, num_warps, num_stages = (given if given is not None else default for given, default in
                                               zip((block_m, block_n, num_warps, num_stages), config))
    if block_tables is None:
        if k.dtype == FP8_DTYPE:
            raise ValueError("contiguous k, v (block_tables=None) must have the query's dtype, got float8_e4m3fn")
        page, table_stride = 0, 0
        block_tables = cu_seqlens_k  # unused
    else:
        page = k.shape[1]
        assert page >= 16 and page & (page - 1) == 0 and block_tables.stride(1) == 1, f"block_size {page}"
        assert k.is_contiguous() and v.is_contiguous()
        table_stride = block_tables.stride(0)
        k, v = k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim)  # [num_slots, ...]
    assert k.stride(-1) == v.stride(-1) == 1 and k.stride(-2) == v.stride(-2) == head_dim
    if out is None:
        out = torch.empty(total_q, num_heads, head_dim, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    if total_q == 0 or max_seqlen_q == 0:
        return out
    fp8 = k.dtype == FP8_DTYPE
    scales = (k_scales, v_scales) if fp8 else (k, v)  # unused pointers when not FP8
    grid = (triton.cdiv(max_seqlen_q, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](q, q.stride(0), q.stride(1), k, k.stride(0), v, v.stride(0), *scales, block_tables,
                          table_stride, cu_seqlens_q, cu_seqlens_k, out, scale * LOG2E, num_heads, num_kv_heads,
                          head_dim, page, block_m, block_n, fp8, fp8 and q.dtype == torch.bfloat16,
                          dot_precision(q.dtype), num_warps=num_warps,
                          num_stages=num_stages)
    return out
