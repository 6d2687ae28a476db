"""vLLM's offline API on the CPU, end to end on the tiny Qwen3 checkpoint: SamplingParams' checks
and each field's effect, output fields, prompt forms, chat, the add_request/step/abort loop,
bad input, generation_config.json defaults and loading by hub id from an offline cache.
References are the engine's own greedy path (checked against transformers in test_engine.py)
and transformers' logits for logprobs and penalties."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from fixtures.checkpoints import ENGINE_ARGS, write_tiny_qwen3
from fixtures.tokenizer import IM_END_ID
from nanovllm import LLM, SamplingParams, TokensPrompt
from nanovllm.sampling_params import RequestOutputKind

PROMPT = "The capital of France is a city that"
IDS = list(range(1000, 1040))  # 2.5 blocks of 16 tokens


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 16, "ignore_eos": True} | kw)


@pytest.fixture(scope="module")
def tokenizer(llm):
    return llm.get_tokenizer()


@pytest.fixture(scope="module")
def hf_model(qwen3_tied):
    return AutoModelForCausalLM.from_pretrained(qwen3_tied, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(llm) -> list[int]:
    """Greedy completion of PROMPT (32 tokens)."""
    return llm.generate(PROMPT, greedy(max_tokens=32), use_tqdm=False)[0].outputs[0].token_ids


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# ---- SamplingParams -------------------------------------------------------------------------

def test_sampling_params_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, -1, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids, p.ignore_eos) == (16, 0, [], [], False)
    assert (p.logprobs, p.skip_special_tokens, p.include_stop_str_in_output) == (None, True, False)
    assert SamplingParams(stop="x").stop == ["x"] and SamplingParams(seed=-1).seed is None
    assert SamplingParams(logprobs=True).logprobs == 1
    g = SamplingParams(temperature=0, top_p=0.5, top_k=3, min_p=0.2)
    assert (g.top_p, g.top_k, g.min_p) == (1.0, 0, 0.0)  # greedy turns them off, as vLLM


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(top_p=1.5), ValueError, r"^top_p must be in \(0, 1\], got 1.5.$"),
    (dict(top_p=0), ValueError, "top_p"),
    (dict(temperature=-1), ValueError, "temperature must be non-negative, got -1"),
    (dict(top_k=-2), ValueError, "top_k .* got -2"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(min_p=1.5), ValueError, r"min_p must be in \[0, 1\], got 1.5"),
    (dict(presence_penalty=2.5), ValueError, r"presence_penalty must be in \[-2, 2\], got 2.5"),
    (dict(frequency_penalty=-3), ValueError, r"frequency_penalty must be in \[-2, 2\], got -3"),
    (dict(repetition_penalty=0), ValueError, "repetition_penalty must be greater than zero, got 0"),
    (dict(max_tokens=0), ValueError, "max_tokens must be at least 1, got 0"),
    (dict(min_tokens=-1), ValueError, "min_tokens .* got -1"),
    (dict(min_tokens=20, max_tokens=10), ValueError, "min_tokens must be less than or equal to max_tokens=10"),
    (dict(n=0), ValueError, "n must be at least 1, got 0"),
    (dict(n=2, temperature=0), ValueError, "n must be 1 when using greedy sampling, got 2"),
    (dict(logprobs=-1), ValueError, "logprobs must be non-negative, got -1"),
    (dict(stop=["ok", ""]), ValueError, "stop cannot contain an empty string"),
    (dict(stop_token_ids=[-5]), ValueError, "stop_token_ids"),
    (dict(prompt_logprobs=-1), ValueError, "prompt_logprobs must be non-negative, got -1"),
    (dict(best_of=3), ValueError, "best_of"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(tempreature=0.5), TypeError, "tempreature"),  # a typo is not dropped
])
def test_sampling_params_checks(kwargs, error, message):
    with pytest.raises(error, match=message):
        SamplingParams(**kwargs)


# ---- prompts, outputs ----------------------------------------------------------------------

def test_prompt_forms_and_input_order(llm, tokenizer, reference):
    ids = tokenizer.encode(PROMPT)
    prompts = [PROMPT, {"prompt": PROMPT}, {"prompt_token_ids": ids}, ids, TokensPrompt(prompt_token_ids=IDS)]
    outputs = llm.generate(prompts, greedy(max_tokens=32), use_tqdm=False)
    assert tokens(outputs)[:4] == [reference] * 4
    assert [o.prompt for o in outputs] == [PROMPT, PROMPT, None, None, None]
    assert [o.prompt_token_ids for o in outputs] == [ids] * 4 + [IDS]
    assert len({o.request_id for o in outputs}) == 5 and all(isinstance(o.request_id, str) for o in outputs)
    for single in (PROMPT, {"prompt": PROMPT}, {"prompt_token_ids": ids}, ids):
        (out,) = llm.generate(single, greedy(max_tokens=32), use_tqdm=False)
        assert out.outputs[0].token_ids == reference
    # one SamplingParams per prompt
    outputs = llm.generate([PROMPT, IDS, PROMPT], [greedy(max_tokens=3), greedy(max_tokens=5), greedy(max_tokens=1)],
                           use_tqdm=False)
    assert [len(t) for t in tokens(outputs)] == [3, 5, 1]
    assert llm.generate([], greedy(), use_tqdm=False) == []


def test_nano_vllm_style_calls(llm, reference):
    (out,) = llm.generate([PROMPT], greedy(max_tokens=32), False)  # use_tqdm third, as in nano-vllm
    assert out["token_ids"] == reference and out["text"] == out.outputs[0].text
    with pytest.raises(KeyError):
        out["logits"]
    # vLLM's older keyword form
    (out,) = llm.generate(prompt_token_ids=[IDS], sampling_params=greedy(max_tokens=4), use_tqdm=False)
    assert out.prompt_token_ids == IDS and len(out.outputs[0].token_ids) == 4


def test_output_fields(llm, tokenizer, reference):
    (out,) = llm.generate(PROMPT, greedy(max_tokens=32), use_tqdm=False)
    assert out.finished and out.prompt_logprobs is None and len(out.outputs) == 1
    c = out.outputs[0]
    assert (c.index, c.finish_reason, c.stop_reason) == (0, "length", None)
    assert c.cumulative_logprob is None and c.logprobs is None
    assert c.finished() and c.text == tokenizer.decode(reference, skip_special_tokens=True)
    (out,) = llm.generate(PROMPT, greedy(max_tokens=4, detokenize=False), use_tqdm=False)
    assert out.outputs[0].text == "" and out.outputs[0].token_ids == reference[:4]
    (out,) = llm.generate(IDS, greedy(max_tokens=2, truncate_prompt_tokens=3), use_tqdm=False)
    assert out.prompt_token_ids == IDS[-3:]


def _first_new_token(ids: list[int], start: int) -> int:
    return next(i for i in range(start, len(ids)) if ids[i] not in ids[:i])


def test_stop_token_ids_eos_and_min_tokens(llm, tokenizer, reference):
    i = _first_new_token(reference, 3)
    stop_id = reference[i]
    (out,) = llm.generate(PROMPT, greedy(max_tokens=32, stop_token_ids=[stop_id]), use_tqdm=False)
    c = out.outputs[0]
    assert c.token_ids == reference[:i + 1]  # the stop token is kept in token_ids ...
    assert (c.finish_reason, c.stop_reason) == ("stop", stop_id)
    assert c.text == tokenizer.decode(reference[:i], skip_special_tokens=True)  # ... and dropped from text
    (out,) = llm.generate(PROMPT, greedy(max_tokens=32, stop_token_ids=[stop_id], include_stop_str_in_output=True),
                          use_tqdm=False)
    assert out.outputs[0].text == tokenizer.decode(reference[:i + 1], skip_special_tokens=True)
    # min_tokens masks the stop id until min_tokens tokens exist
    (out,) = llm.generate(PROMPT, greedy(max_tokens=32, stop_token_ids=[stop_id], min_tokens=i + 3), use_tqdm=False)
    assert stop_id not in out.outputs[0].token_ids[:i + 3] and len(out.outputs[0].token_ids) >= i + 3
    # EOS (every id of generation_config's list): stop_reason None; min_tokens suppresses it too
    engine = llm.llm_engine
    assert {IM_END_ID, 151643} <= engine.eos_token_ids
    saved = engine.eos_token_ids
    engine.eos_token_ids = engine.scheduler.eos_token_ids = engine.input_processor.eos_token_ids = frozenset({stop_id})
    try:
        (stopped,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
        (late,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=32, min_tokens=i + 3), use_tqdm=False)
    finally:
        engine.eos_token_ids = engine.scheduler.eos_token_ids = engine.input_processor.eos_token_ids = saved
    assert stopped.outputs[0].token_ids == reference[:i + 1]
    assert (stopped.outputs[0].finish_reason, stopped.outputs[0].stop_reason) == ("stop", None)
    assert stop_id not in late.outputs[0].token_ids[:i + 3]


def _boundary(tokenizer, ids: list[int]) -> tuple[int, int, str]:
    """(j, offset, text): a token j whose text starts at `offset` of the decoded `text`, with at
    least two clean characters on each side of that boundary."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for j in range(2, len(ids) - 1):
        before = tokenizer.decode(ids[:j], skip_special_tokens=True)
        after = tokenizer.decode(ids[:j + 1], skip_special_tokens=True)
        if ("\ufffd" not in after and text.startswith(after) and len(before) >= 2 and len(after) - len(before) >= 2
                and text.find(text[len(before) - 2:len(before) + 2]) == len(before) - 2):
            return j, len(before), text
    raise AssertionError("no usable token boundary")


