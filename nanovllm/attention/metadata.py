"""Per-step attention metadata, visible to the attention layers only inside `forward_context`.

The model runner builds one `AttentionMetadata` per forward pass and enters
`with forward_context(meta):` around it; leaving the block always clears it, so a stale batch
can never leak into the next step. Tensors live on the model's device.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor                   # [num_tokens] flat cache slot of each token
    cu_seqlens_q: torch.Tensor | None = None     # [num_seqs + 1] prefill query offsets
    cu_seqlens_k: torch.Tensor | None = None     # [num_seqs + 1] prefill key offsets (cached + new)
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    context_lens: torch.Tensor | None = None     # [num_seqs] decode: keys per sequence
    block_tables: torch.Tensor | None = None     # [num_seqs, max_blocks]; None: no cached prefix


_current: AttentionMetadata | None = None


@contextmanager
def forward_context(meta: AttentionMetadata):
    global _current
    assert _current is None, "forward contexts do not nest"
    _current = meta
    try:
        yield meta
    finally:
        _current = None


def get_attention_metadata() -> AttentionMetadata:
    assert _current is not None, "attention ran outside forward_context()"
    return _current
