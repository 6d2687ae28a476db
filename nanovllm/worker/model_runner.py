"""Runs the model on one tensor-parallel rank: builds and loads it, sizes and binds the KV cache,
executes steps (decode from CUDA graphs where captured), and on rank 0 samples.

On construction: the model and its weights, then the KV cache, sized on the GPU from
`gpu_memory_utilization` after a warm-up forward of the largest prefill batch, on the CPU from
`cpu_kvcache_space_gib` (`num_gpu_blocks_override` wins over both; every rank agrees on the
smallest count), then the CUDA graphs (on the GPU unless `enforce_eager`). The layers see the
engine's tensor-parallel group (its owner, the executor or a worker, made it) while the model is
built and during each forward.

Prompt logprobs rows go through the LM head PROMPT_LOGPROBS_CHUNK rows at a time, keeping only
each row's target and top-k, so a long prompt never has all its [num_rows, vocab_size] logits.

Async scheduling: the sampled token ids of the last step stay on the device (rank 0 keeps them;
a step with placeholders broadcasts them to the other ranks first), and the next step's
placeholder rows read their input ids from them; `sample` returns the host copy still under way.
"""
import logging
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch.distributed import ReduceOp

from nanovllm.attention import FP8_DTYPE, PAD_SLOT_ID, Attention, LayerKVCache, backend_class, forward_context
from nanovllm.config import Config
from nanovllm.models import get_model_class
from nanovllm.models.loader import load_dummy_weights, load_model
from nanovllm.sample.logprobs import LogprobsLists, LogprobsTensors, token_logprobs
from nanovllm.sample.metadata import InFlightTokens, SamplingSequence
from nanovllm.sample.sampler import Sampler
from nanovllm.utils.parallel import TensorParallelGroup, tensor_parallel_group
from nanovllm.worker.async_output import AsyncSampledTokens
from nanovllm.worker.cascade import CascadeGroup, CascadePlan, cascade_policy
from nanovllm.worker.cuda_graph import CUDAGraphRunner
from nanovllm.worker.inputs import PromptLogprobsTargets, StepInput, eager_inputs, upload_ints

logger = logging.getLogger(__name__)

PROMPT_LOGPROBS_CHUNK = 256  # prompt logprobs rows per LM-head pass


class ModelOutput(NamedTuple):
    """A forward's results on rank 0 (None elsewhere)."""
    logits: torch.Tensor | None  # [num_logits_rows, vocab_size]; None when no sequence completes its prompt
    prompt_logprobs: LogprobsLists | None = None  # per prompt logprobs row: its target, then the top-k


