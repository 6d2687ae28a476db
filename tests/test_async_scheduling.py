"""Async scheduling end to end on the CPU (tiny Qwen3): the same tokens, texts, logprobs and
finish reasons with `async_scheduling` on and off, for every feature whose logic is host-side
(stops, min_tokens, n > 1, seeds, logprobs, prompt logprobs, preemption, chunked prefill, penalties,
whose newest token the async loop takes from the device), the add_request/step/abort loop, and an exception inside a
round leaving a consistent engine. On the CPU the device work is synchronous, but the loop (one
step late, placeholders, stop handling, freeing) is the one that runs on CUDA.
"""
import pytest

from fixtures.checkpoints import ENGINE_ARGS
from nanovllm import LLM, SamplingParams
from nanovllm.worker.async_output import AsyncSampledTokens

PROMPTS = ["Hello, my name is", "The capital of France is a city that", list(range(1000, 1040)), [42],
           "List all prime numbers within 100 and explain the method step by step:"]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 16, "ignore_eos": True} | kw)


def summary(outputs) -> list:
    """What a caller sees of the outputs, but num_cached_tokens (the engines' caches have
    different histories); logprobs rounded (a batch of another size moves float32 logits in
    their last bits, and the stale rows of async scheduling change the batch)."""
    def entry(e):
        return e and sorted((t, round(p.logprob, 3), p.rank, p.decoded_token) for t, p in e.items())
    return [(o.request_id if not o.request_id.isdigit() else None, o.finished,
             o.prompt_logprobs and [entry(e) for e in o.prompt_logprobs],
             [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason,
               c.cumulative_logprob and round(c.cumulative_logprob, 2), c.logprobs and [entry(e) for e in c.logprobs])
              for c in o.outputs])
            for o in outputs]


@pytest.fixture(scope="module")
def engines(qwen3_tied):
    """{async_scheduling: LLM} on the same checkpoint. Cascade attention off: it is decided per
    batch, async's stale rows change the batches, and a cascade step's split of the same sums moves
    float32 logits in their last bits, enough to swap two ranks in a 150k vocabulary (tests of
    cascade's own equality: test_cascade.py)."""
    built = {mode: LLM(qwen3_tied, async_scheduling=mode, enable_cascade_attention=False, **ENGINE_ARGS)
             for mode in (False, True)}
    yield built
    for llm in built.values():
        llm.shutdown()


def both(engines, prompts, params) -> list:
    results = [summary(engines[mode].generate(prompts, params, use_tqdm=False)) for mode in (False, True)]
    assert results[0] == results[1]
    for llm in engines.values():
        engine = llm.llm_engine
        assert engine._pending is None and engine.is_finished()
        assert engine.scheduler.block_manager.num_free_blocks == engine.executor.num_kvcache_blocks
    return results[0]


def test_default_is_off_on_the_cpu_and_the_option_is_checked(engines, qwen3_tied):
    assert engines[True].llm_engine.config.async_scheduling is True
    with pytest.raises(ValueError, match="async_scheduling.*'yes'"):
        LLM(qwen3_tied, async_scheduling="yes", **ENGINE_ARGS)
    llm = LLM(qwen3_tied, **ENGINE_ARGS)
    try:
        assert llm.llm_engine.config.async_scheduling is False
    finally:
        llm.shutdown()


def test_the_loop_overlaps(engines, monkeypatch):
    """With it on, decode steps take their input ids from the previous step's samples, and the
    engine holds a step in flight between step() calls."""
    engine = engines[True].llm_engine
    placeholders = []
    execute = engine.executor.execute

    def spy(seqs, is_prefill, prev_sampled=None):
        placeholders.append(sum(seq.num_output_placeholders for seq in seqs))
        return execute(seqs, is_prefill, prev_sampled)
    monkeypatch.setattr(engine.executor, "execute", spy)
    engine.add_request("x", PROMPTS[0], greedy(max_tokens=5))
    assert engine.step() == [] and engine._pending is not None  # the prefill is in flight
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert engine._pending is None
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 2, 3, 4, 5]
    assert placeholders == [0, 1, 1, 1, 1]  # every decode input was a placeholder


