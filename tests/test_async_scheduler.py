"""Exact CPU tests of async scheduling at the scheduler level, with a fake device.

The fake device runs each launched step at once, in launch order (as a CUDA stream would): it
keeps every sequence's tokens as the device sees them (placeholders' values included), checks the
step's inputs (prepare_step's positions, slots and input ids, the placeholders read from the
previous step's samples) and simulates the KV cache: each slot holds the token prefix whose K/V it
stores, and every slot a step attends over must hold the right prefix. The host side updates step
N after launching step N+1, as the engine does; rounds may also run synchronously (the engine's
fallback). The fake model's next token is a function of the token ids, so outputs must equal
the reference whatever the batching, preemption, prefix caching or lag.
"""
import random

import pytest

from nanovllm.engine.block_manager import compute_block_hash
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams
from nanovllm.worker.inputs import prepare_step
from test_scheduler import fake_token, make_seq, reference


class FakeDevice:

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.tokens: dict[int, list[int]] = {}  # seq_id -> tokens as the device sees them
        self.kv: dict[int, tuple[int, ...]] = {}  # slot -> the token prefix whose K/V it holds
        self.prev_sampled: list[int] = []
        self.num_sampled = 0  # rows sampled, over all steps
        self.max_position = 0

    def run(self, seqs: list[Sequence], is_prefill: bool, sampled: list[Sequence],
            prev_rows: dict[int, int] | None) -> list[int]:
        """Check and run one step; returns its sampled tokens (one per `sampled`)."""
        step = prepare_step(seqs, is_prefill, self.block_size, prev_rows)
        input_ids = list(step.input_ids)
        for row, index in zip(step.prev_sampled_rows, step.prev_sampled_indices):
            input_ids[row] = self.prev_sampled[index]
        row = 0
        for seq in seqs:
            device = self.tokens.setdefault(seq.seq_id, list(seq.token_ids))
            assert device[:len(seq.token_ids)] == seq.token_ids  # known tokens are the device's
            assert len(device) >= seq.num_tokens
            del device[seq.num_tokens:]  # a preempted sequence's dropped placeholder (recovery)
            start = seq.num_tokens - 1 if not is_prefill else seq.num_cached_tokens
            end = start + (1 if not is_prefill else seq.num_scheduled_tokens)
            for position in range(start):  # everything before is in the cache
                assert self.kv.get(self._slot(seq, position)) == tuple(device[:position + 1]), (seq.seq_id, position)
            for position in range(start, end):
                assert step.positions[row] == position and input_ids[row] == device[position]
                assert step.slot_mapping[row] == self._slot(seq, position)
                self.max_position = max(self.max_position, position)
                self.kv[step.slot_mapping[row]] = tuple(device[:position + 1])
                row += 1
        assert row == len(input_ids)
        tokens = []
        for seq in sampled:
            device = self.tokens[seq.seq_id]
            assert len(device) == seq.num_tokens
            tokens.append(fake_token(device))
            device.append(tokens[-1])
        self.prev_sampled = tokens
        self.num_sampled += len(tokens)
        return tokens

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size


def check_hashes(sched: Scheduler):
    """Every published block of a live sequence hashes its known tokens and their prefix."""
    bm = sched.block_manager
    for seq in (*sched.running, *sched.waiting):
        prefix_hash = None
        for i, block_id in enumerate(seq.block_table):
            token_ids = seq.token_ids[i * bm.block_size:(i + 1) * bm.block_size]
            prefix_hash = compute_block_hash(token_ids, prefix_hash)
            block = bm.blocks[block_id]
            if block.hash is not None:
                assert len(token_ids) == bm.block_size and block.token_ids == token_ids
                assert block.hash == prefix_hash


def run_lagged(sched: Scheduler, seqs: list[Sequence], overlap=lambda: True, max_steps=10_000,
               on_round=None, add=True, device: FakeDevice | None = None) -> dict:
    """Drive the scheduler as the async engine does, adding `seqs` (or, `add=False`, with them
    queued already); returns {seq_id: (completion, reason)}."""
    device = device or FakeDevice(sched.block_manager.block_size)
    for seq in seqs if add else ():
        sched.add(seq)
    pending = None  # (output, tokens) launched, not updated
    finished_ids = []
    for _ in range(max_steps):
        if sched.is_finished() and pending is None:
            break
        sync = not overlap()
        if pending is not None and sync:
            finished_ids += [s.seq_id for s in sched.update(*pending)]
            pending = None
        launched = None
        if not sched.is_finished():
            out = sched.schedule()
            if out.seqs:
                prev_rows = {s.seq_id: r for r, s in enumerate(pending[0].sampled_seqs)} if pending else None
                tokens = device.run(out.seqs, out.is_prefill, out.sampled_seqs, prev_rows)
                sched.advance(out)
                launched = (out, tokens)
        if pending is not None:
            finished_ids += [s.seq_id for s in sched.update(*pending)]
        pending = launched
        if pending is not None and sync:
            finished_ids += [s.seq_id for s in sched.update(*pending)]
            pending = None
        check_hashes(sched)
        assert all(s.num_output_placeholders <= 1 for s in (*sched.running, *sched.waiting))
        if on_round is not None:
            on_round(sched)
    assert sched.is_finished() and pending is None
    assert sorted(finished_ids) == sorted(s.seq_id for s in seqs)  # each exactly once
    bm = sched.block_manager
    assert bm.num_free_blocks == len(bm.blocks) and all(b.ref_count == 0 for b in bm.blocks)
    assert all(s.num_output_placeholders == 0 for s in seqs)
    return {s.seq_id: (s.completion_token_ids, s.finish_reason) for s in seqs}


