"""Qwen3-MoE and Qwen2-MoE against transformers' own classes on the CPU in float32, and the fused
MoE Triton kernels against torch (interpreted on the CPU, compiled on a GPU).

Tiny random checkpoints written by transformers in the published layout (one tensor per expert
and projection). Checked: prefill logits of a mixed batch at tp=1 and tp=2 (gloo), greedy tokens
through `LLM.generate` at tp=1 and, for one checkpoint, tp=2; top-2 of 4 and top-8 of 16 experts,
norm_topk_prob on and off, dense layers (`mlp_only_layers`, `decoder_sparse_step`), Qwen2-MoE's
shared expert; missing, unexpected and misshapen expert weights; an expert intermediate size
that tp does not divide. On a GPU: the kernels at Qwen3-30B-A3B's shapes (and under CUDA-graph
replay), and bf16 greedy decoding with the Triton experts, eager and in CUDA graphs.
"""
import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from fixtures.checkpoints import write_tiny_decoder
from fixtures.prefill import nanovllm_prefill_logits, tp2_prefill_logits
from kernel_checks import run_interpreted
from nanovllm import LLM
from nanovllm.layers.fused_moe import FusedMoE
from nanovllm.models import get_model_class
from nanovllm.models.loader import load_model
from test_models import (ENGINE_ARGS, GREEDY, assert_logits_match, completions, hf_logits,
                         prompts)

MOE_SHAPE = dict(moe_intermediate_size=32, intermediate_size=96)
# name -> (architecture, config overrides of checkpoints.TINY_DECODER_SHAPE and MOE_SHAPE)
CHECKPOINTS = {
    "top2": ("Qwen3MoeForCausalLM", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
    "top8_norm": ("Qwen3MoeForCausalLM", dict(head_dim=16, num_experts=16, num_experts_per_tok=8,
                                              norm_topk_prob=True, tie_word_embeddings=True)),
    # layer 0 dense by mlp_only_layers, layer 2 dense by decoder_sparse_step; layers 1 and 3 sparse
    "dense_layers": ("Qwen3MoeForCausalLM", dict(head_dim=16, num_hidden_layers=4, num_experts=8,
                                                 num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
                                                 decoder_sparse_step=2)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                                              shared_expert_intermediate_size=48)),
}
TP2_GENERATE = ["top2"]


def write(path, name: str, **overrides) -> str:
    arch, config = CHECKPOINTS[name]
    return write_tiny_decoder(path, arch, seed=list(CHECKPOINTS).index(name), **{**MOE_SHAPE, **config, **overrides})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return {name: write(tmp_path_factory.mktemp(name), name) for name in CHECKPOINTS}


@pytest.fixture(scope="module")
def hf_models(checkpoints) -> dict:
    return {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in checkpoints.items()}


def hf_greedy(model) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one prompt at a time, no KV cache."""
    result = []
    for prompt in prompts():
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(GREEDY.max_tokens):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        result.append(ids[0, len(prompt):].tolist())
    return result


# ---- layout --------------------------------------------------------------------------------------

def test_checkpoints_have_the_published_layout_and_the_claimed_layers(checkpoints, hf_models):
    tensors = load_file(f"{checkpoints['dense_layers']}/model.safetensors")
    for e in range(8):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{proj}.weight" in tensors
    assert tensors["model.layers.1.mlp.gate.weight"].shape == (8, 64)
    assert "model.layers.0.mlp.gate_proj.weight" in tensors and "model.layers.2.mlp.up_proj.weight" in tensors
    for name, path in checkpoints.items():
        config = AutoConfig.from_pretrained(path)
        sparse = [hasattr(layer.mlp, "experts") for layer in get_model_class(config)(config).model.layers]
        assert sparse == [hasattr(layer.mlp, "experts") for layer in hf_models[name].model.layers], name
        assert sparse == ([False, True, False, True] if name == "dense_layers" else [True, True]), name


# ---- parity, tp=1 --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CHECKPOINTS)
def test_prefill_logits_match_transformers(name, checkpoints, hf_models):
    batch = prompts()
    assert_logits_match(nanovllm_prefill_logits(checkpoints[name], batch), hf_logits(hf_models[name], batch))


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_greedy_batch_matches_transformers(name, checkpoints, hf_models):
    expected = hf_greedy(hf_models[name])
    llm = LLM(checkpoints[name], **ENGINE_ARGS)
    try:
        assert completions(llm.generate(prompts(), GREEDY, use_tqdm=False)) == expected
    finally:
        llm.shutdown()
    assert len(set(expected[0])) > 3  # the random weights give varied tokens


# ---- parity, tp=2 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp2_prefill(checkpoints, tmp_path_factory) -> dict:
    """Rank 0's prefill logits of every checkpoint in one spawned tp=2 gloo group."""
    tmp = tmp_path_factory.mktemp("tp2")
    odd = write(tmp / "odd", "top2", moe_intermediate_size=33)
    return tp2_prefill_logits(checkpoints, odd, prompts(), str(tmp / "logits.pt"))


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_tp2_prefill_logits_match_transformers(name, tp2_prefill, hf_models):
    assert_logits_match(tp2_prefill[name], hf_logits(hf_models[name], prompts()))


def test_tp2_moe_intermediate_size_not_divisible_raises(tp2_prefill):
    assert tp2_prefill.get("refused") == \
        "moe_intermediate_size (33) must be divisible by tensor_parallel_size (2)."


