"""Cascade decode (triton_cascade, and the torch backend's) against the plain float32 decode reference.

A case: groups of rows whose block tables start with the same blocks (the group's prefix, whole blocks),
each row with its own suffix blocks after them (0 keys up to several blocks), and rows in no group, all
interleaved in the batch so that a group's rows are not contiguous. The reference attends every row over
its full table (prefix blocks + suffix blocks) with kernel_checks.attention's decode_reference. Cache rows
no sequence wrote hold NaN, so a read past a prefix or a suffix shows.
"""
import torch

from kernel_checks.attention import DTYPES, _assert_close, _paged_cache, _strided, decode_reference
from nanovllm.attention import CascadeMetadata
from nanovllm.attention.kv_store import FP8_DTYPE
from nanovllm.attention import triton_cascade
from nanovllm.attention.triton_cascade import cascade_decode

# (prefix blocks, suffix lengths of the members); then the suffix lengths of rows in no group
GROUPS = ((3, (5, 0, 17, 40, 1, 33, 16, 2, 9, 30)), (1, (1, 16)), (2, (63, 7, 20)))
LONE = (0, 12, 50)


def cascade_case(device, block_size, head_dim, group, cache_dtype, dtype=torch.bfloat16, kv_heads=2,
                 groups=GROUPS, lone=LONE, seed=0):
    """(q, k_cache, v_cache, k_scales, v_scales, CascadeMetadata, full block tables, context lens)."""
    g = torch.Generator().manual_seed(seed)
    prefix_lens = [k * block_size for k, _ in groups]
    suffixes = [n for _, members in groups for n in members] + list(lone)
    k_cache, v_cache, k_scales, v_scales, tables = _paged_cache(prefix_lens + suffixes, block_size, kv_heads,
                                                                head_dim, cache_dtype, device, g)
    tables = tables.cpu()
    prefix_tables, suffix_tables = tables[:len(groups)], tables[len(groups):]
    num_seqs = len(suffixes)
    order = torch.randperm(num_seqs, generator=g).tolist()  # batch row of the i-th suffix
    full = torch.zeros(num_seqs, tables.shape[1] * 2, dtype=torch.int32)
    seq_suffix = torch.zeros(num_seqs, tables.shape[1], dtype=torch.int32)
    seq_prefix_lens, suffix_lens, context_lens = [0] * num_seqs, [0] * num_seqs, [0] * num_seqs
    group_rows, cu_group_rows, i = [], [0], 0
    for gid, (k, members) in enumerate(groups):
        rows = []
        for n in members:
            row = order[i]
            full[row, :k] = prefix_tables[gid, :k]
            full[row, k:k + tables.shape[1]] = suffix_tables[i]
            seq_suffix[row] = suffix_tables[i]
            seq_prefix_lens[row], suffix_lens[row], context_lens[row] = k * block_size, n, k * block_size + n
            rows.append(row)
            i += 1
        group_rows += sorted(rows)
        cu_group_rows.append(len(group_rows))
    for n in lone:
        row = order[i]
        full[row, :tables.shape[1]] = seq_suffix[row] = suffix_tables[i]
        suffix_lens[row] = context_lens[row] = n
        i += 1

    def ints(values):
        return torch.tensor(values, dtype=torch.int32, device=device)
    meta = CascadeMetadata(prefix_tables.to(device), ints(prefix_lens), ints(group_rows), ints(cu_group_rows),
                           ints(seq_prefix_lens), seq_suffix.to(device), ints(suffix_lens), num_groups=len(groups),
                           max_prefix_len=max(prefix_lens))
    q = _strided(num_seqs, kv_heads * group, head_dim, dtype, device, g)
    return q, k_cache, v_cache, k_scales, v_scales, meta, full.to(device), ints(context_lens)


def with_room(meta: CascadeMetadata, groups: int, rows: int) -> CascadeMetadata:
    """`meta` as a CUDA graph's buffers hold it: room for `groups` more groups (empty: cu_group_rows repeats
    its last offset) and `rows` more grouped rows, the unused entries holding garbage."""
    def pad(t, n, value):
        return torch.cat([t, torch.full((n, *t.shape[1:]), value, dtype=t.dtype, device=t.device)])
    return CascadeMetadata(pad(meta.prefix_block_tables, groups, 123456), pad(meta.prefix_lens, groups, 1 << 20),
                           pad(meta.group_rows, rows, 123456), pad(meta.cu_group_rows, groups, meta.cu_group_rows[-1]),
                           meta.seq_prefix_lens, meta.suffix_block_tables, meta.suffix_lens,
                           num_groups=meta.num_groups + groups, max_prefix_len=meta.max_prefix_len + 1000)


def check_cascade(device, block_size, head_dim, group, cache_dtype, dtype=torch.bfloat16,
                  splits=((None, None), (1, 1), (2, 1), (3, 2)), prefix_config=None, room=(0, 0)):
    """`room`: (groups, rows) of unused capacity in the metadata (a CUDA graph's plan)."""
    q, k_cache, v_cache, k_scales, v_scales, meta, full, context_lens = cascade_case(
        device, block_size, head_dim, group, cache_dtype, dtype, seed=block_size + head_dim + group)
    if room != (0, 0):
        meta = with_room(meta, *room)
    scale = head_dim ** -0.5
    ref = decode_reference(q, k_cache, v_cache, full, context_lens, scale, k_scales, v_scales)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for prefix_splits, suffix_splits in splits:
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
        cascade_decode(q, k_cache, v_cache, meta, scale, k_scales, v_scales, out=out, prefix_splits=prefix_splits,
                       suffix_splits=suffix_splits, prefix_config=prefix_config)
        _assert_close(out, ref, tol, f"cascade block_size={block_size} head_dim={head_dim} group={group} "
                                     f"cache={cache_dtype} q={dtype} splits={prefix_splits, suffix_splits} "
                                     f"room={room}")


def check(device, block_sizes=(16, 32), head_dims=(64, 128), groups=(1, 2, 3), fp8=True,
          query_dtypes=("float32",), prefix_config=None, merge_chunk=None):
    """Every block size x head_dim x cache dtype (bf16, and FP8 if `fp8`), the GQA groups cycled over them
    (3: a group that is not a power of two); then each extra query dtype once with a same-dtype cache.
    `merge_chunk`: split partials merged per loop step (a small one: several steps, a partial last one)."""
    prefix_config = tuple(prefix_config) if prefix_config else None
    if merge_chunk is not None:
        triton_cascade.MERGE_CHUNK = merge_chunk
    cache_dtypes = [torch.bfloat16] + ([FP8_DTYPE] if fp8 else [])
    configs = [(b, d, c) for b in block_sizes for d in head_dims for c in cache_dtypes]
    for i, (block_size, head_dim, cache_dtype) in enumerate(configs):
        check_cascade(device, block_size, head_dim, groups[i % len(groups)], cache_dtype,
                      prefix_config=prefix_config, room=(5, 40) if i % 2 else (0, 0))
    for name in query_dtypes:
        dtype = DTYPES[name]
        check_cascade(device, block_sizes[0], head_dims[0], groups[-1], dtype, dtype, splits=((None, None),),
                      prefix_config=prefix_config)
