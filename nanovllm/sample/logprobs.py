"""Logprobs of given tokens under raw logits, with their rank and the top-k: what both the sampled
tokens' logprobs and the prompt logprobs report (vLLM 0.8.5, V1: of the model's raw logits).

`LogprobsTensors` are on the device (one per step and kind); `tolist()` copies them to the host
in one transfer per dtype. Row i holds its token first, then the top-k tokens, most likely first.
"""
from typing import NamedTuple

import torch


class LogprobsLists(NamedTuple):
    logprob_token_ids: list[list[int]]  # [num_rows][1 + k]: the row's token, then the top-k
    logprobs: list[list[float]]         # [num_rows][1 + k]
    ranks: list[int]                    # [num_rows] the row's token's rank (1 = most likely)


class LogprobsTensors(NamedTuple):
    logprob_token_ids: torch.Tensor  # [num_rows, 1 + k] int64
    logprobs: torch.Tensor           # [num_rows, 1 + k] float32
    ranks: torch.Tensor              # [num_rows] int64

    def tolist(self) -> LogprobsLists:
        ints = torch.cat([self.ranks.unsqueeze(1), self.logprob_token_ids], 1).tolist()
        return LogprobsLists([row[1:] for row in ints], self.logprobs.tolist(), [row[0] for row in ints])

    @staticmethod
    def cat(parts: list["LogprobsTensors"]) -> "LogprobsTensors":
        return LogprobsTensors(*(torch.cat(tensors) for tensors in zip(*parts)))


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """logits: [num_rows, vocab_size] raw (any float dtype); token_ids: [num_rows] int64: each
    row's token; k: how many of the most likely tokens to add (0: none)."""
    logprobs = torch.log_softmax(logits.float(), -1)  # [num_rows, vocab_size]
    ids = token_ids.unsqueeze(1)  # [num_rows, 1]
    values = logprobs.gather(1, ids)
    ranks = (logprobs >= values).sum(-1)
    if k > 0:
        top = logprobs.topk(k, -1)
        ids, values = torch.cat([ids, top.indices], 1), torch.cat([values, top.values], 1)
    return LogprobsTensors(ids, values, ranks)
