"""Paged decode attention in Triton: split-KV ("flash-decoding"), one query token per sequence.

Cache layout per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] (flash-attn's),
block_size any power of two >= 16; float8_e4m3fn caches carry per-row scales [num_blocks, block_size,
num_kv_heads] (see kv_store) and are dequantized in registers. Pass 1 runs one program per (kv head,
sequence, split): it packs the kv head's GROUP query heads as the rows of a tl.dot tile, walks its share of
the sequence's keys BLOCK_N at a time through the block table with an online softmax (float32, base 2),
and writes a partial output and log-sum-exp; pass 2 merges the splits. An FP8 cache at small GQA groups has
a pass 1 of its own that does the math on CUDA cores (`_fp8_cuda_core_kernel`, below). The grid and the workspace depend
only on static shapes (num_seqs, block-table width, block_size, SM count), never on context_lens, so the
pair is CUDA-graph capturable; rows with context_len 0 (graph padding) read nothing and output zeros.
"""
import torch
import triton
import triton.language as tl

from nanovllm.attention.kv_store import FP8_DTYPE
from nanovllm.attention.triton_tiles import (LOG2E, attend_tiles, cache_rows, check_attention_inputs, dot_precision,
                                             empty_state, fold_partials, merge_splits)
from nanovllm.utils.triton_utils import num_sms, use_pdl

# Tunables (scripts/bench_attention.py sweeps them). Per head_dim: BLOCK_N (keys per tile), num_warps,
# num_stages (tiles in flight: software pipelining of the K/V loads).
DECODE_CONFIGS = {64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 3)}
FP8_DECODE_CONFIGS = {64: (128, 4, 3), 128: (128, 4, 3), 256: (32, 4, 3)}  # an FP8 cache: wider tiles
# An FP8 cache with at most CUDA_CORE_MAX_GROUP query heads per kv head (and a head_dim of CUDA_CORE_HEAD_DIMS) is
# read by the CUDA-core kernel below (measured at GQA 2 only): BLOCK_N, num_warps, and a register cap per thread
# (4 programs of 4 warps per SM).
CUDA_CORE_MAX_GROUP = 2
CUDA_CORE_HEAD_DIMS = (64, 128)
CUDA_CORE_CONFIG = (64, 4, 128)
VECTOR_BYTES = 16  # the CUDA-core kernel loads 16 bytes of a key row per thread
SPLIT_PROGRAMS_PER_SM = 2  # split sequences until num_kv_heads * num_seqs * splits >= this x SM count
MIN_GROUP_ROWS = 16  # tl.dot needs M >= 16: the query-head group is padded up to this
MERGE_CHUNK = 64  # split partials merged per loop step (a decode step has at most 2 x SMs / kv heads)


# The block-table width and split length vary with the batch: runtime values, so no step compiles a variant.
# PREFIX: a cascade's suffix pass (triton_cascade): split 0 of a row with a shared prefix starts from the prefix
# pass's partials (prefix_count_ptr: how many per row; seq_prefix_lens_ptr: 0 for a row in no group) instead of
# from nothing, so no separate merge of prefix and suffix is needed.
@triton.jit(do_not_specialize=["table_stride", "split_len", "prefix_stride"])
def _decode_kernel(q_ptr, q_stride_s, q_stride_h, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr,
                   block_tables_ptr, table_stride, context_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr, qk_scale,
                   split_len, prefix_out_ptr, prefix_lse_ptr, prefix_stride, prefix_count_ptr, seq_prefix_lens_ptr,
                   KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PREFIX: tl.constexpr,
                   FP8: tl.constexpr, FP16_DOT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # (nanovllm/utils/triton_utils.py)
        tl.extra.cuda.gdc_launch_dependents()
    kv_head, seq, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)  # a step input, copied from the host
    if PDL:  # q and this step's keys are the kernel before's
        tl.extra.cuda.gdc_wait()
    start = split * split_len  # split_len: keys per split, a multiple of BLOCK_N
    end = tl.minimum(start + split_len, context_len)  # <= start: nothing to do

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g  # query heads packed as rows, padded with zero rows
    q = tl.load(q_ptr + seq * q_stride_s + heads[:, None] * q_stride_h + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)  # [GROUP_PAD, HEAD_DIM]
    if FP16_DOT:  # e4m3 -> fp16 is one instruction on sm_89+, e4m3 -> bf16 is not: dot in fp16
        q = q.to(tl.float16)
    table_row = block_tables_ptr + seq.to(tl.int64) * table_stride
    m, l, acc = empty_state(GROUP_PAD, HEAD_DIM)
    if PREFIX:  # workspace [num_seqs, num_heads, prefix_stride, (HEAD_DIM)]
        shared = (split == 0) & (tl.load(seq_prefix_lens_ptr + seq) > 0)
        count = tl.where(shared, tl.load(prefix_count_ptr), 0)
        part = (seq * KV_HEADS * GROUP + heads) * prefix_stride
        m, l, acc = fold_partials(prefix_out_ptr, prefix_lse_ptr, part, g < GROUP, count, m, l, acc, HEAD_DIM)
    m, l, acc = attend_tiles(q, table_row, start, end, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr, kv_head,
                             qk_scale, m, l, acc, GROUP_PAD, KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, FP8, PRECISION)

    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # an empty split (or context 0) gives zeros
    head_mask = (g < GROUP)[:, None]
    if not SPLIT:
        out_offsets = (seq * KV_HEADS * GROUP + heads[:, None]) * HEAD_DIM + d[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=head_mask)
    else:  # workspace [num_seqs, num_heads, num_splits, (HEAD_DIM)]
        part = (seq * KV_HEADS * GROUP + heads) * tl.num_programs(2) + split  # [GROUP_PAD]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=head_mask)
        tl.store(part_lse_ptr + part, m + tl.log2(l), mask=g < GROUP)  # -inf when empty


