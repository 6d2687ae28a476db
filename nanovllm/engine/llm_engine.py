"""LLMEngine: vLLM's request loop (`add_request`, `step`, `abort_request`) and `generate` on top.

A step: the scheduler picks sequences, the executor launches the model and samples one token for
each sequence that completed its prompt; then, once the tokens reach the host, the scheduler
appends them and ends sequences on EOS, stop_token_ids and length, the engine records prompt
logprobs and advances the grammars of structured outputs (a completed grammar ends its sequence),
and the output processor does the per-step work of the tracked completions (logprobs, text, stop
strings; a stop string ends its sequence through the scheduler).
`generate`'s loop builds no per-step outputs: untracked completions are decoded once, at the end.

Async scheduling (`async_scheduling`, on by default on CUDA): a round schedules and launches step
N+1, then processes step N, which ran on the device meanwhile; N+1's inputs take N's tokens on the
device (placeholders: scheduler.py). At most one step is in flight between calls, none once no
request is unfinished. A token past a stop is dropped; greedy and seeded tokens are those of the
synchronous loop. A round is synchronous while an unfinished sequence needs its newest token on
the host before its next draw (inflight.py: grammars). An exception inside a round
abandons its steps: their unfinished sequences are preempted (recomputed from their known tokens).

Bad input raises ValueError / TypeError naming it before anything is queued (input_processor.py).
The public methods hold one lock, so calls from several threads run one after another (a
`generate` runs whole). `shutdown()` (also run when the engine is garbage-collected or the
interpreter exits) stops the workers and releases the GPU memory, shared memory and process
group; every later call raises RuntimeError.
"""
import functools
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Sequence as SequenceT

from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.inflight import InflightStep, RoundResults, launch_step, needs_host_tokens
from nanovllm.engine.input_processor import InputProcessor, PromptType, pair_prompts
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.engine.request import Completion, Request
from nanovllm.engine.scheduler import Scheduler, SchedulerOutput
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.structured_output import advance_grammars
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams
from nanovllm.utils.hub import resolve_model_path
from nanovllm.utils.tokenizer import (default_sampling_overrides, eos_token_ids, load_tokenizer,
                                      read_generation_config)
from nanovllm.worker.executor import Executor

logger = logging.getLogger(__name__)


