"""Model registry: config.json's `architectures` name -> model class."""
from torch import nn
from transformers import PretrainedConfig

from nanovllm.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(hf_config: PretrainedConfig) -> type[nn.Module]:
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"model architectures {architectures} are not supported; "
                     f"supported: {sorted(MODEL_REGISTRY)}.")
