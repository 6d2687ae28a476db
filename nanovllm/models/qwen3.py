"""Qwen3ForCausalLM: the shared decoder with per-head RMSNorm on q and k; projection biases as
`attention_bias` says (q, k, v and o alike)."""
from transformers import PretrainedConfig

from nanovllm.models.decoder import DecoderForCausalLM, DecoderSpec


class Qwen3ForCausalLM(DecoderForCausalLM):

    @classmethod
    def decoder_spec(cls, config: PretrainedConfig) -> DecoderSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderSpec(qkv_bias=bias, o_proj_bias=bias, qk_norm=True)