# The split count varies with the batch (eager steps): a runtime value, so no step compiles a variant.
@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_splits, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr,
                  PDL: tl.constexpr):
    if PDL:  # (nanovllm/utils/triton_utils.py) the partials are the kernel before's
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0)  # seq * num_heads + head
    m, total, acc = merge_splits(part_out_ptr, part_lse_ptr, row, num_splits, num_splits,
                                 tl.full([], float("-inf"), tl.float32), tl.zeros([], tl.float32),
                                 tl.zeros([HEAD_DIM], tl.float32), CHUNK, HEAD_DIM)
    out = acc / tl.where(total == 0.0, 1.0, total)  # every split empty (context 0): zeros
    tl.store(out_ptr + row * HEAD_DIM + tl.arange(0, HEAD_DIM), out.to(out_ptr.dtype.element_ty))


# ---- FP8 caches at small GQA groups: the math on CUDA cores ------------------------------------------------
# With two query heads per kv head a tl.dot tile is mostly padding, and Triton (3.6) feeds an FP8 tile to the
# MMA by reading it back from shared memory byte by byte: the MMA kernel moved 2.2 TB/s of FP8 data at the
# bench shapes. This pass keeps every tile in the layout it is loaded in: a tile of BLOCK_N keys is loaded
# [1, BLOCK_N, HEAD_DIM] (16 bytes of a key row per thread, a row's lanes within one warp, the other lanes and
# the warps over keys) and viewed as [1, R, T, HEAD_DIM], key n = r * T + t: r in a thread's registers, t over
# lanes and warps. q . k is a sum within the thread plus a few shuffles; each lane set t keeps its own online
# softmax state (m, l [GROUP, 1, T], acc [GROUP, 1, T, HEAD_DIM]), so the loop has no cross-warp reduction
# and no layout change, and the T states are merged once after it. Same grid, workspace and merge as
# `_decode_kernel`. (The loads are not software-pipelined without a tl.dot: occupancy hides their latency,
# hence the register cap.)

def cuda_core_lanes(head_dim: int, num_warps: int) -> int:
    """T: key rows that one pass of the CUDA-core layout covers (a warp's 32 lanes hold 32 // (head_dim / 16))."""
    return 32 // (head_dim // VECTOR_BYTES) * num_warps


