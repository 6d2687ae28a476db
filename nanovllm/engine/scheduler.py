"""Continuous batching over a BlockManager.

Each step is either a prefill batch or a decode batch, prefill first:
- Prefill admits waiting sequences in order while `max_num_seqs` and the token budget
  `max_num_batched_tokens` allow. A sequence whose remaining prompt exceeds the budget gets the
  budget's worth (chunked prefill) and stays at the head of `waiting` until its prompt is done.
- Decode runs every running sequence one token. When a sequence cannot get a block for its next
  token, the most recently admitted running sequence is preempted: its blocks are freed and it
  goes back to the head of `waiting`, to be recomputed (its prefix blocks are usually still
  cached). No request is dropped.
- A sequence finishes on EOS or one of its stop_token_ids ("stop"), or at max_tokens /
  max_model_len ("length"); the engine ends sequences on stop strings (`finish`) and on
  `abort`, which both free the blocks at once.

A step's life: `schedule()`, the engine launches it, `advance()` (its tokens count as computed,
each sampled sequence gets a placeholder token), `update()` with the sampled tokens. With async
scheduling the engine schedules, launches and advances step N+1 before it updates step N, so:
- decode takes a placeholder as its input (its value stays on the device) and counts it in
  `num_tokens`; a sequence whose placeholder will end it by length is not scheduled again;
- a sequence that an update finds finished (stop, EOS, stop string, abort) was scheduled once
  more: that step's token is dropped (no token past a stop reaches the output); a finished
  sequence has no placeholders;
- a sequence preempted while its last token is a placeholder gets the token while waiting, and
  is not admitted again before it has it; a finish can therefore meet a waiting sequence;
- decode blocks are published to the prefix cache in `update()`, once their tokens are known.
Freeing blocks at once stays safe: see block_manager.py.

The scheduler takes plain numbers and can be built in a test without a model.
"""
from collections import deque
from dataclasses import dataclass

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence]
    is_prefill: bool
    sampled_seqs: list[Sequence]  # the sequences this step samples a token for, in row order
    advanced: bool = False        # advance() accounted for it


class Scheduler:

    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 num_kvcache_blocks: int, block_size: int, eos_token_ids: frozenset[int],
                 enable_prefix_caching: bool = True):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.block_manager = BlockManager(num_kvcache_blocks, block_size, enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        """The next step; a decode step with no sequence when every running sequence waits for
        a placeholder that ends it (async scheduling)."""
        scheduled = self._schedule_prefill()
        if scheduled:
            return SchedulerOutput(scheduled, True, [seq for seq in scheduled if seq.is_prefill_complete_after_step])
        scheduled = self._schedule_decode()
        return SchedulerOutput(scheduled, False, scheduled)

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled = []
        budget = self.max_num_batched_tokens
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq.num_output_placeholders:  # preempted while its last token was on the device
                break
            if not seq.block_table:  # not admitted yet (new, or preempted)
                # Sequences admitted earlier in this loop are in `running` already; a chunked one
                # ends the loop, so `running` counts every admitted sequence exactly once.
                if len(self.running) >= self.max_num_seqs:
                    break
                if not self.block_manager.can_allocate(seq):
                    break
                self.block_manager.allocate(seq)
                if seq.num_prefix_cached_tokens is None:
                    seq.num_prefix_cached_tokens = seq.num_cached_tokens
            remaining = seq.num_tokens - seq.num_cached_tokens
            seq.num_scheduled_tokens = min(remaining, budget)
            budget -= seq.num_scheduled_tokens
            self.block_manager.commit(seq, seq.num_cached_tokens + seq.num_scheduled_tokens)
            scheduled.append(seq)
            if seq.num_scheduled_tokens < remaining:
                break  # chunked: the rest of its prompt goes in the next steps
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        scheduled, kept = [], []  # kept: in `running` order, with those a placeholder ends
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            if seq.num_output_placeholders and self._reaches_length(seq, seq.num_tokens):
                kept.append(seq)  # its placeholder is its last token
                continue
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
                kept.append(seq)
        assert kept, "the KV cache cannot hold a single sequence"
        self.running.extendleft(reversed(kept))
        return scheduled

    def _reaches_length(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` with `num_tokens` tokens is done by max_tokens or max_model_len."""
        return num_tokens - seq.num_prompt_tokens >= seq.max_tokens or num_tokens >= self.max_model_len

    def _preempt(self, seq: Sequence):
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def advance(self, output: SchedulerOutput):
        """Account for a launched step: its tokens count as cached, and each sequence it samples
        for gets a placeholder token (resolved by `update`)."""
        assert not output.advanced, "a step is advanced once"
        output.advanced = True
        for seq in output.seqs:
            seq.num_cached_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
        for seq in output.sampled_seqs:
            seq.num_output_placeholders += 1

    def update(self, output: SchedulerOutput, token_ids: list[int]) -> list[Sequence]:
        """Account for a step's tokens (advancing it first if `advance` was not called):
        `token_ids` holds one per `output.sampled_seqs`. A token of a sequence that finished
        since the step was scheduled is dropped. Returns the sequences that finished."""
        if not output.advanced:
            self.advance(output)
        assert len(token_ids) == len(output.sampled_seqs), "one sampled token per sampled sequence"
        finished = []
        for seq, token_id in zip(output.sampled_seqs, token_ids):
            if seq.is_finished:  # stopped (or aborted) after this step was scheduled
                continue
            seq.append_token(token_id)
            if seq.block_table and not output.is_prefill:
                # Known tokens with K/V: one or (after a synchronous step) two more than at the last update.
                num_known = min(seq.num_cached_tokens, len(seq.token_ids))
                self.block_manager.commit(seq, num_known, first_token=max(0, num_known - 2))
            params = seq.sampling_params
            # The sampler masks EOS and stop_token_ids while a sequence is below min_tokens.
            if not params.ignore_eos and token_id in self.eos_token_ids:
                self.finish(seq, "stop")
            elif params.stop_token_ids and token_id in params.stop_token_ids:
                seq.stop_reason = token_id
                self.finish(seq, "stop")
            elif self._reaches_length(seq, len(seq.token_ids)):
                self.finish(seq, "length")
            if seq.is_finished:
                finished.append(seq)
        return finished

    def preempt_all(self, seqs: list[Sequence]) -> list[Sequence]:
        """Recovery after an exception inside a step: send the unfinished of `seqs` back to
        waiting with no blocks and no placeholders, to be recomputed from their known tokens.
        Returns them."""
        preempted = [seq for seq in dict.fromkeys(seqs) if not seq.is_finished]
        for seq in reversed(preempted):  # each goes to the head of `waiting`: keep their order
            seq.num_output_placeholders = 0
            if seq.status == SequenceStatus.RUNNING:
                self.running.remove(seq)
                self._preempt(seq)
            else:
                self.block_manager.deallocate(seq)
        return preempted

    def finish(self, seq: Sequence, reason: str):
        """End an unfinished sequence (also used by the engine for stop strings) and free its
        blocks. It is running, or waiting when it was preempted while its step was in flight."""
        (self.running if seq.status == SequenceStatus.RUNNING else self.waiting).remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.num_output_placeholders = 0  # tokens still in flight are past the finish: dropped
        self.block_manager.deallocate(seq)

    def abort(self, seq: Sequence):
        """Drop an unfinished sequence wherever it is (waiting, possibly half-prefilled, or
        running) and free its blocks; its finish_reason becomes "abort"."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            return
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        seq.num_output_placeholders = 0
