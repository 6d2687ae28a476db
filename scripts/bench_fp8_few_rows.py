"""The FP8 linear's few-rows kernel (layers/quantization/fp8_few_rows.py) against the FP8 GEMM path and the
skinny kernel, on Qwen3-0.6B's and Qwen3-8B's linears, on the GPU.

    python scripts/bench_fp8_few_rows.py                 # rows 1 and 8; the kernel's own config, 3 and 6 stages
    python scripts/bench_fp8_few_rows.py --sweep         # also BLOCK_N 16-64 x split-K 1-16 x 3 / 6 stages
    python scripts/bench_fp8_few_rows.py --rows 1 4 16

Per (model, linear, rows): the weights' byte floor, then microseconds and weight TB/s of the GEMM path
(activation quantization, the Triton GEMM, the sum of its splits: what `apply` ran at these rows before), the
skinny kernel (CUDA-core products), the few-rows kernel with its own config (`few_rows_config`, NUM_STAGES), and
the best three of the other configs. Times as in bench_fp8_gemm.py: medians of CUDA-graph replays of calls that
each read their own copy of the weight, so the weight comes from HBM. Every result is checked against the GEMM
path (relative error below 1e-2).
"""
import argparse

import torch

from bench_fp8_gemm import HBM_BYTES_PER_S, L2_BYTES, graph_time
from nanovllm.layers.quantization.fp8 import quantize_weight_blockwise
from nanovllm.layers.quantization.fp8_few_rows import NUM_STAGES, few_rows_config, fp8_few_rows_matmul
from nanovllm.layers.quantization.fp8_kernels import fp8_block_matmul, per_token_group_quant_fp8
from nanovllm.layers.skinny_gemm import skinny_linear
from nanovllm.utils.triton_utils import num_sms

SHAPES = {  # (N, K) per linear
    "0.6B": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)},
    "8B": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)},
}
SWEEP = [(block_n, split_k, stages) for block_n in (16, 32, 64) for split_k in (1, 2, 3, 4, 6, 8, 12, 16)
         for stages in (3, 6)]


def bench(model: str, name: str, N: int, K: int, rows: int, sweep: bool):
    torch.manual_seed(0)
    copies = max(2, min(32, -(-4 * L2_BYTES // (N * K))))
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    q, s = quantize_weight_blockwise(w, (128, 128))
    weights = [(q.clone(), s.clone()) for _ in range(copies)]
    x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)

    def gemm_path(w, s):
        return fp8_block_matmul(*per_token_group_quant_fp8(x), w, s, torch.bfloat16)

    want = gemm_path(*weights[0]).float()
    t_gemm = graph_time([lambda w=w, s=s: gemm_path(w, s) for w, s in weights])
    t_skinny = graph_time([lambda w=w, s=s: skinny_linear(x, w, None, s) for w, s in weights])
    own = few_rows_config(N, K, num_sms(x.device))
    configs = [(*own, NUM_STAGES)] + [(*own, stages) for stages in (3, 6) if stages != NUM_STAGES]
    if sweep:
        k_blocks = -(-K // 128)
        configs += [c for c in SWEEP if c[1] <= k_blocks and c not in configs]
    results = []
    for block_n, split_k, stages in configs:
        got = fp8_few_rows_matmul(x, *weights[0], (block_n, split_k), num_stages=stages).float()
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-2, f"{model} {name} rows={rows} {(block_n, split_k, stages)}: relative error {err:.2e}"
        t = graph_time([lambda w=w, s=s: fp8_few_rows_matmul(x, w, s, (block_n, split_k), num_stages=stages)
                        for w, s in weights])
        results.append((t, (block_n, split_k, stages)))

    def rate(t):
        return f"{t * 1e6:6.1f} us {N * K / t / 1e12:4.2f} TB/s"
    best = sorted(results[1:])[:3]
    print(f"{model:4s} {name:7s} rows={rows} | floor {N * K / HBM_BYTES_PER_S * 1e6:5.1f} us | GEMM path "
          f"{rate(t_gemm)} | skinny {rate(t_skinny)} | few rows {rate(results[0][0])} {results[0][1]} | others "
          + "; ".join(f"{rate(t)} {c}" for t, c in best), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    for rows in args.rows:
        for model, shapes in SHAPES.items():
            for name, (N, K) in shapes.items():
                bench(model, name, N, K, rows, args.sweep)


if __name__ == "__main__":
    main()
