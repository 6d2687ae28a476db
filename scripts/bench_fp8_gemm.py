"""The FP8 linear against bf16 torch.matmul on Qwen3-8B's linear shapes, on the GPU.

    python scripts/bench_fp8_gemm.py            # all shapes, M = 1, 16, 256, 4096; then the logit check
    python scripts/bench_fp8_gemm.py --sweep    # also time other tile configs per shape and M
    python scripts/bench_fp8_gemm.py --m 32 64 128   # other row counts

Per (shape, M): the median time of one call, timed as CUDA-graph replays of calls that each read
a different copy of the weights (so that W comes from HBM, not L2, and launch overhead is out),
for the activation quantization, the Triton GEMM, the whole FP8 linear (`apply`: Triton below
CUBLAS_MIN_ROWS rows, cuBLAS's block-scaled GEMM from there where it runs), each of its two paths
with its quantization, and bf16 torch.matmul; GB/s of
weight bytes, TFLOP/s, and the fraction of the floor max(weight bytes / HBM_BW, flops / peak).
Correctness: the FP8 linear against float32 on the dequantized weights, and against bf16 on the
original weights (the quantization error). Last, a random-weight stack of Qwen3-8B MLP blocks
(RMSNorm, gate_up, SiLU-and-mul, down, residual) and an LM head in bf16 vs FP8: max / mean abs
logit error and top-1 agreement over 256 tokens.
"""
import argparse
import math
import statistics

import torch
import torch.nn.functional as F

from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from nanovllm.layers.quantization.config import Fp8Config
from nanovllm.layers.quantization.fp8 import apply, dequantize_weight_blockwise, quantize_weight_blockwise
from nanovllm.layers.quantization.fp8_kernels import (Fp8GemmConfig, cublas_block_matmul, cublas_supported,
                                                      fp8_block_matmul, gemm_config,
                                                      per_token_group_quant_fp8)
from nanovllm.utils.triton_utils import num_sms

HBM_BYTES_PER_S = 4.3e12  # H200, achievable
BF16_FLOPS = 790e12  # H200 dense
FP8_FLOPS = 2 * BF16_FLOPS
L2_BYTES = 50 * 2 ** 20
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}  # (N, K)
MS = (1, 16, 256, 4096)
SWEEP = [Fp8GemmConfig(bm, bn, sk, nw, ns) for bm, bn, sk, nw, ns in (
    (16, 64, 1, 4, 4), (16, 64, 4, 4, 4), (16, 128, 1, 4, 4), (16, 128, 2, 4, 4), (16, 32, 1, 2, 5),
    (32, 64, 1, 4, 4), (64, 64, 1, 4, 3), (64, 128, 1, 4, 3), (64, 128, 2, 4, 3), (128, 128, 1, 8, 3),
    (128, 128, 1, 4, 3), (128, 256, 1, 8, 3))]