@pytest.mark.parametrize("name", TP2_GENERATE)
def test_tp2_greedy_batch_matches_transformers(name, checkpoints, hf_models):
    llm = LLM(checkpoints[name], tensor_parallel_size=2, **ENGINE_ARGS)
    try:
        assert completions(llm.generate(prompts(), GREEDY, use_tqdm=False)) == hf_greedy(hf_models[name])
    finally:
        llm.shutdown()
    assert not dist.is_initialized()


# ---- refused checkpoints -------------------------------------------------------------------------

def edited_copy(src: str, dst, edit) -> str:
    """A copy of checkpoint `src` whose tensors `edit` changed in place."""
    path = shutil.copytree(src, dst)
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")
    return str(path)


def load(path: str):
    config = AutoConfig.from_pretrained(path)
    load_model(get_model_class(config)(config), path)


def test_missing_expert_weight_is_named(checkpoints, tmp_path):
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    path = edited_copy(checkpoints["top2"], tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"lacks weights for: \['{name}'\]"):
        load(path)


def test_unexpected_expert_weight_is_named(checkpoints, tmp_path):
    name = "model.layers.0.mlp.experts.4.gate_proj.weight"  # the model has experts 0..3

    def add(tensors):
        tensors[name] = tensors["model.layers.0.mlp.experts.3.gate_proj.weight"].clone()

    with pytest.raises(ValueError, match=rf"does not expect: \['{name}'\]"):
        load(edited_copy(checkpoints["top2"], tmp_path / "unexpected", add))


def test_misshapen_expert_weight_is_named(checkpoints, tmp_path):
    name = "model.layers.0.mlp.experts.1.down_proj.weight"

    def transpose(tensors):
        tensors[name] = tensors[name].T.contiguous()

    with pytest.raises(ValueError, match=rf"cannot load checkpoint tensor '{name}': .* \(32, 64\) .*expert 1's w2"):
        load(edited_copy(checkpoints["top2"], tmp_path / "misshapen", transpose))


def test_top_k_above_num_experts_is_refused():
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(5\) must be in \[1, num_experts \(4\)\]"):
        FusedMoE(num_experts=4, top_k=5, hidden_size=64, intermediate_size=32, renormalize=True)


# ---- kernels -------------------------------------------------------------------------------------

def test_fused_moe_kernels_interpreted():
    # a few tokens over many experts (some never hit), float32 and float16, the decode tiles
    run_interpreted("fused_moe", num_tokens=3, num_experts=8, top_k=2, hidden=32, intermediate=32,
                    dtypes=["float32", "float16"])
    # several blocks per expert, K and N not multiples of the tiles, grouped program order
    run_interpreted("fused_moe", num_tokens=40, num_experts=4, top_k=2, hidden=80, intermediate=48,
                    tile=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 256, 2048])
def test_fused_moe_kernels_gpu(num_tokens):
    from kernel_checks.fused_moe import check

    # Qwen3-30B-A3B's layer at tp=1 (I = 768) and tp=2 (I = 384)
    check("cuda", num_tokens, num_experts=128, top_k=8, hidden=2048, intermediate=768,
          dtypes=("bfloat16", "float32"))
    check("cuda", num_tokens, num_experts=128, top_k=8, hidden=2048, intermediate=384, dtypes=("bfloat16",))


GPU_MOE = {  # head_dim 128 (flash-attn); 32 experts, top-4, so that decode batches hit a subset
    "Qwen3MoeForCausalLM": dict(head_dim=128, norm_topk_prob=True),
    "Qwen2MoeForCausalLM": dict(shared_expert_intermediate_size=512, norm_topk_prob=False),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("architecture", sorted(GPU_MOE))
def test_gpu_greedy_close_to_transformers(architecture, tmp_path):
    """bf16 on the GPU (Triton experts), CUDA graphs and eager, tp=2 when two GPUs are visible:
    greedy tokens no further from transformers' float32 argmax than its own bf16 run strays. Weights
    of std 0.05, not the fixtures' 0.2: with 0.2 the hidden states grow ~250x in the first layer and
    transformers' own bf16 run strays 0.74 from float32 (Qwen2-MoE, H200), a yardstick too loose."""
    from test_gpu import GREEDY as GPU_GREEDY, assert_greedy_close, hf_greedy as hf_greedy_gpu, worst_relative_gap
    from test_gpu import prompts as gpu_prompts

    path = write_tiny_decoder(tmp_path, architecture, seed=7, vocab_size=32000, hidden_size=512,
                              num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4,
                              intermediate_size=1024, moe_intermediate_size=256, num_experts=32,
                              num_experts_per_tok=4, max_position_embeddings=2048, init_std=0.05,
                              **GPU_MOE[architecture])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    unique = [[t % 32000 for t in p[:300]] for p in gpu_prompts()]
    batch = unique * 3  # decode batches of 12: more experts hit per step
    results = {}
    for tp, eager in [(1, True), (1, False)] + ([(2, False)] if torch.cuda.device_count() >= 2 else []):
        llm = LLM(path, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024, enforce_eager=eager,
                  tensor_parallel_size=tp)
        try:
            results[tp, eager] = [o.outputs[0].token_ids for o in llm.generate(batch, GPU_GREEDY, use_tqdm=False)]
        finally:
            llm.shutdown()
    hf_bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    baseline = worst_relative_gap(hf, unique, hf_greedy_gpu(hf_bf16, unique, GPU_GREEDY.max_tokens))
    for key, got in results.items():
        ours = worst_relative_gap(hf, batch, got)
        print(f"{architecture} (tp, eager) = {key}: worst relative gap {ours:.4f}, transformers bf16 {baseline:.4f}")
        assert ours <= max(0.02, 2 * baseline), key
        assert_greedy_close(hf, batch, results[1, True], got)
