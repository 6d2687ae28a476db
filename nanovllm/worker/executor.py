"""The executor: rank 0's ModelRunner in this process, ranks 1..N-1 in spawned processes.

Each step, rank 0 turns the scheduled sequences into one `StepInput` (host lists), hands it to
the workers through shared memory (one pickle, one event per worker), runs its own shard and
samples. Only the step's inputs travel: what sampling needs of the sequences (and the targets of
prompt logprobs) stays on rank 0.
`shutdown()` (idempotent) stops the workers and frees the GPU memory, shared memory and process
group.
"""
import logging
import multiprocessing as mp
import os
import pickle
import uuid
from multiprocessing.shared_memory import SharedMemory
from multiprocessing.synchronize import Event
from typing import Any

from nanovllm.config import Config
from nanovllm.sample.sampler import SampledTokens
from nanovllm.utils.parallel import find_free_port
from nanovllm.worker.inputs import ScheduledSequence, prepare_step, prompt_logprobs_targets
from nanovllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

SHM_SIZE = 1 << 24  # bytes of the rank-0 -> workers command buffer
WORKER_JOIN_TIMEOUT_S = 30
WORKER_POLL_S = 1.0  # how often an idle worker checks that rank 0 is alive
_LEN_BYTES = 4


def _write(shm: SharedMemory, method: str, args: tuple):
    data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
    if _LEN_BYTES + len(data) > SHM_SIZE:
        raise RuntimeError(f"step input of {len(data)} bytes exceeds the {SHM_SIZE}-byte worker channel")
    shm.buf[:_LEN_BYTES] = len(data).to_bytes(_LEN_BYTES, "little")
    shm.buf[_LEN_BYTES:_LEN_BYTES + len(data)] = data


def _read(shm: SharedMemory) -> tuple[str, tuple]:
    size = int.from_bytes(shm.buf[:_LEN_BYTES], "little")
    return pickle.loads(shm.buf[_LEN_BYTES:_LEN_BYTES + size])


def _worker_main(config: Config, rank: int, port: int, shm_name: str, event: Event):
    """Ranks 1..N-1: run what rank 0 sends until it sends "exit" (or dies)."""
    runner = ModelRunner(config, rank, port)
    shm = SharedMemory(name=shm_name)
    parent = os.getppid()
    try:
        while True:
            while not event.wait(timeout=WORKER_POLL_S):
                if os.getppid() != parent:  # rank 0 died without telling us
                    return
            event.clear()
            method, args = _read(shm)
            if method == "exit":
                return
            getattr(runner, method)(*args)
    finally:
        shm.close()
        runner.exit()


class Executor:

    def __init__(self, config: Config):
        self.block_size = config.kvcache_block_size
        self.workers: list[mp.Process] = []
        self.events: list[Event] = []
        self.shm: SharedMemory | None = None
        self.runner: ModelRunner | None = None
        try:
            port = config.distributed_port or find_free_port()
            if config.tensor_parallel_size > 1:
                self.shm = SharedMemory(name=f"nanovllm_{os.getpid()}_{uuid.uuid4().hex[:12]}", create=True,
                                        size=SHM_SIZE)
                ctx = mp.get_context("spawn")
                for rank in range(1, config.tensor_parallel_size):
                    event = ctx.Event()
                    process = ctx.Process(target=_worker_main, args=(config, rank, port, self.shm.name, event))
                    process.start()
                    self.workers.append(process)
                    self.events.append(event)
            self.runner = ModelRunner(config, 0, port)
        except BaseException:
            self.shutdown()
            raise

    @property
    def num_kvcache_blocks(self) -> int:
        return self.runner.num_kvcache_blocks

    def _call_workers(self, method: str, *args: Any):
        if self.workers:
            _write(self.shm, method, args)
            for event in self.events:
                event.set()

    def execute(self, seqs: list[ScheduledSequence], is_prefill: bool) -> SampledTokens:
        """Run one step on every rank; one sampled token per sequence that completes its prompt in
        this step (every sequence of a decode step), in `seqs` order, and the prompt logprobs
        rows of the sequences that need them (see worker/inputs.py)."""
        step = prepare_step(seqs, is_prefill, self.block_size)
        self._call_workers("execute_model", step)
        targets = prompt_logprobs_targets(seqs) if step.prompt_logprobs_indices else None
        output = self.runner.execute_model(step, targets)
        sampled = [seq for seq in seqs if seq.is_prefill_complete_after_step] if is_prefill else seqs
        return self.runner.sample(output, sampled)

    def shutdown(self):
        """Stop the workers, release the model runner and the shared memory; idempotent."""
        if self.runner is not None:
            try:
                self._call_workers("exit")
                self.runner.exit()
            except Exception:  # a dead worker must not stop the rest of the cleanup
                logger.exception("error while stopping the model runner")
            self.runner = None
        for process in self.workers:
            process.join(WORKER_JOIN_TIMEOUT_S)
            if process.is_alive():
                logger.warning("worker %s did not exit; terminating it", process.pid)
                process.terminate()
                process.join()
        self.workers.clear()
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None
