"""Cascade (shared-prefix) decode attention in Triton: keys that a group of sequences shares are read once
per group, each sequence's own keys once, and the two partial results are merged by log-sum-exp.

Inputs are those of `AttentionMetadata.cascade` (CascadeMetadata). Two passes:
- prefix pass, one program per (kv head, row tile of a group, split of the prefix): the query rows of a
  tile are (sequence of the group, query head of the kv head) pairs, BLOCK_M of them (so a tl.dot tile of
  SEQS_PER_TILE sequences x GROUP heads), attending the group's prefix keys through its prefix block
  table, flash-attention style (float32 online softmax, base 2). The shared K/V tile is loaded once for
  all those rows instead of once per sequence. Each group's prefix is cut into the same number of splits,
  chosen on the device from the step's tile count; each split writes a partial output and log-sum-exp;
- suffix pass: triton_decode's `_decode_kernel` on the suffix block tables and lengths (each row's keys
  after its group's prefix, or all of them for a row in no group). Its first split starts its online
  softmax from the row's prefix partials (triton_tiles.fold_partials) instead of from nothing, so with one
  split per row it writes the final output; with more, triton_decode's split merge follows, as in a plain
  decode. (A separate merge of prefix and suffix partials cost as much as the prefix pass: 8,192 tiny
  programs at the shared-prefix bench's shape.)
Grids depend on the metadata's capacity only (num_groups groups, group_rows' length), never on the groups'
sizes or prefix lengths, which the programs read on the device: the pass is CUDA-graph capturable, and a graph
captured for a capacity replays any plan within it (worker/cuda_graph.py).
FP8 caches are dequantized in registers as in triton_decode.
"""
import torch
import triton
import triton.language as tl

from nanovllm.attention.kv_store import FP8_DTYPE
from nanovllm.attention.metadata import CascadeMetadata
from nanovllm.attention.triton_decode import (DECODE_CONFIGS, FP8_DECODE_CONFIGS, MERGE_CHUNK, MIN_GROUP_ROWS,
                                              SPLIT_PROGRAMS_PER_SM, _decode_kernel, _merge_kernel, decode_splits)
from nanovllm.attention.triton_tiles import LOG2E, attend_tiles, check_attention_inputs, dot_precision, empty_state
from nanovllm.utils.triton_utils import num_sms

# Prefix pass tunables per head_dim: BLOCK_M (query rows per program), BLOCK_N (keys per tile), num_warps,
# num_stages (scripts/bench_cascade.py times them).
PREFIX_CONFIGS = {64: (64, 64, 4, 3), 128: (64, 64, 4, 3), 256: (64, 32, 8, 2)}
FP8_PREFIX_CONFIGS = {64: (64, 32, 4, 3), 128: (64, 32, 4, 3), 256: (64, 32, 8, 2)}
MAX_PREFIX_SPLITS = 16  # the prefix workspace holds this many splits per (sequence, head) at most
MIN_GROUPS_PAD = 16  # groups are read as a vector of this many (or the next power of two): one compiled variant


@triton.jit
def prefix_tiles(cu_group_rows_ptr, num_groups, SEQS_PER_TILE: tl.constexpr, GROUPS_PAD: tl.constexpr):
    """Per group (a [GROUPS_PAD] vector, 0 past num_groups): its first and end offsets in group_rows and its
    row tiles (SEQS_PER_TILE rows each). A step's tiles are its groups' tiles, group by group."""
    g = tl.arange(0, GROUPS_PAD)
    first = tl.load(cu_group_rows_ptr + g, mask=g < num_groups, other=0)
    end = tl.load(cu_group_rows_ptr + g + 1, mask=g < num_groups, other=0)
    return first, end, (end - first + SEQS_PER_TILE - 1) // SEQS_PER_TILE


