"""Decode steps replayed from CUDA graphs, one graph per batch size.

A batch is padded up to the next captured size (graph padding): padded rows store nothing
(PAD_SLOT_ID) and attend over nothing (context length 0). The graphs read their inputs from views
of two device buffers (int64: input ids, positions, then the placeholder rows and their sources,
which the graphs do not read; int32: slot mapping, context lengths, block tables), filled each
step from pinned host staging buffers of the same layout: the int64 one whole, of the int32 one
the first rows of each part that the step's graph reads (`GraphInputs.ranges32`). There are two sets
of staging buffers, used in turn (async scheduling: the host fills step N+1's while step N's
copy may still wait in the stream); an event per set says when its last copy has run. Each set
remembers what its block-table rows hold (`TableRows`), so a step writes only the entries that changed
since the set's last step: in steady decoding a row gains a block every block_size steps.
Placeholder input ids (async scheduling) are scattered in from the previous step's samples on
the device, after the copy and before the replay. All graphs share one memory pool and one
output buffer.

Cascade (shared-prefix) steps have graphs of their own, when the engine's cascade rule is on: for each
size of at least `cascade_min_rows` rows, with room for size // cascade_min_rows groups (the rule's
groups have at least that many rows). The step's suffix tables and lengths take the plain tables' and
context lengths' places; the groups (their prefix tables and lengths, rows, offsets, and each row's
prefix length) follow in the int32 buffer. Groups past the step's last are empty.
"""
import logging

import torch
from torch import nn

from nanovllm.attention import PAD_SLOT_ID, AttentionMetadata, CascadeMetadata, forward_context
from nanovllm.sample.metadata import scatter_prev_sampled
from nanovllm.worker.inputs import StepInput, cascade_prefix_blocks

logger = logging.getLogger(__name__)


class TableRows:
    """What the block-table rows of one staging buffer hold: per row, the sequence's block table (its own list,
    which the block manager only appends to, or replaces by a new one), from which entry on it is staged (a
    cascade step stages each row's table after its shared prefix) and up to which entry."""

    def __init__(self, num_rows: int):
        # parallel lists, updated in place: no new objects per row and step (the garbage collector's count)
        self.tables: list[list[int] | None] = [None] * num_rows
        self.starts, self.ends = [0] * num_rows, [0] * num_rows

    def fill(self, tables, block_tables: list[list[int]], starts: list[int] | None = None):
        """Make row i of `tables` (a [rows, width] array) start with block_tables[i][starts[i]:] (starts: 0s
        when None), writing only the entries it does not already hold."""
        staged_tables, staged_starts, staged_ends = self.tables, self.starts, self.ends
        for row, table in enumerate(block_tables):
            start = starts[row] if starts is not None else 0
            end, staged_end = len(table), staged_ends[row]
            if staged_tables[row] is not table or staged_starts[row] != start or staged_end > end:  # another one
                tables[row, :end - start] = table[start:] if start else table
                staged_tables[row], staged_starts[row] = table, start
            elif staged_end < end:  # the same table, grown
                tables[row, staged_end - start:end - start] = table[staged_end:end]
            staged_ends[row] = end


