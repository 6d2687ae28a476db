"""The executor: rank 0's ModelRunner in this process, ranks 1..N-1 in spawned processes.

Each step, rank 0 turns the scheduled sequences into one `StepInput` (host lists), writes it to
shared memory (one pickle, into the half of the buffer the previous step did not use) and rings
each worker's doorbell (one byte down its own pipe: which half), runs its own shard and samples.
Two halves, because with async scheduling rank 0 writes step N+1 while a worker may still be
reading step N; it has read step N-1, whose collectives rank 0 waited for. Only the step's inputs travel: what sampling needs of the sequences (and the targets
of prompt logprobs) stays on rank 0. The engine's ranks form their own group (utils/parallel.py), over a store of their own.

Faults end in errors, never hangs. A worker that died breaks its doorbell pipe and closes its
connections, so the next step fails at once; a live worker that stops answering fails the step's
collective after its timeout. The error (RuntimeError) names the rank and how it exited, and every
later step raises it again: the ranks are out of step, so the user makes a new LLM. Workers ignore
SIGINT (Ctrl-C is rank 0's to handle); an interrupt in the middle of a step also ends the executor.
A worker leaves when its doorbell pipe closes (rank 0 shut down or died). `shutdown()` is
idempotent and always returns: the workers are asked to leave, terminated if they do not, and the
shared memory and the group are released.
"""
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import uuid
from collections.abc import Mapping
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory

from nanovllm.config import Config
from nanovllm.utils.parallel import SINGLE_RANK, connect_store, create_store, join_group, ranks_ready
from nanovllm.worker.async_output import AsyncSampledTokens
from nanovllm.worker.cascade import CascadePlanner, cascade_policy
from nanovllm.worker.inputs import ScheduledSequence, StepInput, prepare_step, prompt_logprobs_targets
from nanovllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

SHM_SIZE = 1 << 24  # bytes of each half of the rank-0 -> workers step buffer
WORKER_JOIN_TIMEOUT_S = 10  # a worker asked to leave that is still there after this is terminated
WORKER_EXIT_GRACE_S = 2.0  # after a failed step, how long a crashing worker gets to exit (to be named)
_POLL_S = 0.05
_LEN_BYTES = 4


def _write(shm: SharedMemory, half: int, step: StepInput):
    data = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
    if _LEN_BYTES + len(data) > SHM_SIZE:
        raise RuntimeError(f"step input of {len(data)} bytes exceeds the {SHM_SIZE}-byte worker channel")
    start = half * SHM_SIZE
    shm.buf[start:start + _LEN_BYTES] = len(data).to_bytes(_LEN_BYTES, "little")
    shm.buf[start + _LEN_BYTES:start + _LEN_BYTES + len(data)] = data


def _read(shm: SharedMemory, half: int) -> StepInput:
    start = half * SHM_SIZE
    size = int.from_bytes(shm.buf[start:start + _LEN_BYTES], "little")
    return pickle.loads(shm.buf[start + _LEN_BYTES:start + _LEN_BYTES + size])