def test_stop_strings_spanning_token_boundaries(llm, tokenizer, reference):
    j, offset, text = _boundary(tokenizer, reference)
    stop = text[offset - 2:offset + 2]  # last 2 characters of token j-1's text, first 2 of token j's
    for stops in ([stop], ["\x00never\x00", stop]):
        (out,) = llm.generate(PROMPT, greedy(max_tokens=32, stop=stops), use_tqdm=False)
        c = out.outputs[0]
        assert (c.finish_reason, c.stop_reason) == ("stop", stop)
        assert c.token_ids == reference[:j + 1] and c.text == text[:offset - 2]
    (out,) = llm.generate(PROMPT, greedy(max_tokens=32, stop=stop, include_stop_str_in_output=True), use_tqdm=False)
    assert out.outputs[0].text == text[:offset + 2] and out.outputs[0].token_ids == reference[:j + 1]
    # stop strings are not matched within the first min_tokens tokens
    (out,) = llm.generate(PROMPT, greedy(max_tokens=32, stop=stop, min_tokens=j + 2), use_tqdm=False)
    assert len(out.outputs[0].token_ids) > j + 1 and out.outputs[0].token_ids[:j + 1] == reference[:j + 1]


# ---- sampling semantics ---------------------------------------------------------------------

def test_top_k_1_equals_greedy(llm, reference):
    (out,) = llm.generate(PROMPT, SamplingParams(temperature=1.5, top_k=1, max_tokens=32, ignore_eos=True),
                          use_tqdm=False)
    assert out.outputs[0].token_ids == reference