@triton.jit(do_not_specialize=["table_stride", "split_len"])
def _fp8_cuda_core_kernel(q_ptr, q_stride_s, q_stride_h, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr,
                          block_tables_ptr, table_stride, context_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                          qk_scale, split_len, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                          HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
                          SPLIT: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # as in _decode_kernel
        tl.extra.cuda.gdc_launch_dependents()
    kv_head, seq, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    if PDL:
        tl.extra.cuda.gdc_wait()
    start = split * split_len  # a multiple of BLOCK_N
    end = tl.minimum(start + split_len, context_len)
    R: tl.constexpr = BLOCK_N // T

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * q_stride_s + heads[:, None] * q_stride_h + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0).to(tl.float32) * qk_scale  # [GROUP_PAD, HEAD_DIM]
    q = q[:, None, None, :]
    table_row = block_tables_ptr + seq.to(tl.int64) * table_stride

    m = tl.full([GROUP_PAD, 1, T], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD, 1, T], tl.float32)
    acc = tl.zeros([GROUP_PAD, 1, T, HEAD_DIM], tl.float32)
    for tile in range(start, end, BLOCK_N):
        rows = cache_rows(table_row, tile, end, PAGE, BLOCK_N)
        ok = tile + tl.arange(0, BLOCK_N) < end
        row_head = rows * KV_HEADS + kv_head  # [BLOCK_N]: the scales' index, the cache row
        offsets = row_head[None, :, None] * HEAD_DIM + d[None, None, :]  # [1, BLOCK_N, HEAD_DIM]
        # loaded as [1, BLOCK_N, HEAD_DIM] and reshaped: Triton lays a 4-d load out differently across versions
        k = tl.reshape(tl.load(k_cache_ptr + offsets, mask=ok[None, :, None], other=0.0), [1, R, T, HEAD_DIM])
        v = tl.reshape(tl.load(v_cache_ptr + offsets, mask=ok[None, :, None], other=0.0), [1, R, T, HEAD_DIM])
        k_scale = tl.reshape(tl.load(k_scales_ptr + row_head, mask=ok, other=0.0), [1, R, T])
        v_scale = tl.reshape(tl.load(v_scales_ptr + row_head, mask=ok, other=0.0), [1, R, T])
        valid = tl.reshape(ok, [1, R, T])
        s = tl.sum(q * k.to(tl.float32), axis=3) * k_scale  # [GROUP_PAD, R, T]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1, keep_dims=True))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane set with no key yet: weights stay 0
        alpha = tl.exp2(m - base)
        p = tl.exp2(s - base)
        l = l * alpha + tl.sum(p, axis=1, keep_dims=True)
        pv = (p * v_scale)[:, :, :, None]  # P @ (v_fp8 * v_scale) = (P * v_scale) @ v_fp8
        acc = acc * alpha[:, :, :, None] + tl.sum(pv * v.to(tl.float32), axis=1, keep_dims=True)
        m = m_new

    # merge the lane sets: the one cross-warp reduction
    m_all = tl.max(m, axis=2, keep_dims=True)
    weight = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))  # [GROUP_PAD, 1, T]
    l_all = tl.sum(l * weight, axis=2, keep_dims=True)
    out = tl.sum(acc * weight[:, :, :, None], axis=2) / tl.where(l_all == 0.0, 1.0, l_all)  # [GROUP_PAD, 1, HEAD_DIM]
    head_mask = (g < GROUP)[:, None, None]
    if not SPLIT:
        dst = out_ptr + (seq * KV_HEADS * GROUP + heads[:, None, None]) * HEAD_DIM + d[None, None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=head_mask)
    else:  # workspace [num_seqs, num_heads, num_splits, (HEAD_DIM)]
        part = (seq * KV_HEADS * GROUP + heads[:, None, None]) * tl.num_programs(2) + split  # [GROUP_PAD, 1, 1]
        tl.store(part_out_ptr + part * HEAD_DIM + d[None, None, :], out, mask=head_mask)
        tl.store(part_lse_ptr + part, m_all + tl.log2(l_all), mask=head_mask)  # -inf when empty