def test_stops_min_tokens_n_seeds_and_logprobs_are_identical(engines):
    reference = engines[False].generate(PROMPTS[1], greedy(max_tokens=32), use_tqdm=False)[0].outputs[0]
    stop_id = reference.token_ids[6]
    stop_text = reference.text[len(reference.text) // 2:][:3]
    params = [greedy(max_tokens=32, stop_token_ids=[stop_id]),
              greedy(max_tokens=32, stop_token_ids=[stop_id], min_tokens=9),
              greedy(max_tokens=32, stop=[stop_text]),
              greedy(max_tokens=32, stop=[stop_text], include_stop_str_in_output=True, min_tokens=3),
              SamplingParams(temperature=1.0, seed=11, n=3, max_tokens=20, logprobs=2, ignore_eos=True,
                             stop_token_ids=[stop_id])]
    prompts = [PROMPTS[1]] * 4 + [PROMPTS[2]]
    result = both(engines, prompts, params)
    assert result[0][3][0][3] == "stop" and result[2][3][0][3] == "stop"
    eos = frozenset({stop_id})  # EOS, with and without ignore_eos, and min_tokens over it
    for llm in engines.values():
        llm.llm_engine.scheduler.eos_token_ids = eos
    try:
        both(engines, [PROMPTS[1]] * 3, [SamplingParams(temperature=0, max_tokens=32),
                                         SamplingParams(temperature=0, max_tokens=32, min_tokens=10),
                                         greedy(max_tokens=32)])
    finally:
        for llm in engines.values():
            llm.llm_engine.scheduler.eos_token_ids = llm.llm_engine.eos_token_ids


def test_many_lengths_and_unseeded_batches_without_stops_are_identical(qwen3_tied):
    """Without stops the batches are the same step for step, so even unseeded draws match (on
    fresh engines: the random stream advances once per step)."""
    params = [SamplingParams(temperature=0.9, max_tokens=3 + 5 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    fresh = {mode: LLM(qwen3_tied, async_scheduling=mode, **ENGINE_ARGS) for mode in (False, True)}
    try:
        both(fresh, PROMPTS, params)
    finally:
        for llm in fresh.values():
            llm.shutdown()


def test_prompt_logprobs_and_chunked_prefill(qwen3_tied):
    params = [greedy(max_tokens=6, prompt_logprobs=2, logprobs=1), greedy(max_tokens=9)]
    results = []
    for mode in (False, True):
        llm = LLM(qwen3_tied, async_scheduling=mode, max_num_batched_tokens=16, **ENGINE_ARGS)
        try:
            results.append(summary(llm.generate([PROMPTS[2], PROMPTS[4]], params, use_tqdm=False)))
        finally:
            llm.shutdown()
    assert results[0] == results[1] and len(results[0][0][2]) == 40


def test_preemption_is_identical(qwen3_tied):
    results = []
    for mode in (False, True):
        llm = LLM(qwen3_tied, async_scheduling=mode, **(ENGINE_ARGS | dict(max_model_len=128, num_gpu_blocks_override=12)))
        try:
            out = llm.generate(PROMPTS, [greedy(max_tokens=24), SamplingParams(temperature=1, seed=2, max_tokens=30),
                                         greedy(max_tokens=20, stop_token_ids=[7, 9, 11]),
                                         greedy(max_tokens=28, logprobs=1), greedy(max_tokens=25)], use_tqdm=False)
            results.append(summary(out))
            assert llm.llm_engine.scheduler.num_preemptions > 0
            assert llm.llm_engine.scheduler.block_manager.num_free_blocks == 12
        finally:
            llm.shutdown()
    assert results[0] == results[1]


def test_penalties_stay_overlapped(engines, monkeypatch):
    engine = engines[True].llm_engine
    in_flight = []  # per round of the async engine: whether it left a step in flight
    step = type(engine)._step

    def spy(self):
        result = step(self)
        if self is engine:
            in_flight.append(self._pending is not None)
        return result
    monkeypatch.setattr(type(engine), "_step", spy)
    params = [greedy(max_tokens=12, repetition_penalty=1.5, presence_penalty=0.3), greedy(max_tokens=20)]
    both(engines, [PROMPTS[0], PROMPTS[1]], params)
    # the penalised request's newest token comes from the device: every round but the last overlaps
    assert in_flight[:-1] == [True] * (len(in_flight) - 1) and not in_flight[-1] and len(in_flight) > 16


def test_penalties_same_outputs_on_and_off(engines):
    """Every penalty, alone and mixed with stops, min_tokens, seeds, n > 1 and logprobs: the token
    history that the async loop completes on the device gives the synchronous loop's draws."""
    params = [greedy(max_tokens=18, repetition_penalty=1.8),
              greedy(max_tokens=22, frequency_penalty=1.5, stop_token_ids=[7, 9, 11], ignore_eos=False),
              SamplingParams(temperature=0.9, seed=5, presence_penalty=1.2, max_tokens=20, logprobs=2),
              SamplingParams(n=2, temperature=1.0, seed=3, repetition_penalty=0.7, frequency_penalty=-0.5,
                             min_tokens=6, max_tokens=15),
              greedy(max_tokens=25, presence_penalty=-0.8, stop=["e"], ignore_eos=False)]
    out = both(engines, PROMPTS, params)
    assert any(c[3] == "stop" for o in out for c in o[3])  # a stop was hit with penalties in flight


def test_add_request_step_and_abort_mid_run(engines):
    results = []
    for mode in (False, True):
        engine = engines[mode].llm_engine
        engine.add_request("a", PROMPTS[0], greedy(max_tokens=8))
        engine.add_request("b", PROMPTS[1], greedy(max_tokens=40))
        engine.add_request("c", PROMPTS[2], SamplingParams(n=2, seed=1, max_tokens=12, ignore_eos=True, logprobs=1))
        seen = {}
        for i in range(60):
            if i == 5:
                engine.abort_request("b")
            for out in engine.step():
                seen.setdefault(out.request_id, []).append(summary([out])[0])
            if not engine.has_unfinished_requests():
                break
        assert engine._pending is None and engine.is_finished() and engine.step() == []
        assert engine.scheduler.block_manager.num_free_blocks == engine.executor.num_kvcache_blocks
        results.append(seen)
    final = [{rid: outs[-1] for rid, outs in seen.items()} for seen in results]
    assert final[0]["a"] == final[1]["a"] and final[0]["c"] == final[1]["c"]
    assert final[0]["a"][1] and final[0]["c"][1]
    # b was aborted after as many step() calls: one token fewer had reached the host
    sync_b, async_b = (f["b"][3][0][2] for f in final)
    assert not final[1]["b"][1] and 0 < len(async_b) == len(sync_b) - 1 and sync_b[:len(async_b)] == async_b
    assert [len(o[3][0][2]) for o in results[1]["a"]] == list(range(1, 9))  # one report per token


@pytest.mark.parametrize("where", ["launch", "read", "output"])
def test_an_exception_inside_a_round_leaves_a_working_engine(engines, monkeypatch, where):
    """The round fails while launching a step, while waiting for a step's tokens, or while
    processing them; generate raises, a request added by step() survives with the right tokens,
    and the next generate works."""
    expected = summary(engines[False].generate(PROMPTS[:3], greedy(max_tokens=10), use_tqdm=False))
    llm = engines[True]
    engine = llm.llm_engine
    engine.add_request("bystander", PROMPTS[4], greedy(max_tokens=20))
    calls = {"n": 0}

    def failing(original):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt if where == "read" else RuntimeError("injected")
            return original(*args, **kwargs)
        return wrapper
    if where == "launch":
        monkeypatch.setattr(engine.executor, "execute", failing(engine.executor.execute))
    elif where == "read":
        monkeypatch.setattr(AsyncSampledTokens, "get_output", failing(AsyncSampledTokens.get_output))
    else:
        monkeypatch.setattr(engine.output_processor, "update", failing(engine.output_processor.update))
        engine.add_request("tracked", PROMPTS[3], greedy(max_tokens=20))  # output processing each step
    preemptions = engine.scheduler.num_preemptions
    with pytest.raises(KeyboardInterrupt if where == "read" else RuntimeError):
        llm.generate(PROMPTS[:3], greedy(max_tokens=10), use_tqdm=False)
    monkeypatch.undo()
    assert engine._pending is None
    assert engine.scheduler.num_preemptions > preemptions  # the bystander lost a step in flight
    assert summary(llm.generate(PROMPTS[:3], greedy(max_tokens=10), use_tqdm=False)) == expected
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    bystander = next(o for o in outputs if o.request_id == "bystander")
    reference = engines[False].generate(PROMPTS[4], greedy(max_tokens=20), use_tqdm=False)[0]
    assert bystander.outputs[0].token_ids == reference.outputs[0].token_ids
    assert engine.scheduler.block_manager.num_free_blocks == engine.executor.num_kvcache_blocks


def test_tensor_parallel_2_broadcasts_the_samples(qwen3_untied):
    """tp=2: the placeholders' token ids go from rank 0's sampler to rank 1 (a broadcast)."""
    params = [greedy(max_tokens=12), SamplingParams(temperature=1, seed=5, max_tokens=9, ignore_eos=True),
              greedy(max_tokens=20, stop_token_ids=[7, 11, 13])]
    results = []
    for mode, tp in ((False, 1), (True, 2)):
        llm = LLM(qwen3_untied, async_scheduling=mode, tensor_parallel_size=tp, **ENGINE_ARGS)
        try:
            results.append(summary(llm.generate(PROMPTS[:3], params, use_tqdm=False)))
        finally:
            llm.shutdown()
    assert results[0] == results[1]


def test_structured_outputs_fall_back_to_synchronous_rounds(engines):
    pytest.importorskip("xgrammar", reason="xgrammar (the `structured` extra) is not installed")
    from nanovllm.sampling_params import GuidedDecodingParams
    guided = GuidedDecodingParams(regex=r"[a-z]{2,5}@[a-z]{3}\.(com|org)")
    params = [SamplingParams(temperature=0, max_tokens=30, guided_decoding=guided),
              SamplingParams(temperature=1.0, seed=4, max_tokens=30, guided_decoding=guided), greedy(max_tokens=40)]
    result = both(engines, PROMPTS[:3], params)
    assert [c[3] for o in result[:2] for c in o[3]] == ["stop", "stop"]
