"""Batched next-token sampling on the device.

Temperature-scaled sampling uses the exponential race (equivalent to Gumbel-max): with
E ~ Exp(1) i.i.d., argmax(p / E) is distributed as Categorical(p), and needs no cumsum or sort.
Rows with temperature 0 take the argmax of the raw logits.
"""
import torch
from torch import nn


class Sampler(nn.Module):

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
        # logits: [num_seqs, vocab_size]; temperatures: [num_seqs] -> token ids [num_seqs]
        logits = logits.float()
        greedy_tokens = logits.argmax(-1)
        scaled = logits / temperatures.clamp(min=1e-5).unsqueeze(1)
        probs = torch.softmax(scaled, -1)
        sampled = (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)
        return torch.where(temperatures == 0, greedy_tokens, sampled)