@triton.jit
def prefix_split_count(num_tiles, target_programs, max_splits, KV_HEADS: tl.constexpr):
    """Splits of every group's prefix: as many as fit in target_programs (rounded down: a split more costs its
    partials' traffic and the suffix pass's fold), at least one, at most max_splits."""
    return tl.maximum(tl.minimum(target_programs // (KV_HEADS * tl.maximum(num_tiles, 1)), max_splits), 1)


# Everything that varies with the step is a runtime value (group count, splits, table width), read on the device
# where it depends on the groups: one compiled variant serves every step, and a CUDA graph replays any plan that
# fits its capacity (num_groups groups, group_rows' length in rows).
@triton.jit(do_not_specialize=["table_stride", "num_groups", "target_programs", "max_splits"])
def _prefix_kernel(q_ptr, q_stride_s, q_stride_h, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr,
                   prefix_tables_ptr, table_stride, prefix_lens_ptr, group_rows_ptr, cu_group_rows_ptr, num_groups,
                   part_out_ptr, part_lse_ptr, count_ptr, qk_scale, target_programs, max_splits, KV_HEADS: tl.constexpr,
                   GROUP: tl.constexpr, SEQS_PER_TILE: tl.constexpr, GROUPS_PAD: tl.constexpr,
                   HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   FP8: tl.constexpr, FP16_DOT: tl.constexpr, PRECISION: tl.constexpr):
    kv_head, tile, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    firsts, ends, tiles = prefix_tiles(cu_group_rows_ptr, num_groups, SEQS_PER_TILE, GROUPS_PAD)
    num_tiles = tl.sum(tiles, axis=0)
    num_splits = prefix_split_count(num_tiles, target_programs, max_splits, KV_HEADS)
    if (kv_head == 0) & (tile == 0) & (split == 0):
        tl.store(count_ptr, num_splits)  # for the suffix pass: how many partials each row in a group has
    if tile >= num_tiles or split >= num_splits:  # the grid is sized for the capacity, not this step
        return
    tiles_through = tl.cumsum(tiles, axis=0)  # tiles of groups 0..g
    group_id = tl.sum((tiles_through <= tile).to(tl.int32), axis=0)
    mine = tl.arange(0, GROUPS_PAD) == group_id
    first = tl.sum(tl.where(mine, firsts + (tile - tiles_through + tiles) * SEQS_PER_TILE, 0), axis=0)
    group_end = tl.sum(tl.where(mine, ends, 0), axis=0)
    prefix_len = tl.load(prefix_lens_ptr + group_id)
    split_len = ((prefix_len + BLOCK_N - 1) // BLOCK_N + num_splits - 1) // num_splits * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, prefix_len)  # <= start: an empty split

    i = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    member = i // GROUP  # query row i: head i % GROUP of the tile's member-th sequence
    heads = kv_head * GROUP + i % GROUP
    row_ok = (member < SEQS_PER_TILE) & (first + member < group_end)
    seqs = tl.load(group_rows_ptr + first + member, mask=row_ok, other=0).to(tl.int64)
    q = tl.load(q_ptr + seqs[:, None] * q_stride_s + heads[:, None] * q_stride_h + d[None, :],
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    if FP16_DOT:  # an FP8 cache: e4m3 -> fp16 is one instruction, e4m3 -> bf16 is not
        q = q.to(tl.float16)
    table_row = prefix_tables_ptr + group_id.to(tl.int64) * table_stride
    m, l, acc = empty_state(BLOCK_M, HEAD_DIM)
    m, l, acc = attend_tiles(q, table_row, start, end, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr, kv_head,
                             qk_scale, m, l, acc, BLOCK_M, KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, FP8, PRECISION)

    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    part = (seqs * (KV_HEADS * GROUP) + heads) * max_splits + split  # workspace [num_seqs, num_heads, max_splits]
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=row_ok[:, None])
    tl.store(part_lse_ptr + part, m + tl.log2(l), mask=row_ok)  # -inf for an empty split


def cascade_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cascade: CascadeMetadata,
                   scale: float, k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None, *,
                   out: torch.Tensor | None = None, prefix_splits: int | None = None,
                   suffix_splits: int | None = None, prefix_config: tuple[int, int, int, int] | None = None
                   ) -> torch.Tensor:
    """Attention of one query per sequence over its cached keys, a group's shared prefix read once.

    q [num_seqs, num_heads, head_dim] (any row stride, last dim contiguous); caches and scales as
    `paged_decode`'s; `cascade` describes the groups, prefixes and suffixes (see CascadeMetadata). Returns
    [num_seqs, num_heads, head_dim] in q's dtype (into `out`, contiguous, when given). prefix_splits /
    suffix_splits None: enough programs for the SMs; prefix_config None: PREFIX_CONFIGS[head_dim]
    (BLOCK_M, BLOCK_N, num_warps, num_stages). Raises ValueError for an unsupported head_dim, dtype or
    head count."""
    check_attention_inputs(q, k_cache, v_cache, k_scales, v_scales)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert block_size >= 16 and block_size & (block_size - 1) == 0, f"block_size {block_size}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    group = num_heads // num_kv_heads
    fp8 = k_cache.dtype == FP8_DTYPE
    scales = (k_scales, v_scales) if fp8 else (k_cache, v_cache)  # unused pointers when not FP8
    device = q.device
    if out is None:
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    if num_seqs == 0:
        return out
    fp16_dot, precision = fp8 and q.dtype == torch.bfloat16, dot_precision(q.dtype)

    # prefix pass: each group's shared keys once per tile of its rows. The grid covers the metadata's capacity
    # (num_groups groups over group_rows' rows); the programs read the real groups and split count on the device.
    block_m, block_n, num_warps, num_stages = prefix_config or (FP8_PREFIX_CONFIGS if fp8 else PREFIX_CONFIGS)[
        head_dim]
    block_m = max(block_m, triton.next_power_of_2(group))
    seqs_per_tile = block_m // group
    max_tiles = triton.cdiv(cascade.group_rows.shape[0], seqs_per_tile) + cascade.num_groups - 1
    if prefix_splits is None:
        target_programs = SPLIT_PROGRAMS_PER_SM * num_sms(device)
        max_splits = min(MAX_PREFIX_SPLITS, triton.cdiv(target_programs, num_kv_heads),
                         max(1, triton.cdiv(cascade.max_prefix_len, block_n)))
    else:  # exactly this many
        target_programs, max_splits = 1 << 30, prefix_splits
    groups_pad = max(MIN_GROUPS_PAD, triton.next_power_of_2(cascade.num_groups))
    prefix_out = torch.empty(num_seqs, num_heads, max_splits, head_dim, dtype=torch.float32, device=device)
    prefix_lse = torch.empty(num_seqs, num_heads, max_splits, dtype=torch.float32, device=device)
    prefix_count = torch.empty(1, dtype=torch.int32, device=device)  # the splits the programs chose
    prefix_tables = cascade.prefix_block_tables
    assert prefix_tables.stride(1) == 1 and prefix_tables.shape[0] == cascade.num_groups
    _prefix_kernel[(num_kv_heads, max_tiles, max_splits)](
        q, q.stride(0), q.stride(1), k_cache, v_cache, *scales, prefix_tables, prefix_tables.stride(0),
        cascade.prefix_lens, cascade.group_rows, cascade.cu_group_rows, cascade.num_groups, prefix_out, prefix_lse,
        prefix_count, scale * LOG2E, target_programs, max_splits, num_kv_heads, group, seqs_per_tile, groups_pad,
        head_dim, block_size, block_m, block_n, fp8, fp16_dot, precision, num_warps=num_warps, num_stages=num_stages)

    # suffix pass: the paged decode kernel over each row's keys after its prefix, its first split starting from
    # the row's prefix partials; then the plain decode's merge of the splits, if there are several (both without
    # programmatic dependent launch, which the decode kernel takes at one sequence only)
    block_n, num_warps, num_stages = (FP8_DECODE_CONFIGS if fp8 else DECODE_CONFIGS)[head_dim]
    tables, lens = cascade.suffix_block_tables, cascade.suffix_lens
    assert tables.stride(1) == 1 and tables.shape[0] == num_seqs == lens.shape[0]
    max_tiles = max(1, triton.cdiv(tables.shape[1] * block_size, block_n))
    if suffix_splits is None:
        suffix_splits, tiles_per_split = decode_splits(num_seqs, num_kv_heads, tables.shape[1] * block_size,
                                                       device, block_n)
    else:
        tiles_per_split = triton.cdiv(max_tiles, suffix_splits)
        suffix_splits = triton.cdiv(max_tiles, tiles_per_split)
    if suffix_splits > 1:
        suffix_out = torch.empty(num_seqs, num_heads, suffix_splits, head_dim, dtype=torch.float32, device=device)
        suffix_lse = torch.empty(num_seqs, num_heads, suffix_splits, dtype=torch.float32, device=device)
    else:
        suffix_out = suffix_lse = out  # unused
    _decode_kernel[(num_kv_heads, num_seqs, suffix_splits)](
        q, q.stride(0), q.stride(1), k_cache, v_cache, *scales, tables, tables.stride(0), lens, out, suffix_out,
        suffix_lse, scale * LOG2E, tiles_per_split * block_n, prefix_out, prefix_lse, max_splits, prefix_count,
        cascade.seq_prefix_lens, num_kv_heads, group, max(MIN_GROUP_ROWS, triton.next_power_of_2(group)), head_dim,
        block_size, block_n, suffix_splits > 1, True, fp8, fp16_dot, precision, False, num_warps=num_warps,
        num_stages=num_stages)
    if suffix_splits > 1:
        _merge_kernel[(num_seqs * num_heads,)](suffix_out, suffix_lse, out, suffix_splits, MERGE_CHUNK, head_dim,
                                               False)
    return out
