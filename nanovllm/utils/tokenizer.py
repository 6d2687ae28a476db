"""Tokenizer loading and the set of end-of-sequence token ids."""
import json
import os

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path, use_fast=True)


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def eos_token_ids(path: str, hf_config: PretrainedConfig,
                  tokenizer: PreTrainedTokenizerBase | None) -> frozenset[int]:
    """Every id that ends a sequence: generation_config.json's `eos_token_id` (an int or a list),
    the model config's, and the tokenizer's."""
    ids = _as_set(getattr(hf_config, "eos_token_id", None))
    generation_config = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation_config):
        with open(generation_config) as f:
            ids |= _as_set(json.load(f).get("eos_token_id"))
    if tokenizer is not None:
        ids |= _as_set(tokenizer.eos_token_id)
    return frozenset(ids)
