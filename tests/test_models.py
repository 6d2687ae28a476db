"""Every registered architecture against transformers' own class, on the CPU, in float32.

Each checkpoint is tiny and random, written by transformers in the Hugging Face layout (no
tokenizer). Checked per checkpoint: prefill logits of a mixed batch (prompts of different
lengths in one forward) at tp=1 and tp=2 (gloo), and greedy tokens of the same batch through
`LLM.generate` at tp=1 and, for one checkpoint per architecture, tp=2. Also: the registry's
error, the refused configs (sliding window, heads not divisible by tp, unknown rope scaling) and
Llama 3's rope scaling against transformers' own.
"""
import json
import multiprocessing
import shutil

import pytest
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from fixtures.checkpoints import write_tiny_decoder
from fixtures.prefill import nanovllm_prefill_logits, tp2_prefill_logits
from nanovllm import LLM, SamplingParams
from nanovllm.layers.rotary_embedding import rope_inv_freq
from nanovllm.models import MODEL_REGISTRY, get_model_class
from nanovllm.models.llama import MistralForCausalLM
from nanovllm.models.qwen2 import Qwen2ForCausalLM

# Short original context so that all three bands of the llama3 scaling act within the test prompts.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}

# name -> (architecture, config overrides of fixtures.checkpoints.TINY_DECODER_SHAPE); hidden 64, 2 layers,
# 4 heads / 2 KV heads unless overridden.
CHECKPOINTS = {
    "qwen2_tied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),  # no head_dim: hidden / heads
    "qwen2_untied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "llama3": ("LlamaForCausalLM", dict(rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True)),  # 3.2-like
    "llama2": ("LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),  # MHA, unscaled
    "llama_bias": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralForCausalLM", dict(sliding_window=None, head_dim=32)),  # heads * head_dim != hidden
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=16)),
}
TP2_GENERATE = ["qwen2_untied", "llama3", "mistral", "qwen3"]  # one per architecture

ENGINE_ARGS = dict(dtype="float32", kvcache_block_size=16, max_model_len=256, skip_tokenizer_init=True,
                   cpu_kvcache_space_gib=0.1)
PROMPT_LENS = [5, 37, 1, 20]  # 37 spans three 16-token blocks
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ATOL, RTOL = 1e-4, 1e-4


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return {name: write_tiny_decoder(tmp_path_factory.mktemp(name), arch, seed=i, **overrides)
            for i, (name, (arch, overrides)) in enumerate(CHECKPOINTS.items())}


@pytest.fixture(scope="module")
def hf_models(checkpoints) -> dict:
    return {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def hf_greedy_tokens(hf_models) -> dict[str, list[list[int]]]:
    """transformers' greedy continuation of each prompt, one prompt at a time, no KV cache."""
    result = {}
    for name, model in hf_models.items():
        result[name] = []
        for prompt in prompts():
            ids, out = torch.tensor([prompt]), []
            with torch.no_grad():
                for _ in range(GREEDY.max_tokens):
                    next_id = model(ids).logits[0, -1].argmax().item()
                    out.append(next_id)
                    ids = torch.cat([ids, torch.tensor([[next_id]])], 1)
            result[name].append(out)
    return result


def hf_logits(model, batch: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0] for p in batch]


def assert_logits_match(logits: torch.Tensor, refs: list[torch.Tensor]):
    start = 0
    for ref in refs:
        torch.testing.assert_close(logits[start:start + len(ref)], ref, atol=ATOL, rtol=RTOL)
        start += len(ref)
    assert start == len(logits)


