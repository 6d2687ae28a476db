"""The skinny linear (layers/skinny_gemm.py) against the layers' usual kernels at one to eight rows, on the GPU.

    python scripts/bench_skinny.py                   # Qwen3-0.6B's and Qwen3-8B's linears, bf16 and FP8
    python scripts/bench_skinny.py --sweep           # also every tile config in SWEEP, the best three printed
    python scripts/bench_skinny.py --rows 1 8 --models 8B --dtypes fp8

Per (model, linear, weight dtype, rows): microseconds per call and GB/s of weight bytes for the usual
path (bf16: torch's F.linear, cuBLAS; FP8: the FP8 linear, `fp8.apply`, activation quantization
included) and the skinny linear with the config it picks itself (with --sweep also the best three of
SWEEP's, "best" printing the fastest of them); times are medians of CUDA-graph
replays of calls that each read a different copy of the weight (graph_time in bench_fp8_gemm.py), so
the weight comes from HBM and launch overhead is out, as in a decode step's graph.
"""
import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch

from bench_fp8_gemm import HBM_BYTES_PER_S, L2_BYTES, graph_time
from nanovllm.layers.quantization.fp8 import apply, quantize_weight_blockwise
from nanovllm.layers.skinny_gemm import skinny_linear

SHAPES = {  # (N, K) per linear
    "0.6B": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)},
    "8B": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)},
}
# (BLOCK_N, BLOCK_K, num_warps, prefetch); a config is tried at a row count when its partial products
# take at most 64 float32 registers per thread
TILES = [(1, 1024, 4), (1, 2048, 4), (2, 512, 4), (2, 1024, 4), (2, 2048, 8), (4, 256, 4), (4, 512, 4),
         (4, 1024, 4), (4, 1024, 8), (8, 128, 4), (8, 256, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4),
         (16, 512, 8), (1, 512, 4), (1, 256, 4), (2, 256, 4), (4, 128, 4), (2, 128, 4), (1, 128, 4)]
SWEEP = [(*tile, prefetch) for tile in TILES for prefetch in (False, True)]


def fits(config, rows: int) -> bool:
    block_n, block_k, num_warps, _ = config
    return rows * block_n * block_k <= 64 * 32 * num_warps


def bench(model: str, name: str, N: int, K: int, fp8: bool, rows: int, sweep: bool, compile_only: bool = False):
    torch.manual_seed(0)
    weight_bytes = N * K * (1 if fp8 else 2)
    copies = 1 if compile_only else max(2, min(32, -(-4 * L2_BYTES // weight_bytes)))
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    if fp8:
        q, s = quantize_weight_blockwise(w, (128, 128))
        weights = [(q.clone(), s.clone()) for _ in range(copies)]
    else:
        weights = [(w.clone(), None) for _ in range(copies)]
    x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)

    def usual(w, s):
        return apply(x, w, s, None) if fp8 else torch.nn.functional.linear(x, w)

    want = usual(*weights[0]).float()
    configs = [None]  # skinny_linear's own choice (CONFIGS, or CONFIG_FEW_OUTPUTS at one row with few outputs)
    if sweep:
        configs += [c for c in SWEEP if fits(c, rows) and (not fp8 or (128 % c[0] == 0 and c[1] % 128 == 0))]
    if compile_only:
        for config in configs:
            skinny_linear(x, weights[0][0], None, weights[0][1], config=config)
        torch.cuda.synchronize()
        return
    t_usual = graph_time([lambda w=w, s=s: usual(w, s) for w, s in weights])
    results = []
    for config in configs:
        got = skinny_linear(x, weights[0][0], None, weights[0][1], config=config).float()
        err = ((got - want).norm() / want.norm()).item()
        # against the usual path: with FP8 that one also quantizes the activations (~2-3% apart)
        assert err < (6e-2 if fp8 else 2e-2), f"{model} {name} rows={rows} {config}: relative error {err:.2e}"
        t = graph_time([lambda w=w, s=s: skinny_linear(x, w, None, s, config=config) for w, s in weights])
        results.append((t, config))
    default = results[0]
    best = sorted(results[1:] or results, key=lambda r: r[0])[:3]

    def rate(t):
        return f"{t * 1e6:7.1f} us {weight_bytes / t / 1e12:4.2f} TB/s"
    print(f"{model:4s} {name:8s} {'fp8' if fp8 else 'bf16':4s} rows={rows} | floor "
          f"{weight_bytes / HBM_BYTES_PER_S * 1e6:6.1f} us | usual {rate(t_usual)} | skinny {rate(default[0])} "
          f"(default config) | best " + "; ".join(f"{rate(t)} {c}" for t, c in best), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--jobs", type=int, default=8, help="processes compiling the kernels first (into Triton's "
                        "cache) before anything is timed")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    cases = [(model, name, N, K, dtype == "fp8", rows, args.sweep) for dtype in args.dtypes for rows in args.rows
             for model in args.models for name, (N, K) in SHAPES[model].items()]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(compile_case, cases))
    for case in cases:
        bench(*case)


def compile_case(case):
    bench(*case, compile_only=True)


if __name__ == "__main__":
    main()
