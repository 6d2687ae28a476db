"""Decode steps replayed from CUDA graphs, one graph per batch size.

A batch is padded up to the next captured size (graph padding): padded rows store nothing
(PAD_SLOT_ID) and attend over nothing (context length 0). The graphs read their inputs from views
of two device buffers (int64: input ids, positions, then the placeholder rows and their sources,
which the graphs do not read; int32: slot mapping, context lengths, block tables), filled each
step by one copy apiece from pinned host staging buffers of the same layout. There are two sets
of staging buffers, used in turn (async scheduling: the host fills step N+1's while step N's
copy may still wait in the stream); an event per set says when its last copy has run.
Placeholder input ids (async scheduling) are scattered in from the previous step's samples on
the device, after the copy and before the replay. All graphs share one memory pool and one
output buffer. Cascade (shared-prefix) steps are not captured: their grids follow the step's groups,
so they run eagerly (worker/cascade.py's cost rule picks them only when the saving outweighs that).
"""
import logging

import torch
from torch import nn

from nanovllm.attention import PAD_SLOT_ID, AttentionMetadata, forward_context
from nanovllm.sample.metadata import scatter_prev_sampled
from nanovllm.worker.inputs import StepInput

logger = logging.getLogger(__name__)


class CUDAGraphRunner:

    @torch.inference_mode()
    def __init__(self, model: nn.Module, sizes: list[int], max_blocks_per_seq: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device):
        """Capture `model`'s decode forward for each batch size of `sizes`."""
        max_bs, width = max(sizes), max_blocks_per_seq
        self.max_bs, self.width = max_bs, width
        self.staging = [(torch.zeros(4 * max_bs, dtype=torch.int64).pin_memory(),
                         torch.zeros((2 + width) * max_bs, dtype=torch.int32).pin_memory()) for _ in range(2)]
        self.copied = [torch.cuda.Event() for _ in self.staging]  # each set's last copy has run
        self.turn = 0
        self.dev64, self.dev32 = (host.to(device) for host in self.staging[0])
        self.input_ids, positions, self.prev_rows, self.prev_indices = self.dev64.split(max_bs)
        input_ids = self.input_ids
        slot_mapping, context_lens, tables = self.dev32.split([max_bs, max_bs, width * max_bs])
        block_tables = tables.view(max_bs, width)
        self.outputs = torch.zeros(max_bs, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        for bs in sorted(sizes, reverse=True):  # the largest first: the others fit in its pool
            graph = torch.cuda.CUDAGraph()
            meta = AttentionMetadata(is_prefill=False, slot_mapping=slot_mapping[:bs],
                                     context_lens=context_lens[:bs], block_tables=block_tables[:bs])
            with forward_context(meta):
                self.outputs[:bs] = model(input_ids[:bs], positions[:bs])  # warm-up
                with torch.cuda.graph(graph, self.pool):
                    self.outputs[:bs] = model(input_ids[:bs], positions[:bs])
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize(device)
        self.sizes = sorted(self.graphs)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, step: StepInput) -> bool:
        return not step.is_prefill and step.cascade is None and step.num_tokens <= self.max_bs

    def replay(self, step: StepInput, prev_sampled: torch.Tensor | None = None) -> torch.Tensor:
        """[num_seqs, hidden_size]: the decode forward of `step`. `prev_sampled`: the previous
        step's sampled token ids when `step` has placeholders."""
        bs, max_bs = step.num_tokens, self.max_bs
        graph_bs = next(size for size in self.sizes if size >= bs)
        pinned64, pinned32 = self.staging[self.turn]
        self.copied[self.turn].synchronize()  # the copy that last read this set has run
        host64, host32 = pinned64.numpy(), pinned32.numpy()
        host64[:bs] = step.input_ids
        host64[max_bs:max_bs + bs] = step.positions
        num_prev = len(step.prev_sampled_rows)
        host64[2 * max_bs:2 * max_bs + num_prev] = step.prev_sampled_rows
        host64[3 * max_bs:3 * max_bs + num_prev] = step.prev_sampled_indices
        host32[:graph_bs] = PAD_SLOT_ID  # padded rows store nothing ...
        host32[:bs] = step.slot_mapping
        host32[max_bs:max_bs + graph_bs] = 0  # ... and attend over nothing
        host32[max_bs:max_bs + bs] = step.context_lens
        tables = host32[2 * max_bs:].reshape(max_bs, self.width)
        for row, table in enumerate(step.block_tables):
            tables[row, :len(table)] = table
        self.dev64.copy_(pinned64, non_blocking=True)
        self.dev32.copy_(pinned32, non_blocking=True)
        self.copied[self.turn].record()
        self.turn = 1 - self.turn
        if num_prev:
            scatter_prev_sampled(self.input_ids, self.prev_rows[:num_prev], self.prev_indices[:num_prev], prev_sampled)
        self.graphs[graph_bs].replay()
        return self.outputs[:bs]

    def release(self):
        self.graphs.clear()
        self.pool = self.outputs = None
