"""What `LLM.generate` / `LLM.chat` / `LLMEngine.step` return, with vLLM's (v0.8.5) names.

One RequestOutput per request, holding `n` CompletionOutputs ordered by `index`. Fields are
cumulative: `text` and `token_ids` hold everything generated so far. A finished completion has
`finish_reason` "stop" (EOS, a stop token id or a stop string; `stop_reason` says which: the id,
the string, None for EOS) or "length" (max_tokens or max_model_len). `token_ids` keep the token
that stopped the request; `text` drops a stop string unless include_stop_str_in_output.
A structured output (guided_decoding) ends with "stop" once its grammar is complete.
"""
from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """The log-probability of one token under the model's raw logits (before temperature,
    penalties and top-k/top-p/min-p, as vLLM 0.8.5 reports it), its rank among all tokens
    (1 = most likely) and its text (None without a tokenizer)."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs; None unless logprobs
    logprobs: list[dict[int, Logprob]] | None = None  # per sampled position: the sampled token and the top-k
    finish_reason: str | None = None  # "stop" or "length"; None while unfinished
    stop_reason: int | str | None = None  # the stop token id or stop string; None for EOS and "length"

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None  # None when the prompt was given as token ids
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache
    # with SamplingParams.prompt_logprobs: per prompt token, None for the first, then a dict holding
    # the prompt token and the top-k (Logprob as above); None otherwise and until the prompt is done
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def __getitem__(self, key: str):
        """Scripts written for nano-vllm's dict results read `out["text"]` / `out["token_ids"]`:
        these give the first completion's fields."""
        if key in ("text", "token_ids"):
            return getattr(self.outputs[0], key)
        raise KeyError(key)
