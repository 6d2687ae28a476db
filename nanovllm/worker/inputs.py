"""A scheduled step -> the model's inputs: host lists (`StepInput`, what every rank receives), then
device tensors and the attention metadata.

Slot mapping: token position p of a sequence lives in cache slot
block_table[p // block_size] * block_size + p % block_size. Prefill computes tokens
[num_cached_tokens, num_cached_tokens + num_scheduled_tokens) of each sequence; a sequence whose
step reaches its last token yields a logits row (`logits_indices`). Decode computes the last
token of each sequence.

Async scheduling: a decode row whose input token is a placeholder (sampled by the step just
before, still on the device) has input id 0 in `input_ids`; `prev_sampled_rows` names those
rows and `prev_sampled_indices` their rows in the previous step's sampled token ids, which the
model runner scatters into the device's input ids (`scatter_prev_sampled`).

Prompt logprobs: a prefill row at prompt position p < num_prompt_tokens - 1 of a sequence that
asks for them gives the logprob of prompt token p + 1 (`prompt_logprobs_indices`, which every
rank needs: the LM head gathers over them). The tokens those rows score and their k are rank 0's
alone (`PromptLogprobsTargets`) and never travel to the workers.
"""
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch

from nanovllm.attention import AttentionMetadata, CascadeMetadata
from nanovllm.sample.metadata import scatter_prev_sampled
from nanovllm.worker.cascade import CascadePlan, CascadePlanner


class ScheduledSequence(Protocol):
    """What the step's inputs read of a sequence (the engine's Sequence)."""
    seq_id: int
    token_ids: list[int]        # the known tokens
    block_table: list[int]
    num_cached_tokens: int      # tokens whose K/V are in the cache
    num_scheduled_tokens: int   # tokens this step computes
    num_prompt_tokens: int
    num_output_placeholders: int  # tokens sampled but still on the device
    prompt_logprobs: int | None  # k of the prompt logprobs still to compute; None: none

    @property
    def num_tokens(self) -> int: ...  # the known tokens and the placeholders

    @property
    def is_prefill_complete_after_step(self) -> bool: ...  # the step reaches the last token


@dataclass
class StepInput:
    """One forward step, as host lists (cheap to pickle to the workers)."""
    is_prefill: bool
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    block_tables: list[list[int]] | None      # None for a prefill with no cached prefix
    cu_seqlens_q: list[int] = field(default_factory=list)  # prefill only
    cu_seqlens_k: list[int] = field(default_factory=list)  # prefill only
    context_lens: list[int] = field(default_factory=list)  # decode only
    logits_indices: list[int] = field(default_factory=list)  # rows that produce a next token
    prompt_logprobs_indices: list[int] = field(default_factory=list)  # rows that score a prompt token
    prev_sampled_rows: list[int] = field(default_factory=list)     # decode rows whose input is on the device
    prev_sampled_indices: list[int] = field(default_factory=list)  # their rows in the previous step's samples
    cascade: CascadePlan | None = None  # decode only: shared-prefix groups (worker/cascade.py); None: plain

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


class PromptLogprobsTargets(NamedTuple):
    """Rank 0's side of a step's prompt logprobs rows (in `prompt_logprobs_indices` order)."""
    token_ids: list[int]  # per row: the prompt token its logits score
    num_logprobs: int     # the largest k of the step's sequences


def prompt_logprobs_positions(seq: ScheduledSequence) -> range:
    """The positions of the scheduled prefill chunk of `seq` whose logits score a prompt token
    (position p scores token p + 1); empty when the sequence needs no prompt logprobs."""
    if seq.prompt_logprobs is None:
        return range(0)
    start = seq.num_cached_tokens
    return range(start, max(start, min(start + seq.num_scheduled_tokens, seq.num_prompt_tokens - 1)))


