"""LLMEngine: vLLM's request loop (`add_request`, `step`, `abort_request`) and `generate` on top.

Requests and sequences: a request (`request_id`: the caller's string, or a counter that
`generate` assigns) owns `n` Sequences, one per completion, each holding the whole prompt; the
prefix cache then shares the prompt's full KV blocks among them. With a seed, completion i
draws its noise with the seed `seed + i`.

A step: the scheduler picks sequences, the ModelRunner samples one token for each sequence that
completed its prompt, the scheduler appends the tokens and ends sequences on EOS, stop_token_ids
and length. Per-step Python work beyond that is done only for *tracked* completions: those that
want logprobs, have stop strings (incremental detokenization; a hit ends the sequence through the
scheduler), or belong to a request given to `add_request` (whose `step()` outputs carry text every
step). All other completions are decoded once, when they finish, so `generate`'s loop builds no
per-step outputs.

Bad input (prompt, sampling params, request id) raises ValueError / TypeError naming it before
anything is queued, so requests already in flight are not disturbed. `shutdown()` (also run when
the engine is garbage-collected or the interpreter exits) stops the workers and releases the GPU
memory, shared memory and process group.
"""
import itertools
import logging
import multiprocessing as mp
import os
import time
import uuid
import weakref
from dataclasses import dataclass, field
from multiprocessing.shared_memory import SharedMemory
from typing import Iterable, Sequence as SequenceT, TypedDict, Union

from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.model_runner import SHM_SIZE, ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import SampledTokens
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.detokenizer import IncrementalDetokenizer, check_stop_strings
from nanovllm.utils.hub import resolve_model_path
from nanovllm.utils.parallel import find_free_port
from nanovllm.utils.tokenizer import (default_sampling_overrides, eos_token_ids, load_tokenizer,
                                      read_generation_config)

logger = logging.getLogger(__name__)


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]
    prompt: str  # optional: the text the ids came from, reported as RequestOutput.prompt


PromptType = Union[str, list[int], TextPrompt, TokensPrompt]
WORKER_JOIN_TIMEOUT_S = 30
MAX_LOGPROBS = 20  # vLLM's default max_logprobs


@dataclass(eq=False)
class _Completion:
    """Engine-side state of one completion (one Sequence) of a request."""
    request: "_Request"
    index: int
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None = None  # tracked completions that need text per step
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    stopped_by_string: bool = False


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    streamed: bool  # added through add_request: step() reports it every step
    completions: list[_Completion] = field(default_factory=list)
    num_unfinished: int = 0


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