def graph_time(calls: list, replays: int = 20) -> float:
    """Median seconds per call, the calls captured in one CUDA graph (after a warm-up run)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def bench_shape(name: str, N: int, K: int, M: int, sweep: bool):
    torch.manual_seed(0)
    copies = max(2, min(16, math.ceil(4 * L2_BYTES / (N * K))))  # FP8 copies that overflow L2 four times
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    w_q, w_s = quantize_weight_blockwise(w, (128, 128))
    fp8_weights = [(w_q.clone(), w_s.clone()) for _ in range(copies)]
    bf16_weights = [w.clone() for _ in range(max(2, copies // 2))]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    x_q, x_s = per_token_group_quant_fp8(x)

    # correctness
    y = apply(x, w_q, w_s, None).float()
    ref_deq = x.float() @ dequantize_weight_blockwise(w_q, w_s, (128, 128), torch.float32).T
    ref_bf16 = (x @ w.T).float()
    err_deq = ((y - ref_deq).norm() / ref_deq.norm()).item()
    err_bf16 = ((y - ref_bf16).norm() / ref_bf16.norm()).item()

    t_quant = graph_time([lambda: per_token_group_quant_fp8(x)])
    t_gemm = graph_time([lambda q=q, s=s: fp8_block_matmul(x_q, x_s, q, s, torch.bfloat16) for q, s in fp8_weights])
    t_fp8 = graph_time([lambda q=q, s=s: apply(x, q, s, None) for q, s in fp8_weights])
    t_bf16 = graph_time([lambda b=b: torch.matmul(x, b.T) for b in bf16_weights])
    t_triton = graph_time([lambda q=q, s=s: fp8_block_matmul(*per_token_group_quant_fp8(x), q, s, torch.bfloat16)
                           for q, s in fp8_weights])
    paths = f"triton {t_triton * 1e6:8.1f} us"
    if cublas_supported(x.device):
        t_cublas = graph_time([lambda q=q, s=s: cublas_block_matmul(x, q, s, torch.bfloat16) for q, s in fp8_weights])
        y_cublas = cublas_block_matmul(x, w_q, w_s, torch.float32)
        err_cublas = ((y_cublas - ref_deq).norm() / ref_deq.norm()).item()
        paths += f", cublas {t_cublas * 1e6:8.1f} us (rel err {err_cublas:.1e})"
    flops = 2 * M * N * K
    floor_fp8 = max(N * K / HBM_BYTES_PER_S, flops / FP8_FLOPS)
    floor_bf16 = max(2 * N * K / HBM_BYTES_PER_S, flops / BF16_FLOPS)
    config = gemm_config(M, N, K, num_sms(x.device))
    print(f"{name:8s} M={M:5d} | fp8 linear {t_fp8 * 1e6:8.1f} us (quant {t_quant * 1e6:6.1f}, "
          f"gemm {t_gemm * 1e6:8.1f}) "
          f"{N * K / t_gemm / 1e9:7.0f} GB/s {flops / t_gemm / 1e12:6.1f} TFLOP/s, floor {floor_fp8 / t_fp8:5.1%} | "
          f"bf16 {t_bf16 * 1e6:8.1f} us {2 * N * K / t_bf16 / 1e9:7.0f} GB/s {flops / t_bf16 / 1e12:6.1f} TFLOP/s, "
          f"floor {floor_bf16 / t_bf16:5.1%} | speed-up {t_bf16 / t_fp8:4.2f}x | rel err vs dequant {err_deq:.1e}, "
          f"vs bf16 {err_bf16:.1e} | tiles {config.block_m}x{config.block_n} split {config.split_k} | {paths}")
    assert err_deq < 3e-2, f"{name} M={M}: FP8 linear off the dequantized reference by {err_deq:.2e}"
    if sweep:
        results = []
        for candidate in SWEEP:
            try:
                t = graph_time([lambda q=q, s=s: fp8_block_matmul(x_q, x_s, q, s, torch.bfloat16, candidate)
                                for q, s in fp8_weights])
            except Exception as e:  # a tile that does not fit (shared memory, registers)
                print(f"    {candidate}: {type(e).__name__}")
                continue
            results.append((t, candidate))
        results.sort(key=lambda r: r[0])
        for t, candidate in results[:3]:
            print(f"    {t * 1e6:8.1f} us  {candidate}")


class MlpStack(torch.nn.Module):
    """RMSNorm -> gate_up -> SiLU-and-mul -> down -> residual, `layers` times; then an LM head."""

    def __init__(self, hidden: int, intermediate: int, layers: int, vocab: int, quant_config: Fp8Config | None):
        super().__init__()
        self.gate_up = torch.nn.ModuleList(
            MergedColumnParallelLinear(hidden, [intermediate] * 2, quant_config=quant_config,
                                       prefix=f"layers.{i}.gate_up_proj") for i in range(layers))
        self.down = torch.nn.ModuleList(RowParallelLinear(intermediate, hidden, quant_config=quant_config,
                                                          prefix=f"layers.{i}.down_proj") for i in range(layers))
        self.act = SiluAndMul()
        self.lm_head = torch.nn.Parameter(torch.empty(vocab, hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for gate_up, down in zip(self.gate_up, self.down):
            x = x + down(self.act(gate_up(F.rms_norm(x, x.shape[-1:]))))
        return F.linear(F.rms_norm(x, x.shape[-1:]), self.lm_head).float()  # [tokens, vocab]


@torch.no_grad()
def logit_error(tokens: int = 256, layers: int = 8, vocab: int = 32000):
    torch.set_default_dtype(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    models = []
    for quant_config in (None, Fp8Config()):
        with torch.device("cuda"):
            model = MlpStack(4096, 12288, layers, vocab, quant_config)
        gen.manual_seed(0)  # the same random weights in both
        for param in model.parameters():
            param.normal_(0, 0.02, generator=gen)
        for module in model.modules():
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
        models.append(model)
    torch.set_default_dtype(torch.float32)
    assert models[1].gate_up[0].weight.dtype == torch.float8_e4m3fn
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref, got = models[0](x), models[1](x)
    error = (got - ref).abs()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"logits of {layers} Qwen3-8B MLP blocks + LM head, bf16 vs FP8, {tokens} tokens: max abs error "
          f"{error.max():.4f}, mean abs error {error.mean():.4f} (logit std {ref.std():.3f}), "
          f"top-1 agreement {top1:.1%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time other tile configs")
    parser.add_argument("--m", type=int, nargs="+", default=MS, help="row counts (default: %(default)s)")
    parser.add_argument("--no-logits", action="store_true", help="skip the logit check")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), f"{num_sms(torch.device('cuda'))} SMs, "
          f"cuBLAS block-scaled FP8: {cublas_supported(torch.device('cuda'))}")
    for M in args.m:
        for name, (N, K) in SHAPES.items():
            bench_shape(name, N, K, M, args.sweep)
    if not args.no_logits:
        logit_error()


if __name__ == "__main__":
    main()
