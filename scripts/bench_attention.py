"""Time the Triton paged attention kernels on a GPU against the copy ceiling and flash-attn.

Decode at the bench shapes (256 sequences, 16 query / 8 KV heads, head_dim 128, contexts uniform in
[100, 2000], blocks shuffled through the cache) for each block size and bf16 / FP8 caches: median time of
CUDA-graph replays (triton.testing.do_bench, L2 flushed between runs), bytes moved (K + V of the real
contexts, FP8 scales, block tables, q, out) and TB/s; a sweep of the tunables (BLOCK_N, num_warps,
num_stages, num_splits), each output checked against the default's; flash_attn_with_kvcache at block 256.
Then prefill (16 x 1024 tokens; 1024 new tokens on a 512-token cached prefix) in TFLOP/s against
flash_attn_varlen_func. A compact table comes last.

    python scripts/bench_attention.py [--sweep small|full|none]
"""
import argparse
import itertools

import torch
import triton

from nanovllm.attention.kv_store import quantize_fp8
from nanovllm.attention.triton_decode import (CUDA_CORE_CONFIG, CUDA_CORE_MAX_GROUP, DECODE_CONFIGS, decode_splits,
                                              paged_decode)
from nanovllm.attention.triton_prefill import PREFILL_CONFIGS, paged_prefill

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError:
    flash_attn_varlen_func = flash_attn_with_kvcache = None

NUM_SEQS, NUM_HEADS, KV_HEADS, HEAD_DIM = 256, 16, 8, 128
MIN_CONTEXT, MAX_CONTEXT = 100, 2000
BLOCK_SIZES = (16, 32, 64, 128, 256)
PREFILL_SEQS, PREFILL_NEW, PREFILL_PREFIX = 16, 1024, 512
DECODE_SWEEPS = {  # (block_n, num_warps, num_stages) configs, and num_splits values tried at the default
    "none": ([], []),
    "small": ([(32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 2)], [1, 2, 4]),
    "full": (list(itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4, 5))), [1, 2, 3, 4, 8]),
}
PREFILL_SWEEPS = {"none": [], "small": [(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2)],
                  "full": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)))}
DEVICE = torch.device("cuda")


