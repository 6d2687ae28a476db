"""The decoder's fused layers (layers/layernorm, activation, qk_norm_rope) at the model level. The
kernels themselves are checked against their torch references in test_kernels.py.

CPU: the torch path of `qk_norm_rope_store` stores what the attention layer's own store wrote
before the fusion, and `Attention(..., kv_stored=True)` stores nothing. GPU: an engine on the fused
Triton kernels against the same engine on the unfused torch layers (the module-level `triton` of
the three layer files set to None), per attention backend and KV-cache dtype: prefill logits
within bf16 rounding, greedy tokens equal up to near-ties (test_gpu's yardstick). One sequence (one-row
decode steps, where the norms and SiLU run inside the next projection's kernel, layers/skinny_gemm.py)
against the same engine without the one-row kernel: every step's logprobs within a few bf16 roundings.
With programmatic dependent launch (utils/triton_utils.py) and without it: the same tokens and logprobs, bit
for bit (the same kernels; a missing wait would read a buffer the kernel before is still writing).
"""
import pytest
import torch

from nanovllm.attention import Attention, AttentionMetadata, LayerKVCache, forward_context
from nanovllm.attention.kv_store import PAD_SLOT_ID, store_kvcache_torch
from nanovllm.layers import activation, layernorm, linear, qk_norm_rope, skinny_gemm
from nanovllm.layers.qk_norm_rope import QKNorm, QKVHeads, qk_norm_rope_store, qk_norm_rope_torch
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from test_gpu import hf_fp32, qwen3_gpu  # noqa: F401 (fixtures: test_gpu's tiny bf16 Qwen3)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_qk_norm_rope_store_torch_path_stores_like_the_attention_layer():
    g = torch.Generator().manual_seed(0)
    heads = QKVHeads(4, 2, 8)
    qkv = torch.randn(5, 8 * 8, generator=g)
    positions = torch.tensor([3, 0, 9, 4, 1])
    slots = torch.tensor([7, PAD_SLOT_ID, 0, 12, 3])
    cos_sin = RotaryEmbedding(8, 16, 10000.0).cos_sin_cache
    norm = QKNorm(1 + 0.1 * torch.randn(8, generator=g), 1 + 0.1 * torch.randn(8, generator=g), 1e-6)
    cache = LayerKVCache(torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8))
    q, k, v = qk_norm_rope_store(qkv.clone(), positions, cos_sin, heads, norm, cache, slots)
    ref_q, ref_k, ref_v = qk_norm_rope_torch(qkv, positions, cos_sin, heads, norm)
    ref = LayerKVCache(torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8))
    store_kvcache_torch(ref_k, ref_v, ref.k, ref.v, slots)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k) and torch.equal(v, ref_v)
    assert torch.equal(cache.k, ref.k) and torch.equal(cache.v, ref.v) and cache.k.flatten(0, 1)[7].abs().sum() > 0


def test_attention_does_not_store_what_the_caller_stored():
    attn = Attention(2, 8, 8 ** -0.5, 2)
    cache = LayerKVCache(torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8))
    attn.bind(attn.backend, cache)
    q, k, v = torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    meta = AttentionMetadata(is_prefill=True, slot_mapping=torch.tensor([5], dtype=torch.int32),
                             cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32),
                             cu_seqlens_k=torch.tensor([0, 1], dtype=torch.int32), max_seqlen_q=1, max_seqlen_k=1)
    with forward_context(meta):
        attn(q, k, v, kv_stored=True)
        assert cache.k.abs().sum() == 0 and cache.v.abs().sum() == 0
        attn(q, k, v)
        assert torch.equal(cache.k.flatten(0, 1)[5], k[0]) and torch.equal(cache.v.flatten(0, 1)[5], v[0])


# ---- GPU: fused against unfused, whole engine ------------------------------------------------

def _run(path: str, batch: list[list[int]], **options) -> tuple[list[list[int]], list[dict]]:
    """Greedy tokens of `batch`, and the top-20 logprobs of each prompt's first generated token."""
    from test_gpu import GREEDY
    from nanovllm import LLM, SamplingParams
    llm = LLM(path, max_model_len=1024, **options)
    try:
        tokens = [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]
        one = SamplingParams(temperature=0, max_tokens=1, logprobs=20)
        logprobs = [o.outputs[0].logprobs[0] for o in llm.generate(batch, one, use_tqdm=False)]
    finally:
        llm.shutdown()
    return tokens, logprobs


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("options", [dict(attention_backend="flash_attn"), dict(attention_backend="triton"),
                                     dict(attention_backend="triton", kv_cache_dtype="fp8"),
                                     dict(attention_backend="triton", enforce_eager=True)],
                         ids=["flash_attn", "triton", "triton_fp8", "triton_eager"])
