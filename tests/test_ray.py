"""nano-vllm on Ray, on a local CPU cluster (one per module): data-parallel replicas give one
engine's outputs in input order, survive a replica killed mid-run, and free everything on
shutdown; the Ray Data stage (and its Parquet example) answers every row once, with one engine's
tokens. Skipped when Ray is not installed (the `ray` extra; CI installs it with the `test` extra)."""
import importlib.util
import logging
import os
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs Ray: pip install nano-vllm[ray]")

from fixtures.checkpoints import ENGINE_ARGS  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.ray import LLMPredictor  # noqa: E402
from nanovllm.ray import data_parallel  # noqa: E402

RAY_CPUS = 4  # logical CPUs: two replicas, a Ray Data actor and its read / write tasks
CALL_TIMEOUT_S = 180
PROMPTS = [[(7 * i + j) % 5000 + 1 for j in range(3 + 5 * i)] for i in range(10)] + ["Hello, my name is", "The sky"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dp_llm(ray_cluster, qwen3_tied):
    engine = LLM(qwen3_tied, data_parallel_size=2, device="cpu", **ENGINE_ARGS)
    yield engine
    engine.shutdown()


def _request_ids_counted(outputs) -> bool:
    """Ids as one engine gives them: a counter across calls, in input order."""
    ids = [int(o.request_id) for o in outputs]
    return ids == list(range(ids[0], ids[0] + len(ids)))


def _same_completions(got, want):
    assert _request_ids_counted(got) and _request_ids_counted(want)
    for g, w in zip(got, want):
        assert (g.prompt, g.prompt_token_ids, g.finished) == (w.prompt, w.prompt_token_ids, True)
        assert len(g.outputs) == len(w.outputs)
        for gc, wc in zip(g.outputs, w.outputs):
            assert (gc.index, gc.text, gc.token_ids, gc.finish_reason, gc.stop_reason) == \
                   (wc.index, wc.text, wc.token_ids, wc.finish_reason, wc.stop_reason)
            if wc.logprobs is not None:
                assert [list(p) for p in gc.logprobs] == [list(p) for p in wc.logprobs]
                assert gc.cumulative_logprob == pytest.approx(wc.cumulative_logprob, abs=1e-4)


def test_generate_matches_one_engine(dp_llm, llm):
    greedy = [SamplingParams(temperature=0, max_tokens=4 + 2 * i) for i in range(len(PROMPTS))]
    _same_completions(dp_llm.generate(PROMPTS, greedy, use_tqdm=False), llm.generate(PROMPTS, greedy, use_tqdm=False))
    seeded = SamplingParams(temperature=0.8, top_k=50, seed=7, n=2, logprobs=2, max_tokens=8, stop=["\n"])
    _same_completions(dp_llm.generate(PROMPTS, seeded, use_tqdm=False), llm.generate(PROMPTS, seeded, use_tqdm=False))
    assert len(dp_llm.llm_engine.replicas) == 2


def test_chat_matches_one_engine(dp_llm, llm):
    conversation = [{"role": "user", "content": "Hi there"}]
    params = SamplingParams(temperature=0, max_tokens=6)
    _same_completions(dp_llm.chat([conversation, conversation], params, use_tqdm=False),
                      llm.chat([conversation, conversation], params, use_tqdm=False))


def test_bad_input_raises_before_work(dp_llm, ray_cluster, qwen3_tied):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dp_llm.generate([[1, 2], [10 ** 9]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
        dp_llm.generate(["a"], [dict(max_tokens=2)], use_tqdm=False)
    assert all(not r.in_flight for r in dp_llm.llm_engine.replicas)
    assert dp_llm.generate([[1, 2]], SamplingParams(max_tokens=2), use_tqdm=False)[0].finished
    with pytest.raises(ValueError, match="data_parallel_size must be an integer >= 1, got 0"):
        LLM(qwen3_tied, data_parallel_size=0, device="cpu", **ENGINE_ARGS)
    with pytest.raises(ValueError, match="needs 8 CPUs, but the Ray cluster has 4"):
        LLM(qwen3_tied, data_parallel_size=8, device="cpu", **ENGINE_ARGS)
    with pytest.raises(ValueError, match="data_parallel_backend must be 'ray'"):
        LLM(qwen3_tied, data_parallel_backend="mp", **ENGINE_ARGS)


def test_failed_start_names_the_replica_and_frees_its_resources(dp_llm, qwen3_tied):
    free = ray.available_resources()["CPU"]
    with pytest.raises(RuntimeError, match=r"(?s)replica \d failed to start.*fewer than one sequence"):
        LLM(qwen3_tied, data_parallel_size=2, device="cpu", **{**ENGINE_ARGS, "num_gpu_blocks_override": 1})
    deadline = time.monotonic() + CALL_TIMEOUT_S  # placement groups are removed asynchronously
    while ray.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources()["CPU"] == free


def test_predictor_batch(qwen3_tied, llm):
    """LLMPredictor on a numpy batch (no Ray Data): token-id prompts, per-row params, other columns kept."""
    predictor = LLMPredictor(qwen3_tied, sampling_params=dict(temperature=0, max_tokens=5), **ENGINE_ARGS)
    batch = {"id": np.arange(3), "prompt_token_ids": np.array([np.array(p) for p in PROMPTS[:3]], dtype=object),
             "sampling_params": np.array([{"max_tokens": 2, "temperature": None}, {"max_tokens": None}, {}])}
    out = predictor(batch)
    want = llm.generate(PROMPTS[:3], [SamplingParams(temperature=0, max_tokens=m) for m in (2, 5, 5)], use_tqdm=False)
    assert list(out["id"]) == [0, 1, 2]
    assert [list(t) for t in out["generated_token_ids"]] == [w.outputs[0].token_ids for w in want]
    assert list(out["generated_text"]) == [w.outputs[0].text for w in want]
    assert list(out["num_generated_tokens"]) == [len(w.outputs[0].token_ids) for w in want]
    assert list(out["finish_reason"]) == [w.outputs[0].finish_reason for w in want]
    with pytest.raises(ValueError, match="n must be 1"):
        predictor({"prompt": np.array(["a"], dtype=object), "sampling_params": np.array([{"n": 2, "temperature": 1}])})
    with pytest.raises(ValueError, match="needs a 'prompt' or a 'prompt_token_ids' column"):
        predictor({"text": np.array(["a"], dtype=object)})
    predictor.engine.shutdown()


def test_ray_data_parquet_example(ray_cluster, qwen3_tied, llm, tmp_path):
    """examples/ray_data_parquet.py: Parquet in, Parquet out, every row once with one engine's tokens."""
    pd = pytest.importorskip("pandas")
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "ray_data_parquet.py")
    spec = importlib.util.spec_from_file_location("ray_data_parquet", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    texts = [f"Question {i}: what is {i} plus {i}?" for i in range(7)]
    row_params = [{"max_tokens": 2 + i} if i % 2 else {"max_tokens": 2 + i, "temperature": 0.0} for i in range(7)]
    pd.DataFrame({"id": range(7), "prompt": texts, "sampling_params": row_params}).to_parquet(tmp_path / "in.parquet")
    example.run(str(tmp_path / "in.parquet"), str(tmp_path / "out"), qwen3_tied,
                dict(temperature=0, max_tokens=4), concurrency=1, batch_size=3, engine_options=ENGINE_ARGS)
    result = pd.read_parquet(tmp_path / "out").sort_values("id")
    assert list(result["id"]) == list(range(7))
    assert list(result["prompt"]) == texts
    want = llm.generate(texts, [SamplingParams(temperature=0, max_tokens=2 + i) for i in range(7)], use_tqdm=False)
    assert [list(t) for t in result["generated_token_ids"]] == [w.outputs[0].token_ids for w in want]
    assert list(result["generated_text"]) == [w.outputs[0].text for w in want]
    assert list(result["num_generated_tokens"]) == [2 + i for i in range(7)]


def kill_replica_mid_run(dp_llm, prompts, params, caplog):
    """Runs `generate` on a thread and kills replica 1 once it has answered some requests and
    holds others; returns that call's outputs and the replica killed. Asserts the kill came mid-run,
    the call ended, and the log named the replica."""
    victim = dp_llm.llm_engine.replicas[1]
    outputs = []
    thread = threading.Thread(target=lambda: outputs.extend(dp_llm.generate(prompts, params, use_tqdm=False)))
    with caplog.at_level(logging.WARNING, logger=data_parallel.__name__):
        thread.start()
        most, deadline = 0, time.monotonic() + CALL_TIMEOUT_S
        while time.monotonic() < deadline:
            held = len(victim.in_flight)
            most = max(most, held)
            if 0 < held < most:
                ray.kill(victim.actor)
                break
            time.sleep(0.002)
        thread.join(CALL_TIMEOUT_S)
    assert not thread.is_alive()
    assert 0 < held < most, "the replica was not killed mid-run"
    assert "replica 1" in caplog.text and "ray.kill" in caplog.text
    return outputs, victim


def assert_shut_down(dp_llm, victim):
    """After shutdown: both replicas' placement groups removed, the survivor's actor gone, and a
    later call refused."""
    [survivor] = dp_llm.llm_engine.replicas
    assert survivor is not victim
    dp_llm.shutdown()
    groups = [victim.placement_group, survivor.placement_group]
    assert [ray.util.placement_group_table(g)["state"] for g in groups] == ["REMOVED", "REMOVED"]
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(survivor.actor.info.remote(), timeout=CALL_TIMEOUT_S)
    with pytest.raises(RuntimeError, match="no replica left"):
        dp_llm.generate([[1]], use_tqdm=False)


def test_killed_replica_loses_no_request(dp_llm, monkeypatch, caplog):
    """Runs last: kills replica 1 of the module's engine while generate runs, then shuts it down.
    The reference is the same call on both replicas (which test_generate_matches_one_engine ties
    to one engine)."""
    monkeypatch.setattr(data_parallel, "REPORT_INTERVAL_S", 0.02)
    prompts = [[(3 * i + j) % 3000 + 1 for j in range(4 + i)] for i in range(12)]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=10 + 15 * (i % 6)) for i in range(12)]
    expected = dp_llm.generate(prompts, params, use_tqdm=False)
    outputs, victim = kill_replica_mid_run(dp_llm, prompts, params, caplog)
    _same_completions(outputs, expected)
    assert_shut_down(dp_llm, victim)
