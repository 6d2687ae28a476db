"""DataParallelEngine: `data_parallel_size` engine replicas on Ray (replica.py) behind `generate`.

The driver (this process) runs no model. It validates every prompt as one engine would, before
anything runs, then streams the requests to the replicas: longest first (prompt + max_tokens,
times n), each to the free replica with the least work in flight, while that replica holds less
than IN_FLIGHT_FACTOR times what it runs at once (max_num_seqs sequences, its KV cache's tokens).
A replica reports its finished requests every REPORT_INTERVAL_S and is topped up then, so its
scheduler keeps waiting work while the queue has any. Outputs come back in input order, with the
request ids one engine would give; a seeded request samples the same tokens on any replica.

A replica that dies (its actor or its node lost) is dropped with a warning naming it and the
cause, and its unfinished requests are queued again for the others; outputs arrive only with a
call that completed, so none is answered twice. Any other error aborts the call's requests on
every replica and is raised. `shutdown()` (idempotent; also at garbage collection) stops the
replicas (actors and placement groups), and Ray when this engine started it.
"""
import heapq
import itertools
import logging
import weakref
from dataclasses import dataclass
from typing import Sequence as SequenceT

import ray
import torch
from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.input_processor import InputProcessor, PromptType, TokensPrompt, pair_prompts
from nanovllm.outputs import RequestOutput
from nanovllm.ray.replica import Replica, start_replicas
from nanovllm.sampling_params import RequestOutputKind, SamplingParams
from nanovllm.utils.hub import resolve_model_path
from nanovllm.utils.tokenizer import (default_sampling_overrides, eos_token_ids, load_tokenizer,
                                      read_generation_config)

logger = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.5  # how long a replica steps before it reports finished requests
IN_FLIGHT_FACTOR = 2     # work a replica may hold, in units of what it can run at once


@dataclass(frozen=True)
class _Work:
    """One validated request, as the replicas get it."""
    request_id: str
    prompt: TokensPrompt
    params: SamplingParams  # output_kind FINAL_ONLY
    num_seqs: int           # n
    cost: int               # (prompt + max_tokens) tokens x n


