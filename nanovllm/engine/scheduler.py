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
        scheduled = self._schedule_prefill()
        if scheduled:
            return SchedulerOutput(scheduled, is_prefill=True)
        return SchedulerOutput(self._schedule_decode(), is_prefill=False)

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled = []
        budget = self.max_num_batched_tokens
        while self.waiting and budget > 0:
            seq = self.waiting[0]
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
        scheduled = []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                seq.num_scheduled_tokens = 1
                self.block_manager.commit(seq, seq.num_tokens)
                scheduled.append(seq)
        assert scheduled, "the KV cache cannot hold a single sequence"
        self.running.extendleft(reversed(scheduled))
        return scheduled

    def _preempt(self, seq: Sequence):
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def update(self, output: SchedulerOutput, token_ids: list[int]) -> list[Sequence]:
        """Account for a finished step; `token_ids` holds one token per sequence that completed
        its prompt (in `output.seqs` order). Returns the sequences that finished."""
        finished = []
        tokens = iter(token_ids)
        for seq in output.seqs:
            complete = seq.is_prefill_complete_after_step
            seq.num_cached_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if not complete:
                continue
            token_id = next(tokens)
            seq.append_token(token_id)
            params = seq.sampling_params
            # The sampler masks EOS and stop_token_ids while a sequence is below min_tokens.
            if not params.ignore_eos and token_id in self.eos_token_ids:
                self.finish(seq, "stop")
            elif params.stop_token_ids and token_id in params.stop_token_ids:
                seq.stop_reason = token_id
                self.finish(seq, "stop")
            elif seq.num_completion_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
                self.finish(seq, "length")
            if seq.is_finished:
                finished.append(seq)
        assert next(tokens, None) is None, "more sampled tokens than sequences"
        return finished

    def finish(self, seq: Sequence, reason: str):
        """End a running sequence (also used by the engine for stop strings) and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.deallocate(seq)
        self.running.remove(seq)

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
