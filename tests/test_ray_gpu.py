"""Data parallelism on Ray over two GPUs (skipped without two GPUs or Ray): two replicas, one GPU
each, give one engine's greedy tokens (up to bf16 near-ties, judged by a float32 reference), and a
replica killed mid-run loses no request. test_ray.py checks the same on a CPU cluster exactly."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]
ray = pytest.importorskip("ray", reason="needs Ray: pip install nano-vllm[ray]")

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.ray import data_parallel  # noqa: E402
from test_gpu import assert_greedy_close, hf_fp32, prompts, qwen3_gpu  # noqa: E402, F401 (fixtures)
from test_ray import assert_shut_down, kill_replica_mid_run  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_two_gpu_replicas_match_one_engine_and_survive_a_kill(ray_cluster, qwen3_gpu, hf_fp32, monkeypatch,
                                                               caplog):
    monkeypatch.setattr(data_parallel, "REPORT_INTERVAL_S", 0.02)
    # enough decode steps (up to 256) that the kill lands while replica 1 still holds requests
    batch = [p[:100 + 23 * i] for i, p in enumerate(prompts() * 8)]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=32 + 56 * (i % 5)) for i in range(len(batch))]
    one = LLM(qwen3_gpu, max_model_len=1024)
    try:
        want = tokens(one.generate(batch, params, use_tqdm=False))
    finally:
        one.shutdown()
    torch.cuda.empty_cache()

    dp_llm = LLM(qwen3_gpu, data_parallel_size=2, max_model_len=1024)
    got = dp_llm.generate(batch, params, use_tqdm=False)
    assert [int(o.request_id) for o in got] == list(range(int(got[0].request_id), int(got[0].request_id) + len(got)))
    assert_greedy_close(hf_fp32, batch, want, tokens(got))

    outputs, victim = kill_replica_mid_run(dp_llm, batch, params, caplog)
    assert [o.prompt_token_ids for o in outputs] == batch
    assert [len(t) for t in tokens(outputs)] == [p.max_tokens for p in params]
    assert_greedy_close(hf_fp32, batch, want, tokens(outputs))
    assert_shut_down(dp_llm, victim)
