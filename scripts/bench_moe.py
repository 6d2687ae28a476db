"""Time the fused MoE layer alone on the GPU at Qwen3-30B-A3B's layer shape (hidden 2048, 128
experts, top-8, moe_intermediate_size 768, bf16), random router logits and weights.

For each number of tokens: a correctness check of `fused_experts_triton` against the torch path
(`fused_experts_torch` in float32 on the same bf16 inputs), then the median time of the whole
layer (`FusedMoE.forward`: routing, align, the two grouped GEMMs, the top-k sum) replayed in a CUDA
graph (as decode runs) and eagerly, the bytes of expert weights it must read (distinct experts hit
x 3 x hidden x I x 2 bytes) and what that is as GB/s against the H200's ~4.3 TB/s, and useful
TFLOP/s (2 x pairs x 3 x hidden x I). `--sweep` also times each tile config of SWEEP per size.

    python scripts/bench_moe.py [--tokens 1 64 256 4096] [--sweep]
"""
import argparse
import statistics

import torch

from nanovllm.layers.fused_moe import FusedMoE, fused_experts_torch, select_experts
from nanovllm.layers.fused_moe_triton import MoeTileConfig, fused_experts_triton, tile_config

HIDDEN, NUM_EXPERTS, TOP_K, INTERMEDIATE = 2048, 128, 8, 768
PEAK_BYTES_PER_S = 4.3e12  # H200 HBM3e
SWEEP = [MoeTileConfig(*c) for c in [
    (16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4), (16, 64, 64, 1, 4, 5), (16, 128, 64, 1, 4, 4),
    (32, 64, 64, 4, 4, 4), (32, 128, 64, 4, 4, 4), (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 3), (64, 256, 64, 8, 8, 3)]]


def median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn):
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 4096])
    parser.add_argument("--sweep", action="store_true", help="also time every tile config of SWEEP")
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    with torch.device(device):
        layer = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE, renormalize=True).to(dtype)
    layer.w13_weight.data.normal_(0, HIDDEN ** -0.5)
    layer.w2_weight.data.normal_(0, INTERMEDIATE ** -0.5)
    w13, w2 = layer.w13_weight.data, layer.w2_weight.data
    print(f"{torch.cuda.get_device_name()}: hidden {HIDDEN}, {NUM_EXPERTS} experts, top-{TOP_K}, "
          f"I {INTERMEDIATE}, bf16")
    print(f"{'tokens':>6} {'experts hit':>11} {'MB read':>8} {'graph ms':>9} {'eager ms':>9} {'GB/s':>7} "
          f"{'of peak':>7} {'TFLOP/s':>8} {'max err':>8}  tiles")
    for num_tokens in args.tokens:
        x = torch.randn(num_tokens, HIDDEN, device=device, dtype=dtype)
        router_logits = torch.randn(num_tokens, NUM_EXPERTS, device=device, dtype=dtype)
        topk_weights, topk_ids = select_experts(router_logits, TOP_K, renormalize=True)

        ours = fused_experts_triton(x, w13, w2, topk_weights, topk_ids).float()
        ref = fused_experts_torch(x.float(), w13.float(), w2.float(), topk_weights, topk_ids)
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-2, f"{num_tokens} tokens: relative error {err:.3g} against the torch path"

        hit = topk_ids.unique().numel()
        weight_bytes = hit * 3 * HIDDEN * INTERMEDIATE * 2
        flops = 2 * num_tokens * TOP_K * 3 * HIDDEN * INTERMEDIATE
        iters = 200 if num_tokens <= 256 else 50
        graph_ms = median_ms(graphed(lambda: layer(x, router_logits)), iters)
        eager_ms = median_ms(lambda: layer(x, router_logits), iters)
        print(f"{num_tokens:>6} {hit:>11} {weight_bytes / 1e6:>8.1f} {graph_ms:>9.4f} {eager_ms:>9.4f} "
              f"{weight_bytes / graph_ms / 1e6:>7.0f} {weight_bytes / graph_ms / 1e-3 / PEAK_BYTES_PER_S:>7.1%} "
              f"{flops / graph_ms / 1e9:>8.1f} {err:>8.1e}  {tile_config(num_tokens * TOP_K, NUM_EXPERTS)}")
        if args.sweep:
            run = graphed(lambda: fused_experts_triton(x, w13, w2, topk_weights, topk_ids))
            print(f"{'':>6} experts only, {median_ms(run, iters):.4f} ms graphed: the default tiles")
            for config in SWEEP:
                run = graphed(lambda: fused_experts_triton(x, w13, w2, topk_weights, topk_ids, config))
                print(f"{'':>6} experts only, {median_ms(run, iters):.4f} ms graphed: {config}")


if __name__ == "__main__":
    main()
