"""Qwen2MoeForCausalLM (Qwen1.5-MoE, Qwen2-57B-A14B): the Qwen2 decoder (q/k/v bias as
`qkv_bias` says, none on o_proj) with Qwen3-MoE's sparse layers, whose block also has a shared
expert: a SwiGLU MLP of `shared_expert_intermediate_size` scaled by sigmoid(`shared_expert_gate`(x)),
added to the routed experts' output before the block's one all-reduce.
"""
import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from nanovllm.models.decoder import DecoderForCausalLM, DecoderSpec
from nanovllm.models.qwen3_moe import SparseMoeCausalLM, make_experts
from nanovllm.utils.parallel import all_reduce


class SharedExpertMLP(nn.Module):
    """SwiGLU MLP whose output is this rank's partial sum (the block reduces it)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, reduce_results=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Qwen2MoeSparseMoeBlock(nn.Module):

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts, bias=False)
        self.experts = make_experts(config)
        self.shared_expert = SharedExpertMLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden_states, self.gate(hidden_states))  # [num_tokens, hidden], partial sum
        shared = self.shared_expert(hidden_states) * torch.sigmoid(self.shared_expert_gate(hidden_states))
        return all_reduce(out + shared)


class Qwen2MoeForCausalLM(SparseMoeCausalLM, DecoderForCausalLM):
    sparse_block = Qwen2MoeSparseMoeBlock

    @classmethod
    def decoder_spec(cls, config: PretrainedConfig) -> DecoderSpec:
        return DecoderSpec(qkv_bias=bool(getattr(config, "qkv_bias", True)))

