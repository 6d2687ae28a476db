"""A step's samples on their way to the host (vLLM's AsyncModelRunnerOutput).

On CUDA the copies are queued on the current stream right behind the step, into pinned host
memory, followed by an event (recorded even when the step sampled nothing: `get_output()` always
means the step is over on rank 0, and so that every rank has read the step's inputs); nothing
waits for the device until `get_output()`. So with async
scheduling the host goes on to schedule and launch the next step while this one runs, and reads
its tokens one step late. On the CPU the tensors are already on the host.

Invariant: the pinned buffers are read only after the event, and stay referenced by this object
until then (the host allocator does not hand them out again before their copies ran either).
"""
import torch

from nanovllm.sample.logprobs import LogprobsLists, LogprobsTensors
from nanovllm.sample.sampler import SampledTokens, SamplerOutput


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A non-blocking copy of `tensor` into pinned host memory (the tensor itself on the CPU)."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class AsyncSampledTokens:
    """One step's sampled tokens (and logprobs) being copied to the host."""

    def __init__(self, output: SamplerOutput | None, prompt_logprobs: LogprobsLists | None, device: torch.device):
        """`output`: the sampler's results on `device`, None when the step sampled nothing;
        `prompt_logprobs`: the step's prompt logprobs rows, already on the host."""
        self._prompt_logprobs = prompt_logprobs
        self._host: SamplerOutput | None = None
        if output is not None:
            logprobs = None if output.logprobs is None else LogprobsTensors(*map(_to_host, output.logprobs))
            self._host = SamplerOutput(_to_host(output.token_ids), output.logprob_rows, logprobs)
        self._done: torch.cuda.Event | None = None
        if device.type == "cuda":
            self._done = torch.cuda.Event()
            self._done.record()
        self._result: SampledTokens | None = None

    def get_output(self) -> SampledTokens:
        """The samples as host lists; waits for the step (and its copies) to end on the device."""
        if self._result is None:
            if self._done is not None:
                self._done.synchronize()
            host = SampledTokens([]) if self._host is None else self._host.tolist()
            self._result = host._replace(prompt_logprobs=self._prompt_logprobs)
            self._host = self._done = None
        return self._result
