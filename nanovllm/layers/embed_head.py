"""Vocabulary-parallel token embedding and LM head.

Each rank holds `vocab_size / tp` consecutive rows. The embedding zeroes rows outside its shard
and all-reduces; the LM head computes its shard of the logits and gathers them on rank 0
(other ranks get None).
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.parallel import all_reduce, divide, gather_to_rank0, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_size = tp_size()
        self.num_per_rank = divide(num_embeddings, self.tp_size, "vocab_size")
        self.start = tp_rank() * self.num_per_rank
        self.weight = nn.Parameter(torch.empty(self.num_per_rank, embedding_dim))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        shard = loaded.narrow(0, self.start, self.num_per_rank)
        if param.shape != shard.shape:
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit the "
                             f"embedding of shape {tuple(param.shape)} x {self.tp_size} ranks")
        param.data.copy_(shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.start) & (input_ids < self.start + self.num_per_rank)
        y = F.embedding((input_ids - self.start) * in_shard, self.weight)
        return all_reduce(y * in_shard.unsqueeze(-1).to(y.dtype))


class ParallelLMHead(VocabParallelEmbedding):

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        # [num_seqs, hidden] -> [num_seqs, vocab_size] on rank 0
        return gather_to_rank0(F.linear(hidden_states, self.weight), dim=-1)