def test_fused_engine_close_to_unfused(qwen3_gpu, hf_fp32, options, monkeypatch):  # noqa: F811
    from test_gpu import assert_greedy_close, prompts
    if options["attention_backend"] == "flash_attn":
        pytest.importorskip("flash_attn")
    batch = prompts()
    fused_tokens, fused_logprobs = _run(qwen3_gpu, batch, **options)
    with monkeypatch.context() as patch:
        for module in (layernorm, activation, qk_norm_rope):
            patch.setattr(module, "triton", None)
        plain_tokens, plain_logprobs = _run(qwen3_gpu, batch, **options)
    for fused, plain in zip(fused_logprobs, plain_logprobs):
        shared = sorted(set(fused) & set(plain))
        assert len(shared) >= 15, "the top-20 tokens of the first step differ"
        a = torch.tensor([fused[t].logprob for t in shared])
        b = torch.tensor([plain[t].logprob for t in shared])
        assert (a - b).norm() / b.norm() < 2e-2, f"first-step logprobs differ: {a} vs {b}"  # test_gpu's bound
    assert_greedy_close(hf_fp32, batch, fused_tokens, plain_tokens)



@pytest.mark.gpu
@gpu
def test_one_row_prologues_close_to_unfused(qwen3_gpu, hf_fp32, monkeypatch):  # noqa: F811
    from test_gpu import assert_greedy_close, prompts
    from nanovllm import LLM, SamplingParams
    prompt = prompts()[:1]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=20)
    fused_calls = []
    skinny_linear = skinny_gemm.skinny_linear

    def counted(*args, prologue=skinny_gemm.Prologue(), **kwargs):
        fused_calls.append(prologue.norm_weight is not None or prologue.silu_mul)
        return skinny_linear(*args, prologue=prologue, **kwargs)

    def run() -> tuple[list[int], list[dict]]:
        llm = LLM(qwen3_gpu, max_model_len=1024, attention_backend="triton")
        try:
            out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        finally:
            llm.shutdown()
        return out.token_ids, out.logprobs

    with monkeypatch.context() as patch:
        patch.setattr(skinny_gemm, "MAX_LOSS_WITH_PROLOGUE", float("inf"))  # the one-row kernel for every linear
        patch.setattr(skinny_gemm, "_ratios", {})
        patch.setattr(linear, "skinny_linear", counted)
        fused_tokens, fused_logprobs = run()
    assert sum(fused_calls) >= 3 * 2, "the norms and SiLU of one-row steps ran in the projections' kernels"
    with monkeypatch.context() as patch:
        patch.setattr(skinny_gemm, "triton", None)  # prefer_skinny: never
        plain_tokens, plain_logprobs = run()
    for step, (fused, plain) in enumerate(zip(fused_logprobs, plain_logprobs)):
        if fused_tokens[:step] != plain_tokens[:step]:
            break  # a near-tie went the other way: assert_greedy_close judges it
        shared = sorted(set(fused) & set(plain))
        assert len(shared) >= 15, f"step {step}: the top-20 tokens differ"
        a = torch.tensor([fused[t].logprob for t in shared])
        b = torch.tensor([plain[t].logprob for t in shared])
        # bf16 decode of a random-weight model: any change of rounding moves these logprobs by 1-3% (on the
        # CPU, the one-row kernel without its prologues differs from torch's layers by as much); a wrong norm,
        # residual or activation moves them by their own size
        assert (a - b).norm() / b.norm() < 0.1, f"step {step}: logprobs differ: {a} vs {b}"
    assert_greedy_close(hf_fp32, prompt, [fused_tokens], [plain_tokens])


@pytest.mark.gpu
@gpu
def test_programmatic_dependent_launch_changes_no_result(qwen3_gpu, monkeypatch):  # noqa: F811
    from test_gpu import prompts
    from nanovllm import LLM, SamplingParams
    from nanovllm.utils import triton_utils
    if not triton_utils.use_pdl(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90 or later")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)

    def run(pdl: str, eager: bool) -> list:
        monkeypatch.setenv("NANOVLLM_PDL", pdl)
        triton_utils.use_pdl.cache_clear()
        monkeypatch.setattr(skinny_gemm, "_ratios", {})
        llm = LLM(qwen3_gpu, max_model_len=1024, attention_backend="triton", enforce_eager=eager)
        try:  # one row: the whole layer in PDL kernels; four: cuBLAS's products between them
            outputs = [o.outputs[0] for batch in (prompts()[:1], prompts())
                       for o in llm.generate(batch, params, use_tqdm=False)]
        finally:
            llm.shutdown()
        return [(o.token_ids, [{t: p.logprob for t, p in step.items()} for step in o.logprobs]) for o in outputs]

    try:
        # the one-row kernel for every one-row linear, whatever the timing says
        monkeypatch.setattr(skinny_gemm, "MIN_GAIN", 1e-9)
        monkeypatch.setattr(skinny_gemm, "MAX_LOSS_WITH_PROLOGUE", float("inf"))
        for eager in (False, True):
            assert run("1", eager) == run("0", eager), f"enforce_eager={eager}: the same kernels gave other bits"
    finally:
        monkeypatch.undo()
        triton_utils.use_pdl.cache_clear()
