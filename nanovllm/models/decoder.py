"""The decoder-only transformer shared by the Llama, Mistral, Qwen2, Qwen3 and Qwen-MoE families.

Pre-norm layers: RMSNorm -> GQA attention with NeoX RoPE -> residual add; RMSNorm -> SwiGLU MLP ->
residual add. Fused (one Triton kernel each on CUDA, see layers/): each residual add with the
RMSNorm that follows it; q/k norm, RoPE and the KV-cache store; SiLU with the gate-up product. At
one row (decode at batch 1) the norms and SiLU go into the projections after them (PendingNorm,
PendingSiluMul: the projection's one-row kernel computes its input), where that kernel is taken.
The families differ only in what their config says, which each architecture's class reads into a
`DecoderSpec`: the biases of the projections and the per-head RMSNorm of q and k. An MoE family
puts its sparse block in place of the MLP of some layers (`make_mlp`). Tied embeddings come from
`config.tie_word_embeddings`, head_dim from `config.head_dim` or hidden_size / num_attention_heads.

Module and parameter names match the Hugging Face checkpoints (`model.layers.N.self_attn.o_proj`,
`lm_head`, ...), except that q/k/v and gate/up are packed into one matrix each; the loader maps
them through `packed_modules_mapping`.

Refused configs raise ValueError naming the field (see `check_decoder_config`).

`quant_config` (an `Fp8Config`, or None) quantizes the projections (never the embeddings, norms
or LM head); each linear gets it unless the config ignores its checkpoint modules.
"""
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.attention import Attention
from nanovllm.attention.metadata import get_attention_metadata
from nanovllm.layers.activation import PendingSiluMul, SiluAndMul
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import PendingNorm, RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.qk_norm_rope import QKNorm, QKVHeads, qk_norm_rope_store
from nanovllm.layers.quantization.config import Fp8Config
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.models.config_utils import head_dim_of, rope_settings, sliding_window_of
from nanovllm.utils.parallel import tp_size


# checkpoint name -> (parameter name, shard id) for projections packed into one matrix
PACKED_MODULES_MAPPING = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def linear_quant_config(quant_config: Fp8Config | None, prefix: str) -> Fp8Config | None:
    """The scheme of linear `prefix` (None: unquantized), decided on its checkpoint modules' names."""
    if quant_config is None:
        return None
    parent, module = prefix.rsplit(".", 1)
    names = [f"{parent}.{ckpt}" for ckpt, (packed, _) in PACKED_MODULES_MAPPING.items() if packed == module]
    return quant_config.for_layer(names or [prefix])


@dataclass(frozen=True)
class DecoderSpec:
    """What one architecture's decoder layers contain, beyond the sizes in the config."""
    qkv_bias: bool = False     # bias on the q, k and v projections
    o_proj_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False     # bias on gate, up and down projections
    qk_norm: bool = False      # RMSNorm over each head of q and k, before RoPE (Qwen3)


# (config, spec, layer index, quant config, prefix) -> the layer's MLP
MakeMLP = Callable[[PretrainedConfig, DecoderSpec, int, Fp8Config | None, str], nn.Module]


def check_decoder_config(config: PretrainedConfig):
    """Raise ValueError, naming the field, for a config this decoder would run wrongly."""
    tp = tp_size()
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, field)
        if heads % tp:
            raise ValueError(f"{field} ({heads}) must be divisible by tensor_parallel_size ({tp}).")
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu').")
    window = sliding_window_of(config)
    # Sequences never exceed max_position_embeddings (the engine caps max_model_len there), so a
    # window at least that long masks nothing; a shorter one would change the results.
    if window is not None and window < config.max_position_embeddings:
        raise ValueError(f"sliding_window={window} (< max_position_embeddings="
                         f"{config.max_position_embeddings}) is not supported: attention here is full "
                         f"causal attention.")


