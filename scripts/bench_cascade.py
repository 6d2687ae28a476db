"""Time cascade decode (attention/triton_cascade.py) against the plain paged decode on a GPU.

Shape (issue 14): 512 sequences behind one 2,048-token shared prefix, each with randint(32, 256) own
tokens; 16 query / 8 KV heads of 128, bf16 cache, blocks shuffled through the cache. Each variant runs
as a CUDA-graph replay (triton.testing.do_bench median, L2 flushed), so launch overhead is not counted;
the engine runs cascade steps eagerly. Bytes: the K/V a step must read (plain: every sequence's whole
context; cascade: the prefix once plus each sequence's own keys) plus q and out; TB/s = those bytes over
the time, so both rates measure against the same floor of their own work. Also a sweep of the prefix
pass's tile config and split count, each checked against the plain output.

    python scripts/bench_cascade.py [--block-size 16] [--num-seqs 512] [--prefix 2048] [--groups 1]
"""
import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import graph_us, median_us  # noqa: E402
from nanovllm.attention import CascadeMetadata  # noqa: E402
from nanovllm.attention.triton_cascade import PREFIX_CONFIGS, cascade_decode  # noqa: E402
from nanovllm.attention.triton_decode import paged_decode  # noqa: E402

NUM_HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
OWN_MIN, OWN_MAX = 32, 256
PREFIX_SWEEP = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 4), (32, 64, 4, 3), (128, 64, 4, 2)]
SPLIT_SWEEP = [1, 2, 4, 8]
DEVICE = torch.device("cuda")


def inputs(num_seqs: int, prefix: int, groups: int, block_size: int, g: torch.Generator):
    """q, caches, full tables and lengths (the plain path's), the CascadeMetadata, and the bytes each reads."""
    own = torch.randint(OWN_MIN, OWN_MAX + 1, (num_seqs,), generator=g)
    prefix_blocks = prefix // block_size
    own_blocks = (own + block_size - 1) // block_size
    num_blocks = groups * prefix_blocks + int(own_blocks.sum())
    perm = torch.randperm(num_blocks, generator=g)
    prefix_tables = perm[:groups * prefix_blocks].view(groups, prefix_blocks)
    width = prefix_blocks + int(own_blocks.max())
    full = torch.zeros(num_seqs, width, dtype=torch.int32)
    suffix = torch.zeros(num_seqs, int(own_blocks.max()), dtype=torch.int32)
    used = groups * prefix_blocks
    group_of = torch.arange(num_seqs) % groups  # groups interleaved in the batch
    for i, b in enumerate(own_blocks.tolist()):
        suffix[i, :b] = perm[used:used + b]
        full[i, :prefix_blocks] = prefix_tables[group_of[i]]
        full[i, prefix_blocks:prefix_blocks + b] = suffix[i, :b]
        used += b
    k_cache, v_cache = (torch.randn(num_blocks, block_size, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
                        for _ in range(2))
    q = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    rows = [torch.nonzero(group_of == gid).flatten() for gid in range(groups)]
    ints = lambda t: t.to(DEVICE, torch.int32)  # noqa: E731
    meta = CascadeMetadata(ints(prefix_tables), ints(torch.full((groups,), prefix)), ints(torch.cat(rows)),
                           ints(torch.tensor([0] + [len(r) for r in rows]).cumsum(0)),
                           ints(torch.full((num_seqs,), prefix)), ints(suffix), ints(own), num_groups=groups,
                           max_prefix_len=prefix)
    token_bytes = 2 * KV_HEADS * HEAD_DIM * 2  # K and V of one token, bf16
    qo_bytes = 2 * q.numel() * 2
    plain_bytes = int((own + prefix).sum()) * token_bytes + qo_bytes
    cascade_bytes = (groups * prefix + int(own.sum())) * token_bytes + qo_bytes
    return q, k_cache, v_cache, ints(full), ints(own + prefix), meta, plain_bytes, cascade_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-seqs", type=int, default=512)
    parser.add_argument("--prefix", type=int, default=2048, help="shared tokens (a multiple of the block size)")
    parser.add_argument("--groups", type=int, default=1, help="distinct shared prefixes, rows interleaved")
    parser.add_argument("--sweep", action="store_true", help="also time the prefix pass's tile configs x splits")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__)
    g = torch.Generator().manual_seed(0)
    q, k_cache, v_cache, full, lens, meta, plain_bytes, cascade_bytes = inputs(
        args.num_seqs, args.prefix, args.groups, args.block_size, g)
    scale = HEAD_DIM ** -0.5
    plain_us, ref = graph_us(lambda: paged_decode(q, k_cache, v_cache, full, lens, scale))
    cascade_us, out = graph_us(lambda: cascade_decode(q, k_cache, v_cache, meta, scale))
    eager_us = median_us(lambda: cascade_decode(q, k_cache, v_cache, meta, scale))
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"{args.num_seqs} seqs x ({args.prefix} shared in {args.groups} group(s) + {OWN_MIN}-{OWN_MAX} own), "
          f"{NUM_HEADS}/{KV_HEADS} heads of {HEAD_DIM}, bf16, block {args.block_size}")
    print(f"plain decode:   {plain_us:8.1f} us  {plain_bytes / 1e6:8.1f} MB  {plain_bytes / plain_us / 1e6:5.2f} TB/s")
    print(f"cascade decode: {cascade_us:8.1f} us  {cascade_bytes / 1e6:8.1f} MB  "
          f"{cascade_bytes / cascade_us / 1e6:5.2f} TB/s  (eager call {eager_us:.1f} us)")
    print(f"speedup {plain_us / cascade_us:.2f}x, relative difference {err:.1e}")
    if not args.sweep:
        return
    default = PREFIX_CONFIGS[HEAD_DIM]
    for config, splits in itertools.product(PREFIX_SWEEP, [None] + SPLIT_SWEEP):
        try:
            us, out = graph_us(lambda: cascade_decode(q, k_cache, v_cache, meta, scale, prefix_config=config,
                                                      prefix_splits=splits))
        except Exception as e:  # e.g. out of shared memory
            print(f"  prefix config {config} splits {splits}: failed ({type(e).__name__}: {str(e)[:80]})")
            continue
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        flag = " MISMATCH" if err > 1e-2 else ""
        mark = " (default)" if config == default and splits is None else ""
        print(f"  prefix config {config} splits {splits}: {us:8.1f} us  "
              f"{cascade_bytes / us / 1e6:5.2f} TB/s{mark}{flag}")


if __name__ == "__main__":
    main()
