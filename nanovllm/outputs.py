"""What `LLM.generate` returns, with vLLM's names: one RequestOutput per prompt."""
from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list | None = None
    finish_reason: str | None = None  # "stop" or "length"; None while unfinished
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # None when the prompt was given as token ids
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache

    def __getitem__(self, key: str):
        """Scripts written for nano-vllm's dict results read `out["text"]` / `out["token_ids"]`:
        these give the first completion's fields."""
        if key in ("text", "token_ids"):
            return getattr(self.outputs[0], key)
        raise KeyError(key)
