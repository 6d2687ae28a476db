"""Per-step attention metadata, visible to the attention layers only inside `forward_context`.

The model runner builds one `AttentionMetadata` per forward pass and enters
`with forward_context(meta):` around it; leaving the block always clears it, so a stale batch
can never leak into the next step. The context is per thread (a ContextVar), so engines running
in different threads do not see each other's batches. Tensors live on the model's device.
"""
from contextlib import contextmanager
from contextvars import ContextVar
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


_current: ContextVar[AttentionMetadata | None] = ContextVar("attention_metadata", default=None)


@contextmanager
def forward_context(meta: AttentionMetadata):
    assert _current.get() is None, "forward contexts do not nest"
    token = _current.set(meta)
    try:
        yield meta
    finally:
        _current.reset(token)


def get_attention_metadata() -> AttentionMetadata:
    meta = _current.get()
    assert meta is not None, "attention ran outside forward_context()"
    return meta