class GraphInputs:
    """Where a decode graph reads its int32 inputs: one buffer, in parts (host staging and device copy alike)."""

    def __init__(self, max_bs: int, width: int, block_size: int, cascade_min_rows: int | None):
        """The int32 buffer's parts: slot mapping, context lengths, block tables; with cascade graphs then
        each row's prefix length, the grouped rows, the groups' prefix lengths, row offsets and prefix tables."""
        self.max_bs, self.width, self.block_size, self.cascade_min_rows = max_bs, width, block_size, cascade_min_rows
        self.max_groups = max_bs // cascade_min_rows if cascade_min_rows else 0
        groups = self.max_groups
        self.parts32 = [max_bs, max_bs, width * max_bs] + (
            [max_bs, max_bs, groups, groups + 1, groups * width] if groups else [])
        self.starts32 = [sum(self.parts32[:i]) for i in range(len(self.parts32))]

    def plain_metadata(self, buffer32: torch.Tensor, bs: int) -> AttentionMetadata:
        """The attention metadata of a `bs`-row decode graph, as views of an int32 buffer of the layout."""
        slot_mapping, context_lens, tables = buffer32.split(self.parts32)[:3]
        return AttentionMetadata(is_prefill=False, slot_mapping=slot_mapping[:bs], context_lens=context_lens[:bs],
                                 block_tables=tables.view(self.max_bs, self.width)[:bs])

    def cascade_metadata(self, buffer32: torch.Tensor, bs: int) -> AttentionMetadata:
        """The same for a `bs`-row cascade graph: room for bs // cascade_min_rows groups; the suffix tables and
        lengths are the plain step's tables and context lengths."""
        slot_mapping, suffix_lens, tables, seq_prefix_lens, group_rows, prefix_lens, cu_group_rows, prefix_tables = \
            buffer32.split(self.parts32)
        groups, width = bs // self.cascade_min_rows, self.width
        return AttentionMetadata(is_prefill=False, slot_mapping=slot_mapping[:bs], cascade=CascadeMetadata(
            prefix_tables[:groups * width].view(groups, width), prefix_lens[:groups], group_rows[:bs],
            cu_group_rows[:groups + 1], seq_prefix_lens[:bs], tables.view(self.max_bs, width)[:bs],
            suffix_lens[:bs], num_groups=groups, max_prefix_len=width * self.block_size))

    def ranges32(self, graph_bs: int, cascade: bool) -> list[tuple[int, int]]:
        """The [start, end) ranges of the int32 buffer that the `graph_bs` graph (plain or cascade) reads: each
        part's first graph_bs rows (or groups), so a small batch copies a few kilobytes, not the whole buffer."""
        width, groups = self.width, graph_bs // self.cascade_min_rows if cascade else 0
        lengths = [graph_bs, graph_bs, graph_bs * width] + (
            [graph_bs, graph_bs, groups, groups + 1, groups * width] if cascade else [])
        return [(start, start + length) for start, length in zip(self.starts32, lengths)]

    def stage32(self, step: StepInput, host32, graph_bs: int, table_rows: TableRows | None = None):
        """Fill the int32 buffer (a host array of the layout) with `step`'s inputs for the `graph_bs` graph.
        `table_rows`: what the buffer's table rows hold from its last step (None: nothing known, all written)."""
        if table_rows is None:
            table_rows = TableRows(self.max_bs)
        bs, max_bs, width = step.num_tokens, self.max_bs, self.width
        host32[:graph_bs] = PAD_SLOT_ID  # padded rows store nothing ...
        host32[:bs] = step.slot_mapping
        host32[max_bs:max_bs + graph_bs] = 0  # ... and attend over nothing
        host32[max_bs:max_bs + bs] = step.context_lens
        tables = host32[2 * max_bs:2 * max_bs + max_bs * width].reshape(max_bs, width)
        if step.cascade is None:
            table_rows.fill(tables, step.block_tables)
            return
        # suffix tables and lengths in the plain ones' places, then the groups; groups past the last are empty
        plan = step.cascade
        seq_prefix_lens, group_rows, prefix_lens, cu_group_rows, prefix_tables = (
            host32[start:] for start in self.starts32[3:])
        prefix_blocks = cascade_prefix_blocks(plan, bs)
        table_rows.fill(tables, step.block_tables, prefix_blocks)
        seq_prefix_lens[:graph_bs] = 0
        seq_prefix_lens[:bs] = prefix_blocks
        seq_prefix_lens[:bs] *= plan.block_size
        host32[max_bs:max_bs + bs] -= seq_prefix_lens[:bs]  # suffix lengths
        offset = 0
        for g, group in enumerate(plan.groups):
            group_rows[offset:offset + len(group.rows)] = group.rows
            cu_group_rows[g] = offset
            offset += len(group.rows)
            prefix_lens[g] = group.num_prefix_blocks * plan.block_size
            prefix_tables[g * width:g * width + group.num_prefix_blocks] = \
                step.block_tables[group.rows[0]][:group.num_prefix_blocks]
        cu_group_rows[len(plan.groups):graph_bs // self.cascade_min_rows + 1] = offset


class CUDAGraphRunner:

    @torch.inference_mode()
    def __init__(self, model: nn.Module, sizes: list[int], max_blocks_per_seq: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device, block_size: int, cascade_min_rows: int | None = None):
        """Capture `model`'s decode forward for each batch size of `sizes`, and with `cascade_min_rows` its
        cascade forward for each of them with at least that many rows."""
        max_bs = max(sizes)
        self.max_bs = max_bs
        self.layout = layout = GraphInputs(max_bs, max_blocks_per_seq, block_size, cascade_min_rows)
        self.staging = [(torch.zeros(4 * max_bs, dtype=torch.int64).pin_memory(),
                         torch.zeros(sum(layout.parts32), dtype=torch.int32).pin_memory()) for _ in range(2)]
        self.copied = [torch.cuda.Event() for _ in self.staging]  # each set's last copy has run
        self.table_rows = [TableRows(max_bs) for _ in self.staging]  # what each set's table rows hold
        self.turn = 0
        self.dev64, self.dev32 = (host.to(device) for host in self.staging[0])
        self.input_ids, self.positions, self.prev_rows, self.prev_indices = self.dev64.split(max_bs)
        self.outputs = torch.zeros(max_bs, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        for bs in sorted(sizes, reverse=True):  # the largest first: the others fit in its pool
            self.graphs[bs] = self._capture(model, layout.plain_metadata(self.dev32, bs), bs)
            if layout.max_groups and bs >= cascade_min_rows:
                self.cascade_graphs[bs] = self._capture(model, layout.cascade_metadata(self.dev32, bs), bs)
        self.sizes = sorted(self.graphs)
        logger.info("captured CUDA graphs for decode batch sizes %s%s", self.sizes,
                    f" (and cascade steps from {cascade_min_rows} rows)" if layout.max_groups else "")

    def _capture(self, model: nn.Module, meta: AttentionMetadata, bs: int) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with forward_context(meta):
            self.outputs[:bs] = model(self.input_ids[:bs], self.positions[:bs])  # warm-up
            with torch.cuda.graph(graph, self.pool):
                self.outputs[:bs] = model(self.input_ids[:bs], self.positions[:bs])
        if self.pool is None:
            self.pool = graph.pool()
        torch.cuda.synchronize(self.outputs.device)
        return graph

    def _graph_size(self, bs: int) -> int:
        return next(size for size in self.sizes if size >= bs)

    def can_run(self, step: StepInput) -> bool:
        """Whether a captured graph replays `step` (a decode step of at most max_bs rows whose cascade plan,
        if any, fits a cascade graph)."""
        if step.is_prefill or step.num_tokens > self.max_bs:
            return False
        if step.cascade is None:
            return True
        graph_bs = self._graph_size(step.num_tokens)
        return graph_bs in self.cascade_graphs and len(step.cascade.groups) <= graph_bs // self.layout.cascade_min_rows

    def replay(self, step: StepInput, prev_sampled: torch.Tensor | None = None) -> torch.Tensor:
        """[num_seqs, hidden_size]: the decode forward of `step`. `prev_sampled`: the previous
        step's sampled token ids when `step` has placeholders."""
        bs, max_bs = step.num_tokens, self.max_bs
        graph_bs = self._graph_size(bs)
        pinned64, pinned32 = self.staging[self.turn]
        self.copied[self.turn].synchronize()  # the copy that last read this set has run
        host64, host32 = pinned64.numpy(), pinned32.numpy()
        host64[:bs] = step.input_ids
        host64[max_bs:max_bs + bs] = step.positions
        num_prev = len(step.prev_sampled_rows)
        host64[2 * max_bs:2 * max_bs + num_prev] = step.prev_sampled_rows
        host64[3 * max_bs:3 * max_bs + num_prev] = step.prev_sampled_indices
        self.layout.stage32(step, host32, graph_bs, self.table_rows[self.turn])
        graph = self.graphs[graph_bs] if step.cascade is None else self.cascade_graphs[graph_bs]
        self.dev64.copy_(pinned64, non_blocking=True)
        for start, end in self.layout.ranges32(graph_bs, step.cascade is not None):
            self.dev32[start:end].copy_(pinned32[start:end], non_blocking=True)
        self.copied[self.turn].record()
        self.turn = 1 - self.turn
        if num_prev:
            scatter_prev_sampled(self.input_ids, self.prev_rows[:num_prev], self.prev_indices[:num_prev], prev_sampled)
        graph.replay()
        return self.outputs[:bs]

    def release(self):
        self.graphs.clear()
        self.pool = self.outputs = None
