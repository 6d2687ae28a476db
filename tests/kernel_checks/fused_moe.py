"""The fused MoE kernels (nanovllm.layers.fused_moe_triton) against torch.

Each stage on fresh random routing, its outputs poisoned before the run: `moe_align` against the
expected sorted pair list (computed here, exactly), the gate-up and down GEMMs against float64
products, and the whole of `fused_experts_triton` against `fused_experts_torch` in float64.
"""
import torch
import torch.nn.functional as F

from nanovllm.layers.fused_moe import fused_experts_torch, select_experts
from nanovllm.layers.fused_moe_triton import (AlignedPairs, MoeTileConfig, fused_experts_triton, invoke_down,
                                              invoke_gate_up, moe_align, tile_config)

POISON = -7  # in the int buffers of moe_align; float outputs are poisoned with NaN
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def expected_alignment(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[list[int], list[int]]:
    """(sorted_token_ids up to the padded count, expert of each block), by definition."""
    flat, sentinel = topk_ids.flatten().tolist(), topk_ids.numel()
    sorted_ids, experts = [], []
    for expert in range(num_experts):
        pairs = [i for i, e in enumerate(flat) if e == expert]
        padded = -(-len(pairs) // block_m) * block_m
        sorted_ids += pairs + [sentinel] * (padded - len(pairs))
        experts += [expert] * (padded // block_m)
    return sorted_ids, experts


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    assert not actual.isnan().any(), f"{what}: unwritten (NaN) elements"
    tol = TOLERANCE[dtype]
    actual, expected = actual.double().cpu(), expected.double().cpu()  # the reference may sit on the GPU
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item(),
                               msg=lambda m: f"{what} ({dtype}): {m}")


def per_expert(rows: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rows[p] @ weights[expert of pair p].T for every pair p, one expert at a time."""
    flat = topk_ids.flatten()
    out = rows.new_empty(rows.shape[0], weights.shape[1])
    for expert in range(weights.shape[0]):
        pairs = (flat == expert).nonzero().flatten()
        out[pairs] = rows[pairs] @ weights[expert].T
    return out


def check(device: str, num_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int,
          dtypes: tuple[str, ...] = ("float32",), tile: dict | None = None, seed: int = 0):
    """`tile`: MoeTileConfig fields to use instead of `tile_config`'s choice. References are
    computed in float64 on `device` from the inputs as rounded to each dtype."""
    gen = torch.Generator().manual_seed(seed)
    num_pairs = num_tokens * top_k
    config = MoeTileConfig(**tile) if tile else tile_config(num_pairs, num_experts)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    topk_weights, topk_ids = (t.to(device) for t in select_experts(logits, top_k, renormalize=True))
    pair_weights = topk_weights.flatten()  # [N]
    x64 = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    w13_64 = torch.randn(num_experts, 2 * intermediate, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5
    w2_64 = torch.randn(num_experts, hidden, intermediate, generator=gen, dtype=torch.float64) / intermediate ** 0.5

    aligned = AlignedPairs.empty(num_pairs, num_experts, config.BLOCK_M, device)
    for buffer in aligned:
        buffer.fill_(POISON)
    moe_align(topk_ids, num_experts, aligned)
    sorted_ids, experts = expected_alignment(topk_ids.cpu(), num_experts, config.BLOCK_M)
    assert aligned.num_tokens_post_padded.item() == len(sorted_ids), (aligned.num_tokens_post_padded, len(sorted_ids))
    assert len(sorted_ids) <= aligned.sorted_token_ids.numel(), "upper bound of the padded count exceeded"
    assert aligned.sorted_token_ids[:len(sorted_ids)].tolist() == sorted_ids, aligned.sorted_token_ids
    assert aligned.expert_ids[:len(experts)].tolist() == experts, aligned.expert_ids

    tokens = torch.arange(num_pairs, device=device) // top_k
    for name in dtypes:
        dtype = getattr(torch, name)
        x, w13, w2 = (t.to(device, dtype) for t in (x64, w13_64, w2_64))
        gate, up = per_expert(x.double()[tokens], topk_ids, w13.double()).chunk(2, dim=-1)  # [N, I] each
        h = torch.full((num_pairs, intermediate), float("nan"), dtype=dtype, device=device)
        invoke_gate_up(x, w13, h, aligned, top_k, config)
        assert_close(h, F.silu(gate) * up, dtype, "gate-up GEMM with SiLU-and-mul")

        # the down GEMM's reference starts from h as the kernel stored it
        down = per_expert(h.double(), topk_ids, w2.double()) * pair_weights.double()[:, None]  # [N, H]
        out = torch.full((num_pairs, hidden), float("nan"), dtype=dtype, device=device)
        invoke_down(h, w2, out, aligned, pair_weights, config)
        assert_close(out, down, dtype, "down GEMM times the router weight")

        expected = fused_experts_torch(x.double(), w13.double(), w2.double(), topk_weights.double(), topk_ids)
        actual = fused_experts_triton(x, w13, w2, topk_weights, topk_ids, config)
        assert actual.shape == (num_tokens, hidden) and actual.dtype == dtype
        assert_close(actual, expected, dtype, "fused_experts_triton vs fused_experts_torch")
        if device != "cpu":
            assert_close(fused_experts_torch(x, w13, w2, topk_weights, topk_ids), expected, dtype,
                         "fused_experts_torch in the device's dtype")
            check_cuda_graph(x, w13, w2, topk_weights, topk_ids, config, gen)
    print(f"fused_moe ok: {num_tokens} tokens, {num_experts} experts, top-{top_k}, {config}")


def check_cuda_graph(x, w13, w2, topk_weights, topk_ids, config, gen):
    """Capture fused_experts_triton once, replay it on new routing and inputs: same as eager."""
    static = [t.clone() for t in (x, topk_weights, topk_ids)]
    torch.cuda.synchronize()
    fused_experts_triton(static[0], w13, w2, static[1], static[2], config)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts_triton(static[0], w13, w2, static[1], static[2], config)
    logits = torch.randn(*topk_weights.shape[:1], w13.shape[0], generator=gen)
    new_weights, new_ids = (t.to(x.device) for t in select_experts(logits, topk_ids.shape[1], renormalize=False))
    new_x = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    for buffer, value in zip(static, (new_x, new_weights, new_ids)):
        buffer.copy_(value)
    graph.replay()
    torch.testing.assert_close(out, fused_experts_triton(new_x, w13, w2, new_weights, new_ids, config), rtol=0, atol=0)
