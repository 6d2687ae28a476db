"""Exact CPU tests of the Scheduler, driven by a fake deterministic "model": the next token is a
function of the sequence's token ids only, so recomputation (preemption) and prefix caching must
not change any output. No model or checkpoint is needed."""
import itertools
import random

import pytest

from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

NO_EOS = frozenset()
_ids = itertools.count()


def fake_token(token_ids: list[int]) -> int:
    return (sum(token_ids) * 31 + len(token_ids)) % 1000


def reference(prompt, params: SamplingParams, max_model_len: int, eos=NO_EOS):
    """What the scheduler must produce for one request, computed without it."""
    tokens = list(prompt)
    while True:
        t = fake_token(tokens)
        tokens.append(t)
        if not params.ignore_eos and t in eos:
            return tokens[len(prompt):], "stop"
        if params.stop_token_ids and t in params.stop_token_ids:
            return tokens[len(prompt):], "stop"
        if len(tokens) - len(prompt) >= params.max_tokens or len(tokens) >= max_model_len:
            return tokens[len(prompt):], "length"


class RecordingScheduler(Scheduler):
    """The real Scheduler, also recording every added and every finished sequence."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.added: list[Sequence] = []
        self.finished_log: list[Sequence] = []

    def add(self, seq: Sequence):
        self.added.append(seq)
        super().add(seq)

    def update(self, output, token_ids):
        finished = super().update(output, token_ids)
        self.finished_log.extend(finished)
        return finished


def make_sched(**kw) -> RecordingScheduler:
    args = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
                num_kvcache_blocks=64, block_size=4, eos_token_ids=NO_EOS)
    args.update(kw)
    return RecordingScheduler(**args)


def make_seq(prompt, **params) -> Sequence:
    params.setdefault("ignore_eos", True)
    return Sequence(next(_ids), list(prompt), SamplingParams(**params))


def step(sched: Scheduler):
    """One engine step with the fake model. Returns (is_prefill, [(seq, num_scheduled_tokens)],
    tokens emitted, finished sequences)."""
    out = sched.schedule()
    scheduled = [(s, s.num_scheduled_tokens) for s in out.seqs]
    tokens = [fake_token(s.token_ids) for s in out.seqs if s.is_prefill_complete_after_step]
    finished = sched.update(out, tokens)
    return out.is_prefill, scheduled, tokens, finished


def check_invariants(sched: Scheduler):
    bm = sched.block_manager
    live = [s for s in itertools.chain(sched.waiting, sched.running) if s.block_table]
    counts = [0] * len(bm.blocks)
    for s in live:
        for b in s.block_table:
            counts[b] += 1
        # a block for every computed token, none beyond the newest token
        num_blocks = len(s.block_table)
        assert bm.num_blocks_for(s.num_cached_tokens) <= num_blocks <= bm.num_blocks_for(s.num_tokens)
    assert [b.ref_count for b in bm.blocks] == counts
    assert sorted(bm.free_block_ids) == [i for i, c in enumerate(counts) if c == 0]
    assert len(sched.running) <= sched.max_num_seqs
    assert all(s.status == SequenceStatus.RUNNING and s.num_cached_tokens == s.num_tokens - 1
               for s in sched.running)
    assert all(s.status == SequenceStatus.WAITING for s in sched.waiting)


def run_all(sched: RecordingScheduler, new_seqs=(), max_steps=10_000):
    """Add `new_seqs`, run to completion checking every step, and check that every sequence
    ever added finished exactly once. Returns {seq_id: (completion, finish_reason)}."""
    for s in new_seqs:
        sched.add(s)
    for _ in range(max_steps):
        if sched.is_finished():
            break
        is_prefill, scheduled, _, _ = step(sched)
        assert 0 < len(scheduled) <= sched.max_num_seqs
        if is_prefill:
            assert sum(n for _, n in scheduled) <= sched.max_num_batched_tokens
        else:
            assert all(n == 1 for _, n in scheduled)
        check_invariants(sched)
    assert sched.is_finished()
    finished_ids = [s.seq_id for s in sched.finished_log]
    assert sorted(finished_ids) == sorted(s.seq_id for s in sched.added)  # each exactly once
    assert all(s.is_finished and s.block_table == [] for s in sched.added)
    bm = sched.block_manager
    assert bm.num_free_blocks == len(bm.blocks)
    assert all(b.ref_count == 0 for b in bm.blocks)
    return {s.seq_id: (s.completion_token_ids, s.finish_reason) for s in sched.added}


def ids(scheduled):
    return [(s.seq_id, n) for s, n in scheduled]


# ---------------------------------------------------------------- batching

@pytest.mark.parametrize("max_num_seqs, num_running", [(4, 0), (4, 1), (8, 0), (2, 0)])
def test_prefill_admits_up_to_max_num_seqs(max_num_seqs, num_running):
    sched = make_sched(max_num_seqs=max_num_seqs)
    for i in range(num_running):
        sched.add(make_seq([100 + i] * 3, max_tokens=5))
    if num_running:
        step(sched)
        assert len(sched.running) == num_running
    new = [make_seq([i + 1] * 3) for i in range(10)]
    for s in new:
        sched.add(s)
    is_prefill, scheduled, _, _ = step(sched)
    assert is_prefill
    assert ids(scheduled) == [(s.seq_id, 3) for s in new[:max_num_seqs - num_running]]
    assert len(sched.running) == max_num_seqs


def test_prefill_batch_bounded_by_max_num_seqs():
    sched = make_sched(max_num_seqs=2)
    seqs = [make_seq([i + 1] * 3, max_tokens=2) for i in range(5)]
    for s in seqs:
        sched.add(s)
    a, b, c, d, e = seqs

    is_prefill, scheduled, tokens, finished = step(sched)
    assert is_prefill and ids(scheduled) == [(a.seq_id, 3), (b.seq_id, 3)]
    assert tokens == [fake_token([1] * 3), fake_token([2] * 3)]
    assert list(sched.running) == [a, b] and list(sched.waiting) == [c, d, e]

    is_prefill, scheduled, _, finished = step(sched)  # batch full: decode, not admission
    assert not is_prefill and ids(scheduled) == [(a.seq_id, 1), (b.seq_id, 1)]
    assert finished == [a, b]

    is_prefill, scheduled, _, _ = step(sched)
    assert is_prefill and ids(scheduled) == [(c.seq_id, 3), (d.seq_id, 3)]


def test_prefill_batch_bounded_by_token_budget_last_one_chunked():
    sched = make_sched(max_num_batched_tokens=10)
    a, b, c = (make_seq([i + 1] * 4, max_tokens=3) for i in range(3))
    for s in (a, b, c):
        sched.add(s)

    is_prefill, scheduled, tokens, _ = step(sched)
    assert is_prefill and ids(scheduled) == [(a.seq_id, 4), (b.seq_id, 4), (c.seq_id, 2)]
    assert tokens == [fake_token(a.token_ids[:4]), fake_token(b.token_ids[:4])]  # c: none yet
    assert c.num_completion_tokens == 0 and c.num_cached_tokens == 2
    assert list(sched.waiting) == [c] and c.block_table  # admitted, still at the head

    is_prefill, scheduled, tokens, _ = step(sched)
    assert is_prefill and ids(scheduled) == [(c.seq_id, 2)]
    assert tokens == [fake_token([3] * 4)]

    is_prefill, scheduled, _, _ = step(sched)
    assert not is_prefill and ids(scheduled) == [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 1)]


def test_prefill_exactly_filling_the_budget_is_not_chunked():
    sched = make_sched(max_num_batched_tokens=10)
    a, b, c = (make_seq([i + 1] * 5) for i in range(3))
    for s in (a, b, c):
        sched.add(s)
    is_prefill, scheduled, tokens, _ = step(sched)
    assert is_prefill and ids(scheduled) == [(a.seq_id, 5), (b.seq_id, 5)]
    assert len(tokens) == 2
    assert list(sched.waiting) == [c] and c.block_table == []  # not admitted


def test_long_prompt_is_chunked_and_emits_nothing_until_done():
    sched = make_sched(max_num_batched_tokens=8)
    long = make_seq(range(1, 24), max_tokens=2)  # 23 tokens
    short = make_seq([7, 8, 9], max_tokens=2)
    sched.add(long)
    sched.add(short)

    trace = []
    for _ in range(5):
        is_prefill, scheduled, tokens, _ = step(sched)
        trace.append((is_prefill, ids(scheduled), len(tokens), long.num_completion_tokens))
    L, S = long.seq_id, short.seq_id
    assert trace == [
        (True, [(L, 8)], 0, 0),
        (True, [(L, 8)], 0, 0),
        (True, [(L, 7), (S, 1)], 1, 1),  # the short prompt gets the leftover budget
        (True, [(S, 2)], 1, 1),
        (False, [(L, 1), (S, 1)], 2, 2),
    ]
    assert long.completion_token_ids == reference(range(1, 24), long.sampling_params, 256)[0]
    assert long.is_finished and short.is_finished


def test_chunked_prefill_publishes_blocks_as_they_fill():
    sched = make_sched(max_num_batched_tokens=6)
    seq = make_seq(range(1, 15))  # 14 tokens, block size 4
    sched.add(seq)
    bm = sched.block_manager
    step(sched)  # tokens 0..5: block 0 full
    assert [bm.blocks[b].hash is not None for b in seq.block_table] == [True, False, False, False]
    step(sched)  # tokens 6..11: blocks 1, 2 full
    assert [bm.blocks[b].hash is not None for b in seq.block_table] == [True, True, True, False]
    assert seq.num_cached_tokens == 12


def test_decode_batches_follow_the_fake_model():
    sched = make_sched()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    seqs = [make_seq(p, max_tokens=4) for p in prompts]
    for s in seqs:
        sched.add(s)
    is_prefill, scheduled, _, _ = step(sched)
    assert is_prefill and ids(scheduled) == [(s.seq_id, len(p)) for s, p in zip(seqs, prompts)]
    for i in range(3):
        is_prefill, scheduled, tokens, finished = step(sched)
        assert not is_prefill and ids(scheduled) == [(s.seq_id, 1) for s in seqs]
        assert finished == (seqs if i == 2 else [])
    for s, p in zip(seqs, prompts):
        assert s.completion_token_ids == reference(p, s.sampling_params, 256)[0]
        assert len(s.completion_token_ids) == 4 and s.finish_reason == "length"
    assert sched.is_finished()


# ---------------------------------------------------------------- stopping

def test_eos_stops_unless_ignore_eos():
    prompt = [5, 6, 7]
    t1 = fake_token(prompt)
    t2 = fake_token(prompt + [t1])
    assert t1 != t2
    eos = frozenset({t2})

    sched = make_sched(eos_token_ids=eos)
    stop = make_seq(prompt, max_tokens=10, ignore_eos=False)
    ignore = make_seq(prompt, max_tokens=5, ignore_eos=True)
    out = run_all(sched, [stop, ignore])
    assert out[stop.seq_id] == ([t1, t2], "stop")  # the eos token is kept
    assert out[ignore.seq_id][1] == "length"
    assert len(out[ignore.seq_id][0]) == 5 and out[ignore.seq_id][0][:2] == [t1, t2]
    assert out[ignore.seq_id] == reference(prompt, ignore.sampling_params, 256, eos)


def test_eos_as_first_token_stops_after_prefill():
    prompt = [3, 1, 4, 1, 5]
    sched = make_sched(eos_token_ids=frozenset({fake_token(prompt)}))
    seq = make_seq(prompt, max_tokens=10, ignore_eos=False)
    sched.add(seq)
    _, _, _, finished = step(sched)
    assert finished == [seq]
    assert seq.completion_token_ids == [fake_token(prompt)] and seq.finish_reason == "stop"
    assert sched.is_finished()


def test_max_tokens_and_max_model_len_finish_with_length():
    sched = make_sched(max_model_len=8)
    by_tokens = make_seq([1, 2], max_tokens=3)        # 2 + 3 = 5 < 8
    by_len = make_seq([1, 2, 3, 4, 5], max_tokens=100)  # stops at 8 tokens in all
    one = make_seq([9, 9], max_tokens=1)
    out = run_all(sched, [by_tokens, by_len, one])
    assert out[by_tokens.seq_id] == reference([1, 2], by_tokens.sampling_params, 8)
    assert len(out[by_tokens.seq_id][0]) == 3 and out[by_tokens.seq_id][1] == "length"
    assert by_len.num_tokens == 8
    assert out[by_len.seq_id] == reference([1, 2, 3, 4, 5], by_len.sampling_params, 8)
    assert len(out[by_len.seq_id][0]) == 3 and out[by_len.seq_id][1] == "length"
    assert out[one.seq_id] == ([fake_token([9, 9])], "length")


# ---------------------------------------------------------------- preemption

def test_preemption_under_tiny_kv_cache():
    # 3 prompts of 5 tokens take 2 blocks each: all 6 blocks. Once every sequence holds 9 tokens,
    # the next decode needs a third block for each, so the most recently admitted is preempted.
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    sched = make_sched(num_kvcache_blocks=6)
    a, b, c = seqs = [make_seq(p, max_tokens=8) for p in prompts]
    for s in seqs:
        sched.add(s)
    for _ in range(4):  # prefill (6 tokens), then 3 decodes: the 8th token's K/V still fits
        step(sched)
        assert sched.num_preemptions == 0
    assert [s.num_tokens for s in seqs] == [9, 9, 9]
    assert sched.block_manager.num_free_blocks == 0

    is_prefill, scheduled, _, _ = step(sched)
    assert not is_prefill and ids(scheduled) == [(a.seq_id, 1), (b.seq_id, 1)]
    assert sched.num_preemptions == 1
    assert list(sched.waiting) == [c] and list(sched.running) == [a, b]
    assert c.status == SequenceStatus.WAITING and c.block_table == [] and c.num_cached_tokens == 0
    assert c.num_tokens == 9  # its generated tokens are kept and recomputed later
    check_invariants(sched)

    out = run_all(sched)
    big = run_all(make_sched(num_kvcache_blocks=64), [make_seq(p, max_tokens=8) for p in prompts])
    assert [out[s.seq_id] for s in seqs] == list(big.values())
    assert [out[s.seq_id] for s in seqs] == [reference(p, a.sampling_params, 256) for p in prompts]
    assert all(s.finish_reason == "length" and s.num_completion_tokens == 8 for s in seqs)
    assert sched.block_manager.num_free_blocks == 6


def test_preemption_order_most_recent_first_and_waiting_in_admission_order():
    # 4 prompts of 3 tokens take 1 block each, leaving 1 of 5 blocks free. At 5 tokens each needs
    # a second block: a takes the free one; for b, d is preempted; for c nothing is left to
    # preempt but c itself. They wait in admission order: c, then d.
    sched = make_sched(num_kvcache_blocks=5)
    seqs = [make_seq([i] * 3, max_tokens=10) for i in range(1, 5)]
    a, b, c, d = seqs
    for s in seqs:
        sched.add(s)
    step(sched)  # prefill: 4 tokens each
    step(sched)  # decode: the 4th token's K/V fits in the first block
    assert sched.num_preemptions == 0 and sched.block_manager.num_free_blocks == 1
    is_prefill, scheduled, _, _ = step(sched)
    assert not is_prefill and ids(scheduled) == [(a.seq_id, 1), (b.seq_id, 1)]
    assert sched.num_preemptions == 2
    assert list(sched.waiting) == [c, d] and list(sched.running) == [a, b]
    check_invariants(sched)

    out = run_all(sched)
    for s in seqs:
        assert out[s.seq_id] == reference(s.token_ids[:3], s.sampling_params, 256)


def test_single_sequence_larger_than_cache_fails_loudly():
    sched = make_sched(num_kvcache_blocks=2, max_model_len=100)
    sched.add(make_seq([1, 2, 3, 4, 5, 6, 7, 8], max_tokens=10))
    step(sched)  # 8 tokens in 2 blocks, 9 tokens after prefill
    with pytest.raises(AssertionError, match="cannot hold a single sequence"):
        sched.schedule()


# ---------------------------------------------------------------- prefix caching

def test_prefix_cache_hit_gives_the_same_outputs_as_no_caching():
    prefix = list(range(10, 22))  # 12 tokens: 3 blocks
    prompts = [prefix + [1, 2], prefix + [3, 4, 5], prefix + [1, 2]]
    runs = {}
    for enable in (True, False):
        sched = make_sched(enable_prefix_caching=enable)
        seqs = [make_seq(p, max_tokens=6) for p in prompts]
        for s in seqs:
            sched.add(s)
        is_prefill, scheduled, _, _ = step(sched)
        assert is_prefill
        runs[enable] = (ids(scheduled), [s.num_prefix_cached_tokens for s in seqs],
                        run_all(sched, []), seqs)
    sched_on, cached_on, out_on, seqs_on = runs[True]
    sched_off, cached_off, out_off, seqs_off = runs[False]
    # later requests find the first one's blocks, published when it was scheduled
    assert [n for _, n in sched_on] == [14, 3, 2]
    assert cached_on == [0, 12, 12]
    assert [n for _, n in sched_off] == [14, 15, 14]
    assert cached_off == [0, 0, 0]
    assert [out_on[s.seq_id] for s in seqs_on] == [out_off[s.seq_id] for s in seqs_off]
    assert [out_on[s.seq_id] for s in seqs_on] == [reference(p, seqs_on[0].sampling_params, 256)
                                                    for p in prompts]


def test_prefix_cache_hit_after_the_first_request_finished():
    sched = make_sched()
    first = make_seq(range(1, 10), max_tokens=4)  # 9 prompt tokens, 13 after generation
    out1 = run_all(sched, [first])
    assert first.num_prefix_cached_tokens == 0
    # blocks 0, 1 were published by the prefill, block 2 (tokens 8..11) by the third decode;
    # the freed blocks keep their hashes
    prompt = list(first.token_ids)
    second = make_seq(prompt, max_tokens=3)
    out2 = run_all(sched, [second])
    assert second.num_prefix_cached_tokens == 12
    assert out1[first.seq_id] == reference(range(1, 10), first.sampling_params, 256)
    assert out2[second.seq_id] == reference(prompt, second.sampling_params, 256)


# ---------------------------------------------------------------- no request lost

CONFIGS = [
    # max_num_seqs, max_num_batched_tokens, num_kvcache_blocks, block_size, prefix caching
    (8, 16, 8, 4, True),
    (8, 16, 8, 4, False),
    (8, 7, 14, 2, True),
    (4, 64, 4, 8, True),
    (16, 5, 30, 1, True),
    (2, 3, 6, 4, True),
]


@pytest.mark.parametrize("seed, cfg", list(enumerate(CONFIGS)))
def test_every_request_finishes_exactly_once_with_reference_output(seed, cfg):
    max_num_seqs, budget, num_blocks, block_size, caching = cfg
    max_model_len = 24
    assert num_blocks * block_size >= max_model_len  # one request always fits
    rng = random.Random(seed)
    shared = [rng.randrange(1000) for _ in range(16)]
    prompts, seqs = [], []
    for i in range(20):
        n = rng.randrange(1, 17)
        # every other prompt starts with a shared prefix, to exercise prefix caching
        p = shared[:rng.randrange(n + 1)] if i % 2 else []
        p += [rng.randrange(1000) for _ in range(n - len(p))]
        prompts.append(p)
        seqs.append(make_seq(p, max_tokens=rng.randrange(1, 12), ignore_eos=i % 3 != 0))
    eos = frozenset(range(0, 1000, 7))
    sched = make_sched(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                       max_model_len=max_model_len, num_kvcache_blocks=num_blocks,
                       block_size=block_size, eos_token_ids=eos, enable_prefix_caching=caching)
    out = run_all(sched, seqs)
    for s, p in zip(seqs, prompts):
        assert out[s.seq_id] == reference(p, s.sampling_params, max_model_len, eos)
    assert {reason for _, reason in out.values()} == {"stop", "length"}
    assert sched.num_preemptions > 0
    num_hits = sum(s.num_prefix_cached_tokens > 0 for s in seqs)
    if not caching:
        assert num_hits == 0
    elif block_size <= 4:
        assert num_hits > 0
