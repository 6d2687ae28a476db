"""Cascade (shared-prefix) attention for a decode step: which sequences share KV blocks, and whether
reading those blocks once per group pays.

Sequences share physical KV blocks through the prefix cache (one system prompt, `n` samples of a
prompt, beam search). `plan_cascade` finds, from the step's block tables alone, groups of rows whose
tables start with the same run of block ids, and the length of that run. Only whole blocks count and a
group's prefix never exceeds a member's context, so the prefix is `num_prefix_blocks * block_size` keys
every member holds. Attention then reads a group's prefix once for all its rows and each row's own
keys after it, and merges the two by log-sum-exp: exact, the plain step's result.

Grouping: rows are partitioned by their first block, then recursively by the block where their common
run ends (a trie over the block tables, built on demand); each node either becomes one group with the
run shared by all its rows, or leaves the choice to its children, whichever saves more key reads.
Saved reads of a group: prefix_len * (group size - 1) keys. The cost rule (`CascadePolicy`): a group
must save `min_group_saved_tokens` (the extra pass over its prefix and the merge are not free), the
step `min_step_saved_tokens` (0 in the engine: cascade steps replay CUDA graphs of their own, see
worker/cuda_graph.py), and on CUDA a group must have `min_group_rows` rows: the plain kernel runs a
small group's rows together, so their shared blocks come from L2 after the first read and cascade
saves little HBM traffic (docs/CASCADE.md). The CUDA graphs hold size // min_group_rows groups, so
every plan of a step fits its graph.
Cost: O(rows) dict operations per trie level plus binary searches of list-slice comparisons; a node of
min_group_rows rows is not split (its children would be too small), and a batch with no two rows on the
same first block returns after one pass.
"""
from dataclasses import dataclass
from typing import NamedTuple

from nanovllm.attention import backend_class
from nanovllm.config import Config

MIN_GROUP_SAVED_BLOCKS = 4  # a group must save at least this many blocks' worth of key reads
# Groups smaller than this stay on the plain path on CUDA (docs/CASCADE.md has the measurements).
MIN_GROUP_ROWS_CUDA = 16
MAX_TRIE_DEPTH = 64  # branch points followed below a first block (bounds the recursion on odd batches)


class CascadeGroup(NamedTuple):
    rows: list[int]          # rows of the step (ascending) whose block tables start with the same blocks
    num_prefix_blocks: int   # how many leading blocks they share


@dataclass(frozen=True)
class CascadePlan:
    """A decode step's shared-prefix groups (at least one); rows in no group attend as usual."""
    groups: list[CascadeGroup]
    block_size: int

    @property
    def saved_blocks(self) -> int:
        """Blocks of K/V reads (per layer) that the plan saves over the plain step."""
        return sum(g.num_prefix_blocks * (len(g.rows) - 1) for g in self.groups)


@dataclass(frozen=True)
class CascadePolicy:
    """The cost rule; thresholds in tokens of K/V reads saved (per layer)."""
    min_group_saved_tokens: int
    min_step_saved_tokens: int
    min_group_rows: int = 2


def cascade_policy(config: Config) -> CascadePolicy | None:
    """The engine's rule; None when `enable_cascade_attention` is off or the backend has no cascade path."""
    if not config.enable_cascade_attention or not backend_class(config.attention_backend).supports_cascade:
        return None
    return CascadePolicy(MIN_GROUP_SAVED_BLOCKS * config.block_size, 0,
                         MIN_GROUP_ROWS_CUDA if config.device_type == "cuda" else 2)


class Hints(NamedTuple):
    """Shared-run lengths per trie node (keyed by the node's last block): the last plan's, this plan's."""
    old: dict[int, int]
    new: dict[int, int]


