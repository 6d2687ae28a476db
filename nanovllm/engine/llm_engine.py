"""LLMEngine: the schedule -> run -> postprocess loop over all requests.

The engine owns the tokenizer, the scheduler and rank 0's ModelRunner; ranks 1..N-1 run in
spawned worker processes. Every request is validated completely (prompt, sampling params) before
anything is queued, so bad input raises without disturbing requests already in flight.
`shutdown()` (also run when the engine is garbage-collected or the interpreter exits) stops the
workers and releases the GPU memory, shared memory and process group.
"""
import logging
import multiprocessing as mp
import os
import time
import uuid
import weakref
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Sequence as SequenceT, Union

from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.model_runner import SHM_SIZE, ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.parallel import find_free_port
from nanovllm.utils.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

PromptType = Union[str, list[int]]
WORKER_JOIN_TIMEOUT_S = 30


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    seq: Sequence


def _worker_main(config: Config, rank: int, port: int, shm_name: str, event):
    runner = ModelRunner(config, rank, port, shm_name, event)
    runner.worker_loop()


def _shutdown(runner: ModelRunner | None, workers: list, shm: SharedMemory | None):
    """Idempotent cleanup; holds no reference to the engine itself."""
    if runner is not None:
        try:
            runner.exit()
        except Exception:  # a dead worker must not stop the rest of the cleanup
            logger.exception("error while stopping the model runner")
    for p in workers:
        p.join(WORKER_JOIN_TIMEOUT_S)
        if p.is_alive():
            logger.warning("worker %s did not exit; terminating it", p.pid)
            p.terminate()
            p.join()
    workers.clear()
    if shm is not None:
        shm.close()
        shm.unlink()


class LLMEngine:

    def __init__(self, model: str, **kwargs):
        self.config = config = Config(model, **kwargs)
        workers: list[mp.Process] = []
        shm = None
        runner = None
        try:
            port = config.distributed_port or find_free_port()
            events = []
            if config.tensor_parallel_size > 1:
                shm = SharedMemory(name=f"nanovllm_{os.getpid()}_{uuid.uuid4().hex[:12]}", create=True,
                                   size=SHM_SIZE)
                ctx = mp.get_context("spawn")
                for rank in range(1, config.tensor_parallel_size):
                    event = ctx.Event()
                    process = ctx.Process(target=_worker_main, args=(config, rank, port, shm.name, event))
                    process.start()
                    workers.append(process)
                    events.append(event)
            runner = ModelRunner(config, 0, port, shm.name if shm else None, events)
            self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model)
            num_blocks = runner.num_kvcache_blocks
            blocks_per_seq = -(-config.max_model_len // config.kvcache_block_size)
            if blocks_per_seq > num_blocks:
                raise ValueError(
                    f"the KV cache holds {num_blocks} blocks of {config.kvcache_block_size} tokens, fewer than "
                    f"one sequence of max_model_len={config.max_model_len} needs ({blocks_per_seq}); lower "
                    f"max_model_len or give the cache more memory.")
        except BaseException:
            _shutdown(runner, workers, shm)
            raise
        self.model_runner = runner
        self._finalizer = weakref.finalize(self, _shutdown, runner, workers, shm)
        self.eos_token_ids = eos_token_ids(config.model, config.hf_config, self.tokenizer)
        self.vocab_size = config.hf_config.vocab_size
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len, num_kvcache_blocks=num_blocks,
            block_size=config.kvcache_block_size, eos_token_ids=self.eos_token_ids,
            enable_prefix_caching=config.enable_prefix_caching)
        self._requests: dict[int, _Request] = {}  # seq_id -> request
        self._next_seq_id = 0
        logger.info("engine ready: %d KV blocks of %d tokens on %s", num_blocks, config.kvcache_block_size,
                    config.device_type)

    def shutdown(self):
        """Stop the workers and free the GPU memory; the engine is unusable afterwards."""
        self._finalizer()

    # ---- requests --------------------------------------------------------------------------

    def _prompt_token_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt was given as text, but skip_tokenizer_init=True: pass token ids.")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                      for t in prompt):
            text, token_ids = None, list(prompt)
        else:
            raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}: "
                            f"{prompt!r:.80}")
        if not token_ids:
            raise ValueError(f"prompt is empty: {prompt!r}.")
        if len(token_ids) > self.config.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens, more than max_model_len="
                             f"{self.config.max_model_len}.")
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size}).")
        return text, token_ids

    def _make_request(self, prompt: PromptType, sampling_params: SamplingParams) -> _Request:
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}.")
        text, token_ids = self._prompt_token_ids(prompt)
        seq = Sequence(self._next_seq_id, token_ids, sampling_params)
        self._next_seq_id += 1
        return _Request(str(seq.seq_id), text, seq)

    def _enqueue(self, request: _Request):
        self._requests[request.seq.seq_id] = request
        self.scheduler.add(request.seq)

    def add_request(self, prompt: PromptType, sampling_params: SamplingParams) -> str:
        """Validate and queue one request; returns its request id."""
        request = self._make_request(prompt, sampling_params)
        self._enqueue(request)
        return request.request_id

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    # ---- the loop --------------------------------------------------------------------------

    def _step(self) -> tuple[list[Sequence], int]:
        """One schedule -> run -> postprocess round. Returns the sequences that finished and the
        number of tokens computed (positive: prefill tokens; negative: decode sequences)."""
        output = self.scheduler.schedule()
        num_tokens = (sum(seq.num_scheduled_tokens for seq in output.seqs) if output.is_prefill
                      else -len(output.seqs))
        token_ids = self.model_runner.run(output.seqs, output.is_prefill)
        return self.scheduler.update(output, token_ids), num_tokens

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the RequestOutputs of the requests that finished in it."""
        finished, _ = self._step()
        return [self._finish_output(seq) for seq in finished]

    def _finish_output(self, seq: Sequence) -> RequestOutput:
        request = self._requests.pop(seq.seq_id)
        token_ids = seq.completion_token_ids
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else ""
        completion = CompletionOutput(index=0, text=text, token_ids=token_ids, finish_reason=seq.finish_reason)
        return RequestOutput(request.request_id, request.prompt, seq.token_ids[:seq.num_prompt_tokens],
                             [completion], finished=True, num_cached_tokens=seq.num_prefix_cached_tokens)

    def generate(self, prompts: PromptType | SequenceT[PromptType],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; results come back in input order.

        `prompts`: a str, a list of token ids, or a list of either. `sampling_params`: one for
        all prompts, a list of the same length, or None for the defaults. Raises ValueError /
        TypeError on bad input before any request is queued.
        """
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts; "
                                 f"pass one SamplingParams or one per prompt.")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        requests = [self._make_request(p, sp) for p, sp in zip(prompts, params_list)]
        for request in requests:
            self._enqueue(request)
        order = {request.seq.seq_id: i for i, request in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            while not self.is_finished():
                start = time.perf_counter()
                finished, num_tokens = self._step()
                elapsed = time.perf_counter() - start
                if num_tokens > 0:
                    prefill_tps = num_tokens / elapsed
                else:
                    decode_tps = -num_tokens / elapsed
                pbar.set_postfix({"Prefill": f"{int(prefill_tps)}tok/s", "Decode": f"{int(decode_tps)}tok/s"},
                                 refresh=False)
                for seq in finished:
                    output = self._finish_output(seq)
                    if seq.seq_id in order:
                        results[order[seq.seq_id]] = output
                pbar.update(len(finished))
        finally:
            pbar.close()
        return results