def prompt_logprobs_targets(seqs: list[ScheduledSequence]) -> PromptLogprobsTargets:
    """The targets of `prepare_step(seqs, is_prefill=True, ...)`'s prompt logprobs rows."""
    token_ids, k = [], 0
    for seq in seqs:
        positions = prompt_logprobs_positions(seq)
        if positions:
            token_ids.extend(seq.token_ids[positions.start + 1:positions.stop + 1])
            k = max(k, seq.prompt_logprobs)
    return PromptLogprobsTargets(token_ids, k)


def _slots(seq: ScheduledSequence, start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of the tokens at positions [start, end) of `seq`."""
    slots = []
    for i in range(start // block_size, (end + block_size - 1) // block_size):
        base = seq.block_table[i] * block_size - i * block_size
        slots.extend(range(base + max(start, i * block_size), base + min(end, (i + 1) * block_size)))
    return slots


def prepare_step(seqs: list[ScheduledSequence], is_prefill: bool, block_size: int,
                 prev_sampled: Mapping[int, int] | None = None, cascade: CascadePlanner | None = None) -> StepInput:
    """`prev_sampled`: seq_id -> row of the previous step's sampled tokens, for every decode
    sequence whose input token is a placeholder (async scheduling; prefill steps have none).
    `cascade`: what plans shared-prefix decode steps (None: never)."""
    if not is_prefill:
        step = StepInput(is_prefill=False, input_ids=[], positions=[], slot_mapping=[],
                         block_tables=[seq.block_table for seq in seqs], logits_indices=list(range(len(seqs))))
        for row, seq in enumerate(seqs):
            num_tokens = seq.num_tokens
            position = num_tokens - 1
            if seq.num_output_placeholders:
                step.input_ids.append(0)
                step.prev_sampled_rows.append(row)
                step.prev_sampled_indices.append(prev_sampled[seq.seq_id])
            else:
                step.input_ids.append(seq.token_ids[-1])
            step.positions.append(position)
            step.slot_mapping.append(seq.block_table[position // block_size] * block_size + position % block_size)
            step.context_lens.append(num_tokens)
        if cascade is not None:
            step.cascade = cascade.plan(step.block_tables, step.context_lens, block_size)
        return step
    step = StepInput(is_prefill=True, input_ids=[], positions=[], slot_mapping=[], block_tables=None,
                     cu_seqlens_q=[0], cu_seqlens_k=[0])
    for seq in seqs:
        assert not seq.num_output_placeholders, "a prefill reads known tokens only"
        start, end = seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens
        step.input_ids.extend(seq.token_ids[start:end])
        step.positions.extend(range(start, end))
        step.slot_mapping.extend(_slots(seq, start, end, block_size))
        step.cu_seqlens_q.append(step.cu_seqlens_q[-1] + end - start)
        step.cu_seqlens_k.append(step.cu_seqlens_k[-1] + end)
        if end == seq.num_tokens:
            step.logits_indices.append(step.cu_seqlens_q[-1] - 1)
        positions = prompt_logprobs_positions(seq)
        first_row = step.cu_seqlens_q[-2] - start
        step.prompt_logprobs_indices.extend(range(first_row + positions.start, first_row + positions.stop))
    if any(seq.num_cached_tokens for seq in seqs):  # attend over cached prefixes too
        step.block_tables = [seq.block_table for seq in seqs]
    return step


def upload_ints(device: torch.device, *arrays: list[int]) -> list[torch.Tensor]:
    """Several int lists to the device in one host-to-device copy, as int64 slices. Each slice starts
    16-byte aligned (lists padded to an even length): Triton compiles a kernel per pointer alignment,
    so an unaligned slice in some steps would compile a second variant in the middle of a run."""
    padded = [len(a) + len(a) % 2 for a in arrays]
    host = np.zeros(sum(padded), dtype=np.int64)
    start = 0
    for a, size in zip(arrays, padded):
        host[start:start + len(a)] = a
        start += size
    host = torch.from_numpy(host)
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    return [t[:len(a)] for t, a in zip(host.split(padded), arrays)]


def padded_tables(tables: list[list[int]]) -> list[int]:
    """Block tables as one flat row-major list, rows padded with block 0 (never read); at least one column."""
    width = max(1, max(len(t) for t in tables))
    return [b for t in tables for b in (t + [0] * (width - len(t)))]


def cascade_prefix_blocks(plan: CascadePlan, num_rows: int) -> list[int]:
    """Per row of the step: the blocks its group shares (0 for a row in no group)."""
    blocks = [0] * num_rows
    for group in plan.groups:
        for row in group.rows:
            blocks[row] = group.num_prefix_blocks
    return blocks


def _cascade_lists(step: StepInput) -> list[list[int]]:
    """`step.cascade` as the host lists of CascadeMetadata's tensors, in its field order (tables flat)."""
    plan, tables = step.cascade, step.block_tables
    seq_prefix_blocks = cascade_prefix_blocks(plan, len(tables))
    cu_group_rows = [0]
    for group in plan.groups:
        cu_group_rows.append(cu_group_rows[-1] + len(group.rows))
    seq_prefix_lens = [k * plan.block_size for k in seq_prefix_blocks]
    return [padded_tables([tables[g.rows[0]][:g.num_prefix_blocks] for g in plan.groups]),
            [g.num_prefix_blocks * plan.block_size for g in plan.groups],
            [row for g in plan.groups for row in g.rows],
            cu_group_rows,
            seq_prefix_lens,
            padded_tables([t[k:] for t, k in zip(tables, seq_prefix_blocks)]),
            [n - p for n, p in zip(step.context_lens, seq_prefix_lens)]]


def eager_inputs(step: StepInput, device: torch.device, prev_sampled: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input_ids, positions, attention metadata) of an eager forward, in one upload.
    `prev_sampled`: the previous step's sampled token ids when the step has placeholders."""
    if step.cascade is not None:
        groups = step.cascade.groups
        input_ids, positions, slot_mapping, rows, indices, *cascade = upload_ints(
            device, step.input_ids, step.positions, step.slot_mapping, step.prev_sampled_rows,
            step.prev_sampled_indices, *_cascade_lists(step))
        if step.prev_sampled_rows:
            scatter_prev_sampled(input_ids, rows, indices, prev_sampled)
        cascade = [t.int() for t in cascade]
        cascade[0], cascade[5] = cascade[0].view(len(groups), -1), cascade[5].view(step.num_tokens, -1)
        meta = AttentionMetadata(is_prefill=False, slot_mapping=slot_mapping.int(), cascade=CascadeMetadata(
            *cascade, num_groups=len(groups),
            max_prefix_len=max(g.num_prefix_blocks for g in groups) * step.cascade.block_size))
        return input_ids, positions, meta
    lengths = (step.cu_seqlens_q, step.cu_seqlens_k) if step.is_prefill else (step.context_lens,)
    tables = padded_tables(step.block_tables) if step.block_tables else []
    input_ids, positions, slot_mapping, flat_tables, rows, indices, *lens = upload_ints(
        device, step.input_ids, step.positions, step.slot_mapping, tables, step.prev_sampled_rows,
        step.prev_sampled_indices, *lengths)
    if step.prev_sampled_rows:
        scatter_prev_sampled(input_ids, rows, indices, prev_sampled)
    meta = AttentionMetadata(
        is_prefill=step.is_prefill, slot_mapping=slot_mapping.int(),
        block_tables=flat_tables.int().view(len(step.block_tables), -1) if tables else None)
    if step.is_prefill:
        meta.cu_seqlens_q, meta.cu_seqlens_k = lens[0].int(), lens[1].int()
        meta.max_seqlen_q = max(b - a for a, b in zip(step.cu_seqlens_q, step.cu_seqlens_q[1:]))
        meta.max_seqlen_k = max(b - a for a, b in zip(step.cu_seqlens_k, step.cu_seqlens_k[1:]))
    else:
        meta.context_lens = lens[0].int()
    return input_ids, positions, meta
