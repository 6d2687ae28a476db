"""The routed experts on CUDA in Triton: align, grouped gate-up GEMM with SiLU-and-mul, grouped
down GEMM times the router weight, then the sum over each token's top-k.

The top-k routing gives N = num_tokens * top_k (token, slot) pairs, numbered flat
(`token * top_k + slot`). `moe_align` lists them sorted by expert (stable: by pair number within
an expert) in `sorted_token_ids`, each expert's run padded to a multiple of BLOCK_M with the
sentinel N, and records the expert of each BLOCK_M block, so that each block of rows of the two
grouped GEMMs reads one expert's weights; experts that no pair hit are never read.

CUDA-graph capturable: no host sync and no data-dependent shape. The buffers have their upper
bound, N + min(N, E) * (BLOCK_M - 1) entries (each expert hit adds at most BLOCK_M - 1 padding),
and GEMM programs past the real padded count (`num_tokens_post_padded`, read on the device) exit
at once. Deterministic: no atomics; each pair's output row is written by one program, and a
token's top-k rows are summed by torch in a fixed order.
"""
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs may lack Triton; FusedMoE falls back to the torch path
    triton = None


class MoeTileConfig(NamedTuple):
    BLOCK_M: int  # rows (pairs) per block; also the padding unit of moe_align
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int  # row blocks that sweep the same weight tiles together (L2 reuse)
    num_warps: int
    num_stages: int


# (largest average number of pairs per expert, tiles). Few pairs per expert (decode): the GEMMs
# are bound by reading the routed experts' weights, so small row blocks waste no weight reads and
# narrow column tiles spread each expert over more programs. Many (prefill): larger tiles.
TILE_CONFIGS: tuple[tuple[float, MoeTileConfig], ...] = (
    (4, MoeTileConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)),
    (32, MoeTileConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=4)),
    (float("inf"), MoeTileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)),
)


def tile_config(num_pairs: int, num_experts: int) -> MoeTileConfig:
    per_expert = num_pairs / num_experts
    return next(config for bound, config in TILE_CONFIGS if per_expert <= bound)


class AlignedPairs(NamedTuple):
    sorted_token_ids: torch.Tensor  # [num_blocks * BLOCK_M] int32: pair ids by expert; N pads each run
    expert_ids: torch.Tensor  # [num_blocks] int32: the expert of each BLOCK_M block (valid blocks only)
    num_tokens_post_padded: torch.Tensor  # [1] int32: the padded count; later entries are unwritten

    @classmethod
    def empty(cls, num_pairs: int, num_experts: int, block_m: int, device: torch.device) -> "AlignedPairs":
        """Buffers of the upper-bound size for `num_pairs` pairs (see the module docstring)."""
        num_blocks = triton.cdiv(num_pairs + min(num_pairs, num_experts) * (block_m - 1), block_m)
        return cls(torch.empty(num_blocks * block_m, dtype=torch.int32, device=device),
                   torch.empty(num_blocks, dtype=torch.int32, device=device),
                   torch.empty(1, dtype=torch.int32, device=device))


def moe_align(topk_ids: torch.Tensor, num_experts: int, out: AlignedPairs):
    """Sort the pairs of topk_ids [num_tokens, top_k] by expert into `out` (in place), each
    expert's run padded to a multiple of BLOCK_M = len(out.sorted_token_ids) / len(out.expert_ids)."""
    flat_ids = topk_ids.flatten().to(torch.int32)  # [N]
    num_pairs = flat_ids.numel()
    block_m = out.sorted_token_ids.numel() // out.expert_ids.numel()
    counts = torch.empty(num_experts, dtype=torch.int32, device=topk_ids.device)
    scan = min(1024, triton.next_power_of_2(num_pairs))
    _count_kernel[(num_experts,)](flat_ids, counts, num_pairs, BLOCK=scan)
    _align_kernel[(num_experts,)](flat_ids, counts, *out, num_pairs, num_experts, BLOCK_M=block_m, BLOCK=scan,
                                  E_PAD=triton.next_power_of_2(num_experts))


def invoke_gate_up(x: torch.Tensor, w13: torch.Tensor, out: torch.Tensor, aligned: AlignedPairs, top_k: int,
                   config: MoeTileConfig):
    """out[pair] = silu(x[token] @ gate[e].T) * (x[token] @ up[e].T) for every routed pair.
    x: [num_tokens, H]; w13: [E, 2 * I, H] (gate rows, then up rows); out: [N, I], written in place."""
    num_pairs, inter = out.shape
    assert x.stride(1) == 1 and w13.stride(2) == 1 and out.stride(1) == 1
    num_blocks = aligned.expert_ids.numel()
    grid = (num_blocks * triton.cdiv(inter, config.BLOCK_N),)
    _gate_up_kernel[grid](x, w13, out, *aligned, num_pairs, top_k, x.shape[1], inter, num_blocks,
                          x.stride(0), w13.stride(0), w13.stride(1), out.stride(0),
                          BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K,
                          GROUP_M=config.GROUP_M, PRECISION=_dot_precision(x.dtype),
                          num_warps=config.num_warps, num_stages=config.num_stages)