class ModelRunner:

    def __init__(self, config: Config, tp_group: TensorParallelGroup):
        """`tp_group`: this rank's member of the engine's group; its owner destroys it."""
        self.config = config
        self.tp_group = tp_group
        self.rank = tp_group.rank
        self.world_size = tp_group.size
        self.block_size = config.block_size
        self.device = torch.device("cuda", self.rank) if config.device_type == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.prev_sampled: torch.Tensor | None = None  # rank 0: the last step's sampled token ids
        self.num_prev_logits = 0  # the last step's logits rows (how many tokens it sampled)
        with tensor_parallel_group(tp_group):
            self._build(config)
        tp_group.barrier(self.device)

    def _build(self, config: Config):
        """Model, weights, sampler, KV cache and CUDA graphs of this rank."""
        hf_config = config.hf_config
        torch.manual_seed(config.seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(config.torch_dtype)
        try:
            with torch.device(self.device):
                self.model = get_model_class(hf_config)(hf_config, config.quant_config)
            if config.load_format == "dummy":
                load_dummy_weights(self.model, config.seed)
            else:
                load_model(self.model, config.model)
        finally:
            torch.set_default_dtype(default_dtype)
        self.model.eval()
        self.sampler = None
        if self.rank == 0:
            self.sampler = Sampler(config.seed)
            self.sampler.warm_up(hf_config.vocab_size, config.torch_dtype, self.device)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.attention_backend = backend_class(config.attention_backend)()
        for layer in self.attention_layers:
            layer.bind(self.attention_backend)
        self.graph_runner = None  # the warm-up forward below runs eagerly
        self.num_kvcache_blocks = self._num_kvcache_blocks()
        self._allocate_kv_cache(self.num_kvcache_blocks)
        policy = cascade_policy(config)
        if self.device.type == "cuda":
            self._warmup_cached_prefill()
            if policy is not None:
                self._warmup_cascade()
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graph_runner = CUDAGraphRunner(self.model, config.graph_batch_sizes,
                                                -(-config.max_model_len // self.block_size), hf_config.hidden_size,
                                                config.torch_dtype, self.device, self.block_size,
                                                policy.min_group_rows if policy else None)

    def exit(self):
        """Release the graphs, the cache and the model."""
        if self.graph_runner is not None:
            self.graph_runner.release()
            self.graph_runner = None
        for layer in self.attention_layers:
            layer.bind(self.attention_backend)
        self.kv_cache = self.kv_scales = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # ---- KV cache --------------------------------------------------------------------------

    @property
    def _cache_dtype(self) -> torch.dtype:
        return FP8_DTYPE if self.config.fp8_kv_cache else self.config.torch_dtype

    def _block_bytes(self) -> int:
        """Bytes of one KV block over all layers: K and V, and for FP8 their float32 scales."""
        layer = self.attention_layers[0]
        per_token_head = layer.head_dim * self._cache_dtype.itemsize + (4 if self.config.fp8_kv_cache else 0)
        return 2 * len(self.attention_layers) * self.block_size * layer.num_kv_heads * per_token_head

    def _num_kvcache_blocks(self) -> int:
        config = self.config
        if self.device.type == "cuda":
            self._warmup()  # also gives a true peak for sizing, even with an override
        if config.num_gpu_blocks_override is not None:
            num_blocks = config.num_gpu_blocks_override
        elif self.device.type == "cpu":
            num_blocks = int(config.cpu_kvcache_space_gib * (1 << 30)) // self._block_bytes()
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            stats = torch.cuda.memory_stats(self.device)
            activation_peak = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
            budget = total * config.gpu_memory_utilization - (total - free) - activation_peak
            num_blocks = int(budget) // self._block_bytes()
        if self.world_size > 1:  # every rank must agree on the block count
            n = torch.tensor([num_blocks], device=self.device)
            num_blocks = int(self.tp_group.all_reduce(n, op=ReduceOp.MIN).item())
        if num_blocks < 1:
            raise ValueError(f"no memory is left for the KV cache (gpu_memory_utilization="
                             f"{config.gpu_memory_utilization}); raise it or lower max_num_batched_tokens.")
        return num_blocks

    def _allocate_kv_cache(self, num_blocks: int):
        layer = self.attention_layers[0]
        # [2 (k, v), num_layers, num_blocks, block_size, num_kv_heads(, head_dim)]
        shape = (2, len(self.attention_layers), num_blocks, self.block_size, layer.num_kv_heads)
        # Zeros on the CPU: the reference attention reads whole padded blocks, masked, and masked
        # garbage could still be NaN. The CUDA kernels read only valid rows.
        alloc = torch.zeros if self.device.type == "cpu" else torch.empty
        self.kv_cache = alloc(*shape, layer.head_dim, dtype=self._cache_dtype, device=self.device)
        self.kv_scales = alloc(shape, dtype=torch.float32, device=self.device) if self.config.fp8_kv_cache else None
        for i, layer in enumerate(self.attention_layers):
            scales = (self.kv_scales[0, i], self.kv_scales[1, i]) if self.kv_scales is not None else ()
            layer.bind(self.attention_backend, LayerKVCache(self.kv_cache[0, i], self.kv_cache[1, i], *scales))

    @torch.inference_mode()
    def _warmup(self):
        """A forward of the largest prefill batch, so the activation peak can be measured."""
        config = self.config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        seq_len = min(config.max_model_len, config.max_num_batched_tokens)
        num_seqs = max(1, min(config.max_num_batched_tokens // seq_len, config.max_num_seqs))
        cu = [i * seq_len for i in range(num_seqs + 1)]
        step = StepInput(is_prefill=True, input_ids=[0] * cu[-1], positions=list(range(seq_len)) * num_seqs,
                         slot_mapping=[PAD_SLOT_ID] * cu[-1], block_tables=None, cu_seqlens_q=cu,
                         cu_seqlens_k=cu, logits_indices=[c - 1 for c in cu[1:]])
        self.execute_model(step)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _warmup_cached_prefill(self):
        """A one-token prefill read through the paged cache (block 0, nothing written), so that the kernels of
        a prefill with cached context (a prefix hit, a chunk's continuation) compile now rather than in the
        first request that has one (about a second on an H200). Its one-row linears also time their two
        kernels (layers/skinny_gemm.py) before the CUDA graphs capture the faster."""
        step = StepInput(is_prefill=True, input_ids=[0], positions=[0], slot_mapping=[PAD_SLOT_ID],
                         block_tables=[[0]], cu_seqlens_q=[0, 1], cu_seqlens_k=[0, 1], logits_indices=[0])
        self._warmup_step(step)

    @torch.inference_mode()
    def _warmup_cascade(self):
        """A two-row decode step whose rows share one block (block 0 as prefix and suffix, nothing
        written), run through the cascade path, so that its kernels compile now rather than in the
        first step that shares a prefix when steps run eagerly (the CUDA graphs' capture compiles them too)."""
        size = self.block_size
        step = StepInput(is_prefill=False, input_ids=[0, 0], positions=[size, size], slot_mapping=[PAD_SLOT_ID] * 2,
                         block_tables=[[0, 0], [0, 0]], context_lens=[size + 1] * 2, logits_indices=[0, 1],
                         cascade=CascadePlan([CascadeGroup([0, 1], 1)], size))
        self._warmup_step(step)

    def _warmup_step(self, step: StepInput):
        """Run `step` for what it leaves behind (compiled kernels, timed linears); no step follows from it."""
        self.execute_model(step)
        self.num_prev_logits = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- execution -------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, step: StepInput, prompt_targets: PromptLogprobsTargets | None = None) -> ModelOutput:
        """The forward of `step` (every rank) and its logits rows. `prompt_targets`: rank 0's
        targets of `step.prompt_logprobs_indices` (None on the other ranks)."""
        with tensor_parallel_group(self.tp_group):
            prev_sampled = self._prev_sampled(step)
            self.num_prev_logits = len(step.logits_indices)
            if self.graph_runner is not None and self.graph_runner.can_run(step):
                hidden_states = self.graph_runner.replay(step, prev_sampled)
            else:
                input_ids, positions, meta = eager_inputs(step, self.device, prev_sampled)
                with forward_context(meta):
                    hidden_states = self.model(input_ids, positions)
            prompt_logprobs = None
            if step.prompt_logprobs_indices:
                prompt_logprobs = self._prompt_logprobs(hidden_states, step.prompt_logprobs_indices, prompt_targets)
            if not step.logits_indices:
                return ModelOutput(None, prompt_logprobs)
            if step.is_prefill:
                hidden_states = hidden_states[upload_ints(self.device, step.logits_indices)[0]]
            return ModelOutput(self.model.compute_logits(hidden_states), prompt_logprobs)

    def _prev_sampled(self, step: StepInput) -> torch.Tensor | None:
        """[num_prev_logits] int64 on this rank's device: the previous step's sampled token ids,
        when `step` has placeholder rows (every rank decides alike: they all see `step`)."""
        if not step.prev_sampled_rows:
            return None
        if self.rank == 0:
            assert self.prev_sampled is not None and len(self.prev_sampled) == self.num_prev_logits, \
                "placeholders refer to the step just before"
            return self.tp_group.broadcast(self.prev_sampled)
        return self.tp_group.broadcast(torch.empty(self.num_prev_logits, dtype=torch.int64, device=self.device))

    def _prompt_logprobs(self, hidden_states: torch.Tensor, indices: list[int],
                         targets: PromptLogprobsTargets | None) -> LogprobsLists | None:
        """hidden_states: [num_tokens, hidden_size]; the logprobs of the rows `indices` (every
        rank joins the LM head's gather; rank 0 scores them)."""
        assert (targets is None) == (self.rank != 0), "rank 0, and only it, has the prompt logprobs targets"
        rows, *token_ids = upload_ints(self.device, indices, *([] if targets is None else [targets.token_ids]))
        parts = []
        for start in range(0, len(indices), PROMPT_LOGPROBS_CHUNK):
            chunk = slice(start, start + PROMPT_LOGPROBS_CHUNK)
            logits = self.model.compute_logits(hidden_states[rows[chunk]])  # [chunk, vocab_size] on rank 0
            if logits is not None:
                parts.append(token_logprobs(logits, token_ids[0][chunk], targets.num_logprobs))
        return LogprobsTensors.cat(parts).tolist() if parts else None

    @torch.inference_mode()
    def sample(self, output: ModelOutput, seqs: list[SamplingSequence],
               prev_rows: Mapping[int, int] | None = None) -> AsyncSampledTokens:
        """Rank 0: one token per logits row (row i for seqs[i]), with the step's prompt logprobs;
        their copy to the host is under way (no wait here). Keeps the token ids on the device
        for the next step's placeholders. `prev_rows`: seq_id -> row of the previous step's samples
        (async scheduling), for the sampler's penalties of sequences whose newest token is one."""
        if output.logits is None:
            self.prev_sampled = None
            return AsyncSampledTokens(None, output.prompt_logprobs, self.device)
        in_flight = None
        if prev_rows and self.prev_sampled is not None:
            in_flight = InFlightTokens(self.prev_sampled, prev_rows)
        sampled = self.sampler(output.logits, seqs, in_flight)
        self.prev_sampled = sampled.token_ids
        return AsyncSampledTokens(sampled, output.prompt_logprobs, self.device)