def _common_blocks(tables: list[list[int]], rows: list[int], start: int, limit: int, hint: int | None) -> int:
    """The length (>= start, <= limit) of the run of blocks all `rows` share, knowing they share [0, start).
    `hint`, a guess (the last step's length): one pass over the rows confirms it, else a binary search."""
    ref = tables[rows[0]]
    if hint is not None and start <= hint <= limit:
        head = ref[start:hint]
        if all(tables[r][start:hint] == head for r in rows[1:]) and (
                hint == limit or any(tables[r][hint] != ref[hint] for r in rows[1:])):
            return hint
    lo, hi = start, limit  # invariant: the rows share [0, lo)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        head = ref[lo:mid]
        if all(tables[r][lo:mid] == head for r in rows[1:]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _best_groups(tables: list[list[int]], caps: list[int], rows: list[int], shared: int, min_saved_blocks: float,
                 min_rows: int, hints: Hints, depth: int = 0) -> tuple[int, list[CascadeGroup]]:
    """(saved blocks, groups) of the best partition of `rows`, which share their first `shared` blocks.
    `min_rows`: the smallest group (at least 2)."""
    limit = min(map(caps.__getitem__, rows))
    node = tables[rows[0]][shared - 1]  # a block sits at the same position in every table holding it
    shared = hints.new[node] = _common_blocks(tables, rows, shared, limit, hints.old.get(node))
    here = shared * (len(rows) - 1)
    qualifies = here >= min_saved_blocks and len(rows) >= min_rows
    best = (here, [CascadeGroup(sorted(rows), shared)]) if qualifies else (0, [])
    # Past `shared` the rows part (or the shortest has no block left): a child has at most len(rows) - 1 of them
    if depth == MAX_TRIE_DEPTH or len(rows) - 1 < min_rows:
        return best
    if shared == limit:  # some row has no block to branch on
        rows = [r for r in rows if caps[r] > shared]
    buckets: dict[int, list[int]] = {}
    for r in rows:
        buckets.setdefault(tables[r][shared], []).append(r)
    below, groups = 0, []
    for bucket in buckets.values():
        if len(bucket) >= min_rows:
            saved, sub = _best_groups(tables, caps, bucket, shared + 1, min_saved_blocks, min_rows, hints, depth + 1)
            below += saved
            groups += sub
    return (below, groups) if below > best[0] else best


class CascadePlanner:
    """plan_cascade with the last step's shared-run lengths as hints: a decode step mostly has the rows and
    groups of the step before, so each node's length is confirmed by one pass over its rows instead of being
    searched for again (on the development machine, 1,024 rows in 64 groups of 16 behind 1,024-token prefixes,
    block 16: 1.45 -> 0.89 ms of host time per step; 512 rows in 32 such groups, with the unsplit nodes: 0.55 ms,
    0.90 without hints). The plan is the one plan_cascade makes without hints."""

    def __init__(self, policy: CascadePolicy):
        self.policy = policy
        self._lengths: dict[int, int] = {}

    def plan(self, block_tables: list[list[int]], context_lens: list[int], block_size: int) -> CascadePlan | None:
        hints = Hints(self._lengths, {})
        plan = plan_cascade(block_tables, context_lens, block_size, self.policy, hints)
        self._lengths = hints.new
        return plan


def plan_cascade(block_tables: list[list[int]], context_lens: list[int], block_size: int,
                 policy: CascadePolicy, hints: Hints | None = None) -> CascadePlan | None:
    """The shared-prefix groups of a decode step that pass `policy`; None when none does (plain step).
    `hints`: see CascadePlanner (None: none)."""
    if hints is None:
        hints = Hints({}, {})
    firsts = {t[0] for t in block_tables if t}
    if len(firsts) == len(block_tables):  # no two rows on one first block: the common case, decided fast
        return None
    caps = [min(len(t), n // block_size) for t, n in zip(block_tables, context_lens)]  # whole blocks of keys
    by_first: dict[int, list[int]] = {}
    for row, table in enumerate(block_tables):
        if caps[row]:
            by_first.setdefault(table[0], []).append(row)
    min_saved_blocks, min_rows = policy.min_group_saved_tokens / block_size, max(2, policy.min_group_rows)
    groups = []
    for rows in by_first.values():
        if len(rows) >= min_rows:
            groups += _best_groups(block_tables, caps, rows, 1, min_saved_blocks, min_rows, hints)[1]
    plan = CascadePlan(sorted(groups), block_size)
    if not groups or plan.saved_blocks * block_size < policy.min_step_saved_tokens:
        return None
    return plan
