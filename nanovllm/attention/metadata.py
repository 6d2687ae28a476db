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
class CascadeMetadata:
    """A decode step with shared prefixes (worker/cascade.py): group g's rows all hold the same first
    prefix_lens[g] keys (whole blocks); each row's keys after its group's prefix are its suffix (the whole
    context for a row in no group). Attention = LSE-merge of the prefix pass and the suffix pass.
    The host ints bound the groups (they size the grids; a CUDA graph's metadata has room for more groups
    than a step uses: groups past the last are empty, cu_group_rows repeating its last offset)."""
    prefix_block_tables: torch.Tensor  # [num_groups, max_prefix_blocks] int32, the shared blocks
    prefix_lens: torch.Tensor          # [num_groups] int32 shared keys (a multiple of block_size)
    group_rows: torch.Tensor           # [num_grouped_rows] int32 step rows, group by group
    cu_group_rows: torch.Tensor        # [num_groups + 1] int32 offsets of each group's rows in group_rows
    seq_prefix_lens: torch.Tensor      # [num_seqs] int32 the prefix_len of each row's group; 0: no group
    suffix_block_tables: torch.Tensor  # [num_seqs, max_suffix_blocks] int32 each row's table after the prefix
    suffix_lens: torch.Tensor          # [num_seqs] int32 context_len - seq_prefix_len
    num_groups: int                    # groups there is room for
    max_prefix_len: int                # no group's prefix is longer


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
    cascade: CascadeMetadata | None = None       # decode with shared prefixes; block_tables, context_lens None


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
