"""Qwen2ForCausalLM (Qwen2, Qwen2.5): the shared decoder with a bias on q, k and v (always, there is
no config field for it) and none on o_proj or the MLP; no q/k norm. Qwen2 configs usually omit
head_dim (then hidden_size / num_attention_heads)."""
from transformers import PretrainedConfig

from nanovllm.models.decoder import DecoderForCausalLM, DecoderSpec


class Qwen2ForCausalLM(DecoderForCausalLM):

    @classmethod
    def decoder_spec(cls, config: PretrainedConfig) -> DecoderSpec:
        return DecoderSpec(qkv_bias=True)