def _is_token_ids(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class LLMEngine:

    def __init__(self, model: str, tokenizer: str | None = None, **kwargs):
        """`model`: a local folder or a hub id; `tokenizer`: where to load the tokenizer from, when
        not from the model (a folder or a hub id). Other options: those of `Config`."""
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
            self.tokenizer = None
            if not config.skip_tokenizer_init:
                self.tokenizer = load_tokenizer(resolve_model_path(tokenizer) if tokenizer else config.model)
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
        # SamplingParams overrides from generation_config.json, used when the caller gives none.
        self.default_sampling_overrides = default_sampling_overrides(read_generation_config(config.model))
        self.vocab_size = config.hf_config.vocab_size
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len, num_kvcache_blocks=num_blocks,
            block_size=config.kvcache_block_size, eos_token_ids=self.eos_token_ids,
            enable_prefix_caching=config.enable_prefix_caching)
        self._requests: dict[str, _Request] = {}      # unfinished requests by id
        self._completions: dict[int, _Completion] = {}  # unfinished sequences by seq_id
        self._tracked: dict[int, _Completion] = {}      # those of them that need per-step work
        self._unclaimed: list[RequestOutput] = []       # add_request outputs finished inside generate()
        self._seq_ids = itertools.count()
        self._request_counter = itertools.count()
        logger.info("engine ready: %d KV blocks of %d tokens on %s", num_blocks, config.kvcache_block_size,
                    config.device_type)

    def shutdown(self):
        """Stop the workers and free the GPU memory; the engine is unusable afterwards."""
        self._finalizer()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with generation_config.json's temperature / top_k / top_p / min_p /
        repetition_penalty / max_new_tokens where present."""
        return SamplingParams(**self.default_sampling_overrides)

    # ---- requests --------------------------------------------------------------------------

    def _prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of one prompt, validated."""
        text = None
        if isinstance(prompt, dict):
            unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
            if unknown:
                raise ValueError(f"prompt dict has unsupported keys {unknown}; use 'prompt' or 'prompt_token_ids'.")
            if "prompt_token_ids" in prompt:
                text, prompt = prompt.get("prompt"), prompt["prompt_token_ids"]
                if not _is_token_ids(prompt):
                    raise TypeError(f"prompt_token_ids must be a list of ints, got {prompt!r:.80}")
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
                if not isinstance(prompt, str):
                    raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r:.80}")
            else:
                raise ValueError("prompt dict needs a 'prompt' or a 'prompt_token_ids' key, got {}.")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt was given as text, but skip_tokenizer_init=True: pass token ids.")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif _is_token_ids(prompt):
            token_ids = list(prompt)
        else:
            raise TypeError(f"prompt must be a str, a list of token ids, {{'prompt': str}} or "
                            f"{{'prompt_token_ids': [...]}}, got {type(prompt).__name__}: {prompt!r:.80}")
        if not token_ids:
            raise ValueError(f"prompt is empty: {prompt!r}.")
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size}).")
        return text, token_ids

    def _make_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                      streamed: bool) -> _Request:
        """A validated request and its sequences; nothing is queued yet."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}: {request_id!r}.")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request.")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}.")
        if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
            raise ValueError(f"Requested sample logprobs of {params.logprobs}, which is greater than max "
                             f"allowed: {MAX_LOGPROBS}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {params.stop!r} need a tokenizer, but skip_tokenizer_init=True.")
        text, token_ids = self._prompt(prompt)
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens:]
        if len(token_ids) > self.config.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens, more than max_model_len="
                             f"{self.config.max_model_len}.")
        request = _Request(request_id, text, token_ids, params, streamed, num_unfinished=params.n)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        needs_text = (streamed or params.stop) and params.detokenize and self.tokenizer is not None
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            seq = Sequence(next(self._seq_ids), token_ids, params, seed=seed, all_stop_token_ids=stop_ids)
            detokenizer = (IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
                           if needs_text else None)
            logprobs = [] if params.logprobs is not None else None
            request.completions.append(_Completion(request, index, seq, detokenizer, logprobs,
                                                   None if logprobs is None else 0.0))
        return request

    def _enqueue(self, request: _Request):
        self._requests[request.request_id] = request
        for completion in request.completions:
            seq = completion.seq
            self._completions[seq.seq_id] = completion
            if request.streamed or completion.detokenizer is not None or completion.logprobs is not None:
                self._tracked[seq.seq_id] = completion
            self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams):
        """Validate and queue one request (vLLM's signature). `step()` then reports it each step
        it progresses. Raises ValueError for an id that an unfinished request already has."""
        self._enqueue(self._make_request(request_id, prompt, params, streamed=True))

    def abort_request(self, request_id: str | Iterable[str]):
        """Drop unfinished requests, freeing their KV blocks; unknown ids are ignored."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            request = self._requests.pop(rid, None)
            if request is None:
                continue
            for completion in request.completions:
                if not completion.seq.is_finished:
                    self.scheduler.abort(completion.seq)
                self._completions.pop(completion.seq.seq_id, None)
                self._tracked.pop(completion.seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def is_finished(self) -> bool:
        return not self._requests and self.scheduler.is_finished()

    # ---- the loop --------------------------------------------------------------------------

    def _step(self) -> tuple[list[_Request], list[_Completion], int]:
        """One schedule -> run -> postprocess round. Returns the requests that finished, the
        tracked completions that got a token, and the number of tokens computed (positive:
        prefill tokens; negative: decode sequences)."""
        output = self.scheduler.schedule()
        num_tokens = (sum(seq.num_scheduled_tokens for seq in output.seqs) if output.is_prefill
                      else -len(output.seqs))
        sampled_seqs = output.seqs
        if self._tracked and output.is_prefill:  # rows are the sequences whose prompt completes
            sampled_seqs = [seq for seq in output.seqs if seq.is_prefill_complete_after_step]
        sampled = self.model_runner.run(output.seqs, output.is_prefill)
        finished = self.scheduler.update(output, sampled.token_ids)
        progressed = self._track(sampled_seqs, sampled, finished) if self._tracked else []
        return [r for r in map(self._finish_seq, finished) if r is not None], progressed, num_tokens

    def _track(self, seqs: list[Sequence], sampled: SampledTokens, finished: list[Sequence]) -> list[_Completion]:
        """Per-step work of the tracked completions among `seqs` (row i of `sampled` is seqs[i]):
        logprobs, incremental text, stop strings. Appends sequences it stops to `finished`."""
        progressed = []
        for row, seq in enumerate(seqs):
            completion = self._tracked.get(seq.seq_id)
            if completion is None:
                continue
            progressed.append(completion)
            params = completion.request.params
            if completion.logprobs is not None:
                self._record_logprobs(completion, sampled, row)
            detokenizer = completion.detokenizer
            stopped_by_token = seq.finish_reason == "stop"
            if detokenizer is None or (stopped_by_token and not params.include_stop_str_in_output):
                continue
            new_chars = detokenizer.update([seq.last_token])
            if not params.stop or stopped_by_token or seq.num_completion_tokens <= params.min_tokens:
                continue
            hit = check_stop_strings(detokenizer.output_text, new_chars, params.stop,
                                     params.include_stop_str_in_output)
            if hit is None:
                continue
            seq.stop_reason, cut = hit
            detokenizer.output_text = detokenizer.output_text[:cut]
            completion.stopped_by_string = True
            if seq.is_finished:  # by length in this very step: the stop string wins, as in vLLM
                seq.finish_reason = "stop"
            else:
                self.scheduler.finish(seq, "stop")
                finished.append(seq)
        return progressed

    def _record_logprobs(self, completion: _Completion, sampled: SampledTokens, row: int):
        token_ids, logprobs = sampled.logprob_token_ids[row], sampled.logprobs[row]
        k = completion.request.params.logprobs
        entry = {token_ids[0]: Logprob(logprobs[0], sampled.ranks[row], self._token_text(token_ids[0]))}
        for rank, (token_id, logprob) in enumerate(zip(token_ids[1:k + 1], logprobs[1:k + 1]), 1):
            if token_id not in entry:
                entry[token_id] = Logprob(logprob, rank, self._token_text(token_id))
        completion.logprobs.append(entry)
        completion.cumulative_logprob += logprobs[0]

    def _token_text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _finish_seq(self, seq: Sequence) -> _Request | None:
        """Account for a finished sequence; returns its request once all its sequences are done."""
        completion = self._completions.pop(seq.seq_id)
        self._tracked.pop(seq.seq_id, None)
        request = completion.request
        request.num_unfinished -= 1
        if request.num_unfinished:
            return None
        del self._requests[request.request_id]
        return request

    def _completion_output(self, completion: _Completion) -> CompletionOutput:
        seq, params = completion.seq, completion.request.params
        token_ids = seq.completion_token_ids
        if completion.stopped_by_string:
            text = completion.detokenizer.output_text
        elif seq.is_finished and params.detokenize and self.tokenizer is not None:
            stop_token = seq.finish_reason == "stop" and not params.include_stop_str_in_output
            text = self.tokenizer.decode(token_ids[:-1] if stop_token else token_ids,
                                         skip_special_tokens=params.skip_special_tokens)
        elif completion.detokenizer is not None:  # in progress: hold back what may start a stop string
            text = completion.detokenizer.output_text
            if params.stop and not params.include_stop_str_in_output:
                text = text[:max(0, len(text) - (max(map(len, params.stop)) - 1))]
        else:
            text = ""
        return CompletionOutput(completion.index, text, token_ids, completion.cumulative_logprob,
                                completion.logprobs, seq.finish_reason, seq.stop_reason)

    def _request_output(self, request: _Request) -> RequestOutput:
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             [self._completion_output(c) for c in request.completions],
                             finished=request.num_unfinished == 0,
                             num_cached_tokens=request.completions[0].seq.num_prefix_cached_tokens)

    def step(self) -> list[RequestOutput]:
        """Run one step; returns a RequestOutput (cumulative, vLLM's default) for every request
        that got tokens in it, finished or not, and for requests added here that finished during
        a `generate` call."""
        outputs, self._unclaimed = self._unclaimed, []
        if self.scheduler.is_finished():
            return outputs
        finished, progressed, _ = self._step()
        reported = {id(r) for r in finished}
        for completion in progressed:
            request = completion.request
            if id(request) not in reported:
                reported.add(id(request))
                outputs.append(self._request_output(request))
        outputs.extend(self._request_output(r) for r in finished)
        return outputs

    def generate(self, prompts: PromptType | SequenceT[PromptType],
                 sampling_params: SamplingParams | SequenceT[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; results come back in input order.

        `prompts`: one prompt (a str, a list of token ids, {"prompt": str} or
        {"prompt_token_ids": [...]}) or a list of them. `sampling_params`: one for all prompts, a
        list of the same length, or None for `get_default_sampling_params()`. Raises ValueError /
        TypeError on bad input before any request is queued.
        """
        if isinstance(prompts, (str, dict)) or (_is_token_ids(prompts) and prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}: "
                            f"{prompts!r:.80}")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts; "
                                 f"pass one SamplingParams or one per prompt.")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        requests = [self._make_request(self._new_request_id(), p, sp, streamed=False)
                    for p, sp in zip(prompts, params_list)]
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
                else:
                    decode_tps = -num_tokens / elapsed
                pbar.set_postfix({"Prefill": f"{int(prefill_tps)}tok/s", "Decode": f"{int(decode_tps)}tok/s"},
                                 refresh=False)
                for request in finished:
                    i = order.get(id(request))
                    if i is None:  # someone's add_request: its output waits for their next step()
                        self._unclaimed.append(self._request_output(request))
                        continue
                    results[i] = self._request_output(request)
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
