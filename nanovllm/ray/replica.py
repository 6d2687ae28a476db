"""One data-parallel replica: an LLMEngine inside a Ray actor, on its own placement group.

A replica's resources are one placement-group bundle, so one node: `tensor_parallel_size` GPUs
and as many CPUs, or `tensor_parallel_size` CPUs for a CPU engine. Its tensor-parallel ranks are
the engine's own spawned processes, which inherit the actor's CUDA_VISIBLE_DEVICES.

`EngineReplica.run` adds requests (FINAL_ONLY, so nothing is built per step) and steps the engine
for about `duration_s`, returning only the requests that finished; the engine keeps the others,
so its batch stays full from one call to the next. `Replica.stop()` (idempotent) kills the actor
and removes its placement group.
"""
import socket
import time
from dataclasses import dataclass, field

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nanovllm.engine.input_processor import PromptType
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams

PLACEMENT_TIMEOUT_S = 300  # how long a replica may wait for its GPUs / CPUs to become free


@dataclass(frozen=True)
class ReplicaInfo:
    """What a started replica reports: where it runs and how much it can run at once."""
    node: str
    max_num_seqs: int
    kv_cache_tokens: int  # KV-cache blocks x tokens per block


class EngineReplica:
    """The actor's body (made remote by `start_replicas`)."""

    def __init__(self, model: str, tokenizer: str | None, engine_kwargs: dict):
        self.engine = LLMEngine(model, tokenizer=tokenizer, **engine_kwargs)

    def info(self) -> ReplicaInfo:
        config = self.engine.config
        return ReplicaInfo(socket.gethostname(), config.max_num_seqs,
                           self.engine.executor.num_kvcache_blocks * config.kvcache_block_size)

    def run(self, requests: list[tuple[str, PromptType, SamplingParams]], duration_s: float) -> list[RequestOutput]:
        """Queue `requests` (request_id, prompt, params), step for about `duration_s` or until
        nothing is left, and return the outputs of the requests that finished meanwhile."""
        for request_id, prompt, params in requests:
            self.engine.add_request(request_id, prompt, params)
        finished = []
        deadline = time.monotonic() + duration_s
        while self.engine.has_unfinished_requests() and time.monotonic() < deadline:
            finished.extend(output for output in self.engine.step() if output.finished)
        return finished

    def abort(self, request_ids: list[str]):
        self.engine.abort_request(request_ids)


@dataclass(eq=False)
class Replica:
    """The driver's handle on one replica, and the requests it holds (request_id -> input index)."""
    index: int
    actor: ActorHandle
    placement_group: PlacementGroup
    info: ReplicaInfo | None = None
    in_flight: dict[str, int] = field(default_factory=dict)

    def stop(self):
        ray.kill(self.actor, no_restart=True)
        remove_placement_group(self.placement_group)


def start_replicas(count: int, model: str, tokenizer: str | None, engine_kwargs: dict,
                   use_gpu: bool) -> list[Replica]:
    """Start `count` replicas, each on its own placement group, and wait until all are ready.
    A given `distributed_port` becomes port + replica index (replicas may share a node). Raises
    RuntimeError naming the replica and the cause when one cannot be placed or started (the
    others are stopped first)."""
    tp = engine_kwargs.get("tensor_parallel_size", 1)
    port = engine_kwargs.get("distributed_port")
    bundle = {"GPU": tp, "CPU": tp} if use_gpu else {"CPU": tp}
    groups = [placement_group([bundle], strategy="STRICT_PACK") for _ in range(count)]
    actor_cls = ray.remote(EngineReplica)
    replicas = []
    try:
        for index, group in enumerate(groups):
            if not group.wait(PLACEMENT_TIMEOUT_S):
                raise RuntimeError(f"data-parallel replica {index} could not get {bundle} within "
                                   f"{PLACEMENT_TIMEOUT_S}s; the Ray cluster has {ray.available_resources()} free.")
        for index, group in enumerate(groups):
            kwargs = engine_kwargs if port is None else {**engine_kwargs, "distributed_port": port + index}
            actor = actor_cls.options(
                num_cpus=tp, num_gpus=tp if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
            ).remote(model, tokenizer, kwargs)
            replicas.append(Replica(index, actor, group))
        infos = [replica.actor.info.remote() for replica in replicas]
        for replica, info in zip(replicas, infos):
            try:
                replica.info = ray.get(info)
            except ray.exceptions.RayActorError as error:
                raise RuntimeError(f"data-parallel replica {replica.index} failed to start: {error}") from error
    except BaseException:
        for replica in replicas:
            replica.stop()
        for group in groups[len(replicas):]:
            remove_placement_group(group)
        raise
    return replicas
