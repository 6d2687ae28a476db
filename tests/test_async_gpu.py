"""Async scheduling on the GPU (skipped without CUDA): with CUDA graphs and eager, the same
tokens and logprobs with it on and off. Without stops the two loops run the same batches step
for step (a sequence that its in-flight token ends by length is not scheduled again), so the
outputs must be identical bit for bit, unseeded draws included; with stops the async loop runs
each stopped sequence one more (dropped) step, so batches differ and greedy tokens are compared
up to bf16 near-ties. Also tp=2 (two GPUs): the samples' broadcast to rank 1."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from test_gpu import assert_greedy_close, hf_fp32, prompts, qwen3_gpu  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def workload() -> tuple[list[list[int]], list[SamplingParams]]:
    batch = prompts() * 6
    kinds = [dict(temperature=0), dict(temperature=0.8), dict(temperature=1.0, seed=3),
             dict(temperature=0.7, top_k=20, top_p=0.9, logprobs=2), dict(temperature=0, logprobs=0, min_tokens=5),
             dict(temperature=0, repetition_penalty=1.3, frequency_penalty=0.4),  # its newest token from the device
             dict(temperature=0.8, seed=11, presence_penalty=0.6)]
    params = [SamplingParams(ignore_eos=True, max_tokens=8 + 13 * (i % 5), **kinds[i % len(kinds)])
              for i in range(len(batch))]
    return batch, params


def outputs(llm: LLM, batch, params) -> list:
    result = []
    for o in llm.generate(batch, params, use_tqdm=False):
        c = o.outputs[0]
        result.append((c.token_ids, c.finish_reason, c.logprobs and [sorted((t, p.logprob, p.rank) for t, p in e.items())
                                                                     for e in c.logprobs]))
    return result


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_same_outputs_on_and_off_without_stops(qwen3_gpu, enforce_eager):
    batch, params = workload()
    results = []
    for mode in (False, True):
        llm = LLM(qwen3_gpu, async_scheduling=mode, enforce_eager=enforce_eager, max_model_len=1024)
        try:
            assert llm.llm_engine.config.async_scheduling is mode
            results.append(outputs(llm, batch, params))
            results.append(outputs(llm, batch, params))  # a second run: the prefix cache's path
        finally:
            llm.shutdown()
    assert results[0] == results[2] and results[1] == results[3]


def test_stops_end_outputs_at_once_and_greedy_tokens_agree(qwen3_gpu, hf_fp32):  # noqa: F811
    batch = prompts() * 4
    llm = LLM(qwen3_gpu, async_scheduling=False, max_model_len=1024)
    try:
        free = [o.outputs[0].token_ids for o in llm.generate(batch, SamplingParams(temperature=0, max_tokens=40,
                                                                                      ignore_eos=True), use_tqdm=False)]
    finally:
        llm.shutdown()
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[out[5 + i % 20]])
              for i, out in enumerate(free)]
    results = []
    for mode in (False, True):
        llm = LLM(qwen3_gpu, async_scheduling=mode, max_model_len=1024)
        try:
            results.append([o.outputs[0] for o in llm.generate(batch, params, use_tqdm=False)])
            assert llm.llm_engine.scheduler.block_manager.num_free_blocks == llm.llm_engine.executor.num_kvcache_blocks
        finally:
            llm.shutdown()
    for p, outs in zip(params, zip(*results)):
        for c in outs:  # the stop token ends the output: nothing past it
            stops = [i for i, t in enumerate(c.token_ids) if t in p.stop_token_ids]
            assert stops in ([], [len(c.token_ids) - 1]) and (c.finish_reason == "stop") == bool(stops)
    common = [min(len(a.token_ids), len(b.token_ids)) for a, b in zip(*results)]
    assert_greedy_close(hf_fp32, batch, *[[c.token_ids[:n] for c, n in zip(r, common)] for r in results])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_parallel_2_same_outputs_on_and_off(qwen3_gpu):
    batch, params = workload()
    results = []
    for mode in (False, True):
        llm = LLM(qwen3_gpu, async_scheduling=mode, tensor_parallel_size=2, max_model_len=1024)
        try:
            results.append(outputs(llm, batch, params))
        finally:
            llm.shutdown()
    assert results[0] == results[1]