def median_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def graph_us(fn) -> tuple[float, torch.Tensor]:
    """Median time of CUDA-graph replays of fn (warmed up eagerly first), and its output."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return median_us(graph.replay), out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def copy_ceiling() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src))
    print(f"device-to-device copy of 1 GiB: {us:.0f} us, {2 * src.numel() / us / 1e6:.2f} TB/s (read + write)")
    return 2 * src.numel() / us / 1e6


def decode_inputs(block_size: int, fp8: bool, g: torch.Generator):
    """q, caches (shuffled blocks), scales, block tables, context lens, and the bytes one decode moves."""
    lens = torch.randint(MIN_CONTEXT, MAX_CONTEXT + 1, (NUM_SEQS,), generator=g)
    blocks = (lens + block_size - 1) // block_size
    width = -(-MAX_CONTEXT // block_size)
    perm = torch.randperm(int(blocks.sum()), generator=g)
    tables = torch.zeros(NUM_SEQS, width, dtype=torch.int32)
    used = 0
    for i, b in enumerate(blocks.tolist()):
        tables[i, :b] = perm[used:used + b]
        used += b
    shape = (used, block_size, KV_HEADS, HEAD_DIM)
    caches, scales = [], []
    for _ in range(2):
        x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
        if fp8:
            x, s = quantize_fp8(x)
            scales.append(s)
        caches.append(x)
    q = torch.randn(NUM_SEQS, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    keys = int(lens.sum()) * KV_HEADS
    moved = (2 * keys * HEAD_DIM * caches[0].element_size() + (2 * keys * 4 if fp8 else 0)
             + int(blocks.sum()) * 4 + 2 * q.numel() * q.element_size() + NUM_SEQS * 4)
    return (q, *caches, tables.to(DEVICE), lens.int().to(DEVICE), *(scales or [None, None])), moved


def bench_decode(sweep: str) -> list[tuple]:
    rows, g = [], torch.Generator().manual_seed(0)
    tile_configs, split_counts = DECODE_SWEEPS[sweep]
    for fp8, block_size in itertools.product((False, True), BLOCK_SIZES):
        (q, k_cache, v_cache, tables, lens, k_scales, v_scales), moved = decode_inputs(block_size, fp8, g)
        scale = HEAD_DIM ** -0.5

        def run(**tunables):
            return lambda: paged_decode(q, k_cache, v_cache, tables, lens, scale, k_scales, v_scales, **tunables)
        block_n, num_warps, num_stages = (CUDA_CORE_CONFIG[:2] + (1,) if fp8 and NUM_HEADS // KV_HEADS
                                          <= CUDA_CORE_MAX_GROUP else DECODE_CONFIGS[HEAD_DIM])
        splits, _ = decode_splits(NUM_SEQS, KV_HEADS, tables.shape[1] * block_size, DEVICE, block_n)
        default_config = (block_n, num_warps, num_stages, splits)
        default_us, ref = graph_us(run())
        best_us, best_config = default_us, default_config
        candidates = [dict(block_n=n, num_warps=w, num_stages=s) for n, w, s in tile_configs]
        candidates += [dict(num_splits=s) for s in split_counts if s != splits]
        for tunables in candidates:
            try:
                us, out = graph_us(run(**tunables))
            except Exception as e:  # e.g. out of shared memory for a large tile x stages
                print(f"  {tunables}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            err = rel_err(out, ref)
            if err > 1e-2:
                print(f"  {tunables}: MISMATCH, relative error {err:.1e} against the default config")
                continue
            if us < best_us:
                config = (tunables.get("block_n", block_n), tunables.get("num_warps", num_warps),
                          tunables.get("num_stages", num_stages), tunables.get("num_splits", splits))
                best_us, best_config = us, config
        flash_us = None
        if flash_attn_with_kvcache is not None and block_size == 256 and not fp8:
            flash_us, out = graph_us(lambda: flash_attn_with_kvcache(
                q.unsqueeze(1), k_cache, v_cache, cache_seqlens=lens, block_table=tables, softmax_scale=scale,
                causal=True).squeeze(1))
            print(f"  flash_attn_with_kvcache: {flash_us:.1f} us, relative difference {rel_err(ref, out):.1e}")
        name = f"decode {'fp8 ' if fp8 else 'bf16'} block {block_size:3d}"
        print(f"{name}: default {default_config} {default_us:.1f} us {moved / default_us / 1e6:.2f} TB/s; "
              f"best {best_config} {best_us:.1f} us {moved / best_us / 1e6:.2f} TB/s")
        rows.append((name, default_us, moved / default_us / 1e6, best_config, best_us, moved / best_us / 1e6,
                     flash_us))
    return rows


def bench_prefill(sweep: str) -> list[tuple]:
    rows, g = [], torch.Generator().manual_seed(1)
    num_seqs, new, scale = PREFILL_SEQS, PREFILL_NEW, HEAD_DIM ** -0.5
    for prefix, block_size in ((0, None), (0, 16), (0, 256), (PREFILL_PREFIX, 16), (PREFILL_PREFIX, 256)):
        total = prefix + new
        q = torch.randn(num_seqs * new, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        cu_q = torch.arange(0, num_seqs + 1, device=DEVICE, dtype=torch.int32) * new
        cu_k = torch.arange(0, num_seqs + 1, device=DEVICE, dtype=torch.int32) * total
        if block_size is None:
            k, v = (torch.randn(num_seqs * total, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
                    for _ in range(2))
            tables = None
        else:
            width = -(-total // block_size)
            blocks = torch.randperm(num_seqs * width, generator=g)
            tables = blocks.view(num_seqs, width).int().to(DEVICE)
            k, v = (torch.randn(num_seqs * width, block_size, KV_HEADS, HEAD_DIM, device=DEVICE,
                                dtype=torch.bfloat16) for _ in range(2))
        pairs = new * prefix + new * (new + 1) // 2  # attended (query, key) pairs per sequence and head
        flops = 4 * HEAD_DIM * pairs * NUM_HEADS * num_seqs

        def run(**tunables):
            return paged_prefill(q, k, v, cu_q, cu_k, new, scale, tables, **tunables)
        ref = run()
        default_us = median_us(run)
        best_us, best_config = default_us, PREFILL_CONFIGS[HEAD_DIM]
        for m, n, w, s in PREFILL_SWEEPS[sweep]:
            try:
                out = run(block_m=m, block_n=n, num_warps=w, num_stages=s)
                err = rel_err(out, ref)
                us = median_us(lambda: run(block_m=m, block_n=n, num_warps=w, num_stages=s))
            except Exception as e:
                print(f"  prefill config {(m, n, w, s)}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            if err > 1e-2:
                print(f"  prefill config {(m, n, w, s)}: MISMATCH, relative error {err:.1e}")
            elif us < best_us:
                best_us, best_config = us, (m, n, w, s)
        flash_us = None
        if flash_attn_varlen_func is not None and block_size in (None, 256):
            def flash():
                return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=new,
                                              max_seqlen_k=total, softmax_scale=scale, causal=True,
                                              block_table=tables)
            flash_us = median_us(flash)
            print(f"  flash_attn_varlen_func: {flash_us:.0f} us, relative difference {rel_err(ref, flash()):.1e}")
        name = f"prefill {'contig' if block_size is None else f'block {block_size}'} prefix {prefix}"
        print(f"{name}: default {default_us:.0f} us {flops / default_us / 1e6:.0f} TFLOP/s; best {best_config} "
              f"{best_us:.0f} us {flops / best_us / 1e6:.0f} TFLOP/s")
        rows.append((name, default_us, flops / default_us / 1e6, best_config, best_us, flops / best_us / 1e6,
                     flash_us and flops / flash_us / 1e6))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", choices=sorted(DECODE_SWEEPS), default="small")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__,
          "flash-attn", "yes" if flash_attn_with_kvcache else "no")
    ceiling = copy_ceiling()
    decode_rows = bench_decode(args.sweep)
    prefill_rows = bench_prefill(args.sweep)
    print(f"\n{'case':30s} {'default':>9s} {'TB/s':>6s}  {'best config':22s} {'best':>9s} {'TB/s':>6s} "
          f"{'flash':>9s}   (copy ceiling {ceiling:.2f} TB/s)")
    for name, us, rate, config, best_us, best_rate, flash_us in decode_rows:
        flash = f"{flash_us:7.1f}us" if flash_us else "        -"
        print(f"{name:30s} {us:7.1f}us {rate:6.2f}  {str(config):22s} {best_us:7.1f}us {best_rate:6.2f} {flash}")
    print(f"\n{'case':30s} {'default':>9s} {'TFLOP/s':>7s} {'best config':22s} {'best':>9s} {'TFLOP/s':>7s} "
          f"{'flash TFLOP/s':>13s}")
    for name, us, rate, config, best_us, best_rate, flash_rate in prefill_rows:
        flash = f"{flash_rate:13.0f}" if flash_rate else "            -"
        print(f"{name:30s} {us:7.0f}us {rate:7.0f} {str(config):22s} {best_us:7.0f}us {best_rate:7.0f} {flash}")


if __name__ == "__main__":
    main()
