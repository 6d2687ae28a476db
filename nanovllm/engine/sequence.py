"""One sequence (one completion of a request): its token ids, KV block table and progress.

Invariants: the first `num_cached_tokens` tokens have their K/V in the blocks of `block_table`
once the launched steps complete (a launched step's tokens count as cached: later steps run after
it on the device); a scheduled step computes tokens [num_cached_tokens, num_cached_tokens +
num_scheduled_tokens). Tokens are only ever appended (preemption recomputes K/V, it never drops tokens).
The block size is not stored here: the BlockManager owns it.

Async scheduling: a launched step's sampled token is a placeholder until the host reads it
(`num_output_placeholders`, vLLM's name: 0, 1 or, between scheduling a step and reading the one
before, 2). `num_tokens` and `num_completion_tokens` count the placeholders (the sequence as
the device sees it: positions, the sampler's token count); `token_ids` and `num_output_tokens`
hold the known tokens only. A placeholder is resolved by `append_token`.

`sampling_state` belongs to the sampler on rank 0 (the token-id mirror of a penalised
sequence); it is created on the sequence's first penalised step and dies with the sequence.
`grammar` (structured outputs) is the sequence's grammar matcher: the sampler masks with it,
the engine advances it with each new token.
`prompt_logprobs` is the k of the prompt logprobs still to compute (None: none are); while set,
the sequence reads nothing from the prefix cache, so that every prompt position gets its logits.
"""
import sys
from enum import Enum, auto
from typing import Any

from nanovllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:

    def __init__(self, seq_id: int, token_ids: list[int], sampling_params: SamplingParams, *,
                 seed: int | None = None, all_stop_token_ids: frozenset[int] = frozenset(),
                 prompt_logprobs: int | None = None, grammar: Any = None):
        """`seed`: this sequence's sampling seed (None: the engine's random stream); a request with
        n > 1 gives its i-th sequence `sampling_params.seed + i`. `all_stop_token_ids`: ids that
        end the sequence (EOS unless ignore_eos, and stop_token_ids), masked while it is shorter
        than `min_tokens`. `prompt_logprobs`, `grammar`: see the module's docstring."""
        self.seq_id = seq_id
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params = sampling_params
        self.seed = seed
        self.all_stop_token_ids = all_stop_token_ids
        # max_tokens=None: no limit of its own; max_model_len still ends the sequence.
        self.max_tokens = sys.maxsize if sampling_params.max_tokens is None else sampling_params.max_tokens
        self.block_table: list[int] = []
        self.num_cached_tokens = 0      # tokens whose K/V are in the cache
        self.num_scheduled_tokens = 0   # tokens the current step computes
        self.num_output_placeholders = 0  # sampled tokens still on the device (async scheduling)
        self.num_prefix_cached_tokens: int | None = None  # prompt tokens found in the prefix cache on admission
        self.finish_reason: str | None = None  # "stop", "length" or "abort"
        self.stop_reason: int | str | None = None  # the stop_token_id or stop string; None for EOS
        self.sampling_state: Any = None
        self.prompt_logprobs = prompt_logprobs
        self.grammar = grammar

    @property
    def num_tokens(self) -> int:
        """Known tokens and placeholders."""
        return len(self.token_ids) + self.num_output_placeholders

    @property
    def num_completion_tokens(self) -> int:
        """Tokens sampled so far, placeholders included."""
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        """Completion tokens known on the host."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        """The newest known token."""
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def is_prefill_complete_after_step(self) -> bool:
        """True when the scheduled step reaches the last token, so it yields a next token."""
        return self.num_cached_tokens + self.num_scheduled_tokens == self.num_tokens

    def append_token(self, token_id: int):
        """Add a sampled token: the value of the oldest placeholder when there is one."""
        self.token_ids.append(token_id)
        if self.num_output_placeholders:
            self.num_output_placeholders -= 1
