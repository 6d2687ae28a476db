"""What `LLM.beam_search` returns, with vLLM's (v0.8.5) names and scoring.

A BeamSearchSequence's `tokens` hold the prompt and the generated tokens, `text` decodes them
all, `logprobs` has one dict per generated token: the candidates its beam was given at that step
(its 2 * beam_width most likely next tokens, and the one it sampled). Beams are ranked by
`get_beam_search_score`: cum_logprob / len(tokens) ** length_penalty, not counting a final EOS.
"""
from dataclasses import dataclass, field

from nanovllm.outputs import Logprob


@dataclass
class BeamSearchSequence:
    tokens: list[int]                    # prompt + generated
    logprobs: list[dict[int, Logprob]]   # per generated token
    cum_logprob: float = 0.0             # sum of the generated tokens' logprobs
    text: str | None = None              # set on the returned sequences (prompt included)
    finish_reason: str | None = None     # set on the returned sequences: "stop" (EOS) or "length"
    stop_reason: int | str | None = None  # always None (EOS is the only stop)


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # at most beam_width, best first


@dataclass
class BeamSearchInstance:
    """One prompt's search: its live beams and the finished ones."""
    beams: list[BeamSearchSequence]
    completed: list[BeamSearchSequence] = field(default_factory=list)


def get_beam_search_score(tokens: list[int], cumulative_logprob: float, eos_token_id: int | None,
                          length_penalty: float = 1.0) -> float:
    """vLLM's score: the cumulative logprob over the length (prompt included, a final EOS not)
    raised to `length_penalty`."""
    seq_len = len(tokens)
    if tokens[-1] == eos_token_id:
        seq_len -= 1
    return cumulative_logprob / (seq_len ** length_penalty)