def decode_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device, block_n: int,
                  programs_per_sm: int = SPLIT_PROGRAMS_PER_SM) -> tuple[int, int]:
    """(num_splits, tiles_per_split) from static shapes only; max_context is the block-table width in
    tokens. Splits until the grid has programs_per_sm x SMs programs, never more splits than tiles."""
    max_tiles = max(1, triton.cdiv(max_context, block_n))
    splits = min(max_tiles, max(1, triton.cdiv(programs_per_sm * num_sms(device), num_seqs * num_kv_heads)))
    tiles_per_split = triton.cdiv(max_tiles, splits)
    return triton.cdiv(max_tiles, tiles_per_split), tiles_per_split


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, k_scales: torch.Tensor | None = None,
                 v_scales: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                 num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None) -> torch.Tensor:
    """Attention of one query per sequence over its cached keys 0..context_len-1.

    q [num_seqs, num_heads, head_dim] (any row stride, last dim contiguous); caches [num_blocks, block_size,
    num_kv_heads, head_dim] of q's dtype or float8_e4m3fn (then k_scales / v_scales [num_blocks, block_size,
    num_kv_heads] float32 are required); block_tables [num_seqs, max_blocks] int32, rows padded with valid
    block ids; context_lens [num_seqs] int32 (0 gives a zero row). Returns [num_seqs, num_heads, head_dim]
    in q's dtype, written into `out` (contiguous) when given. num_splits None: decode_splits' choice; other
    tunables None: DECODE_CONFIGS[head_dim] (an FP8 cache: CUDA_CORE_CONFIG or FP8_DECODE_CONFIGS). No host
    syncs: CUDA-graph capturable. Raises ValueError for an unsupported head_dim, dtype or head count, or a
    block_n the CUDA-core kernel cannot tile."""
    check_attention_inputs(q, k_cache, v_cache, k_scales, v_scales)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert block_size >= 16 and block_size & (block_size - 1) == 0, f"block_size {block_size}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    group = num_heads // num_kv_heads
    fp8 = k_cache.dtype == FP8_DTYPE
    cuda_core = fp8 and group <= CUDA_CORE_MAX_GROUP and head_dim in CUDA_CORE_HEAD_DIMS
    if cuda_core:
        defaults = CUDA_CORE_CONFIG[:2] + (1,)  # its loads are not pipelined: one stage
    else:
        defaults = (FP8_DECODE_CONFIGS if fp8 else DECODE_CONFIGS)[head_dim]
    block_n, num_warps, num_stages = (given if given is not None else default for given, default in
                                      zip((block_n, num_warps, num_stages), defaults))
    lanes = cuda_core_lanes(head_dim, num_warps) if cuda_core else 0
    if cuda_core and block_n % lanes:
        raise ValueError(f"block_n must be a multiple of {lanes} for an FP8 cache at head_dim {head_dim} and "
                         f"{num_warps} warps, got {block_n}")
    assert block_tables.stride(1) == 1 and block_tables.shape[0] == num_seqs == context_lens.shape[0]
    max_tiles = max(1, triton.cdiv(block_tables.shape[1] * block_size, block_n))
    if num_splits is None:
        num_splits, tiles_per_split = decode_splits(num_seqs, num_kv_heads, block_tables.shape[1] * block_size,
                                                    q.device, block_n)
    else:
        tiles_per_split = triton.cdiv(max_tiles, num_splits)
        num_splits = triton.cdiv(max_tiles, tiles_per_split)
    if out is None:
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    if num_seqs == 0:
        return out
    if num_splits > 1:  # [num_seqs, num_heads, num_splits, head_dim], [num_seqs, num_heads, num_splits]
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    scales = (k_scales, v_scales) if fp8 else (k_cache, v_cache)  # unused pointers when not FP8
    # kv heads fastest: a sequence's programs run together and share its block-table row and scale sectors in L2
    grid = (num_kv_heads, num_seqs, num_splits)
    args = (q, q.stride(0), q.stride(1), k_cache, v_cache, *scales, block_tables, block_tables.stride(0), context_lens,
            out, part_out, part_lse, scale * LOG2E, tiles_per_split * block_n)
    # programmatic dependent launch at one sequence only (batch-1 decode, where every kernel of the layer has it);
    # at batch 8 the step took longer with it (H200: 1.45 ms per step against 1.43 without; utils/triton_utils.py)
    pdl = use_pdl(q.device) and num_seqs == 1
    if cuda_core:
        _fp8_cuda_core_kernel[grid](*args, num_kv_heads, group, triton.next_power_of_2(group), head_dim, block_size,
                                    block_n, lanes, num_splits > 1, pdl, num_warps=num_warps, num_stages=num_stages,
                                    maxnreg=CUDA_CORE_CONFIG[2], launch_pdl=pdl)
    else:
        no_prefix = (out, out, 0, context_lens, context_lens)  # unused pointers: PREFIX is False
        _decode_kernel[grid](*args, *no_prefix, num_kv_heads, group, max(MIN_GROUP_ROWS, triton.next_power_of_2(group)),
                             head_dim, block_size, block_n, num_splits > 1, False, fp8,
                             fp8 and q.dtype == torch.bfloat16, dot_precision(q.dtype), pdl, num_warps=num_warps,
                             num_stages=num_stages, launch_pdl=pdl)
    if num_splits > 1:
        _merge_kernel[(num_seqs * num_heads,)](part_out, part_lse, out, num_splits, MERGE_CHUNK, head_dim, pdl,
                                               launch_pdl=pdl)
    return out
