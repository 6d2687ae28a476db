"""End-to-end engine tests on the CPU: parity with transformers' Qwen3ForCausalLM on the same
tiny checkpoint, and the scheduler's features (chunked prefill, preemption, prefix caching,
tensor parallelism) giving the same tokens as the plain path."""
import gc
import glob
import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fixtures.checkpoints import ENGINE_ARGS
from nanovllm import LLM, SamplingParams
from nanovllm.attention import PAD_SLOT_ID, AttentionMetadata, forward_context

TEXT_PROMPTS = ["Hello, my name is", "The capital of France is a city that",
                "List all prime numbers within 100 and explain the method step by step:"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def token_prompts(path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer.encode(p) for p in TEXT_PROMPTS]
    prompts.append(list(range(1000, 1100)))  # 100 tokens: spans several 16-token blocks
    prompts.append([42])
    return prompts


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(max_tokens):
            next_id = model(ids).logits[0, -1].argmax().item()
            out.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], 1)
    return out


def completions(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def hf_model(qwen3_tied):
    return AutoModelForCausalLM.from_pretrained(qwen3_tied, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_tokens(qwen3_tied, hf_model):
    return [hf_greedy(hf_model, p, GREEDY.max_tokens) for p in token_prompts(qwen3_tied)]


def test_prefill_logits_match_transformers(llm, hf_model, qwen3_tied):
    runner = llm.llm_engine.executor.runner
    prompts = token_prompts(qwen3_tied)[:3]
    flat = [t for p in prompts for t in p]
    cu = [0]
    for p in prompts:
        cu.append(cu[-1] + len(p))
    meta = AttentionMetadata(is_prefill=True, slot_mapping=torch.full((len(flat),), PAD_SLOT_ID, dtype=torch.int32),
                             cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
                             cu_seqlens_k=torch.tensor(cu, dtype=torch.int32),
                             max_seqlen_q=max(map(len, prompts)), max_seqlen_k=max(map(len, prompts)))
    positions = torch.tensor([i for p in prompts for i in range(len(p))])
    with torch.no_grad(), forward_context(meta):
        hidden = runner.model(torch.tensor(flat), positions)
        logits = runner.model.compute_logits(hidden)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model(torch.tensor([p])).logits[0]
        torch.testing.assert_close(logits[cu[i]:cu[i + 1]], ref, atol=2e-4, rtol=1e-4)


def test_greedy_batch_matches_transformers(llm, qwen3_tied, reference_tokens):
    outputs = llm.generate(token_prompts(qwen3_tied), GREEDY, use_tqdm=False)
    assert completions(outputs) == reference_tokens
    assert len(set(reference_tokens[0])) > 3  # the fixture's weights give varied text


def test_text_prompts_and_outputs(llm, qwen3_tied, reference_tokens):
    outputs = llm.generate(TEXT_PROMPTS, GREEDY, use_tqdm=False)
    tokenizer = AutoTokenizer.from_pretrained(qwen3_tied)
    for prompt, out, ref in zip(TEXT_PROMPTS, outputs, reference_tokens):
        assert out.prompt == prompt
        assert out.prompt_token_ids == tokenizer.encode(prompt)
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].text == tokenizer.decode(ref, skip_special_tokens=True)
        assert out.outputs[0].finish_reason == "length" and out.finished
        assert out["token_ids"] == ref and out["text"] == out.outputs[0].text


def test_single_prompt_forms(llm, reference_tokens, qwen3_tied):
    ids = token_prompts(qwen3_tied)[3]
    (out,) = llm.generate(ids, GREEDY, use_tqdm=False)
    assert out.prompt is None and out.outputs[0].token_ids == reference_tokens[3]
    (out,) = llm.generate(TEXT_PROMPTS[0], [GREEDY], use_tqdm=False)
    assert out.outputs[0].token_ids == reference_tokens[0]


def test_eos_stops_and_max_tokens(llm, qwen3_tied, reference_tokens):
    eos = reference_tokens[0][5]  # pretend the 6th greedy token is an EOS id
    llm.llm_engine.scheduler.eos_token_ids = frozenset({eos})
    try:
        (stopped,) = llm.generate(TEXT_PROMPTS[0], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
        (ignored,) = llm.generate(TEXT_PROMPTS[0], GREEDY, use_tqdm=False)
    finally:
        llm.llm_engine.scheduler.eos_token_ids = llm.llm_engine.eos_token_ids
    first = reference_tokens[0].index(eos)
    assert stopped.outputs[0].token_ids == reference_tokens[0][:first + 1]
    assert stopped.outputs[0].finish_reason == "stop"
    assert ignored.outputs[0].token_ids == reference_tokens[0]
    (short,) = llm.generate(TEXT_PROMPTS[0], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert short.outputs[0].token_ids == reference_tokens[0][:3]


def test_eos_ids_come_from_generation_config(llm):
    assert {151645, 151643} <= llm.llm_engine.eos_token_ids


def test_sampling_is_seeded_and_valid(qwen3_tied):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    runs = []
    for _ in range(2):
        engine = LLM(qwen3_tied, seed=7, **ENGINE_ARGS)
        runs.append(completions(engine.generate(TEXT_PROMPTS, params, use_tqdm=False)))
        engine.shutdown()
    assert runs[0] == runs[1]
    vocab = json.load(open(os.path.join(qwen3_tied, "config.json")))["vocab_size"]
    assert all(0 <= t < vocab for toks in runs[0] for t in toks)
    assert all(len(toks) == 12 for toks in runs[0])


def test_chunked_prefill_same_tokens(qwen3_tied, reference_tokens):
    engine = LLM(qwen3_tied, max_num_batched_tokens=24, **ENGINE_ARGS)
    try:
        assert completions(engine.generate(token_prompts(qwen3_tied), GREEDY, use_tqdm=False)) == reference_tokens
    finally:
        engine.shutdown()


def test_preemption_same_tokens(qwen3_tied, reference_tokens):
    args = dict(ENGINE_ARGS, max_model_len=128, num_gpu_blocks_override=12)
    engine = LLM(qwen3_tied, **args)
    try:
        prompts = token_prompts(qwen3_tied)
        outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                                  use_tqdm=False)
        scheduler = engine.llm_engine.scheduler
        assert scheduler.num_preemptions > 0
        assert [o.outputs[0].token_ids[:16] for o in outputs] == reference_tokens
        assert scheduler.block_manager.num_free_blocks == 12
    finally:
        engine.shutdown()


def test_prefix_cache_hits_same_tokens(qwen3_tied, hf_model):
    shared = list(range(2000, 2040))  # 2.5 blocks of 16 shared by every prompt
    prompts = [shared + [7, 8, 9], shared + [100 + i for i in range(20)], shared]
    reference = [hf_greedy(hf_model, p, 8) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine = LLM(qwen3_tied, **ENGINE_ARGS)
    try:
        first = engine.generate(prompts, params, use_tqdm=False)
        second = engine.generate(prompts, params, use_tqdm=False)
    finally:
        engine.shutdown()
    assert completions(first) == reference == completions(second)
    # First run: later prompts of the same batch already hit the blocks the first one computes.
    assert [o.num_cached_tokens for o in first] == [0, 32, 32]
    # Second run: the 2nd prompt's third block (shared tail + its own tokens) is cached too.
    assert [o.num_cached_tokens for o in second] == [32, 48, 32]
    uncached = LLM(qwen3_tied, enable_prefix_caching=False, **ENGINE_ARGS)
    try:
        out = uncached.generate(prompts, params, use_tqdm=False)
        assert completions(out) == reference and all(o.num_cached_tokens == 0 for o in out)
    finally:
        uncached.shutdown()


def test_bad_input_raises_and_engine_survives(llm, qwen3_tied, reference_tokens, tmp_path):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)
    too_long = [1] * (ENGINE_ARGS["max_model_len"] + 1)
    bad_cases = [
        ([TEXT_PROMPTS[0], ""], GREEDY, "empty"),
        ([TEXT_PROMPTS[0], too_long], GREEDY, "max_model_len"),
        ([TEXT_PROMPTS[0], [5, 10 ** 7]], GREEDY, "10000000"),
        ([TEXT_PROMPTS[0], [-1]], GREEDY, "-1"),
        (TEXT_PROMPTS, [GREEDY, GREEDY], "sampling_params"),
    ]
    for prompts, params, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.is_finished()
    assert completions(llm.generate(TEXT_PROMPTS, GREEDY, use_tqdm=False)) == reference_tokens[:3]
    with pytest.raises(ValueError, match="no-such-model"):
        LLM(str(tmp_path / "no-such-model"))
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(qwen3_tied, max_num_seq=4)  # typo of max_num_seqs
    foreign = tmp_path / "foreign"
    shutil.copytree(qwen3_tied, foreign)
    config = json.load(open(foreign / "config.json"))
    config["architectures"] = ["FooForCausalLM"]
    json.dump(config, open(foreign / "config.json", "w"))
    with pytest.raises(ValueError, match="Qwen3ForCausalLM"):
        LLM(str(foreign), **ENGINE_ARGS)


def test_missing_and_unexpected_weights_are_named(qwen3_tied, tmp_path):
    from safetensors.torch import load_file, save_file
    weights = load_file(os.path.join(qwen3_tied, "model.safetensors"))
    for name, change in [("missing", "drop"), ("unexpected", "add")]:
        folder = tmp_path / name
        shutil.copytree(qwen3_tied, folder)
        changed = dict(weights)
        if change == "drop":
            del changed["model.layers.1.mlp.up_proj.weight"]
            match = "gate_up_proj"
        else:
            changed["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
            match = "mlp.extra.weight"
        save_file(changed, str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match=match):
            LLM(str(folder), **ENGINE_ARGS)


def test_shutdown_and_recreate(qwen3_tied, reference_tokens):
    engine = LLM(qwen3_tied, **ENGINE_ARGS)
    engine.shutdown()
    engine.shutdown()  # idempotent
    del engine
    gc.collect()
    engine = LLM(qwen3_tied, **ENGINE_ARGS)
    assert completions(engine.generate(TEXT_PROMPTS, GREEDY, use_tqdm=False)) == reference_tokens[:3]
    del engine  # garbage collection releases it too
    gc.collect()


def test_tensor_parallel_2_same_tokens_and_clean_exit(qwen3_untied):
    prompts = token_prompts(qwen3_untied)
    single = LLM(qwen3_untied, **ENGINE_ARGS)
    expected = completions(single.generate(prompts, GREEDY, use_tqdm=False))
    single.shutdown()
    engine = LLM(qwen3_untied, tensor_parallel_size=2, max_num_batched_tokens=64, **ENGINE_ARGS)
    workers = multiprocessing.active_children()
    assert len(workers) >= 1
    shm = glob.glob(f"/dev/shm/nanovllm_{os.getpid()}_*")  # this process's only: others may run too
    assert shm
    try:
        assert completions(engine.generate(prompts, GREEDY, use_tqdm=False)) == expected
    finally:
        engine.shutdown()
    assert not any(w.is_alive() for w in workers)
    assert not any(os.path.exists(f) for f in shm)
    assert not torch.distributed.is_initialized()


def test_interpreter_exit_with_live_tp_engine_does_not_hang(qwen3_tied):
    script = (
        "from nanovllm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({qwen3_tied!r}, tensor_parallel_size=2, **{ENGINE_ARGS!r})\n"
        "    print(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "leaked" not in result.stderr