def _worker_main(config: Config, rank: int, port: int, shm_name: str, doorbell: Connection):
    """Ranks 1..N-1: run each step rank 0 announces, until the doorbell pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    store = connect_store(port, config.tensor_parallel_size)
    group = join_group(store, rank, config.tensor_parallel_size, config.device_type)
    runner = ModelRunner(config, group)
    shm = SharedMemory(name=shm_name)
    try:
        while True:
            try:
                half = doorbell.recv_bytes()[0]
            except EOFError:  # rank 0 shut down or died
                return
            runner.execute_model(_read(shm, half))
    finally:
        shm.close()
        runner.exit()
        group.destroy()


def _exit_status(process: BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Executor:

    def __init__(self, config: Config):
        self.block_size = config.block_size
        policy = cascade_policy(config)
        self.cascade = CascadePlanner(policy) if policy is not None else None  # None: decode steps never cascade
        self.workers: list[BaseProcess] = []
        self.doorbells: list[Connection] = []
        self.shm: SharedMemory | None = None
        self.shm_half = 0  # the half of `shm` the next step is written to
        self.tp_group = SINGLE_RANK
        self.runner: ModelRunner | None = None
        self.failure: str | None = None  # set once a step failed: why the executor cannot go on
        try:
            size = config.tensor_parallel_size
            if size > 1:
                store = create_store(config.distributed_port, size)
                self.shm = SharedMemory(name=f"nanovllm_{os.getpid()}_{uuid.uuid4().hex[:12]}", create=True,
                                        size=2 * SHM_SIZE)
                ctx = mp.get_context("spawn")
                for rank in range(1, size):
                    receiver, sender = ctx.Pipe(duplex=False)
                    process = ctx.Process(target=_worker_main, name=f"nanovllm-tp-rank{rank}",
                                          args=(config, rank, store.port, self.shm.name, receiver))
                    process.start()
                    receiver.close()  # the worker holds the only read end: its death breaks the pipe
                    self.workers.append(process)
                    self.doorbells.append(sender)
                self._wait_for_workers(store, size)
                self.tp_group = join_group(store, 0, size, config.device_type)
            self.runner = ModelRunner(config, self.tp_group)
        except BaseException as e:
            dead = self._dead_worker(WORKER_EXIT_GRACE_S) if isinstance(e, RuntimeError) else None
            self._release(terminate=True)  # workers still building would wait for rank 0 in vain
            if dead is not None:  # a collective failed because a worker died: name the worker
                raise RuntimeError(f"{dead} while the engine was being built (its own error, if any, "
                                   f"is printed above).") from e
            raise

    @property
    def num_kvcache_blocks(self) -> int:
        return self.runner.num_kvcache_blocks

    def _wait_for_workers(self, store, size: int):
        """Until every worker reached the rendezvous; RuntimeError naming one that exited first."""
        while not ranks_ready(store, size):
            dead = self._dead_worker(_POLL_S)
            if dead is not None:
                raise RuntimeError(f"{dead} while starting (its own error, if any, is printed above).")

    def _dead_worker(self, wait_s: float) -> str | None:
        """'tensor-parallel worker rank R (pid P) exited ...' for the first worker that has exited,
        waiting up to `wait_s` for one to; None if all are alive (or there are none)."""
        if not self.workers:
            return None
        ended = wait([process.sentinel for process in self.workers], timeout=wait_s)
        for rank, process in enumerate(self.workers, 1):
            if process.sentinel in ended:
                process.join()  # reaped, for its exit code
                return f"tensor-parallel worker rank {rank} (pid {process.pid}) {_exit_status(process)}"
        return None

    def execute(self, seqs: list[ScheduledSequence], is_prefill: bool,
                prev_sampled: Mapping[int, int] | None = None) -> AsyncSampledTokens:
        """Launch one step on every rank; one sampled token per sequence that completes its prompt
        in this step (every sequence of a decode step), in `seqs` order, and the prompt logprobs
        rows of the sequences that need them (see worker/inputs.py), on their way to the host.
        `prev_sampled`: seq_id -> row in the step launched just before, for the sequences whose
        input token is a placeholder (async scheduling). RuntimeError when a rank failed, in this
        step or an earlier one."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        step = prepare_step(seqs, is_prefill, self.block_size, prev_sampled, self.cascade)
        targets = prompt_logprobs_targets(seqs) if step.prompt_logprobs_indices else None
        if self.workers:
            _write(self.shm, self.shm_half, step)
            try:
                for doorbell in self.doorbells:
                    doorbell.send_bytes(bytes([self.shm_half]))  # BrokenPipeError: that worker is gone
                self.shm_half = 1 - self.shm_half
                output = self.runner.execute_model(step, targets)
            except BaseException as e:
                self.failure = self._failure(e)
                if isinstance(e, Exception):
                    raise RuntimeError(self.failure) from e
                raise  # KeyboardInterrupt, SystemExit: as they are; later steps raise the failure
        else:
            output = self.runner.execute_model(step, targets)
        sampled = [seq for seq in seqs if seq.is_prefill_complete_after_step] if is_prefill else seqs
        return self.runner.sample(output, sampled, prev_sampled)

    def _failure(self, cause: BaseException) -> str:
        """Why the executor cannot go on after `cause` interrupted a step."""
        todo = "this LLM cannot continue: call shutdown() and create a new LLM"
        dead = self._dead_worker(WORKER_EXIT_GRACE_S if isinstance(cause, Exception) else 0)
        if dead is not None:
            return f"{dead}; {todo} (the worker's own error, if any, is printed above)."
        what = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        return f"a tensor-parallel step failed or was interrupted on rank 0 ({what}), so the ranks are out of step; {todo}."

    def shutdown(self):
        """Stop the workers, release the model runner, the group and the shared memory; idempotent."""
        self._release(terminate=self.failure is not None)

    def _release(self, terminate: bool):
        """`terminate`: the workers may be stuck (in a collective, in their build): no waiting."""
        if self.runner is not None:
            try:
                self.runner.exit()
            except Exception:  # the rest of the cleanup must still run
                logger.exception("error while releasing the model runner")
            self.runner = None
        for doorbell in self.doorbells:  # a waiting worker sees EOF and leaves
            doorbell.close()
        self.doorbells.clear()
        group, self.tp_group = self.tp_group, SINGLE_RANK
        closing = None
        if not terminate and self.workers:
            # A leaving worker closes the group, and NCCL's shutdown waits for every rank: rank 0
            # closes its side meanwhile, on a thread, so that neither waits for the other to go first
            closing = threading.Thread(target=group.destroy, name="nanovllm-tp-close", daemon=True)
            closing.start()
        deadline = time.monotonic() + (0 if terminate else WORKER_JOIN_TIMEOUT_S)
        for process in self.workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                if not terminate:
                    logger.warning("worker %s did not exit; terminating it", process.pid)
                process.terminate()
                process.join(WORKER_JOIN_TIMEOUT_S)
                if process.is_alive():
                    process.kill()
                    process.join()
        self.workers.clear()
        if closing is None:
            group.destroy(abort=terminate)
        else:
            closing.join(WORKER_JOIN_TIMEOUT_S)
            if closing.is_alive():  # a daemon thread: it does not keep the process from exiting
                logger.warning("the tensor-parallel group did not close in %s s; leaving it", WORKER_JOIN_TIMEOUT_S)
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None