def test_seeds_reproduce_across_runs_and_batches(llm):
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    plain = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    (alone,) = tokens(llm.generate(PROMPT, seeded, use_tqdm=False))
    batch = tokens(llm.generate([IDS, PROMPT, "Hello"], [plain, seeded, greedy()], use_tqdm=False))
    assert batch[1] == alone == tokens(llm.generate(PROMPT, seeded, use_tqdm=False))[0]
    assert tokens(llm.generate(PROMPT, seeded.clone(seed=8), use_tqdm=False))[0] != alone
    # n completions: completion i draws with seed + i, so each matches an n=1 request with that seed
    (out,) = llm.generate(PROMPT, seeded.clone(n=3), use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
    assert [c.token_ids for c in out.outputs] == [tokens(llm.generate(PROMPT, seeded.clone(seed=7 + i),
                                                                       use_tqdm=False))[0] for i in range(3)]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3


def _hf_logits(hf_model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[len(completion), vocab]: the logits that predicted each completion token."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + completion])).logits[0]
    return logits[len(prompt) - 1:-1]


def test_logprobs_are_log_softmax_of_the_model_logits(llm, hf_model, tokenizer):
    params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=3, logprobs=3, max_tokens=6,
                            ignore_eos=True)
    (out,) = llm.generate(IDS, params, use_tqdm=False)
    c = out.outputs[0]
    reference = torch.log_softmax(_hf_logits(hf_model, IDS, c.token_ids), -1)
    assert len(c.logprobs) == len(c.token_ids) == 6
    for position, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        ref = reference[position]
        top = ref.topk(3)
        assert list(entry)[0] == token and set(top.indices.tolist()) <= set(entry) and len(entry) <= 4
        for token_id, logprob in entry.items():
            assert logprob.logprob == pytest.approx(ref[token_id].item(), abs=2e-4)
            assert logprob.decoded_token == tokenizer.decode([token_id])
        assert entry[token].rank == int((ref >= ref[token] - 1e-6).sum())
        assert [entry[t].rank for t in top.indices.tolist()] == [1, 2, 3]
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))
    (out,) = llm.generate(IDS, greedy(max_tokens=3, logprobs=0), use_tqdm=False)
    assert [list(e) for e in out.outputs[0].logprobs] == [[t] for t in out.outputs[0].token_ids]
    assert all(e[t].rank == 1 for t, e in zip(out.outputs[0].token_ids, out.outputs[0].logprobs))


