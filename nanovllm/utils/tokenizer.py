"""Tokenizer loading, and what a checkpoint's generation_config.json says: the end-of-sequence
ids, and the default sampling settings (vLLM's `get_diff_sampling_param`).

A folder without a working tokenizer is an error naming it, never an empty tokenizer (which
transformers makes from a config alone, and which turns every text into no tokens)."""
import json
import os

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

# generation_config.json keys that override SamplingParams' defaults when the user gives none;
# max_new_tokens is Hugging Face's name of max_tokens.
GENERATION_CONFIG_SAMPLING_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


# What a Hugging Face tokenizer folder holds, for the error message.
TOKENIZER_FILES = "tokenizer_config.json with tokenizer.json, or vocab.json and merges.txt, or tokenizer.model"


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of folder `path`. Raises ValueError naming the folder when none loads from it
    or the one that loads has no vocabulary."""
    remedy = "pass tokenizer=<a folder or hub id that has one>, or skip_tokenizer_init=True to work with token ids"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... by the kind of gap
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"no tokenizer could be loaded from {path!r} (looked for {TOKENIZER_FILES}; "
                         f"{type(e).__name__}: {reason}); {remedy}.") from e
    if not tokenizer.encode("a", add_special_tokens=False):
        raise ValueError(f"no tokenizer was found in {path!r} (looked for {TOKENIZER_FILES}; what loaded has no "
                         f"vocabulary); {remedy}.")
    return tokenizer


def read_generation_config(path: str) -> dict:
    """The contents of `path`/generation_config.json; {} when there is none."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def default_sampling_overrides(generation_config: dict) -> dict:
    """The SamplingParams keyword arguments that generation_config.json sets (None values ignored)."""
    overrides = {key: generation_config[key] for key in GENERATION_CONFIG_SAMPLING_KEYS
                 if generation_config.get(key) is not None}
    if "max_new_tokens" in overrides:
        overrides["max_tokens"] = overrides.pop("max_new_tokens")
    return overrides


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def eos_token_ids(path: str, hf_config: PretrainedConfig,
                  tokenizer: PreTrainedTokenizerBase | None) -> frozenset[int]:
    """Every id that ends a sequence: generation_config.json's `eos_token_id` (an int or a list),
    the model config's, and the tokenizer's."""
    ids = _as_set(getattr(hf_config, "eos_token_id", None))
    ids |= _as_set(read_generation_config(path).get("eos_token_id"))
    if tokenizer is not None:
        ids |= _as_set(tokenizer.eos_token_id)
    return frozenset(ids)
