"""FusedMoE: the routed experts of a sparse MoE block, their weights stacked into two parameters.

- `w13_weight` [num_experts, 2 * I / tp, hidden]: each expert's gate rows, then its up rows;
- `w2_weight` [num_experts, hidden, I / tp]: each expert's down projection.
Under tensor parallelism every rank holds every expert, a 1/tp slice of each one's intermediate
dimension (as the dense MLP): the output is this rank's partial sum, which the caller all-reduces.
The loader fills them from the per-expert checkpoint tensors (`experts.{e}.{gate,up,down}_proj`)
through `expert_params_mapping` and `weight_loader(param, loaded, expert_id, shard_id)`.

Routing (`select_experts`): softmax over the experts in float32, top-k, optionally renormalised.
The experts run in Triton on CUDA (`fused_moe_triton`) and in torch, expert by expert, elsewhere
(`fused_experts_torch`, also the reference of the kernels).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.fused_moe_triton import fused_experts_triton, triton
from nanovllm.utils.parallel import divide, tp_rank, tp_size

# checkpoint projection -> shard id (vLLM's names: w1 gate, w3 up, w2 down)
EXPERT_SHARDS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class ExpertParamMapping(NamedTuple):
    param_name: str  # "experts.w13_weight"
    weight_name: str  # "experts.3.gate_proj.weight": the checkpoint's name, past the module prefix
    expert_id: int
    shard_id: str  # "w1", "w3" or "w2"


def make_expert_params_mapping(num_experts: int) -> list[ExpertParamMapping]:
    return [ExpertParamMapping("experts.w2_weight" if shard == "w2" else "experts.w13_weight",
                               f"experts.{expert}.{proj}.weight", expert, shard)
            for expert in range(num_experts) for proj, shard in EXPERT_SHARDS.items()]


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [num_tokens, num_experts] -> (topk_weights float32, topk_ids int64), each
    [num_tokens, top_k]: the top-k of the softmax, divided by their sum when `renormalize`."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    topk_weights, topk_ids = probs.topk(top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def fused_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """The contract of `fused_experts_triton`, expert by expert in torch (host syncs: not for graphs).
    x: [num_tokens, H]; w13: [E, 2 * I, H]; w2: [E, H, I]; topk_*: [num_tokens, top_k] -> [num_tokens, H]."""
    out = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32))
    for expert in range(w13.shape[0]):
        tokens, slots = torch.where(topk_ids == expert)
        if tokens.numel() == 0:
            continue
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)  # [n, I] each
        y = F.linear(F.silu(gate) * up, w2[expert])  # [n, H]
        out.index_add_(0, tokens, y.to(out.dtype) * topk_weights[tokens, slots, None])
    return out.to(x.dtype)


class FusedMoE(nn.Module):
    """forward(hidden_states [num_tokens, hidden], router_logits [num_tokens, num_experts]) ->
    [num_tokens, hidden]: this rank's partial sum (not all-reduced). ValueError when
    `intermediate_size` is not divisible by the tensor-parallel size."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in [1, num_experts ({num_experts})].")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.intermediate_size_per_partition = divide(intermediate_size, self.tp_size, "moe_intermediate_size")
        inter = self.intermediate_size_per_partition
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, inter))
        self.w13_weight.weight_loader = self.w2_weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, expert_id: int, shard_id: str):
        """Copy this rank's slice of one expert's checkpoint tensor ([I, hidden] for w1 / w3,
        [hidden, I] for w2) into `param`; ValueError when its shape is not that."""
        inter, hidden = self.intermediate_size_per_partition, self.w2_weight.shape[1]
        expected = (hidden, inter * self.tp_size) if shard_id == "w2" else (inter * self.tp_size, hidden)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit expert {expert_id}'s "
                             f"{shard_id} of shape {expected}")
        if shard_id == "w2":
            param.data[expert_id].copy_(loaded.narrow(1, self.tp_rank * inter, inter))
        else:
            offset = {"w1": 0, "w3": inter}[shard_id]  # gate rows, then up rows
            param.data[expert_id].narrow(0, offset, inter).copy_(loaded.narrow(0, self.tp_rank * inter, inter))

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        experts = fused_experts_triton if hidden_states.is_cuda and triton is not None else fused_experts_torch
        return experts(hidden_states, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
