"""Decode steps replayed from CUDA graphs, one graph per batch size.

A batch is padded up to the next captured size (graph padding): padded rows store nothing
(PAD_SLOT_ID) and attend over nothing (context length 0). The graphs read their inputs from views
of two device buffers (int64: input ids, positions; int32: slot mapping, context lengths, block
tables), filled each step by one copy apiece from pinned host staging buffers of the same layout.
All graphs share one memory pool and one output buffer. Cascade (shared-prefix) steps are not
captured: their grids follow the step's groups, so they run eagerly (worker/cascade.py's cost rule
picks them only when the saving outweighs that).
"""
import logging

import torch
from torch import nn

from nanovllm.attention import PAD_SLOT_ID, AttentionMetadata, forward_context
from nanovllm.worker.inputs import StepInput

logger = logging.getLogger(__name__)


class CUDAGraphRunner:

    @torch.inference_mode()
    def __init__(self, model: nn.Module, sizes: list[int], max_blocks_per_seq: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device):
        """Capture `model`'s decode forward for each batch size of `sizes`."""
        max_bs, width = max(sizes), max_blocks_per_seq
        self.max_bs, self.width = max_bs, width
        self.host64 = torch.zeros(2 * max_bs, dtype=torch.int64).pin_memory()
        self.host32 = torch.zeros((2 + width) * max_bs, dtype=torch.int32).pin_memory()
        self.dev64, self.dev32 = self.host64.to(device), self.host32.to(device)
        input_ids, positions = self.dev64.split(max_bs)
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

    def replay(self, step: StepInput) -> torch.Tensor:
        """[num_seqs, hidden_size]: the decode forward of `step`. Reusing the staging buffers is
        safe: the previous step's copy finished before its sampled tokens reached the host (on
        workers: before the collective rank 0 waited on)."""
        bs, max_bs = step.num_tokens, self.max_bs
        graph_bs = next(size for size in self.sizes if size >= bs)
        host64, host32 = self.host64.numpy(), self.host32.numpy()
        host64[:bs] = step.input_ids
        host64[max_bs:max_bs + bs] = step.positions
        host32[:graph_bs] = PAD_SLOT_ID  # padded rows store nothing ...
        host32[:bs] = step.slot_mapping
        host32[max_bs:max_bs + graph_bs] = 0  # ... and attend over nothing
        host32[max_bs:max_bs + bs] = step.context_lens
        tables = host32[2 * max_bs:].reshape(max_bs, self.width)
        for row, table in enumerate(step.block_tables):
            tables[row, :len(table)] = table
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32.copy_(self.host32, non_blocking=True)
        self.graphs[graph_bs].replay()
        return self.outputs[:bs]

    def release(self):
        self.graphs.clear()
        self.pool = self.outputs = None
