"""Model registry: config.json's `architectures` name -> model class.

Every class here is the shared decoder (`nanovllm.models.decoder`) with its architecture's
`DecoderSpec`; adding an architecture of the same shape is one small class and one entry.
"""
from torch import nn
from transformers import PretrainedConfig

from nanovllm.models.llama import LlamaForCausalLM, MistralForCausalLM
from nanovllm.models.qwen2 import Qwen2ForCausalLM
from nanovllm.models.qwen2_moe import Qwen2MoeForCausalLM
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def get_model_class(hf_config: PretrainedConfig) -> type[nn.Module]:
    """The class of the first of `hf_config.architectures` that is registered; ValueError listing
    the supported names when none is."""
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"model architectures {architectures} are not supported; "
                     f"supported: {sorted(MODEL_REGISTRY)}.")
