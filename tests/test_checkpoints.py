"""Fast CPU checks of the tiny checkpoint writer (tests/fixtures/)."""

import json
import os
import unicodedata

import pytest
import torch
from safetensors import safe_open

from fixtures.tokenizer import (
    END_THINK_ID,
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    QWEN3_ADDED_TOKEN_IDS,
    QWEN3_VOCAB_END,
    THINK_ID,
    qwen_tiktoken_encoding,
)

TEXTS = [
    "Hello world! 你好",
    "I'm sure they'll say it's 12345 dollars, isn't it?",
    "def f(x):\n    return x  +  1\n\n\n# done\t\ttabs   ",
    "  leading spaces and trailing   ",
    "Ünïcödé — naïve café, 日本語のテキスト, 한국어, emoji 🚀🔥 and math ∑ x² ≥ 0",
    "URLs: https://example.com/a_b?c=d&e=f#frag; email a.b@c.de",
    "\r\n\r\nWindows lines\r\nand\n\nunix ones\n",
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA aaaaaaaa ................ !!!!!!",
]


@pytest.fixture(scope="module")
def tok(qwen3_tied):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tied)


def test_tokenizer_roundtrip_and_specials(tok):
    assert tok.is_fast
    text = "Hello world! 你好"
    ids = tok.encode(text)
    assert ids == [9707, 1879, 0, 220, 108386]
    assert tok.decode(ids) == text
    assert len(tok) == QWEN3_VOCAB_END == 151669
    assert tok.bos_token is None
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == IM_END_ID
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == ENDOFTEXT_ID
    assert tok.convert_tokens_to_ids("<|im_start|>") == IM_START_ID
    for content, tid in QWEN3_ADDED_TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(content) == tid
    ids = tok.encode("<|im_start|>user\n<think>x</think><|im_end|>")
    assert ids[0] == IM_START_ID and THINK_ID in ids and END_THINK_ID in ids and ids[-1] == IM_END_ID
    # <think> is an added but non-special token: kept by skip_special_tokens.
    assert tok.decode(ids, skip_special_tokens=True) == "user\n<think>x</think>"


def test_tokenizer_matches_tiktoken(tok):
    enc = qwen_tiktoken_encoding()
    for text in TEXTS:
        text = unicodedata.normalize("NFC", text)  # HF applies NFC, tiktoken does not
        ids = tok.encode(text)
        assert ids == enc.encode(text, allowed_special="all"), text
        assert tok.decode(ids) == text
    special = "<|im_start|>system\nhi<|im_end|>\n<|endoftext|>"
    assert tok.encode(special) == enc.encode(special, allowed_special="all")


def test_chat_template_chatml(tok):
    msgs = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
    )
    assert tok.apply_chat_template(msgs, tokenize=False) == expected
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == expected + "<|im_start|>assistant\n"
    no_think = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think == expected + "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.mark.parametrize("name", ["qwen3_tied", "qwen3_untied"])
def test_checkpoint_layout(name, request):
    path = request.getfixturevalue(name)
    tied = name == "qwen3_tied"
    files = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    with open(os.path.join(path, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 151643, "eos_token_id": [151645, 151643]}
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "qwen3" and cfg.architectures == ["Qwen3ForCausalLM"]
    assert cfg.tie_word_embeddings is tied
    assert (cfg.bos_token_id, cfg.eos_token_id) == (151643, 151645)
    rope_theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    assert rope_theta == 1e6
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        expected |= {p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
        expected |= {p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    if not tied:
        expected.add("lm_head.weight")
    assert keys == expected


@pytest.mark.parametrize("name", ["qwen3_tied", "qwen3_untied"])
def test_hf_greedy_generation_is_varied(name, request, tok):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) == 20
    assert len(set(new)) >= 5, new
    assert max(new) < QWEN3_VOCAB_END
