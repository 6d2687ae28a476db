"""Exact CPU tests of the paged KV-cache BlockManager: allocation order, reference counts, the
free list, append at block boundaries and prefix caching. No model is needed."""
import itertools

import pytest

import nanovllm.engine.block_manager as block_manager_module
from nanovllm.engine.block_manager import BlockManager, compute_block_hash
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 4  # block size used throughout
_ids = itertools.count()


def make_seq(tokens) -> Sequence:
    return Sequence(next(_ids), list(tokens), SamplingParams())


def prefill(bm: BlockManager, tokens) -> Sequence:
    """Admit a sequence and mark its whole prompt as computed, as one full prefill step would."""
    seq = make_seq(tokens)
    bm.allocate(seq)
    bm.commit(seq, seq.num_tokens)
    seq.num_cached_tokens = seq.num_tokens
    return seq


def free_list(bm: BlockManager) -> list[int]:
    return list(bm.free_block_ids)


def ref_counts(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


# ---------------------------------------------------------------- allocation and the free list

def test_num_blocks_for_rounds_up():
    bm = BlockManager(4, BS)
    assert [bm.num_blocks_for(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_hands_out_block_ids_in_order_with_ref_count_one():
    bm = BlockManager(8, BS)
    a = make_seq(range(10))            # 3 blocks
    b = make_seq(range(100, 105))      # 2 blocks
    bm.allocate(a)
    bm.allocate(b)
    assert a.block_table == [0, 1, 2]
    assert b.block_table == [3, 4]
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 0
    assert ref_counts(bm) == [1, 1, 1, 1, 1, 0, 0, 0]
    assert free_list(bm) == [5, 6, 7]
    assert bm.num_free_blocks == 3


def test_deallocate_releases_tail_first_and_free_list_is_oldest_freed_first():
    bm = BlockManager(6, BS, enable_prefix_caching=False)
    a = make_seq(range(12))  # blocks 0, 1, 2
    b = make_seq(range(4))   # block 3
    bm.allocate(a)
    bm.allocate(b)
    assert free_list(bm) == [4, 5]

    a.num_cached_tokens = 12
    bm.deallocate(a)
    assert a.block_table == [] and a.num_cached_tokens == 0 and a.num_scheduled_tokens == 0
    assert free_list(bm) == [4, 5, 2, 1, 0]
    bm.deallocate(b)
    assert free_list(bm) == [4, 5, 2, 1, 0, 3]
    assert ref_counts(bm) == [0] * 6

    c = make_seq(range(50, 70))  # 5 blocks: taken from the front of the free list
    bm.allocate(c)
    assert c.block_table == [4, 5, 2, 1, 0]
    assert free_list(bm) == [3]


def test_can_allocate_at_block_boundary():
    bm = BlockManager(2, BS)
    assert bm.can_allocate(make_seq(range(8)))       # exactly 2 blocks
    assert not bm.can_allocate(make_seq(range(9)))   # 3 blocks
    bm.allocate(make_seq(range(5)))                  # takes both blocks
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(make_seq([1]))


def test_can_append_and_may_append_at_block_boundaries():
    bm = BlockManager(3, BS)
    seq = make_seq(range(4))  # exactly one full block
    bm.allocate(seq)
    assert seq.block_table == [0]

    seq.append_token(4)       # token 5 needs a second block
    assert bm.can_append(seq)
    bm.may_append(seq)
    assert seq.block_table == [0, 1]
    assert ref_counts(bm) == [1, 1, 0]

    for t in (5, 6, 7):       # tokens 6..8 fit in block 1
        seq.append_token(t)
        bm.may_append(seq)
        assert seq.block_table == [0, 1]

    other = make_seq([9])
    bm.allocate(other)        # takes the last free block
    assert bm.num_free_blocks == 0
    assert bm.can_append(seq)  # 8 tokens in 2 blocks: still fits without a free block
    seq.append_token(8)       # 9 tokens: needs a third block, none free
    assert not bm.can_append(seq)

    bm.deallocate(other)
    assert bm.can_append(seq)
    bm.may_append(seq)
    assert seq.block_table == [0, 1, 2]


# ---------------------------------------------------------------- prefix caching: publishing

def test_commit_publishes_only_full_blocks_with_chained_hashes():
    bm = BlockManager(8, BS)
    tokens = list(range(100, 110))  # 10 tokens: 2 full blocks + 2 tokens
    seq = make_seq(tokens)
    bm.allocate(seq)

    bm.commit(seq, 3)                # chunk of 3 tokens: no block full yet
    assert bm.hash_to_block_id == {}
    assert [b.hash for b in bm.blocks[:3]] == [None, None, None]

    seq.num_cached_tokens = 3
    bm.commit(seq, 10)               # rest of the prompt: blocks 0 and 1 are full, block 2 is not
    h0 = compute_block_hash(tokens[0:4], None)
    h1 = compute_block_hash(tokens[4:8], h0)
    assert bm.hash_to_block_id == {h0: 0, h1: 1}
    assert (bm.blocks[0].hash, bm.blocks[1].hash, bm.blocks[2].hash) == (h0, h1, None)
    assert bm.blocks[0].token_ids == tokens[0:4]
    assert bm.blocks[1].token_ids == tokens[4:8]
    assert bm.blocks[2].token_ids == []

    # decode: tokens 11 and 12 fill block 2; it is published when its last token is computed
    seq.num_cached_tokens = 10
    seq.append_token(110)
    bm.commit(seq, 11)
    assert bm.blocks[2].hash is None
    seq.num_cached_tokens = 11
    seq.append_token(111)
    bm.commit(seq, 12)
    h2 = compute_block_hash([108, 109, 110, 111], h1)
    assert bm.blocks[2].hash == h2
    assert bm.hash_to_block_id == {h0: 0, h1: 1, h2: 2}


def test_block_hash_is_chained():
    h_a = compute_block_hash([1, 2, 3, 4], None)
    h_b = compute_block_hash([0, 0, 0, 0], None)
    assert compute_block_hash([5, 6, 7, 8], h_a) != compute_block_hash([5, 6, 7, 8], h_b)
    assert compute_block_hash([5, 6, 7, 8], h_a) != compute_block_hash([5, 6, 7, 8], None)
    assert compute_block_hash([5, 6, 7, 8], h_a) == compute_block_hash([5, 6, 7, 8], h_a)


# ---------------------------------------------------------------- prefix caching: hits

def test_hit_on_same_prefix_miss_after_different_prefix():
    bm = BlockManager(16, BS)
    a = prefill(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])

    # block 1 has the same tokens as a's block 1, but after a different block 0: a miss
    b = make_seq([0, 0, 0, 0, 5, 6, 7, 8, 9])
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert set(b.block_table).isdisjoint(a.block_table)

    # same first two blocks: both hit, counted in whole blocks
    c = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 10])
    bm.allocate(c)
    assert c.num_cached_tokens == 8
    assert c.block_table[:2] == a.block_table[:2]
    assert c.block_table[2] not in a.block_table
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]

    # the first miss ends the shared prefix, even if a later block matches
    d = make_seq([1, 2, 3, 4, 0, 0, 0, 0, 9, 9, 9, 9, 1])
    bm.allocate(d)
    assert d.num_cached_tokens == 4
    assert d.block_table[0] == a.block_table[0]
    assert bm.blocks[a.block_table[0]].ref_count == 3


