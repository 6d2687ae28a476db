"""Paged KV-cache block allocation with reference counts and prefix caching.

Invariants:
- A block is either free (ref_count == 0, in `free_block_ids`) or used (ref_count > 0).
- A block's `hash` is set only once all its `block_size` tokens are known and have their K/V
  computed or being computed by a scheduled or launched step.
- Blocks are freed on the host at once, even while a launched step still reads or writes them
  (async scheduling: a sequence that finished one step late): any later use of the block is by
  a later step, which runs after it on the device (one stream per rank), so nothing is reused
  before the device is done with it. The hash chains the previous block's hash with the
  block's token ids (xxhash64), so equal hashes mean equal prefixes; a hit is still verified
  against the stored token ids before reuse.
- Freed blocks keep their hash and contents until reallocated, so a later request with the same
  prefix can take them back. `free_block_ids` is ordered oldest-freed first: allocation takes the
  front, which keeps recently freed prefixes around longest.
"""
from array import array
from collections import OrderedDict

import xxhash

from nanovllm.engine.sequence import Sequence


def compute_block_hash(token_ids: list[int], prefix_hash: int | None) -> int:
    h = xxhash.xxh64()
    if prefix_hash is not None:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.intdigest()


class Block:

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: list[int] = []

    def reset(self):
        self.ref_count = 1
        self.hash = None
        self.token_ids = []


class BlockManager:

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _block_tokens(self, seq: Sequence, i: int) -> list[int]:
        return seq.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def _take_free_block(self) -> int:
        """Pop the oldest free block and forget whatever prefix it held."""
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.reset()
        return block_id

    def _release(self, block_id: int):
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None

    def can_allocate(self, seq: Sequence) -> bool:
        """Conservative: counts every block of the sequence as new (cache hits may need fewer)."""
        return self.num_free_blocks >= self.num_blocks_for(seq.num_tokens)

    def allocate(self, seq: Sequence):
        """Give `seq` blocks for all its tokens, reusing cached full-prefix blocks.

        Sets `seq.block_table` and `seq.num_cached_tokens`. The last token is never taken from
        the cache: the step must compute at least one token to produce logits. A sequence that
        still needs prompt logprobs takes nothing from the cache (its blocks are still published).
        """
        assert not seq.block_table
        reads_cache = self.enable_prefix_caching and seq.prompt_logprobs is None
        num_cacheable = (seq.num_tokens - 1) // self.block_size if reads_cache else 0
        prefix_hash = None
        for i in range(self.num_blocks_for(seq.num_tokens)):
            block_id = None
            if i < num_cacheable:
                token_ids = self._block_tokens(seq, i)
                prefix_hash = compute_block_hash(token_ids, prefix_hash)
                hit = self.hash_to_block_id.get(prefix_hash)
                if hit is not None and self.blocks[hit].token_ids == token_ids:
                    block_id = hit
                    if self.blocks[hit].ref_count == 0:
                        del self.free_block_ids[hit]
                    self.blocks[hit].ref_count += 1
                    seq.num_cached_tokens += self.block_size
                else:
                    num_cacheable = 0  # first miss ends the shared prefix
            if block_id is None:
                block_id = self._take_free_block()
            seq.block_table.append(block_id)

    def deallocate(self, seq: Sequence):
        """Drop `seq`'s references (tail first, so shared prefixes stay cached longest)."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_cached_tokens = 0
        seq.num_scheduled_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """Room for the K/V of the last token (the input of a decode step)."""
        return len(seq.block_table) * self.block_size >= seq.num_tokens or self.num_free_blocks > 0

    def may_append(self, seq: Sequence):
        if len(seq.block_table) * self.block_size < seq.num_tokens:
            seq.block_table.append(self._take_free_block())

    def commit(self, seq: Sequence, num_computed_tokens: int, first_token: int | None = None):
        """Publish the hashes of blocks that are full once `num_computed_tokens` K/V exist (their
        token ids must be known), looking from the block of `first_token` on (default:
        `seq.num_cached_tokens`, the first token of the step being scheduled)."""
        if not self.enable_prefix_caching:
            return
        first = (seq.num_cached_tokens if first_token is None else first_token) // self.block_size
        for i in range(first, num_computed_tokens // self.block_size):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            prefix_hash = self.blocks[seq.block_table[i - 1]].hash if i > 0 else None
            if i > 0 and prefix_hash is None:  # the chain is broken: a hash now would be wrong
                break
            block.token_ids = self._block_tokens(seq, i)
            block.hash = compute_block_hash(block.token_ids, prefix_hash)
            self.hash_to_block_id[block.hash] = block.block_id