class DecoderAttention(nn.Module):

    def __init__(self, config: PretrainedConfig, spec: DecoderSpec, quant_config: Fp8Config | None = None,
                 prefix: str = ""):
        super().__init__()
        head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=spec.qkv_bias,
                                          quant_config=linear_quant_config(quant_config, f"{prefix}.qkv_proj"),
                                          prefix=f"{prefix}.qkv_proj")
        self.heads = QKVHeads(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        bias=spec.o_proj_bias,
                                        quant_config=linear_quant_config(quant_config, f"{prefix}.o_proj"),
                                        prefix=f"{prefix}.o_proj")
        base, rope_scaling = rope_settings(config)
        self.rotary_emb = RotaryEmbedding(head_dim, config.max_position_embeddings, base, rope_scaling)
        self.attn = Attention(self.heads.num_heads, head_dim, head_dim ** -0.5, self.heads.num_kv_heads)
        if spec.qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor | PendingNorm) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # [num_tokens, (heads + 2 * kv_heads) * head_dim]
        norm = None
        if self.q_norm is not None:
            norm = QKNorm(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        cache = self.attn.cache
        slot_mapping = get_attention_metadata().slot_mapping if cache is not None else None
        # q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim]; k, v stored in `cache`
        q, k, v = qk_norm_rope_store(qkv, positions, self.rotary_emb.cos_sin_cache, self.heads, norm, cache,
                                     slot_mapping)
        out = self.attn(q, k, v, kv_stored=True)
        return self.o_proj(out.flatten(1, -1))


class DecoderMLP(nn.Module):

    def __init__(self, config: PretrainedConfig, spec: DecoderSpec, quant_config: Fp8Config | None = None,
                 prefix: str = ""):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=spec.mlp_bias,
            quant_config=linear_quant_config(quant_config, f"{prefix}.gate_up_proj"), prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=spec.mlp_bias,
                                           quant_config=linear_quant_config(quant_config, f"{prefix}.down_proj"),
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor | PendingNorm) -> torch.Tensor:
        return self.down_proj(PendingSiluMul(self.act_fn, self.gate_up_proj(x)))


class DecoderLayer(nn.Module):

    def __init__(self, config: PretrainedConfig, spec: DecoderSpec, mlp: nn.Module,
                 quant_config: Fp8Config | None = None, prefix: str = ""):
        super().__init__()
        self.self_attn = DecoderAttention(config, spec, quant_config, f"{prefix}.self_attn")
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        """Returns (this layer's MLP output, the residual stream before it); the caller adds them. The norms
        are left to the projections after them (PendingNorm: a one-row projection computes its norm itself)."""
        x = PendingNorm(self.input_layernorm, hidden_states, residual)
        hidden_states = self.self_attn(positions, x)
        x = PendingNorm(self.post_attention_layernorm, hidden_states, x.residual)
        return self.mlp(x if isinstance(self.mlp, DecoderMLP) else x.value()), x.residual


class DecoderModel(nn.Module):

    def __init__(self, config: PretrainedConfig, spec: DecoderSpec, make_mlp: MakeMLP,
                 quant_config: Fp8Config | None = None, prefix: str = "model"):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, spec, make_mlp(config, spec, i, quant_config,
                                                                         f"{prefix}.layers.{i}.mlp"),
                                                  quant_config, f"{prefix}.layers.{i}")
                                     for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class DecoderForCausalLM(nn.Module):
    """Base of the architecture classes; a subclass says what its config means in `decoder_spec`."""
    packed_modules_mapping = PACKED_MODULES_MAPPING

    @classmethod
    def decoder_spec(cls, config: PretrainedConfig) -> DecoderSpec:
        raise NotImplementedError

    @classmethod
    def make_mlp(cls, config: PretrainedConfig, spec: DecoderSpec, layer_idx: int, quant_config: Fp8Config | None,
                 prefix: str) -> nn.Module:
        """The MLP of layer `layer_idx`: the dense SwiGLU MLP unless a subclass says otherwise (MoE)."""
        return DecoderMLP(config, spec, quant_config, prefix)

    def __init__(self, config: PretrainedConfig, quant_config: Fp8Config | None = None):
        super().__init__()
        check_decoder_config(config)
        self.model = DecoderModel(config, self.decoder_spec(config), self.make_mlp, quant_config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)  # [num_tokens, hidden_size]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden_states)  # [num_seqs, vocab_size] on rank 0, None elsewhere