def test_no_hit_after_a_missing_earlier_block():
    # Block 1 is still cached but block 0's entry is gone (as if evicted): block 1 must not be
    # reused, since token_ids[:num_cached_tokens] must all be in the cache.
    bm = BlockManager(8, BS)
    a = prefill(bm, range(1, 10))
    bm.deallocate(a)
    del bm.hash_to_block_id[compute_block_hash([1, 2, 3, 4], None)]
    b = make_seq(range(1, 10))
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert b.block_table == [3, 4, 5]
    assert bm.blocks[1].ref_count == 0 and 1 in bm.free_block_ids


def test_last_token_is_never_taken_from_the_cache():
    bm = BlockManager(16, BS)
    a = prefill(bm, range(8))  # exactly 2 blocks, both published
    assert all(bm.blocks[i].hash is not None for i in a.block_table)

    b = make_seq(range(8))     # fully cached prompt: the last block is recomputed
    bm.allocate(b)
    assert b.num_cached_tokens == 4
    assert b.block_table[0] == a.block_table[0]
    assert b.block_table[1] not in a.block_table
    assert bm.blocks[b.block_table[1]].hash is None

    c = make_seq(list(range(8)) + [8])  # one more token: both blocks can come from the cache
    bm.allocate(c)
    assert c.num_cached_tokens == 8
    assert c.block_table[:2] == a.block_table

    d = make_seq(range(3))     # shorter than a block: nothing cacheable
    bm.allocate(d)
    assert d.num_cached_tokens == 0


def test_hash_collision_is_caught_by_comparing_token_ids(monkeypatch):
    # Every block hashes to the same value: a lookup always finds the last published block,
    # and only the token comparison can tell a real hit from a collision.
    monkeypatch.setattr(block_manager_module, "compute_block_hash", lambda token_ids, prefix_hash: 7)
    bm = BlockManager(8, BS)
    a = prefill(bm, [1, 2, 3, 4, 5])
    assert bm.hash_to_block_id == {7: a.block_table[0]}

    b = make_seq([9, 9, 9, 9, 5])
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert b.block_table[0] != a.block_table[0]
    assert bm.blocks[a.block_table[0]].ref_count == 1

    c = make_seq([1, 2, 3, 4, 6])  # same tokens: a genuine hit
    bm.allocate(c)
    assert c.num_cached_tokens == 4
    assert c.block_table[0] == a.block_table[0]
    assert bm.blocks[a.block_table[0]].ref_count == 2


