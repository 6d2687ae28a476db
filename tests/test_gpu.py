"""GPU checks (skipped without CUDA): bf16 prefill logits against transformers on the GPU, greedy
tokens identical with and without CUDA graphs, flash-attn's prefix-cache path equal to the
uncached path, and tensor parallelism when two GPUs are visible."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.worker.inputs import prepare_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen3_gpu(tmp_path_factory):
    """A Qwen3 small enough to build quickly, with flash-attn's head dim 128, in bfloat16."""
    from fixtures.checkpoints import write_tiny_qwen3
    return write_tiny_qwen3(tmp_path_factory.mktemp("qwen3_gpu"), num_hidden_layers=4, hidden_size=512,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=128, intermediate_size=1024,
                            dtype=torch.bfloat16, seed=3)


@pytest.fixture(scope="module")
def hf_fp32(qwen3_gpu):
    return AutoModelForCausalLM.from_pretrained(qwen3_gpu, dtype=torch.float32).cuda().eval()


def assert_greedy_close(hf_fp32, prompts: list[list[int]], a: list[list[int]], b: list[list[int]],
                        rel_tol: float = 0.02):
    """Greedy outputs of two bf16 paths agree token for token, except that after a point where
    the float32 reference scores both paths' tokens within `rel_tol * |top logit|` of the top (a
    near-tie: bf16 resolves a logit near 19 only to 0.125, so rounding may break it either way)
    the rest may differ. A real bug diverges with gaps of the order of the logits' spread."""
    for prompt, x, y in zip(prompts, a, b, strict=True):
        assert len(x) == len(y)
        i = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), None)
        if i is None:
            continue
        with torch.no_grad():
            logits = hf_fp32(torch.tensor([prompt + x[:i]], device="cuda")).logits[0, -1]
        gap = (logits[x[i]] - logits[y[i]]).abs().item()
        top = logits.max().item()
        tol = rel_tol * abs(top)
        print(f"diverged at token {i}/{len(x)}: gap {gap:.4f}, top logit {top:.2f}, std {logits.std():.2f}")
        assert gap <= tol and top - max(logits[x[i]], logits[y[i]]).item() <= tol, \
            f"prompt of {len(prompt)} tokens: token {i} differs ({x[i]} vs {y[i]}) beyond a near-tie (gap {gap:.3f})"


def worst_relative_gap(hf_fp32, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """Teacher-forced check of greedy output: given each output's own prefix, how far below the
    float32 reference's best token (relative to the top logit) its worst token scores. Judged on
    its own trajectory, a near-tie taken the other way cannot derail the comparison."""
    worst = 0.0
    for prompt, out in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            logits = hf_fp32(torch.tensor([prompt + out], device="cuda")).logits[0, len(prompt) - 1:-1]
        top = logits.max(-1).values
        chosen = logits.gather(1, torch.tensor(out, device="cuda").unsqueeze(1)).squeeze(1)
        worst = max(worst, ((top - chosen) / top.abs()).max().item())
    return worst


def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outputs = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            for _ in range(max_tokens):
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
        outputs.append(ids[0, len(p):].tolist())
    return outputs


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 150000, (n,), generator=g).tolist() for n in (5, 37, 300, 700)]


def test_prefill_logits_match_transformers_bf16(qwen3_gpu):
    hf = AutoModelForCausalLM.from_pretrained(qwen3_gpu, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(qwen3_gpu, enforce_eager=True, max_model_len=1024)
    runner = llm.llm_engine.executor.runner
    try:
        for p in prompts():
            seq = Sequence(0, p, GREEDY)
            llm.llm_engine.scheduler.block_manager.allocate(seq)
            seq.num_scheduled_tokens = len(p)
            step = prepare_step([seq], True, runner.block_size)
            step.logits_indices = list(range(len(p)))  # logits of every position
            logits = _logits(runner, step)
            llm.llm_engine.scheduler.block_manager.deallocate(seq)
            with torch.no_grad():
                ref = hf(torch.tensor([p], device="cuda")).logits[0].float()
            rel = (logits - ref).norm() / ref.norm()
            assert rel < 2e-2, f"prompt of {len(p)} tokens: relative error {rel:.2e}"
    finally:
        llm.shutdown()


def _logits(runner, step):
    """Run the model on `step` and return the logits of `step.logits_indices` (float32)."""
    from nanovllm.attention import AttentionMetadata, forward_context
    t = lambda x, dt: torch.tensor(x, dtype=dt, device="cuda")
    meta = AttentionMetadata(is_prefill=True, slot_mapping=t(step.slot_mapping, torch.int32),
                             cu_seqlens_q=t(step.cu_seqlens_q, torch.int32), cu_seqlens_k=t(step.cu_seqlens_k, torch.int32),
                             max_seqlen_q=step.cu_seqlens_q[-1], max_seqlen_k=step.cu_seqlens_k[-1])
    with torch.inference_mode(), forward_context(meta):
        hidden = runner.model(t(step.input_ids, torch.int64), t(step.positions, torch.int64))
        return runner.model.compute_logits(hidden[step.logits_indices]).float()


def test_cuda_graphs_same_tokens_as_eager(qwen3_gpu, hf_fp32):
    results = []
    batch = prompts() * 5
    for eager in (True, False):
        llm = LLM(qwen3_gpu, enforce_eager=eager, max_model_len=2048, max_num_seqs=64)
        results.append([o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)])
        llm.shutdown()
    assert_greedy_close(hf_fp32, batch, results[0], results[1])