def test_penalties_match_a_direct_computation(llm, hf_model, tokenizer):
    prompt = tokenizer.encode("The capital of France")
    (plain,) = tokens(llm.generate(prompt, greedy(max_tokens=12), use_tqdm=False))
    assert len(set(plain)) < len(plain)  # greedy repeats itself here, so the penalties matter
    presence, frequency, repetition = 0.3, 0.4, 1.5
    params = greedy(max_tokens=12, presence_penalty=presence, frequency_penalty=frequency,
                    repetition_penalty=repetition)
    (out,) = llm.generate(prompt, params, use_tqdm=False)
    generated = []
    for _ in range(12):  # vLLM's penalties on transformers' logits, one token at a time
        logits = _hf_logits(hf_model, prompt, generated + [0])[-1]
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[prompt + generated] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=len(logits)).float()
        logits = logits - frequency * counts - presence * (counts > 0)
        generated.append(int(logits.argmax()))
    assert out.outputs[0].token_ids == generated != plain


# ---- chat ------------------------------------------------------------------------------------

def test_chat(llm, tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    (out,) = llm.chat(conversation, greedy(max_tokens=4), use_tqdm=False)
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert out.prompt == text and text.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == tokenizer.encode(text, add_special_tokens=False)
    assert out.outputs[0].token_ids == tokens(llm.generate(out.prompt_token_ids, greedy(max_tokens=4),
                                                           use_tqdm=False))[0]
    outputs = llm.chat([conversation, [{"role": "user", "content": [{"type": "text", "text": "Yo"}]}]],
                       greedy(max_tokens=2), use_tqdm=False, chat_template_kwargs={"enable_thinking": False})
    assert len(outputs) == 2 and outputs[0].prompt.endswith("<think>\n\n</think>\n\n")
    assert "<|im_start|>user\nYo<|im_end|>" in outputs[1].prompt
    (out,) = llm.chat(conversation, greedy(max_tokens=1), use_tqdm=False, add_generation_prompt=False,
                      chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert out.prompt == "[Be brief.][Hi there]"


# ---- the engine loop -------------------------------------------------------------------------

def test_add_request_step_abort(llm, tokenizer, reference):
    engine = llm.llm_engine
    free_blocks = engine.scheduler.block_manager.num_free_blocks
    engine.add_request("a", PROMPT, greedy(max_tokens=6))
    engine.add_request("b", {"prompt_token_ids": IDS}, greedy(max_tokens=50))
    engine.add_request("c", IDS, SamplingParams(n=2, seed=1, max_tokens=5, ignore_eos=True))
    with pytest.raises(ValueError, match="'a'"):
        engine.add_request("a", PROMPT, greedy())
    seen: dict[str, list] = {}
    while "a" not in seen or not seen["a"][-1].finished:
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
        if len(seen["a"]) == 1:  # the n=2 request's sequences share the prompt's full blocks (prefix cache)
            assert engine._requests["c"].completions[1].seq.num_prefix_cached_tokens == 32
    a = seen["a"]
    assert [len(o.outputs[0].token_ids) for o in a] == [1, 2, 3, 4, 5, 6]  # one report per new token
    assert [o.finished for o in a] == [False] * 5 + [True]
    assert a[-1].outputs[0].token_ids == reference[:6]
    assert a[-1].outputs[0].text == tokenizer.decode(reference[:6], skip_special_tokens=True)
    assert all(a[-1].outputs[0].text.startswith(o.outputs[0].text) for o in a)
    assert engine.has_unfinished_requests()
    engine.abort_request(["b", "no-such-id"])
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    assert not seen["b"][-1].finished and len(seen["b"][-1].outputs[0].token_ids) < 50
    assert seen["c"][-1].finished and [len(c.token_ids) for c in seen["c"][-1].outputs] == [5, 5]
    assert engine.scheduler.block_manager.num_free_blocks == free_blocks
    assert engine.step() == [] and engine.is_finished()
    engine.add_request("a", PROMPT, greedy(max_tokens=2))  # a finished id may be used again
    engine.abort_request("a")
    assert not engine.has_unfinished_requests()


def test_final_only_requests_are_reported_once(llm, reference):
    """output_kind FINAL_ONLY (what the data-parallel replicas use): one report, when finished,
    even for a request that needs per-step work (logprobs)."""
    engine = llm.llm_engine
    engine.add_request("final", PROMPT, greedy(max_tokens=6, logprobs=1, output_kind=RequestOutputKind.FINAL_ONLY))
    engine.add_request("each", PROMPT, greedy(max_tokens=3))
    seen = []
    while engine.has_unfinished_requests():
        seen += engine.step()
    [final] = [o for o in seen if o.request_id == "final"]
    assert final.finished and final.outputs[0].token_ids == reference[:6] and len(final.outputs[0].logprobs) == 6
    assert len([o for o in seen if o.request_id == "each"]) == 3
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind=RequestOutputKind.DELTA)


def test_data_parallel_without_ray_names_the_extra(qwen3_tied, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    for name in [m for m in sys.modules if m.startswith("nanovllm.ray")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"pip install nano-vllm\[ray\]"):
        LLM(qwen3_tied, data_parallel_size=2, **ENGINE_ARGS)


def test_bad_input_raises_naming_it_and_the_engine_keeps_serving(llm, qwen3_tied, reference):
    engine = llm.llm_engine
    engine.add_request("keep", PROMPT, greedy(max_tokens=32))
    engine.step()
    cases = [
        (lambda: llm.generate([PROMPT, ""], greedy(), use_tqdm=False), ValueError, "empty"),
        (lambda: llm.generate([[]], greedy(), use_tqdm=False), ValueError, "empty"),
        (lambda: llm.generate([[1] * 513], greedy(), use_tqdm=False), ValueError, "max_model_len"),
        (lambda: llm.generate([[5, 10 ** 7]], greedy(), use_tqdm=False), ValueError, "10000000"),
        (lambda: llm.generate(PROMPT, greedy(logprobs=21), use_tqdm=False), ValueError, "logprobs of 21"),
        (lambda: llm.generate({"prompt": PROMPT, "mm_data": 1}, greedy(), use_tqdm=False), ValueError, "mm_data"),
        (lambda: llm.generate([PROMPT, PROMPT], [greedy()], use_tqdm=False), ValueError, "sampling_params"),
        (lambda: llm.generate(PROMPT, {"temperature": 0}, use_tqdm=False), TypeError, "SamplingParams"),
        (lambda: llm.generate(3.5, greedy(), use_tqdm=False), TypeError, "prompt"),
        (lambda: engine.add_request("keep", PROMPT, greedy()), ValueError, "keep"),
        (lambda: LLM(qwen3_tied, max_num_seq=4), TypeError, "max_num_seq"),
        (lambda: LLM(qwen3_tied, quantization="awq"), ValueError, "quantization"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].request_id == "keep" and outputs[-1].outputs[0].token_ids == reference


# ---- defaults from generation_config.json, skip_tokenizer_init, hub ids -----------------------

def test_generation_config_defaults_and_skip_tokenizer_init(tmp_path):
    generation_config = {"eos_token_id": [IM_END_ID, 151643], "temperature": 0.7, "top_k": 20, "top_p": 0.8,
                         "repetition_penalty": 1.05, "max_new_tokens": 5, "do_sample": True}
    path = write_tiny_qwen3(tmp_path / "gen", seed=0, generation_config=generation_config)
    # vLLM options that change nothing here are accepted
    llm = LLM(path, skip_tokenizer_init=True, seed=None, trust_remote_code=True, swap_space=4,
              **dict(ENGINE_ARGS, max_model_len=64))
    try:
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.7, 20, 0.8)
        assert (defaults.repetition_penalty, defaults.max_tokens) == (1.05, 5)
        (out,) = llm.generate([IDS[:10]], use_tqdm=False)
        assert len(out.outputs[0].token_ids) <= 5 and out.outputs[0].text == ""
        assert llm.get_tokenizer() is None
        with pytest.raises(ValueError, match="skip_tokenizer_init"):
            llm.generate(PROMPT, use_tqdm=False)
        (out,) = llm.generate([list(range(60))], greedy(max_tokens=None), use_tqdm=False)  # up to max_model_len
        assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"
    finally:
        llm.shutdown()


def test_hub_id_from_an_offline_cache(qwen3_tied, llm, tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-qwen3"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(qwen3_tied, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    expected = tokens(llm.generate([IDS], greedy(max_tokens=8), use_tqdm=False))[0]
    script = (
        "from nanovllm import LLM, SamplingParams\n"
        f"llm = LLM('tiny-org/tiny-qwen3', **{ENGINE_ARGS!r})\n"
        f"out = llm.generate([{IDS!r}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)\n"
        "print('TOKENS', out[0].outputs[0].token_ids, llm.llm_engine.config.model)\n"
        "try:\n"
        "    LLM('tiny-org/missing-model')\n"
        "except ValueError as e:\n"
        "    print('MISSING', 'tiny-org/missing-model' in str(e))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()}
    assert lines["TOKENS"].startswith(f"TOKENS {expected}") and str(repo / "snapshots" / commit) in lines["TOKENS"]
    assert lines["MISSING"] == "MISSING True"
    with pytest.raises(ValueError, match="no-such-folder"):
        LLM(str(tmp_path / "no-such-folder"))
    assert json.load(open(repo / "snapshots" / commit / "config.json"))["architectures"] == ["Qwen3ForCausalLM"]