def completions(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# ---- parity, tp=1 --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CHECKPOINTS)
def test_prefill_logits_match_transformers(name, checkpoints, hf_models):
    batch = prompts()
    assert_logits_match(nanovllm_prefill_logits(checkpoints[name], batch), hf_logits(hf_models[name], batch))


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_greedy_batch_matches_transformers(name, checkpoints, hf_greedy_tokens):
    llm = LLM(checkpoints[name], **ENGINE_ARGS)
    try:
        assert completions(llm.generate(prompts(), GREEDY, use_tqdm=False)) == hf_greedy_tokens[name]
    finally:
        llm.shutdown()
    assert len(set(hf_greedy_tokens[name][0])) > 3  # the random weights give varied tokens


def test_tied_and_untied_embeddings(checkpoints):
    for name, tied in [("qwen2_tied", True), ("qwen2_untied", False), ("llama3", True), ("llama2", False)]:
        hf_config = AutoConfig.from_pretrained(checkpoints[name])
        model = get_model_class(hf_config)(hf_config)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied, name


def test_checkpoint_configs_exercise_what_they_claim(checkpoints):
    qwen2 = AutoConfig.from_pretrained(checkpoints["qwen2_tied"])
    assert getattr(qwen2, "head_dim", None) is None  # head_dim comes from hidden_size / heads
    mistral = AutoConfig.from_pretrained(checkpoints["mistral"])
    assert mistral.sliding_window is None and mistral.head_dim * mistral.num_attention_heads != mistral.hidden_size
    # the llama3 scaling changes the frequencies that the test prompts' positions reach
    llama3 = AutoConfig.from_pretrained(checkpoints["llama3"])
    params = getattr(llama3, "rope_parameters", None) or llama3.rope_scaling
    assert params["rope_type"] == "llama3"
    scaled, plain = rope_inv_freq(16, 10000.0, params), rope_inv_freq(16, 10000.0, None)
    assert (scaled < plain).sum() >= 4 and scaled[0] == plain[0]


# ---- parity, tp=2 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp2_prefill(checkpoints, tmp_path_factory) -> dict:
    """Rank 0's prefill logits of every checkpoint in one spawned tp=2 gloo group."""
    tmp = tmp_path_factory.mktemp("tp2")
    bad = write_tiny_decoder(tmp / "kv1", "LlamaForCausalLM", num_key_value_heads=1)
    return tp2_prefill_logits(checkpoints, bad, prompts(), str(tmp / "logits.pt"))


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_tp2_prefill_logits_match_transformers(name, tp2_prefill, hf_models):
    assert_logits_match(tp2_prefill[name], hf_logits(hf_models[name], prompts()))


def test_tp2_kv_heads_not_divisible_raises(tp2_prefill):
    assert tp2_prefill.get("refused") == \
        "num_key_value_heads (1) must be divisible by tensor_parallel_size (2)."


@pytest.mark.parametrize("name", TP2_GENERATE)
def test_tp2_greedy_batch_matches_transformers(name, checkpoints, hf_greedy_tokens):
    llm = LLM(checkpoints[name], tensor_parallel_size=2, **ENGINE_ARGS)
    try:
        assert completions(llm.generate(prompts(), GREEDY, use_tqdm=False)) == hf_greedy_tokens[name]
    finally:
        llm.shutdown()
    assert not dist.is_initialized()


def test_tp2_heads_not_divisible_raises_without_hanging(tmp_path):
    path = write_tiny_decoder(tmp_path, "LlamaForCausalLM", hidden_size=48, num_attention_heads=3,
                              num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"num_attention_heads \(3\) must be divisible by "
                                         r"tensor_parallel_size \(2\)"):
        LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    assert not dist.is_initialized()  # the failed build leaves no process group behind
    assert not multiprocessing.active_children()


# ---- registry and refused configs ----------------------------------------------------------------

def test_unsupported_architecture_lists_supported(checkpoints, tmp_path):
    config = LlamaConfig(architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError) as info:
        get_model_class(config)
    for arch in ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]:
        assert arch in str(info.value)
    assert sorted(MODEL_REGISTRY) == ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                      "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"]
    # through the engine: a Llama checkpoint whose config.json names an unknown architecture
    path = shutil.copytree(checkpoints["llama2"], tmp_path / "renamed")
    with open(path / "config.json") as f:
        config_json = json.load(f)
    config_json["architectures"] = ["FancyLlamaForCausalLM"]
    with open(path / "config.json", "w") as f:
        json.dump(config_json, f)
    with pytest.raises(ValueError, match=r"\['FancyLlamaForCausalLM'\] are not supported; supported: "
                                         r"\['LlamaForCausalLM', 'MistralForCausalLM'"):
        LLM(str(path), **ENGINE_ARGS)


def test_mistral_sliding_window_is_refused():
    small = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    with pytest.raises(ValueError, match="sliding_window=256"):
        MistralForCausalLM(MistralConfig(sliding_window=256, **small))
    # a window no shorter than any sequence masks nothing: accepted
    MistralForCausalLM(MistralConfig(sliding_window=512, **small))
    MistralForCausalLM(MistralConfig(sliding_window=None, **small))
    # Qwen2 applies its window only with use_sliding_window
    Qwen2ForCausalLM(Qwen2Config(use_sliding_window=False, sliding_window=16, **small))
    with pytest.raises(ValueError, match="sliding_window=16"):
        Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=0, **small))


def test_unsupported_activation_is_refused():
    config = LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        get_model_class(config)(config)


# ---- rope scaling --------------------------------------------------------------------------------

def test_llama3_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_scaling=scaling, rope_theta=500000.0)  # Llama 3.1 8B
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_inv_freq(128, 500000.0, scaling)
    torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)
    plain = rope_inv_freq(128, 500000.0, None)
    assert (ours == plain).any() and (ours < plain).any()


def test_unsupported_rope_scaling_raises():
    with pytest.raises(ValueError, match="rope_scaling of type 'yarn' is not supported"):
        rope_inv_freq(16, 10000.0, {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="lacks \\['original_max_position_embeddings'\\]"):
        rope_inv_freq(16, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0})
