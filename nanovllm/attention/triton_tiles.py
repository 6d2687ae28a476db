"""Building blocks of the Triton attention kernels (triton_decode, triton_cascade, triton_prefill): input
checks, finding cache rows through a block table, the online-softmax loop over a kv head's keys, and folding
split partial results (a normalized output and a base-2 log-sum-exp per row) into a running state.

Online-softmax state, in base 2 and float32: m, the running max of the scaled logits; l, the sum of
exp2(logit - m); acc, the sum of exp2(logit - m) * v. A partial result (out, lse) is the state (lse, 1, out).
"""
import torch
import triton
import triton.language as tl

from nanovllm.attention.kv_store import FP8_DTYPE

HEAD_DIMS = (64, 128, 256)
QUERY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LOG2E = 1.4426950408889634


def check_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scales: torch.Tensor | None, v_scales: torch.Tensor | None):
    """ValueError for a head_dim, dtype or head count these kernels do not support."""
    num_heads, head_dim = q.shape[-2:]
    num_kv_heads = k_cache.shape[-2]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if q.dtype not in QUERY_DTYPES:
        raise ValueError(f"query dtype must be one of {QUERY_DTYPES}, got {q.dtype}")
    if k_cache.dtype not in (q.dtype, FP8_DTYPE) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"cache dtype must be the query's ({q.dtype}) or {FP8_DTYPE}, got {k_cache.dtype}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if k_cache.dtype == FP8_DTYPE and (k_scales is None or v_scales is None):
        raise ValueError("a float8_e4m3fn cache needs k_scales and v_scales")
    assert q.stride(-1) == 1 and v_cache.shape == k_cache.shape and k_cache.shape[-1] == head_dim


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is the default, unused for 16-bit inputs


@triton.jit
def cache_rows(table_row_ptr, start, length, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Flat cache rows (block * PAGE + offset, int64) [BLOCK_N] of key positions start + 0..BLOCK_N-1
    (start a multiple of BLOCK_N); table entries of positions >= length are not read."""
    offs = tl.arange(0, BLOCK_N)
    if PAGE >= BLOCK_N:  # the tile lies within one page: one table entry
        block = tl.load(table_row_ptr + start // PAGE).to(tl.int64)
        rows = block * PAGE + (start % PAGE + offs)
    else:  # the tile spans BLOCK_N // PAGE pages
        pos = start + offs
        block = tl.load(table_row_ptr + pos // PAGE, mask=pos < length, other=0).to(tl.int64)
        rows = block * PAGE + pos % PAGE
    return rows


@triton.jit
def attend_tiles(q, table_row_ptr, start, end, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr, kv_head,
                 qk_scale, m, l, acc, ROWS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 PAGE: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax (float32, base 2) of the query rows q [ROWS, HEAD_DIM] over one kv head's keys
    start..end-1, found through the block-table row (start a multiple of BLOCK_N), continuing the state
    (m, l, acc): the running max [ROWS], the normalizer [ROWS] and the unnormalized output [ROWS, HEAD_DIM]
    (-inf, 0 and zeros for nothing yet; see `empty_state`). Returns the state after the last key."""
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    for tile in range(start, end, BLOCK_N):
        rows = cache_rows(table_row_ptr, tile, end, PAGE, BLOCK_N)  # [BLOCK_N]
        valid = tile + n < end
        offsets = rows[:, None] * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + d[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)  # [ROWS, BLOCK_N]
        if FP8:  # s = (q . k_fp8) * k_scale, column by column
            k_scale = tl.load(k_scales_ptr + rows * KV_HEADS + kv_head, mask=valid, other=0.0)
            s = s * (k_scale * qk_scale)[None, :]
        else:
            s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if FP8:  # fold v_scale into P's columns: P @ (v_fp8 * v_scale) = (P * v_scale) @ v_fp8
            v_scale = tl.load(v_scales_ptr + rows * KV_HEADS + kv_head, mask=valid, other=0.0)
            p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m = m_new
    return m, l, acc


@triton.jit
def empty_state(ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The online-softmax state before any key: m -inf, l 0, acc zeros."""
    return (tl.full([ROWS], float("-inf"), tl.float32), tl.zeros([ROWS], tl.float32),
            tl.zeros([ROWS, HEAD_DIM], tl.float32))


@triton.jit
def merge_splits(part_out_ptr, part_lse_ptr, row, num_splits, count, m, total, acc, CHUNK: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    """Fold the first `count` of `row`'s num_splits partial results (workspace rows of HEAD_DIM outputs and
    a base-2 log-sum-exp, -inf for an empty split) into the running max m, weight total and weighted sum
    acc [HEAD_DIM]; CHUNK splits at a time, so that no compiled variant depends on the split count."""
    c = tl.arange(0, CHUNK)
    d = tl.arange(0, HEAD_DIM)
    for start in range(0, count, CHUNK):
        ok = start + c < count
        lse = tl.load(part_lse_ptr + row * num_splits + start + c, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # all empty so far: weights stay 0
        alpha = tl.exp2(m - base)
        w = tl.exp2(lse - base)
        parts = tl.load(part_out_ptr + (row * num_splits + start + c)[:, None] * HEAD_DIM + d[None, :],
                        mask=ok[:, None], other=0.0)  # [CHUNK, HEAD_DIM]
        total = total * alpha + tl.sum(w, axis=0)
        acc = acc * alpha + tl.sum(parts * w[:, None], axis=0)
        m = m_new
    return m, total, acc


@triton.jit
def fold_partials(part_out_ptr, part_lse_ptr, part, row_ok, count, m, l, acc, HEAD_DIM: tl.constexpr):
    """Fold the partial results at workspace rows part + 0..count-1 (part [ROWS]: each row's first; outputs
    [HEAD_DIM] per workspace row, lse -inf for an empty one) into the state (m, l, acc) of the rows where
    row_ok, one partial at a time (a few: the cascade's prefix splits)."""
    d = tl.arange(0, HEAD_DIM)
    for s in range(0, count):
        lse = tl.load(part_lse_ptr + part + s, mask=row_ok, other=float("-inf"))
        out = tl.load(part_out_ptr + (part + s)[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing so far: weights stay 0
        alpha = tl.exp2(m - base)
        w = tl.exp2(lse - base)
        l = l * alpha + w
        acc = acc * alpha[:, None] + out * w[:, None]
        m = m_new
    return m, l, acc