def make_sched(**kw) -> Scheduler:
    args = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
                num_kvcache_blocks=64, block_size=4, eos_token_ids=frozenset())
    return Scheduler(**(args | kw))


def test_decode_inputs_come_from_the_previous_step_and_outputs_match():
    seqs = [make_seq(range(10 * i, 10 * i + 5 + i), max_tokens=6 + i) for i in range(4)]
    placeholders_seen = []
    out = run_lagged(make_sched(), seqs, on_round=lambda s: placeholders_seen.append(
        sum(q.num_output_placeholders for q in s.running)))
    assert max(placeholders_seen) > 0  # the lag was exercised
    for seq in seqs:
        assert out[seq.seq_id] == reference(seq.prompt_token_ids, seq.sampling_params, 256)


def test_a_stop_found_one_step_late_drops_the_extra_token():
    eos = frozenset(range(0, 1000, 7))  # about one token in seven ends its sequence
    seqs = [make_seq(range(i, i + 9), ignore_eos=False, max_tokens=40) for i in range(6)]
    seqs.append(make_seq(range(50, 60), max_tokens=30, stop_token_ids=[3, 5, 11]))
    out = run_lagged(make_sched(eos_token_ids=eos), seqs)
    for seq in seqs:
        assert out[seq.seq_id] == reference(seq.prompt_token_ids, seq.sampling_params, 256, eos)
    assert any(reason == "stop" for _, reason in out.values())


def test_length_is_known_ahead_so_no_step_runs_past_max_tokens_or_max_model_len():
    device = FakeDevice(4)
    seqs = [make_seq(range(20), max_tokens=100), make_seq(range(30, 33), max_tokens=2),
            make_seq(range(40, 45), max_tokens=7)]
    run_lagged(make_sched(max_model_len=24), seqs, device=device)
    assert [len(s.completion_token_ids) for s in seqs] == [4, 2, 7]
    assert device.num_sampled == 4 + 2 + 7  # no row sampled a token past a length limit
    assert device.max_position == 22  # the last token (position 23) is sampled, never computed


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_match_the_reference(seed):
    rng = random.Random(seed)
    cfg = dict(max_num_seqs=rng.choice([2, 4, 8]), max_num_batched_tokens=rng.choice([8, 16, 64]),
               num_kvcache_blocks=rng.choice([12, 20, 64]), block_size=rng.choice([2, 4]),
               max_model_len=48, enable_prefix_caching=rng.random() < 0.7,
               eos_token_ids=frozenset(range(rng.randrange(5), 1000, rng.choice([11, 23, 1000]))))
    sched = make_sched(**cfg)
    shared = [rng.randrange(1000) for _ in range(rng.choice([0, 5, 9]))]  # prefix-cache hits
    seqs = []
    for _ in range(rng.randrange(3, 12)):
        prompt = shared + [rng.randrange(1000) for _ in range(rng.randrange(1, 20))]
        params = SamplingParams(max_tokens=rng.randrange(1, 25), ignore_eos=rng.random() < 0.3,
                                stop_token_ids=rng.sample(range(1000), 3) if rng.random() < 0.3 else None)
        seqs.append(Sequence(rng.randrange(10 ** 9), prompt, params))
    mode = rng.choice(["async", "mixed"])  # mixed: rounds switch to synchronous at random
    out = run_lagged(sched, seqs, overlap=lambda: mode == "async" or rng.random() < 0.5)
    for seq in seqs:
        assert out[seq.seq_id] == reference(seq.prompt_token_ids, seq.sampling_params, 48, cfg["eos_token_ids"])


def test_preemption_under_lag_recomputes_exactly():
    sched = make_sched(num_kvcache_blocks=14, max_num_seqs=6, block_size=4, max_model_len=64)
    seqs = [make_seq(range(100 * i, 100 * i + 6), max_tokens=20) for i in range(6)]
    out = run_lagged(sched, seqs)
    assert sched.num_preemptions > 0
    for seq in seqs:
        assert out[seq.seq_id] == reference(seq.prompt_token_ids, seq.sampling_params, 64)


def test_preempt_all_recovers_from_an_abandoned_step():
    sched = make_sched()
    seqs = [make_seq(range(i, i + 7), max_tokens=10) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    device = FakeDevice(4)
    out = sched.schedule()  # the prefill: launched, never read (an exception in the round)
    device.run(out.seqs, True, out.sampled_seqs, None)
    sched.advance(out)
    assert all(s.num_output_placeholders == 1 for s in seqs)
    assert sched.preempt_all(out.seqs) == seqs
    assert all(s.num_output_placeholders == 0 and not s.block_table for s in seqs)
    assert list(sched.waiting) == seqs and not sched.running
    assert sched.block_manager.num_free_blocks == 64
    result = run_lagged(sched, seqs, add=False, device=device)
    for seq in seqs:
        assert result[seq.seq_id] == reference(seq.prompt_token_ids, seq.sampling_params, 256)


@pytest.mark.parametrize("pattern", ["async", "alternate", "sync"])
def test_decode_blocks_reach_the_prefix_cache(pattern):
    """Blocks filled by decode steps are published once their tokens are known, also when
    rounds switch between synchronous and overlapped (two new tokens between two updates)."""
    rounds = iter(range(10 ** 6))
    overlap = {"async": lambda: True, "sync": lambda: False, "alternate": lambda: next(rounds) % 3 != 0}[pattern]
    sched, device = make_sched(), FakeDevice(4)
    first = make_seq(range(500, 506), max_tokens=15)  # 21 tokens, 20 with K/V: 5 full blocks
    run_lagged(sched, [first], overlap=overlap, device=device)
    second = make_seq(first.token_ids + [1, 2])
    run_lagged(sched, [second], overlap=overlap, device=device)
    assert second.num_prefix_cached_tokens == 20
