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
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item(),
                               msg=lambda m: f"{what} ({dtype}): {m}")


def check(device: str, num_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int,
          dtypes: tuple[str, ...] = ("float32",), tile: dict | None = None, seed: int = 0):
    """`tile`: MoeTileConfig fields to use instead of `tile_config`'s choice."""
    gen = torch.Generator().manual_seed(seed)
    num_pairs = num_tokens * top_k
    config = MoeTileConfig(**tile) if tile else tile_config(num_pairs, num_experts)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    topk_weights, topk_ids = select_experts(logits, top_k, renormalize=True)
    x64 = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    w13_64 = torch.randn(num_experts, 2 * intermediate, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5
    w2_64 = torch.randn(num_experts, hidden, intermediate, generator=gen, dtype=torch.float64) / intermediate ** 0.5

    aligned = AlignedPairs.empty(num_pairs, num_experts, config.BLOCK_M, device)
    for buffer in aligned:
        buffer.fill_(POISON)
    moe_align(topk_ids.to(device), num_experts, aligned)
    sorted_ids, experts = expected_alignment(topk_ids, num_experts, config.BLOCK_M)
    assert aligned.num_tokens_post_padded.item() == len(sorted_ids), (aligned.num_tokens_post_padded, len(sorted_ids))
    assert len(sorted_ids) <= aligned.sorted_token_ids.numel(), "upper bound of the padded count exceeded"
    assert aligned.sorted_token_ids[:len(sorted_ids)].tolist() == sorted_ids, aligned.sorted_token_ids
    assert aligned.expert_ids[:len(experts)].tolist() == experts, aligned.expert_ids

    tokens = torch.arange(num_pairs) // top_k
    for name in dtypes:
        dtype = getattr(torch, name)
        # float64 references from the inputs as rounded to dtype
        x, w13, w2 = (t.to(dtype) for t in (x64, w13_64, w2_64))
        x_d, w13_d, w2_d = (t.to(device) for t in (x, w13, w2))
        gate_up = torch.einsum("ph,pih->pi", x.double()[tokens], w13.double()[topk_ids.flatten()])  # [N, 2 * I]
        gate, up = gate_up.chunk(2, dim=-1)
        h_ref = F.silu(gate) * up  # [N, I]

        h = torch.full((num_pairs, intermediate), float("nan"), dtype=dtype, device=device)
        invoke_gate_up(x_d, w13_d, h, aligned, top_k, config)
        assert_close(h, h_ref, dtype, "gate-up GEMM with SiLU-and-mul")

        h_rounded = h.double().cpu()  # the down GEMM's input as the kernel stored it
        down_ref = torch.einsum("pi,phi->ph", h_rounded, w2.double()[topk_ids.flatten()])
        down_ref *= topk_weights.flatten().double()[:, None]
        out = torch.full((num_pairs, hidden), float("nan"), dtype=dtype, device=device)
        invoke_down(h, w2_d, out, aligned, topk_weights.flatten().to(device), config)
        assert_close(out, down_ref, dtype, "down GEMM times the router weight")

        expected = fused_experts_torch(x.double(), w13.double(), w2.double(), topk_weights.double(), topk_ids)
        actual = fused_experts_triton(x_d, w13_d, w2_d, topk_weights.to(device), topk_ids.to(device), config)
        assert actual.shape == (num_tokens, hidden) and actual.dtype == dtype
        assert_close(actual, expected, dtype, "fused_experts_triton vs fused_experts_torch")
        if device != "cpu":  # the torch path on the same device (the one the model falls back to)
            torch_path = fused_experts_torch(x_d, w13_d, w2_d, topk_weights.to(device), topk_ids.to(device))
            assert_close(torch_path, expected, dtype, "fused_experts_torch on the device")
    print(f"fused_moe ok: {num_tokens} tokens, {num_experts} experts, top-{top_k}, {config}")
