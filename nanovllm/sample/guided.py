"""The structured-outputs stage: a row with a grammar keeps only the tokens its grammar allows.

The bitmask ([num_guided, ceil(vocab_size / 32)] int32, bit t % 32 of word t // 32 set: token t
allowed; xgrammar's layout) was filled on the host by each row's matcher (metadata.py). Here it is
unpacked on the device and the forbidden tokens of those rows' float32 copies set to -inf; rows
without a grammar are not touched. Ids past the tokenizer's vocabulary (the model's padding) are
never allowed.
"""
import torch

from nanovllm.sample.metadata import SamplingMetadata


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, ceil(vocab_size / 32)] int32 bitmask -> [n, vocab_size] bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [n, words, 32]
    return bits.view(len(bitmask), -1)[:, :vocab_size].bool()


def apply_grammar_bitmask_(patched: torch.Tensor, t: SamplingMetadata):
    """patched: [num_patched, vocab_size] float32, modified in place: the slots `t.guided_slots`
    get -inf where `t.bitmask` forbids the token."""
    if not len(t.guided_slots):
        return
    allowed = allowed_tokens(t.bitmask, patched.shape[1])
    patched[t.guided_slots] = patched[t.guided_slots].masked_fill(~allowed, float("-inf"))