def test_prefix_cache_path_equals_uncached(qwen3_gpu, hf_fp32):
    shared = prompts()[3][:600]
    batch = [shared + p[:20] for p in prompts()] + [shared]
    results = []
    for caching in (False, True):
        llm = LLM(qwen3_gpu, enable_prefix_caching=caching, max_model_len=2048)
        llm.generate(batch[:1], GREEDY, use_tqdm=False)  # fills the cache (when enabled)
        outputs = llm.generate(batch, GREEDY, use_tqdm=False)
        llm.shutdown()
        results.append(outputs)
    assert all(o.num_cached_tokens == 0 for o in results[0])
    assert all(o.num_cached_tokens >= 512 for o in results[1][:4])
    assert_greedy_close(hf_fp32, batch, *[[o.outputs[0].token_ids for o in r] for r in results])


def test_chunked_prefill_same_tokens_on_gpu(qwen3_gpu, hf_fp32):
    results = []
    for budget in (16384, 256):
        llm = LLM(qwen3_gpu, max_num_batched_tokens=budget, max_model_len=1024)
        results.append([o.outputs[0].token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)])
        llm.shutdown()
    assert_greedy_close(hf_fp32, prompts(), results[0], results[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_parallel_2_same_tokens(qwen3_gpu, hf_fp32):
    results = []
    for tp in (1, 2):
        llm = LLM(qwen3_gpu, tensor_parallel_size=tp, max_model_len=1024)
        results.append([o.outputs[0].token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)])
        llm.shutdown()
    assert_greedy_close(hf_fp32, prompts(), results[0], results[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_parallel_2_two_engines_and_a_dead_worker(qwen3_gpu):
    """Two tp=2 engines in one process (each its own NCCL group, CUDA graphs captured); a worker
    killed while idle is named at the next step; shutdown leaves no process behind."""
    import multiprocessing
    import os
    import signal
    first = LLM(qwen3_gpu, tensor_parallel_size=2, max_model_len=1024, gpu_memory_utilization=0.3)
    second = LLM(qwen3_gpu, tensor_parallel_size=2, max_model_len=1024, gpu_memory_utilization=0.6)
    try:
        outputs = [[o.outputs[0].token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)]
                   for llm in (first, second)]
        assert outputs[0] == outputs[1]
        worker = first.llm_engine.executor.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        with pytest.raises(RuntimeError, match="worker rank 1 .* was killed by SIGKILL"):
            first.generate(prompts(), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in second.generate(prompts(), GREEDY, use_tqdm=False)] == outputs[1]
    finally:
        first.shutdown()
        second.shutdown()
    assert not multiprocessing.active_children()


FAMILIES = {  # head dims 64 and 128 (the flash-attn build here has those two)
    "Qwen2ForCausalLM": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "LlamaForCausalLM": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    "MistralForCausalLM": dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                               sliding_window=None),
    "Qwen3ForCausalLM": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=128),
}


@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_family_greedy_close_to_transformers(architecture, tmp_path):
    from fixtures.checkpoints import write_tiny_decoder
    overrides = dict(FAMILIES[architecture])
    rope_scaling = overrides.pop("rope_scaling", None)
    path = write_tiny_decoder(tmp_path, architecture, seed=5, rope_scaling=rope_scaling, vocab_size=32000,
                              intermediate_size=1024, num_hidden_layers=4, max_position_embeddings=2048,
                              **overrides)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    batch = [[t % 32000 for t in p[:300]] for p in prompts()]
    llm = LLM(path, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()
    # Random weights without q/k norm make attention scores large and bf16-sensitive; the
    # yardstick is how far transformers' own bf16 greedy run strays from its float32 argmax.
    hf_bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    baseline = worst_relative_gap(hf, batch, hf_greedy(hf_bf16, batch, GREEDY.max_tokens))
    ours = worst_relative_gap(hf, batch, got)
    print(f"{architecture}: worst relative gap {ours:.4f}, transformers bf16 {baseline:.4f}")
    assert ours <= max(0.02, 2 * baseline)
