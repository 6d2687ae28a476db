"""One request's token ids, KV block table and progress.

Invariants: `token_ids[:num_cached_tokens]` have their K/V in the blocks of `block_table`;
a scheduled step computes `token_ids[num_cached_tokens : num_cached_tokens + num_scheduled_tokens]`.
The block size is not stored here: the BlockManager owns it.
"""
from enum import Enum, auto

from nanovllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:

    def __init__(self, seq_id: int, token_ids: list[int], sampling_params: SamplingParams):
        self.seq_id = seq_id
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params = sampling_params
        self.block_table: list[int] = []
        self.num_cached_tokens = 0      # tokens whose K/V are in the cache
        self.num_scheduled_tokens = 0   # tokens the current step computes
        self.num_prefix_cached_tokens: int | None = None  # prompt tokens found in the prefix cache on admission
        self.finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def is_prefill_complete_after_step(self) -> bool:
        """True when the scheduled step reaches the last token, so it yields a next token."""
        return self.num_cached_tokens + self.num_scheduled_tokens == self.num_tokens

    def append_token(self, token_id: int):
        self.token_ids.append(token_id)
