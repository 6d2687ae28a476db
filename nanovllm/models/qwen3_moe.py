"""Qwen3MoeForCausalLM (Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 decoder (q/k norm) with a sparse
MoE block in place of the MLP of the layers that `is_sparse_layer` names; the others keep the
dense MLP of `intermediate_size`.

The block: a replicated router `gate` (hidden -> num_experts, no bias), the top
`num_experts_per_tok` of its float32 softmax, renormalised when `norm_topk_prob`, and the experts
(`FusedMoE`, of `moe_intermediate_size`); under tensor parallelism one all-reduce of its output.
Checkpoint names as published: `mlp.gate.weight`, `mlp.experts.{e}.{gate,up,down}_proj.weight`.
"""
import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.layers.fused_moe import FusedMoE, make_expert_params_mapping
from nanovllm.layers.linear import ReplicatedLinear
from nanovllm.layers.quantization.config import Fp8Config
from nanovllm.models.decoder import DecoderMLP, DecoderSpec
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.parallel import all_reduce


def is_sparse_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    """As transformers: not in `mlp_only_layers`, experts exist, and every `decoder_sparse_step`-th layer."""
    return (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0)


def make_experts(config: PretrainedConfig) -> FusedMoE:
    return FusedMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                    config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob))


class Qwen3MoeSparseMoeBlock(nn.Module):

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts, bias=False)
        self.experts = make_experts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(hidden_states)  # [num_tokens, num_experts]
        return all_reduce(self.experts(hidden_states, router_logits))  # [num_tokens, hidden]


class SparseMoeCausalLM:
    """Mixin of the MoE architectures (before their decoder class in the bases): the layers that
    `is_sparse_layer` names get `sparse_block(config)` as their MLP, the others the dense MLP."""
    sparse_block: type[nn.Module]

    @classmethod
    def make_mlp(cls, config: PretrainedConfig, spec: DecoderSpec, layer_idx: int, quant_config: Fp8Config | None,
                 prefix: str) -> nn.Module:
        if is_sparse_layer(config, layer_idx):
            return cls.sparse_block(config)
        return DecoderMLP(config, spec, quant_config, prefix)

    def __init__(self, config: PretrainedConfig, quant_config: Fp8Config | None = None):
        if quant_config is not None:
            raise ValueError(f"FP8 weights are not supported for {type(self).__name__} yet (its experts are "
                             f"unquantized); load the bf16 checkpoint without quantization.")
        super().__init__(config, quant_config)
        self.expert_params_mapping = make_expert_params_mapping(config.num_experts)


class Qwen3MoeForCausalLM(SparseMoeCausalLM, Qwen3ForCausalLM):
    sparse_block = Qwen3MoeSparseMoeBlock
