"""LlamaForCausalLM (Llama 2, 3, 3.1, 3.2) and MistralForCausalLM: the shared decoder as the config
says. Llama: `attention_bias` on q, k, v and o, `mlp_bias` on the MLP (both False in the released
checkpoints); RoPE scaling of type "llama3" comes with `rope_scaling` / `rope_parameters`.
Mistral: no biases; a config whose `sliding_window` would mask anything is refused by the shared
decoder (Mistral 7B v0.3 sets it to null)."""
from transformers import PretrainedConfig

from nanovllm.models.decoder import DecoderForCausalLM, DecoderSpec


class LlamaForCausalLM(DecoderForCausalLM):

    @classmethod
    def decoder_spec(cls, config: PretrainedConfig) -> DecoderSpec:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return DecoderSpec(qkv_bias=attention_bias, o_proj_bias=attention_bias,
                           mlp_bias=bool(getattr(config, "mlp_bias", False)))


class MistralForCausalLM(DecoderForCausalLM):

    @classmethod
    def decoder_spec(cls, config: PretrainedConfig) -> DecoderSpec:
        return DecoderSpec()
