"""Input processing: the prompt forms vLLM accepts -> validated Requests with their Sequences.

Every check raises ValueError / TypeError naming the bad value before anything is queued, so
requests already in flight are never disturbed (a guided_decoding grammar is compiled here, so
an invalid one fails here too). A prompt is a str, a list of token ids (ints, numpy integers
included), {"prompt": str} or {"prompt_token_ids": [...], "prompt"?: str}.
"""
from numbers import Integral
from typing import Iterator, Sequence as SequenceT, TypedDict, Union

from transformers import PreTrainedTokenizerBase

from nanovllm.engine.request import Completion, Request
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.structured_output import StructuredOutputManager
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.detokenizer import IncrementalDetokenizer

MAX_LOGPROBS = 20  # vLLM's default max_logprobs


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]
    prompt: str  # optional: the text the ids came from, reported as RequestOutput.prompt


PromptType = Union[str, list[int], TextPrompt, TokensPrompt]


def _is_token_id(value) -> bool:
    return type(value) is int or (isinstance(value, Integral) and not isinstance(value, bool))


def is_token_ids(value) -> bool:
    """A list or tuple of ints (numpy integers too; bools are not token ids)."""
    return isinstance(value, (list, tuple)) and all(map(_is_token_id, value))


def check_text(text: str, what: str = "prompt"):
    """ValueError naming `text` when it cannot be encoded (a lone surrogate such as '\\ud800')."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text ({e.reason} at index {e.start}): {text!r:.80}") from None


def pair_prompts(prompts: PromptType | SequenceT[PromptType],
                 sampling_params: SamplingParams | SequenceT[SamplingParams]) -> list[tuple[PromptType, SamplingParams]]:
    """`generate`'s arguments as (prompt, params) pairs: one prompt or a list; one SamplingParams
    for all prompts or one per prompt."""
    if isinstance(prompts, (str, dict)) or (is_token_ids(prompts) and prompts):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}: "
                        f"{prompts!r:.80}")
    if not isinstance(sampling_params, (list, tuple)):
        return [(prompt, sampling_params) for prompt in prompts]
    if len(sampling_params) != len(prompts):
        raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts; "
                         f"pass one SamplingParams or one per prompt.")
    return list(zip(prompts, sampling_params))


class InputProcessor:

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, max_model_len: int,
                 eos_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.structured_output = StructuredOutputManager(tokenizer, vocab_size, eos_token_ids)

    def parse_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of one prompt, validated."""
        text = None
        if isinstance(prompt, dict):
            unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
            if unknown:
                raise ValueError(f"prompt dict has unsupported keys {unknown}; use 'prompt' or 'prompt_token_ids'.")
            if "prompt_token_ids" in prompt:
                text, prompt = prompt.get("prompt"), prompt["prompt_token_ids"]
                if not is_token_ids(prompt):
                    raise TypeError(f"prompt_token_ids must be a list of ints, got {prompt!r:.80}")
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
                if not isinstance(prompt, str):
                    raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r:.80}")
            else:
                raise ValueError("prompt dict needs a 'prompt' or a 'prompt_token_ids' key, got {}.")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt was given as text, but skip_tokenizer_init=True: pass token ids.")
            check_text(prompt)
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif is_token_ids(prompt):
            token_ids = list(map(int, prompt))
        else:
            raise TypeError(f"prompt must be a str, a list of token ids, {{'prompt': str}} or "
                            f"{{'prompt_token_ids': [...]}}, got {type(prompt).__name__}: {prompt!r:.80}")
        if not token_ids:
            raise ValueError(f"prompt is empty: {prompt!r}.")
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size}).")
        return text, token_ids

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams, streamed: bool,
                seq_ids: Iterator[int]) -> Request:
        """A validated request and its sequences (ids from `seq_ids`); nothing is queued yet."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}: {request_id!r}.")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}.")
        if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
            raise ValueError(f"Requested sample logprobs of {params.logprobs}, which is greater than max "
                             f"allowed: {MAX_LOGPROBS}")
        if params.prompt_logprobs is not None and params.prompt_logprobs > MAX_LOGPROBS:
            raise ValueError(f"Requested prompt logprobs of {params.prompt_logprobs}, which is greater than max "
                             f"allowed: {MAX_LOGPROBS}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {params.stop!r} need a tokenizer, but skip_tokenizer_init=True.")
        text, token_ids = self.parse_prompt(prompt)
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens:]
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens, more than max_model_len={self.max_model_len}.")
        compiled = None if params.guided_decoding is None else self.structured_output.compile(params.guided_decoding)
        request = Request(request_id, text, token_ids, params, streamed, num_unfinished=params.n,
                          prompt_logprobs=None if params.prompt_logprobs is None else [None])
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        needs_text = (streamed or params.stop) and params.detokenize and self.tokenizer is not None
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            # the request's prompt logprobs come from its first sequence
            prompt_logprobs = params.prompt_logprobs if index == 0 and len(token_ids) > 1 else None
            grammar = None if compiled is None else self.structured_output.grammar(compiled)
            seq = Sequence(next(seq_ids), token_ids, params, seed=seed, all_stop_token_ids=stop_ids,
                           prompt_logprobs=prompt_logprobs, grammar=grammar)
            detokenizer = (IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
                           if needs_text else None)
            logprobs = [] if params.logprobs is not None else None
            request.completions.append(Completion(request, index, seq, detokenizer, logprobs,
                                                  None if logprobs is None else 0.0))
        return request