class DataParallelEngine:
    """`generate`, `get_tokenizer` and `get_default_sampling_params` of an LLMEngine, over
    `data_parallel_size` replicas (`self.replicas`: those alive)."""

    def __init__(self, model: str, tokenizer: str | None = None, data_parallel_size: int = 1, **kwargs):
        """`kwargs`: LLMEngine's options, the same for every replica. Raises ValueError for a bad
        option, or when the Ray cluster lacks the GPUs / CPUs; RuntimeError when a replica fails
        to start (naming it and the cause)."""
        if not isinstance(data_parallel_size, int) or isinstance(data_parallel_size, bool) or data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be an integer >= 1, got {data_parallel_size!r}.")
        # The driver validates the options and reads the model's config and tokenizer here; a
        # driver without a GPU (the head node of a GPU cluster) leaves the device checks to the replicas.
        driver_kwargs = kwargs
        if kwargs.get("device") == "cuda" and not torch.cuda.is_available():
            driver_kwargs = {**kwargs, "device": None}
        config = Config(model, **driver_kwargs)
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(resolve_model_path(tokenizer) if tokenizer else config.model)
        self.default_sampling_overrides = default_sampling_overrides(read_generation_config(config.model))
        self.input_processor = InputProcessor(self.tokenizer, config.hf_config.vocab_size, config.max_model_len,
                                              eos_token_ids(config.model, config.hf_config, self.tokenizer))
        self.max_model_len = config.max_model_len
        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init()  # RAY_ADDRESS, else the cluster running on this machine, else a new local one
        try:
            use_gpu = _use_gpu(kwargs.get("device"), data_parallel_size, config.tensor_parallel_size)
            self.replicas: list[Replica] = start_replicas(
                data_parallel_size, model, tokenizer, kwargs if use_gpu else {**kwargs, "device": "cpu"}, use_gpu)
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self.replicas, owns_ray)
        self._request_counter = itertools.count()
        self._seq_ids = itertools.count()
        logger.info("%d data-parallel replicas on %s", len(self.replicas), [r.info.node for r in self.replicas])

    def shutdown(self):
        """Kill the replicas' actors and remove their placement groups; unusable afterwards."""
        self._finalizer()

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.default_sampling_overrides)

    def generate(self, prompts: PromptType | SequenceT[PromptType],
                 sampling_params: SamplingParams | SequenceT[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """As LLMEngine.generate: one RequestOutput per prompt, in input order; ValueError /
        TypeError on bad input before anything runs. Raises RuntimeError once every replica died."""
        if not self.replicas:
            raise RuntimeError("the data-parallel engine has no replica left (shut down, or all died).")
        pairs = pair_prompts(prompts, self.get_default_sampling_params() if sampling_params is None
                             else sampling_params)
        work = [self._work(prompt, params) for prompt, params in pairs]
        queue = [(-w.cost, i) for i, w in enumerate(work)]  # a max-heap on cost: the longest first
        heapq.heapify(queue)
        results: list[RequestOutput | None] = [None] * len(work)
        calls: dict[ray.ObjectRef, Replica] = {}  # one call in progress at most per replica
        pbar = tqdm(total=len(work), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        try:
            self._dispatch(work, queue, calls)
            while calls:
                [ref], _ = ray.wait(list(calls), num_returns=1)
                replica = calls.pop(ref)
                try:
                    outputs = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    self._drop(replica, error, work, queue)
                    outputs = []
                for output in outputs:
                    i = replica.in_flight.pop(output.request_id)
                    assert results[i] is None, f"request {output.request_id} answered twice"
                    results[i] = output
                    pbar.update(1)
                self._dispatch(work, queue, calls)
        except BaseException:
            for replica in self.replicas:  # leave the replicas serving the next call
                if replica.in_flight:
                    replica.actor.abort.remote(list(replica.in_flight))
                    replica.in_flight.clear()
            raise
        finally:
            pbar.close()
        assert not queue and all(r is not None for r in results)
        return results

    def _work(self, prompt: PromptType, params: SamplingParams) -> _Work:
        """Validate one prompt (the replicas' InputProcessor checks) and price it."""
        request_id = str(next(self._request_counter))
        request = self.input_processor.process(request_id, prompt, params, False, self._seq_ids)
        tokens = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        if request.prompt is not None:
            tokens["prompt"] = request.prompt
        max_tokens = self.max_model_len if params.max_tokens is None else params.max_tokens
        cost = min(len(request.prompt_token_ids) + max_tokens, self.max_model_len) * params.n
        return _Work(request_id, tokens, params.clone(output_kind=RequestOutputKind.FINAL_ONLY), params.n, cost)

    def _dispatch(self, work: list[_Work], queue: list[tuple[int, int]], calls: dict[ray.ObjectRef, Replica]):
        """Top up the replicas that have no call in progress, longest request first, each to the
        one with the least work in flight; start a call on each of them that holds requests."""
        busy = set(map(id, calls.values()))
        free = [r for r in self.replicas if id(r) not in busy]
        load = {id(r): [sum(work[i].num_seqs for i in r.in_flight.values()),
                        sum(work[i].cost for i in r.in_flight.values())] for r in free}
        new = {id(r): [] for r in free}
        while queue:
            i = queue[0][1]
            head = work[i]
            room = [r for r in free if _has_room(r, load[id(r)], head)]
            if not room:
                break
            replica = min(room, key=lambda r: load[id(r)][1])
            heapq.heappop(queue)
            replica.in_flight[head.request_id] = i
            load[id(replica)][0] += head.num_seqs
            load[id(replica)][1] += head.cost
            new[id(replica)].append((head.request_id, head.prompt, head.params))
        for replica in free:
            if replica.in_flight:
                calls[replica.actor.run.remote(new[id(replica)], REPORT_INTERVAL_S)] = replica

    def _drop(self, replica: Replica, error: Exception, work: list[_Work], queue: list[tuple[int, int]]):
        """Forget a dead replica and queue its unfinished requests again. Raises RuntimeError
        when it was the last."""
        self.replicas.remove(replica)
        replica.stop()
        for i in replica.in_flight.values():
            heapq.heappush(queue, (-work[i].cost, i))
        logger.warning("data-parallel replica %d (node %s) died; its %d unfinished requests go to the %d "
                       "other replicas. Cause: %s", replica.index, replica.info.node, len(replica.in_flight),
                       len(self.replicas), error)
        replica.in_flight.clear()
        if not self.replicas:
            raise RuntimeError(f"every data-parallel replica died; the last, replica {replica.index} "
                               f"(node {replica.info.node}), because: {error}") from error


def _has_room(replica: Replica, load: list[int], work: _Work) -> bool:
    """Whether `replica`, holding `load` ([sequences, cost]), may take `work` too (always, when empty)."""
    num_seqs, cost = load
    return not num_seqs or (num_seqs + work.num_seqs <= IN_FLIGHT_FACTOR * replica.info.max_num_seqs
                            and cost + work.cost <= IN_FLIGHT_FACTOR * replica.info.kv_cache_tokens)


def _use_gpu(device: str | None, data_parallel_size: int, tensor_parallel_size: int) -> bool:
    """Whether the replicas run on GPUs: yes unless device="cpu" or the cluster has none.
    Raises ValueError when the cluster has too few GPUs (or CPUs) for all replicas."""
    resources = ray.cluster_resources()
    needed = data_parallel_size * tensor_parallel_size
    use_gpu = device == "cuda" or (device is None and resources.get("GPU", 0) > 0)
    kind = "GPU" if use_gpu else "CPU"
    if resources.get(kind, 0) < needed:
        raise ValueError(f"data_parallel_size={data_parallel_size} x tensor_parallel_size={tensor_parallel_size} "
                         f"needs {needed} {kind}s, but the Ray cluster has {resources.get(kind, 0):g}.")
    return use_gpu


def _shutdown(replicas: list[Replica], owns_ray: bool):
    if not ray.is_initialized():  # Ray already shut down: the actors went with it
        return
    for replica in replicas:
        replica.stop()
    replicas.clear()
    if owns_ray:
        ray.shutdown()
