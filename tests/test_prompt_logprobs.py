"""SamplingParams.prompt_logprobs end to end on the tiny Qwen3 checkpoint: equal to transformers'
log-softmax over the prompt (the prompt token with its rank, and the top k), with and without a
cached prefix, with chunked prefill, in batches mixed with plain requests, and bad input."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from fixtures.checkpoints import ENGINE_ARGS
from nanovllm import LLM, SamplingParams

IDS = list(range(1000, 1040))  # 2.5 blocks of 16 tokens
OTHER = list(range(2000, 2030))


@pytest.fixture(scope="module")
def hf_logprobs(qwen3_tied):
    """Prompt -> [len, vocab_size] float32 log-softmax of transformers' logits."""
    model = AutoModelForCausalLM.from_pretrained(qwen3_tied, dtype=torch.float32).eval()

    @torch.no_grad()
    def logprobs(ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return logprobs


def check(prompt_logprobs, ids: list[int], k: int, reference: torch.Tensor):
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for i in range(1, len(ids)):
        entry, row = prompt_logprobs[i], reference[i - 1]
        first = next(iter(entry))
        assert first == ids[i]  # the prompt token first
        assert entry[first].logprob == pytest.approx(row[ids[i]].item(), abs=1e-4)
        value = row[ids[i]]  # its rank, up to float noise among near ties
        assert int((row > value + 1e-4).sum()) < entry[first].rank <= int((row >= value - 1e-4).sum())
        top = row.topk(k)
        expected = dict(zip(top.indices.tolist(), top.values.tolist()))
        assert set(entry) == {ids[i]} | set(expected)
        for rank, (token_id, value) in enumerate(expected.items(), 1):
            assert entry[token_id].logprob == pytest.approx(value, abs=1e-4)
            if token_id != ids[i]:
                assert entry[token_id].rank == rank
                assert isinstance(entry[token_id].decoded_token, str)


def test_prompt_logprobs_match_transformers_in_a_mixed_batch(llm, hf_logprobs):
    params = [SamplingParams(prompt_logprobs=3, max_tokens=2), SamplingParams(max_tokens=3, temperature=0),
              SamplingParams(prompt_logprobs=0, logprobs=2, max_tokens=2, n=2, seed=1)]
    alone = llm.generate({"prompt_token_ids": OTHER}, params[1], use_tqdm=False)[0]
    out = llm.generate([{"prompt_token_ids": IDS}, {"prompt_token_ids": OTHER}, "Hello there, prompt"], params,
                       use_tqdm=False)
    check(out[0].prompt_logprobs, IDS, 3, hf_logprobs(IDS))
    assert out[1].prompt_logprobs is None and out[1].outputs[0].token_ids == alone.outputs[0].token_ids
    text_ids = out[2].prompt_token_ids
    check(out[2].prompt_logprobs, text_ids, 0, hf_logprobs(text_ids))
    assert all(len(entry) == 1 for entry in out[2].prompt_logprobs[1:])  # k=0: the prompt token only
    assert len(out[2].outputs) == 2 and all(len(c.logprobs) == 2 for c in out[2].outputs)


def test_prompt_logprobs_with_a_cached_prefix(llm, hf_logprobs):
    prefix = list(range(3000, 3032))  # two full blocks
    llm.generate({"prompt_token_ids": prefix + [5]}, SamplingParams(max_tokens=1), use_tqdm=False)
    ids = prefix + [7, 8, 9]
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(prompt_logprobs=2, max_tokens=1), use_tqdm=False)[0]
    check(out.prompt_logprobs, ids, 2, hf_logprobs(ids))
    assert out.num_cached_tokens == 0  # recomputed: a cached prefix has no logits
    again = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert again.num_cached_tokens == 32  # its blocks are still published for others


def test_prompt_logprobs_with_chunked_prefill(qwen3_tied, hf_logprobs):
    chunked = LLM(qwen3_tied, **ENGINE_ARGS | dict(max_num_batched_tokens=24, max_num_seqs=4))
    try:
        prompts = [{"prompt_token_ids": IDS}, {"prompt_token_ids": OTHER}, {"prompt_token_ids": IDS[:9]}]
        params = [SamplingParams(prompt_logprobs=4, max_tokens=2), SamplingParams(max_tokens=2),
                  SamplingParams(prompt_logprobs=1, max_tokens=2)]
        out = chunked.generate(prompts, params, use_tqdm=False)
        check(out[0].prompt_logprobs, IDS, 4, hf_logprobs(IDS))
        check(out[2].prompt_logprobs, IDS[:9], 1, hf_logprobs(IDS[:9]))
        engine = chunked.llm_engine  # through step(): reported once the prompt is done
        engine.add_request("r", {"prompt_token_ids": OTHER}, SamplingParams(prompt_logprobs=1, max_tokens=2))
        reported = [o for _ in range(4) for o in engine.step()]
        assert reported and all(len(o.prompt_logprobs) == len(OTHER) for o in reported)
    finally:
        chunked.shutdown()


def test_one_token_prompt(llm):
    out = llm.generate({"prompt_token_ids": [42]}, SamplingParams(prompt_logprobs=2, max_tokens=1), use_tqdm=False)
    assert out[0].prompt_logprobs == [None]


def test_bad_prompt_logprobs(llm):
    with pytest.raises(ValueError, match="Requested prompt logprobs of 21, which is greater than max allowed: 20"):
        llm.generate("Hi", SamplingParams(prompt_logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs must be non-negative, got -2"):
        SamplingParams(prompt_logprobs=-2)
    with pytest.raises(TypeError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=1.5)
    assert not llm.llm_engine.has_unfinished_requests()