def _serialized(method):
    """Run `method` holding the engine's lock, and only while the engine is not shut down."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            if self._closed:
                raise RuntimeError(f"this LLM has been shut down; create a new LLM to call {method.__name__}().")
            return method(self, *args, **kwargs)
    return wrapper


class LLMEngine:

    def __init__(self, model: str, tokenizer: str | None = None, **kwargs):
        """`model`: a local folder or a hub id; `tokenizer`: where to load the tokenizer from, when
        not from the model (a folder or a hub id). Other options: those of `Config`."""
        self._lock = threading.RLock()
        self._closed = False
        self.config = config = Config(model, **kwargs)
        self.tokenizer = None
        if not config.skip_tokenizer_init:  # before the model: a missing tokenizer fails fast
            self.tokenizer = load_tokenizer(resolve_model_path(tokenizer) if tokenizer else config.model)
        executor = Executor(config)
        try:
            num_blocks = executor.num_kvcache_blocks
            blocks_per_seq = -(-config.max_model_len // config.block_size)
            if blocks_per_seq > num_blocks:
                raise ValueError(
                    f"the KV cache holds {num_blocks} blocks of {config.block_size} tokens, fewer than "
                    f"one sequence of max_model_len={config.max_model_len} needs ({blocks_per_seq}); lower "
                    f"max_model_len or give the cache more memory.")
        except BaseException:
            executor.shutdown()
            raise
        self.executor = executor
        self._finalizer = weakref.finalize(self, executor.shutdown)
        self.eos_token_ids = eos_token_ids(config.model, config.hf_config, self.tokenizer)
        # SamplingParams overrides from generation_config.json, used when the caller gives none.
        self.default_sampling_overrides = default_sampling_overrides(read_generation_config(config.model))
        self.input_processor = InputProcessor(self.tokenizer, config.hf_config.vocab_size, config.max_model_len,
                                              self.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len, num_kvcache_blocks=num_blocks,
            block_size=config.block_size, eos_token_ids=self.eos_token_ids,
            enable_prefix_caching=config.enable_prefix_caching)
        self._requests: dict[str, Request] = {}        # unfinished requests by id
        self._completions: dict[int, Completion] = {}  # unfinished sequences by seq_id
        self._tracked: dict[int, Completion] = {}      # those of them that need per-step work
        self._guided: set[int] = set()                 # those of them with a grammar (seq_ids)
        self._sync_seqs: set[int] = set()              # those whose draws need host tokens (needs_host_tokens)
        self._pending: InflightStep | None = None     # the step in flight (async scheduling)
        self._unclaimed: list[RequestOutput] = []      # add_request outputs finished inside generate()
        self._seq_ids = itertools.count()
        self._request_counter = itertools.count()
        logger.info("engine ready: %d KV blocks of %d tokens on %s", num_blocks, config.block_size,
                    config.device_type)

    def shutdown(self):
        """Stop the workers and free the GPU memory; later calls raise RuntimeError. Waits for
        a call running in another thread to end."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with generation_config.json's temperature / top_k / top_p / min_p /
        repetition_penalty / max_new_tokens where present."""
        return SamplingParams(**self.default_sampling_overrides)

    # ---- requests --------------------------------------------------------------------------

    def _make_request(self, request_id: str, prompt: PromptType, params: SamplingParams, streamed: bool) -> Request:
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request.")
        return self.input_processor.process(request_id, prompt, params, streamed, self._seq_ids)

    def _enqueue(self, request: Request):
        self._requests[request.request_id] = request
        for completion in request.completions:
            self._completions[completion.seq.seq_id] = completion
            if completion.tracked:
                self._tracked[completion.seq.seq_id] = completion
            if completion.seq.grammar is not None:
                self._guided.add(completion.seq.seq_id)
            if needs_host_tokens(completion.seq):
                self._sync_seqs.add(completion.seq.seq_id)
            self.scheduler.add(completion.seq)

    @_serialized
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams):
        """Validate and queue one request (vLLM's signature). `step()` then reports it each step
        it progresses, or only when it finishes with `params.output_kind` FINAL_ONLY. Raises
        ValueError for an id that an unfinished request already has."""
        final_only = isinstance(params, SamplingParams) and params.output_kind is RequestOutputKind.FINAL_ONLY
        self._enqueue(self._make_request(request_id, prompt, params, streamed=not final_only))

    @_serialized
    def abort_request(self, request_id: str | Iterable[str]):
        """Drop unfinished requests, freeing their KV blocks; unknown ids are ignored."""
        request_ids = [request_id] if isinstance(request_id, str) else request_id
        if not isinstance(request_ids, Iterable):
            raise TypeError(f"request_id must be a str or an iterable of str, got {type(request_id).__name__}: "
                            f"{request_id!r:.80}")
        request_ids = list(request_ids)
        bad = next((rid for rid in request_ids if not isinstance(rid, str)), None)
        if bad is not None:
            raise TypeError(f"request_id must be a str or an iterable of str, got {type(bad).__name__}: {bad!r:.80}")
        for rid in request_ids:
            request = self._requests.pop(rid, None)
            if request is None:
                continue
            for completion in request.completions:
                if not completion.seq.is_finished:
                    self.scheduler.abort(completion.seq)
                self._completions.pop(completion.seq.seq_id, None)
                self._tracked.pop(completion.seq.seq_id, None)
                self._guided.discard(completion.seq.seq_id)
                self._sync_seqs.discard(completion.seq.seq_id)
        if self._pending is not None and not self._requests:  # every row of it is past a finish
            pending, self._pending = self._pending, None
            pending.samples.get_output()

    @_serialized
    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @_serialized
    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    @_serialized
    def is_finished(self) -> bool:
        return not self._requests and self.scheduler.is_finished()

    # ---- the loop --------------------------------------------------------------------------

    def _step(self) -> tuple[list[Request], list[Completion], int]:
        """One round of the loop (see the module's docstring). Returns the requests that finished,
        the tracked completions that got a token, and the number of tokens of the last step
        processed (positive: prefill tokens; negative: decode sequences; 0: none processed)."""
        overlap = self.config.async_scheduling and not self._sync_seqs
        previous, self._pending = self._pending, None
        scheduled = launched = None
        results = RoundResults()
        try:
            if previous is not None and not overlap:  # the next step needs its tokens on the host
                self._process(previous, results)
                previous = None
            if not self.scheduler.is_finished():
                scheduled = self.scheduler.schedule()
                if scheduled.seqs:
                    launched = launch_step(self.executor, self.scheduler, scheduled, previous)
            if previous is not None:
                self._process(previous, results)
                previous = None
            if launched is not None and not overlap:
                self._process(launched, results)
                launched = None
        except BaseException:
            touched = [step.output for step in (previous, launched) if step is not None]
            self._recover(touched + ([scheduled] if scheduled is not None else []))
            raise
        self._pending = launched
        if launched is not None and not self._requests:  # every row of it is past a finish
            self._pending = None
            launched.samples.get_output()
        return results.finished, results.progressed, results.num_tokens

    def _process(self, step: InflightStep, results: RoundResults):
        """Read a launched step's tokens (waiting for the device) and account for them."""
        sampled = step.samples.get_output()
        if step.prompt_spans:
            self.output_processor.record_step_prompt_logprobs(step.prompt_spans, sampled.prompt_logprobs,
                                                              self._completions)
        sampled_seqs = step.output.sampled_seqs
        finished = self.scheduler.update(step.output, sampled.token_ids)
        for seq in advance_grammars(sampled_seqs) if self._guided else ():
            self.scheduler.finish(seq, "stop")  # the grammar is complete, or rejected the token
            finished.append(seq)
        for row, seq in enumerate(sampled_seqs if self._tracked else ()):
            completion = self._tracked.get(seq.seq_id)
            if completion is None:  # untracked, or finished before this step (its token was dropped)
                continue
            results.progressed.append(completion)
            if self.output_processor.update(completion, sampled, row) and not seq.is_finished:
                self.scheduler.finish(seq, "stop")
                finished.append(seq)
        results.finished.extend(r for r in map(self._finish_seq, finished) if r is not None)
        results.num_tokens = step.num_tokens

    def _recover(self, outputs: list[SchedulerOutput]):
        """After an exception inside a round: abandon its steps (scheduled, launched or half
        processed). Their unfinished sequences are preempted, dropping their placeholders."""
        seqs = [seq for output in outputs for seq in output.seqs]
        preempted = self.scheduler.preempt_all(seqs)
        if preempted:
            logger.warning("a step was interrupted: %d sequences will be recomputed", len(preempted))

    def _finish_seq(self, seq: Sequence) -> Request | None:
        """Account for a finished sequence; returns its request once all its sequences are done."""
        completion = self._completions.pop(seq.seq_id)
        self._tracked.pop(seq.seq_id, None)
        self._guided.discard(seq.seq_id)
        self._sync_seqs.discard(seq.seq_id)
        request = completion.request
        request.num_unfinished -= 1
        if request.num_unfinished:
            return None
        del self._requests[request.request_id]
        return request

    @_serialized
    def step(self) -> list[RequestOutput]:
        """Run one step; returns a RequestOutput (cumulative, vLLM's default) for every request
        that got tokens in it, finished or not, and for requests added here that finished during
        a `generate` call. With async scheduling a step's tokens are reported by the next call."""
        outputs, self._unclaimed = self._unclaimed, []
        if self.scheduler.is_finished() and self._pending is None:
            return outputs
        finished, progressed, _ = self._step()
        reported = {id(r) for r in finished}
        for completion in progressed:
            request = completion.request
            if request.streamed and id(request) not in reported:
                reported.add(id(request))
                outputs.append(self.output_processor.request_output(request))
        outputs.extend(self.output_processor.request_output(r) for r in finished)
        return outputs

    @_serialized
    def generate(self, prompts: PromptType | SequenceT[PromptType],
                 sampling_params: SamplingParams | SequenceT[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; results come back in input order.

        `prompts`: one prompt or a list of them (see input_processor.py). `sampling_params`: one
        for all prompts, a list of the same length, or None for `get_default_sampling_params()`.
        Raises ValueError / TypeError on bad input before any request is queued.
        """
        pairs = pair_prompts(prompts, self.get_default_sampling_params() if sampling_params is None
                             else sampling_params)
        requests = [self._make_request(self._new_request_id(), prompt, params, streamed=False)
                    for prompt, params in pairs]
        for request in requests:
            self._enqueue(request)
        order = {id(request): i for i, request in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        num_left = len(requests)
        try:
            while num_left:
                start = time.perf_counter()
                finished, _, num_tokens = self._step()
                elapsed = time.perf_counter() - start
                if num_tokens > 0:
                    prefill_tps = num_tokens / elapsed
                elif num_tokens < 0:
                    decode_tps = -num_tokens / elapsed
                pbar.set_postfix({"Prefill": f"{int(prefill_tps)}tok/s", "Decode": f"{int(decode_tps)}tok/s"},
                                 refresh=False)
                for request in finished:
                    i = order.get(id(request))
                    if i is None:  # someone's add_request: its output waits for their next step()
                        self._unclaimed.append(self.output_processor.request_output(request))
                        continue
                    results[i] = self.output_processor.request_output(request)
                    num_left -= 1
                    pbar.update(1)
        except BaseException:
            self.abort_request([r.request_id for r in requests])  # leave the engine serving others
            raise
        finally:
            pbar.close()
        return results

    def _new_request_id(self) -> str:
        """The next counter value not used by an unfinished request."""
        while (request_id := str(next(self._request_counter))) in self._requests:
            pass
        return request_id