def invoke_down(h: torch.Tensor, w2: torch.Tensor, out: torch.Tensor, aligned: AlignedPairs,
                pair_weights: torch.Tensor, config: MoeTileConfig):
    """out[pair] = pair_weights[pair] * (h[pair] @ down[e].T) for every routed pair.
    h: [N, I]; w2: [E, H, I]; pair_weights: [N] float32; out: [N, H], written in place."""
    num_pairs, hidden = out.shape
    assert h.stride(1) == 1 and w2.stride(2) == 1 and out.stride(1) == 1 and pair_weights.is_contiguous()
    num_blocks = aligned.expert_ids.numel()
    grid = (num_blocks * triton.cdiv(hidden, config.BLOCK_N),)
    _down_kernel[grid](h, w2, out, pair_weights, *aligned, num_pairs, h.shape[1], hidden, num_blocks,
                       h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
                       BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K,
                       GROUP_M=config.GROUP_M, PRECISION=_dot_precision(h.dtype),
                       num_warps=config.num_warps, num_stages=config.num_stages)


def fused_experts_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, config: MoeTileConfig | None = None) -> torch.Tensor:
    """x: [num_tokens, H]; w13: [E, 2 * I, H]; w2: [E, H, I]; topk_weights (float32), topk_ids:
    [num_tokens, top_k] -> [num_tokens, H] in x.dtype: sum over the top-k of weight * expert(x).
    `config` None: `tile_config` of the number of pairs."""
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden, inter = w2.shape
    num_pairs = num_tokens * top_k
    config = config or tile_config(num_pairs, num_experts)
    aligned = AlignedPairs.empty(num_pairs, num_experts, config.BLOCK_M, x.device)
    moe_align(topk_ids, num_experts, aligned)
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    invoke_gate_up(x, w13, h, aligned, top_k, config)
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    invoke_down(h, w2, out, aligned, topk_weights.flatten().float(), config)
    return out.view(num_tokens, top_k, hidden).sum(1)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 exactly (as torch); others ignore it


if triton is not None:

    @triton.jit
    def _count_kernel(ids_ptr, counts_ptr, num_pairs, BLOCK: tl.constexpr):
        """counts[e] = number of pairs routed to expert e (program e)."""
        expert = tl.program_id(0)
        total = 0
        for start in range(0, num_pairs, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
            total += tl.sum((ids == expert).to(tl.int32))
        tl.store(counts_ptr + expert, total)

    @triton.jit
    def _align_kernel(ids_ptr, counts_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr, num_pairs, num_experts,
                      BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
        """Program e writes expert e's run of sorted_token_ids (its pairs in order, then padding)
        and the expert ids of its blocks; program 0 also the padded total."""
        expert = tl.program_id(0)
        offs_e = tl.arange(0, E_PAD)
        counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        start = tl.sum(tl.where(offs_e < expert, padded, 0))  # this expert's run begins after those before
        count = tl.sum(tl.where(offs_e == expert, counts, 0))
        end = start + tl.sum(tl.where(offs_e == expert, padded, 0))
        if expert == 0:
            tl.store(num_padded_ptr, tl.sum(padded))
        seen = 0
        for first in range(0, num_pairs, BLOCK):
            offs = first + tl.arange(0, BLOCK)
            hit = (tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1) == expert).to(tl.int32)
            rank = seen + tl.cumsum(hit, 0) - hit  # exclusive prefix count: the pair's place in the run
            tl.store(sorted_ptr + start + rank, offs, mask=hit != 0)
            seen += tl.sum(hit)
        pad = start + count + tl.arange(0, BLOCK_M)
        tl.store(sorted_ptr + pad, num_pairs, mask=pad < end)
        for block in range(start // BLOCK_M, end // BLOCK_M, BLOCK):
            offs = block + tl.arange(0, BLOCK)
            tl.store(expert_ids_ptr + offs, expert, mask=offs < end // BLOCK_M)

    @triton.jit
    def _block_of(pid, num_blocks_m, num_blocks_n, GROUP_M: tl.constexpr):
        """(row block, column block) of program `pid`, GROUP_M row blocks per column sweep."""
        per_group = GROUP_M * num_blocks_n
        first_m = pid // per_group * GROUP_M
        group_m = tl.minimum(num_blocks_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m

    @triton.jit
    def _gate_up_kernel(x_ptr, w_ptr, out_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr, num_pairs, top_k,
                        K, inter, num_blocks_m, stride_x, stride_we, stride_wn, stride_out,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
        pid_m, pid_n = _block_of(tl.program_id(0), num_blocks_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]; num_pairs: padding
        row_ok = pairs < num_pairs
        tokens = (pairs // top_k).to(tl.int64)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tokens[:, None] * stride_x + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        up_rows = inter * stride_wn  # the up projection's rows follow the gate's
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            gate = tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), gate, input_precision=PRECISION)
            up = tl.dot(a, tl.load(w_ptrs + up_rows, mask=w_mask, other=0.0), up, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        h = gate * tl.sigmoid(gate) * up  # SiLU(gate) * up
        out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
        tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _down_kernel(h_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr, num_pairs,
                     K, hidden, num_blocks_m, stride_h, stride_we, stride_wn, stride_out,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
        pid_m, pid_n = _block_of(tl.program_id(0), num_blocks_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]; num_pairs: padding
        row_ok = pairs < num_pairs
        rows = pairs.to(tl.int64)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < hidden
        offs_k = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows[:, None] * stride_h + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc *= tl.load(weights_ptr + rows, mask=row_ok, other=0.0)[:, None]  # the router weight of each pair
        out_ptrs = out_ptr + rows[:, None] * stride_out + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