def test_forged_hash_entry_pointing_at_other_tokens_is_not_a_hit():
    bm = BlockManager(8, BS)
    a = prefill(bm, [1, 2, 3, 4, 5])
    bm.hash_to_block_id[compute_block_hash([9, 9, 9, 9], None)] = a.block_table[0]
    b = make_seq([9, 9, 9, 9, 5])
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert b.block_table == [2, 3]
    assert bm.blocks[a.block_table[0]].ref_count == 1


def test_freed_block_with_hash_is_reused_and_leaves_the_free_list():
    bm = BlockManager(8, BS)
    a = prefill(bm, range(1, 10))  # blocks 0, 1 published; block 2 partial
    assert a.block_table == [0, 1, 2]
    bm.deallocate(a)
    assert free_list(bm) == [3, 4, 5, 6, 7, 2, 1, 0]

    b = make_seq(list(range(1, 9)) + [20])
    bm.allocate(b)
    assert b.num_cached_tokens == 8
    assert b.block_table == [0, 1, 3]  # two hits, then the oldest free block
    assert ref_counts(bm) == [1, 1, 0, 1, 0, 0, 0, 0]
    assert free_list(bm) == [4, 5, 6, 7, 2]


def test_reallocated_hashed_block_loses_its_hash_mapping():
    bm = BlockManager(2, BS)
    a = prefill(bm, [1, 2, 3, 4, 5])  # blocks 0 (published), 1
    h = compute_block_hash([1, 2, 3, 4], None)
    assert bm.hash_to_block_id == {h: 0}
    bm.deallocate(a)
    assert free_list(bm) == [1, 0]

    b = make_seq([7] * 8)             # other content takes both blocks, block 0 last
    bm.allocate(b)
    assert b.block_table == [1, 0]
    assert b.num_cached_tokens == 0
    assert bm.hash_to_block_id == {}
    assert (bm.blocks[0].hash, bm.blocks[0].token_ids) == (None, [])
    bm.deallocate(b)

    c = make_seq([1, 2, 3, 4, 5])     # a's prefix is gone
    bm.allocate(c)
    assert c.num_cached_tokens == 0


def test_reallocating_a_stale_duplicate_keeps_the_live_mapping():
    bm = BlockManager(3, BS)
    a = prefill(bm, range(8))         # blocks 0, 1
    b = prefill(bm, range(8))         # hit on 0; block 1 recomputed into block 2
    assert b.block_table == [0, 2]
    h0 = compute_block_hash(list(range(4)), None)
    h1 = compute_block_hash(list(range(4, 8)), h0)
    assert bm.hash_to_block_id == {h0: 0, h1: 2}  # the newest copy is published
    assert bm.blocks[1].hash == h1                # the old copy still carries the hash

    bm.deallocate(a)                  # frees block 1 only (block 0 is shared)
    assert free_list(bm) == [1]
    c = make_seq([50])
    bm.allocate(c)                    # reuses block 1: must not drop h1 -> 2
    assert c.block_table == [1]
    assert bm.hash_to_block_id == {h0: 0, h1: 2}
    bm.deallocate(c)

    d = make_seq(list(range(8)) + [8])
    bm.allocate(d)
    assert d.num_cached_tokens == 8
    assert d.block_table == [0, 2, 1]


def test_shared_blocks_across_two_live_sequences():
    bm = BlockManager(8, BS)
    a = prefill(bm, range(1, 10))                 # [0, 1, 2]
    b = prefill(bm, list(range(1, 9)) + [99])     # [0, 1, 3]
    assert b.block_table == [0, 1, 3]
    assert ref_counts(bm)[:4] == [2, 2, 1, 1]
    assert free_list(bm) == [4, 5, 6, 7]

    bm.deallocate(a)  # the shared blocks stay in use
    assert ref_counts(bm)[:4] == [1, 1, 0, 1]
    assert free_list(bm) == [4, 5, 6, 7, 2]
    bm.deallocate(b)
    assert ref_counts(bm) == [0] * 8
    assert free_list(bm) == [4, 5, 6, 7, 2, 3, 1, 0]


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = prefill(bm, range(9))
    assert bm.hash_to_block_id == {}
    assert all(b.hash is None for b in bm.blocks)
    b = make_seq(range(9))     # same prompt while a is alive
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert b.block_table == [3, 4, 5]
    bm.deallocate(a)
    bm.deallocate(b)

    c = make_seq(range(9))
    bm.allocate(c)
    assert c.num_cached_tokens == 0
    assert c.block_table == [6, 7, 2]
    assert ref_counts(bm) == [0, 0, 1, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("enable", [True, False])
def test_allocate_never_uses_more_blocks_than_can_allocate_counts(enable):
    bm = BlockManager(4, BS, enable_prefix_caching=enable)
    a = prefill(bm, range(9))
    bm.deallocate(a)
    b = make_seq(range(12))
    assert bm.can_allocate(b) is True
    bm.allocate(b)
    assert bm.num_free_blocks == 4 - 3
    assert b.num_cached_tokens == (8 if enable else 0)
