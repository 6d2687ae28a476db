"""Tensor-parallel groups: each engine owns one, and the layers see it through a scoped context.

A `TensorParallelGroup` is one engine's ranks over its own TCPStore and its own gloo (CPU) or
NCCL (GPU) backend object; nothing goes through torch.distributed's process-wide default group,
so engines of any sizes can live in one process (and next to a user's own default group).
With one rank there is no backend and every collective is the identity.

The model runner enters `with tensor_parallel_group(group):` while it builds the model and around
each forward; `tp_rank()`, `tp_size()`, `all_reduce()` and `gather_to_rank0()` read that group,
and outside any such block they see a single rank. The context is a ContextVar: per thread.
"""
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta

import torch
import torch.distributed as dist

# A collective that waits longer than this for a live but unresponsive rank fails (a dead rank's
# closed connection fails it at once). On the GPU, NCCL's watchdog enforces it.
GLOO_TIMEOUT_S = 60
NCCL_TIMEOUT_S = 600
# How long the store waits for a rank to join (the spawned ranks start Python and import torch).
RENDEZVOUS_TIMEOUT_S = 300
_READY_KEY = "ready/{}"


class TensorParallelGroup:
    """`rank` of `size` ranks; `backend` is a torch ProcessGroupGloo / ProcessGroupNCCL (None when
    size == 1). Collectives are in place and return their input (rank 0's output for gather)."""

    def __init__(self, rank: int = 0, size: int = 1, backend=None):
        assert (size == 1) == (backend is None)
        self.rank, self.size, self.backend = rank, size, backend

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.size > 1:
            opts = dist.AllreduceOptions()
            opts.reduceOp = op
            self.backend.allreduce([x], opts).wait()
        return x

    def gather_to_rank0(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Every rank's shard of `x` concatenated along `dim` on rank 0; None on the other ranks."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        opts = dist.GatherOptions()
        opts.rootRank = 0
        self.backend.gather([parts] if parts else [], [x], opts).wait()
        return torch.cat(parts, dim) if parts else None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x` (same shape and dtype on each)."""
        if self.size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = 0, 0
            self.backend.broadcast([x], opts).wait()
        return x

    def barrier(self, device: torch.device):
        self.all_reduce(torch.zeros(1, device=device))

    def destroy(self, abort: bool = False):
        """Close the backend's connections; the group is unusable afterwards. `abort`: a rank
        failed, so collectives may be pending: drop them rather than wait for them."""
        if self.backend is not None:
            self.backend.abort() if abort else self.backend.shutdown()
            self.backend = None


SINGLE_RANK = TensorParallelGroup()
_current: ContextVar[TensorParallelGroup] = ContextVar("tensor_parallel_group", default=SINGLE_RANK)


@contextmanager
def tensor_parallel_group(group: TensorParallelGroup):
    """Make `group` the one that tp_rank / tp_size / the collectives read, inside the block."""
    token = _current.set(group)
    try:
        yield group
    finally:
        _current.reset(token)


def tp_rank() -> int:
    return _current.get().rank


def tp_size() -> int:
    return _current.get().size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    return _current.get().all_reduce(x)


def gather_to_rank0(x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
    """Concatenate every rank's shard along `dim` on rank 0; other ranks get None."""
    return _current.get().gather_to_rank0(x, dim)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) must be divisible by tensor_parallel_size ({denominator}).")
    return numerator // denominator


# ---- making a group ------------------------------------------------------------------------

def create_store(port: int | None, size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store on 127.0.0.1:`port` (None: a free port, then `store.port`)."""
    return dist.TCPStore("127.0.0.1", port or 0, size, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))


def connect_store(port: int, size: int) -> dist.TCPStore:
    """Ranks 1..N-1: a client of rank 0's store."""
    return dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))


def ranks_ready(store: dist.Store, size: int) -> bool:
    """Rank 0: whether ranks 1..size-1 have reached `join_group`."""
    return store.check([_READY_KEY.format(rank) for rank in range(1, size)])


def join_group(store: dist.Store, rank: int, size: int, device_type: str) -> TensorParallelGroup:
    """This rank's member of the engine's group over `store`; gloo on the CPU, NCCL on the GPU.
    Blocks until every rank joins: rank 0 calls it once `ranks_ready`."""
    if size == 1:
        return SINGLE_RANK
    if rank > 0:
        store.set(_READY_KEY.format(rank), "1")
    store = dist.PrefixStore("tp", store)  # the backend's keys apart from ours
    if device_type == "cuda":
        from torch.distributed import ProcessGroupNCCL  # absent from CPU builds of torch
        options = ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=NCCL_TIMEOUT_S)
        backend = ProcessGroupNCCL(store, rank, size, options)
    else:
        backend = dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=GLOO_TIMEOUT_S))
    return TensorParallelGroup(rank, size, backend)
