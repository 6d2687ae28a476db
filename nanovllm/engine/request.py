"""The engine's state of a request: the request itself and its `n` completions.

A request (`request_id`: the caller's string, or a counter that `generate` assigns) owns `n`
Sequences, one per completion, each holding the whole prompt; the prefix cache then shares the
prompt's full KV blocks among them. A completion is *tracked* when it needs per-step work in the
output processor (logprobs, incremental text for stop strings or for `step()`'s outputs).
"""
from dataclasses import dataclass, field

from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import Logprob
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.detokenizer import IncrementalDetokenizer


@dataclass(eq=False)
class Completion:
    """One completion (one Sequence) of a request."""
    request: "Request"
    index: int
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None = None  # completions that need text per step
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    stopped_by_string: bool = False

    @property
    def tracked(self) -> bool:
        return self.request.streamed or self.detokenizer is not None or self.logprobs is not None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    streamed: bool  # added through add_request, CUMULATIVE: step() reports it every step
    completions: list[Completion] = field(default_factory=list)
    num_unfinished: int = 0
    # SamplingParams.prompt_logprobs: one entry per prompt token so far (None for the first),
    # filled by the steps that compute the prompt of the first completion's sequence
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
