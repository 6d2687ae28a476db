"""LLM.beam_search (vLLM 0.8.5's algorithm) on tiny Qwen3 checkpoints, against transformers'
`generate(num_beams=...)`.

Where the two agree, the tests ask for equality: without EOS (ignore_eos: every beam runs
max_tokens; the order is that of cum_logprob whatever the length penalty), and with EOS on a
checkpoint where EOS wins its step outright. They differ by design elsewhere: vLLM finishes every
EOS candidate among a beam's 2 * beam_width, transformers only those ranked within the best
beam_width of the step; vLLM's length is the whole sequence (prompt included, EOS not),
transformers' the generated tokens (EOS included); vLLM runs all max_tokens steps, transformers
may stop early (`early_stopping`)."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from fixtures.checkpoints import ENGINE_ARGS
from fixtures.tokenizer import IM_END_ID
from nanovllm import LLM, BeamSearchParams, SamplingParams
from nanovllm.beam_search import get_beam_search_score

IDS = list(range(1000, 1020))
OTHER = list(range(2000, 2013))


def hf_beams(model, ids: list[int], width: int, max_tokens: int, length_penalty: float, eos: int | None):
    """transformers' best `width` beams: (generated tokens up to the first EOS, cum_logprob)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), num_beams=width, num_return_sequences=width, do_sample=False,
                             max_new_tokens=max_tokens, length_penalty=length_penalty, eos_token_id=eos,
                             pad_token_id=0, early_stopping="never", output_scores=True,
                             return_dict_in_generate=True)
    beams = []
    for seq, score in zip(out.sequences, out.sequences_scores):
        tokens = seq[len(ids):].tolist()
        if eos in tokens:
            tokens = tokens[:tokens.index(eos) + 1]
        beams.append((tokens, score.item() * len(tokens) ** length_penalty))
    return beams


def check(output, prompt_ids: list[int], expected):
    got = [(s.tokens[len(prompt_ids):], s.cum_logprob) for s in output.sequences]
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    assert [c for _, c in got] == pytest.approx([c for _, c in expected], abs=1e-3)
    for seq in output.sequences:
        assert seq.tokens[:len(prompt_ids)] == prompt_ids and len(seq.logprobs) == len(seq.tokens) - len(prompt_ids)


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_without_eos_matches_transformers(llm, qwen3_tied, length_penalty):
    model = AutoModelForCausalLM.from_pretrained(qwen3_tied, dtype=torch.float32).eval()
    text = "The capital of France is"
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True, length_penalty=length_penalty)
    outputs = llm.beam_search([{"prompt_token_ids": IDS}, text, {"prompt_token_ids": OTHER}], params)
    text_ids = llm.get_tokenizer().encode(text)
    for output, ids in zip(outputs, [IDS, text_ids, OTHER]):
        check(output, ids, hf_beams(model, ids, 3, 6, length_penalty, None))
        assert all(s.finish_reason == "length" and s.stop_reason is None for s in output.sequences)
    assert outputs[1].sequences[0].text.startswith(text)  # vLLM: the text holds the prompt


@pytest.fixture(scope="module")
def eos_checkpoint(qwen3_tied, tmp_path_factory):
    """qwen3_tied whose EOS embedding is 1.1x that of the third greedy token of IDS, so EOS
    outranks it there (and the tied LM head scores it): beam search meets EOS early."""
    path = str(tmp_path_factory.mktemp("qwen3_eos"))
    shutil.copytree(qwen3_tied, path, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(qwen3_tied, dtype=torch.float32).eval()
    with torch.no_grad():
        third = model.generate(torch.tensor([IDS]), do_sample=False, max_new_tokens=3, eos_token_id=None,
                               pad_token_id=0)[0, -1].item()
    weights = load_file(f"{path}/model.safetensors")
    weights["model.embed_tokens.weight"][IM_END_ID] = 1.1 * weights["model.embed_tokens.weight"][third]
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_with_eos_matches_transformers(eos_checkpoint, length_penalty):
    model = AutoModelForCausalLM.from_pretrained(eos_checkpoint, dtype=torch.float32).eval()
    llm = LLM(eos_checkpoint, **ENGINE_ARGS)
    try:
        output = llm.beam_search([{"prompt_token_ids": IDS}], BeamSearchParams(3, 6, length_penalty=length_penalty))[0]
    finally:
        llm.shutdown()
    check(output, IDS, hf_beams(model, IDS, 3, 6, length_penalty, IM_END_ID))
    first = output.sequences[0]
    assert first.tokens[-1] == IM_END_ID and first.finish_reason == "stop" and len(first.tokens) == len(IDS) + 3
    scores = [get_beam_search_score(s.tokens, s.cum_logprob, IM_END_ID, length_penalty) for s in output.sequences]
    assert scores == sorted(scores, reverse=True)


def test_beam_search_shares_the_prompt_blocks(llm):
    """Every step's beams take their common full blocks from the prefix cache."""
    prompt = list(range(4000, 4048))  # three full blocks of 16
    engine = llm.llm_engine
    cached = []
    generate = engine.generate

    def recording(prompts, params, use_tqdm):
        outputs = generate(prompts, params, use_tqdm)
        cached.append([o.num_cached_tokens for o in outputs])
        return outputs
    engine.generate = recording
    try:
        llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True))
    finally:
        del engine.generate
    assert cached[0] == [0]  # the first step computes the (new) prompt
    assert cached[1:] == [[48, 48], [48, 48]]  # then only the tokens past the prompt's full blocks


def test_bad_beam_search_input(llm):
    with pytest.raises(ValueError, match="beam_width must be at least 1, got 0"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be at least 1, got 0"):
        BeamSearchParams(beam_width=2, max_tokens=0)
    with pytest.raises(ValueError, match="temperature must be non-negative, got -1"):
        BeamSearchParams(beam_width=2, max_tokens=2, temperature=-1)
    with pytest.raises(TypeError, match="length_penalty must be a number"):
        BeamSearchParams(beam_width=2, max_tokens=2, length_penalty="long")
    with pytest.raises(ValueError, match="beam_width must be at most 10"):
        llm.beam_search(["Hi"], BeamSearchParams(beam_width=11, max_tokens=2))
    with pytest.raises(TypeError, match="params must be a BeamSearchParams"):
        llm.beam_search(["Hi"], SamplingParams())
    with pytest.raises(ValueError, match="more than max_model_len"):
        llm.beam_search([{"prompt_token_ids": [5] * 600}], BeamSearchParams(beam_width=2, max_tokens=2))
