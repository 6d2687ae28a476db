"""Structured outputs (SamplingParams.guided_decoding, xgrammar) end to end on the tiny Qwen3
checkpoint: completions always parse / match their JSON schema, regex, choice or EBNF grammar,
greedy and sampled, and end with "stop" once the grammar is complete; plain requests batched with
them are unchanged; bad grammars raise ValueError before anything is queued. Also the bitmask
stage on its own, and the message without xgrammar."""
import json
import re
import sys

import pytest
import torch

from nanovllm import GuidedDecodingParams, SamplingParams
from nanovllm.engine.structured_output import StructuredOutputManager
from nanovllm.sample.guided import allowed_tokens

xgrammar = pytest.importorskip("xgrammar", reason="xgrammar (the `structured` extra) is not installed")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "color"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                         "color": {"enum": ["red", "green", "blue"]}}}
REGEX = r"[a-z]{2,5}@[a-z]{3}\.(com|org)"
CHOICES = ["yes", "no", "maybe so"]
GRAMMAR = 'root ::= "(" num (op num)? ")"\nop ::= "+" | "*"\nnum ::= [0-9] | [0-9] [0-9]'
PROMPTS = ["Hello there", "Give me an answer:", {"prompt_token_ids": list(range(1000, 1030))}]


def check_json(text: str):
    value = json.loads(text)
    assert set(value) == {"name", "ok", "color"} and isinstance(value["ok"], bool)
    assert value["color"] in ("red", "green", "blue") and len(value["name"]) <= 6


CASES = [
    (GuidedDecodingParams(json=SCHEMA), check_json),
    (GuidedDecodingParams(regex=REGEX), lambda text: re.fullmatch(REGEX, text) or pytest.fail(text)),
    (GuidedDecodingParams(choice=CHOICES), lambda text: text in CHOICES or pytest.fail(text)),
    (GuidedDecodingParams(grammar=GRAMMAR),
     lambda text: re.fullmatch(r"\(\d{1,2}([+*]\d{1,2})?\)", text) or pytest.fail(text)),
]


@pytest.mark.parametrize("guided, check", CASES, ids=["json", "regex", "choice", "grammar"])
def test_guided_outputs_follow_their_grammar(llm, guided, check):
    params = [SamplingParams(temperature=0, max_tokens=40, guided_decoding=guided),
              SamplingParams(temperature=1.0, seed=3, max_tokens=40, guided_decoding=guided),
              SamplingParams(temperature=0.8, top_k=50, n=2, max_tokens=40, ignore_eos=True, guided_decoding=guided)]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for output in outputs:
        for completion in output.outputs:
            assert completion.finish_reason == "stop", completion
            check(completion.text)


def test_plain_requests_batched_with_guided_ones_are_unchanged(llm):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS, plain, use_tqdm=False)
    guided = SamplingParams(temperature=0, max_tokens=30, guided_decoding=GuidedDecodingParams(regex=REGEX))
    mixed = llm.generate(PROMPTS + PROMPTS, [plain] * 3 + [guided] * 3, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == [o.outputs[0].token_ids for o in alone]
    assert all(re.fullmatch(REGEX, o.outputs[0].text) for o in mixed[3:])


@pytest.mark.parametrize("guided, message", [
    (GuidedDecodingParams(regex="(ab"), "guided_decoding.regex is invalid"),
    (GuidedDecodingParams(grammar="root ::= undefined_rule"), "guided_decoding.grammar or choice is invalid"),
    (GuidedDecodingParams(json="{not json"), "guided_decoding.json is not valid JSON"),
    (GuidedDecodingParams(json={"type": "frobnicate"}), "guided_decoding.json is invalid"),
])
def test_invalid_grammars_raise_before_anything_runs(llm, guided, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(["ok", "fine"], [SamplingParams(), SamplingParams(guided_decoding=guided)], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(json=SCHEMA, regex="a"), ValueError, "You can only use one kind of guided decoding"),
    (dict(), ValueError, "guided_decoding needs one of"),
    (dict(choice="yes"), TypeError, "choice must be a list of str"),
    (dict(choice=[]), ValueError, "choice must list at least one string"),
    (dict(regex="a", backend="outlines"), ValueError, "backend must be None, 'auto' or 'xgrammar'"),
    (dict(regex="a", whitespace_pattern=" *"), ValueError, "whitespace_pattern is not supported"),
    (dict(json_object=False), ValueError, "json_object must be True or None"),
])
def test_bad_guided_decoding_params(kwargs, error, message):
    with pytest.raises(error, match=message):
        GuidedDecodingParams(**kwargs)
    with pytest.raises(TypeError, match="guided_decoding must be a GuidedDecodingParams"):
        SamplingParams(guided_decoding={"regex": "a"})


def test_grammars_compile_once_and_never_allow_padding_ids(llm):
    manager = llm.llm_engine.input_processor.structured_output
    first = manager.compile(GuidedDecodingParams(json=SCHEMA))
    assert manager.compile(GuidedDecodingParams(json=json.dumps(SCHEMA))) is first  # cached
    grammar = manager.grammar(manager.compile(GuidedDecodingParams(json_object=True)))
    bitmask = torch.zeros(1, (manager.vocab_size + 31) // 32, dtype=torch.int32)
    grammar.fill_bitmask(bitmask, 0)
    allowed = allowed_tokens(bitmask, manager.vocab_size)[0]
    tokenizer_size = len(llm.get_tokenizer())
    assert allowed[:tokenizer_size].any() and not allowed[tokenizer_size:].any()


def test_bitmask_unpacking():
    bitmask = torch.zeros(2, 4, dtype=torch.int32)
    bitmask[0, 0] = 1 - (1 << 31)            # bits 0 and 31 (the sign bit): tokens 0 and 31
    bitmask[1, 3] = 1 << 4                   # token 100
    allowed = allowed_tokens(bitmask, 101)
    assert allowed.shape == (2, 101)
    assert allowed[0].nonzero().flatten().tolist() == [0, 31] and allowed[1].nonzero().flatten().tolist() == [100]
    logits = torch.randn(2, 101)
    reference = logits.clone()
    xgrammar.apply_token_bitmask_inplace(reference, bitmask)
    assert torch.equal(logits.masked_fill(~allowed, float("-inf")), reference)


def test_without_xgrammar_the_error_names_the_extra(llm, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    manager = StructuredOutputManager(llm.get_tokenizer(), 151936, frozenset([151645]))
    with pytest.raises(ImportError, match=re.escape("pip install nano-vllm[structured]")):
        manager.compile(GuidedDecodingParams(regex="a+"))
