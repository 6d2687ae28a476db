"""The KV path's options on the CPU: every block size with prefix caching, chunked prefill and
preemption (greedy tokens equal transformers'), the FP8 cache (stored as float8 with scales, read
dequantized; logits close to the float cache's), the backend choice and its errors, and the
Triton backend end to end under Triton's interpreter (tokens equal the torch backend's)."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from fixtures.checkpoints import ENGINE_ARGS, write_tiny_qwen3
from nanovllm import LLM, SamplingParams
from nanovllm.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from kv_cache_accuracy import compare  # noqa: E402

ARGS = {k: v for k, v in ENGINE_ARGS.items() if k not in ("kvcache_block_size", "max_model_len")}
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def hf_model(qwen3_tied):
    return AutoModelForCausalLM.from_pretrained(qwen3_tied, dtype=torch.float32).eval()


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
def test_block_sizes_prefix_cache_chunks_preemption(qwen3_tied, hf_model, block_size):
    shared = [2000 + i for i in range(block_size + 8)]  # one full shared block and a partial one
    prompts = [shared + [7], shared + [8, 9, 10], [3000 + i for i in range(block_size - 4)]]
    reference = [hf_greedy(hf_model, p, GREEDY.max_tokens) for p in prompts]
    # 4 blocks (one max_model_len sequence): the three sequences outgrow them while decoding
    llm = LLM(qwen3_tied, block_size=block_size, max_model_len=4 * block_size, num_gpu_blocks_override=4,
              max_num_batched_tokens=block_size // 2 + 3, **ARGS)
    try:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == reference
        assert llm.llm_engine.scheduler.num_preemptions > 0
        again = llm.generate(prompts[:2], GREEDY, use_tqdm=False)  # the shared block is cached by now
        assert [o.outputs[0].token_ids for o in again] == reference[:2]
        assert [o.num_cached_tokens for o in again] == [block_size, block_size]
    finally:
        llm.shutdown()


def test_fp8_cache_is_stored_as_float8_and_reads_close(qwen3_tied):
    llm = LLM(qwen3_tied, kv_cache_dtype="fp8", block_size=16, max_model_len=256, **ARGS)
    try:
        runner = llm.llm_engine.executor.runner
        assert runner.kv_cache.dtype == torch.float8_e4m3fn and runner.kv_scales.dtype == torch.float32
        (out,) = llm.generate([list(range(100, 160))], GREEDY, use_tqdm=False)
        assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
        assert runner.kv_scales.abs().sum() > 0  # scales were written
    finally:
        llm.shutdown()
    prompts = [[100 + 7 * i % 900 for i in range(n)] for n in (30, 75)]
    result = compare(qwen3_tied, prompts, 12, block_size=16, max_model_len=256, **ARGS)
    # e4m3 keeps 3 mantissa bits (relative rounding error <= 1/16 per element, one scale per token
    # and head of 16 here): measured 3.5% of the logits' spread, KL 3e-3, top-1 agreement 23/24
    assert result["mean_abs"] < 0.06 * result["logit_std"] and result["mean_kl"] < 0.01, result
    assert result["top1_agreement"] >= 0.9, result


@pytest.mark.parametrize("options, match", [
    (dict(attention_backend="flashinfer"), r"attention_backend must be one of \('auto', 'flash_attn', 'triton', "
                                           r"'torch'\), got 'flashinfer'"),
    (dict(attention_backend="flash_attn"), "attention_backend='flash_attn' cannot serve this engine"),
    (dict(attention_backend="triton"), "attention_backend='triton' cannot serve this engine: Triton kernels run"),
    (dict(kv_cache_dtype="fp8_e5m2"), r"kv_cache_dtype must be one of \('auto', 'fp8', 'fp8_e4m3'\), got 'fp8_e5m2'"),
    (dict(block_size=0), "block_size must be an integer >= 1, got 0"),
    (dict(block_size=32, kvcache_block_size=64), "block_size=32 and kvcache_block_size=64 differ"),
])
def test_bad_kv_options_raise_at_construction(qwen3_tied, options, match):
    with pytest.raises(ValueError, match=match):
        Config(qwen3_tied, device="cpu", **options)


def test_backend_and_block_size_resolution(qwen3_tied):
    config = Config(qwen3_tied, device="cpu")
    assert (config.attention_backend, config.block_size, config.kvcache_block_size) == ("torch", 16, 16)
    assert Config(qwen3_tied, device="cpu", kvcache_block_size=48).block_size == 48  # the alias; torch: any size


def test_triton_backend_interpreted_equals_torch(tmp_path):
    """The Triton backend end to end on the CPU under TRITON_INTERPRET=1 (head_dim 64: one of the
    kernels' sizes), bf16-free float32, block sizes 16 and 32, model-dtype and FP8 caches: greedy
    tokens equal the torch backend's on the same cache dtype."""
    path = write_tiny_qwen3(tmp_path / "qwen3_hd64", num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                            num_hidden_layers=1, seed=4)
    code = f"""
import sys
from nanovllm import LLM, SamplingParams
prompts = [list(range(100, 140)), list(range(500, 519)), [7, 8, 9]]
params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
for block_size, kv_cache_dtype in ((16, "auto"), (32, "fp8")):
    tokens = {{}}
    for backend in ("torch", "triton"):
        llm = LLM({str(path)!r}, attention_backend=backend, block_size=block_size, kv_cache_dtype=kv_cache_dtype,
                  max_model_len=128, max_num_batched_tokens=24, device="cpu", dtype="float32",
                  cpu_kvcache_space_gib=0.01)
        first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        again = [o.outputs[0].token_ids for o in llm.generate(prompts[:1], params, use_tqdm=False)]  # prefix hit
        assert again == first[:1], (backend, again, first)
        tokens[backend] = first
        llm.shutdown()
    assert tokens["torch"] == tokens["triton"], (block_size, kv_cache_dtype, tokens)
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]
