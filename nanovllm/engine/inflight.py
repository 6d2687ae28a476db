"""A launched step whose tokens the host has not read yet, and how the loop launches one.

`launch_step` runs a scheduled step's inputs and sampling on the executor (nothing waits for the
device) and advances the scheduler; the step's placeholder rows read the samples of `previous`,
the step launched just before, on the device (async scheduling). The loop reads the tokens later
(`samples.get_output()`), at once in a synchronous round.
"""
from dataclasses import dataclass, field
from typing import NamedTuple

from nanovllm.engine.request import Completion, Request
from nanovllm.engine.scheduler import Scheduler, SchedulerOutput
from nanovllm.engine.sequence import Sequence
from nanovllm.worker.async_output import AsyncSampledTokens
from nanovllm.worker.executor import Executor
from nanovllm.worker.inputs import prompt_logprobs_positions


class InflightStep(NamedTuple):
    output: SchedulerOutput
    samples: AsyncSampledTokens
    prompt_spans: list[tuple[Sequence, range]]  # (sequence, positions) of its prompt logprobs rows
    num_tokens: int  # positive: prefill tokens; negative: decode sequences


@dataclass
class RoundResults:
    """What one round of the loop processed."""
    finished: list[Request] = field(default_factory=list)  # requests that finished
    progressed: list[Completion] = field(default_factory=list)  # tracked completions that got a token
    num_tokens: int = 0  # of the last step processed (see InflightStep); 0: none


def needs_host_tokens(seq: Sequence) -> bool:
    """Whether sampling `seq` needs its newest token on the host: a grammar (its bitmask is filled
    on the host). Such sequences make the loop synchronous. (Penalties do not: the sampler takes a
    placeholder's token from the device, sample/metadata.py.)"""
    return seq.grammar is not None


def launch_step(executor: Executor, scheduler: Scheduler, output: SchedulerOutput,
                previous: InflightStep | None) -> InflightStep:
    """Launch the scheduled `output` and advance the scheduler past it."""
    prompt_spans = []  # in row order
    if output.is_prefill:
        prompt_spans = [(seq, prompt_logprobs_positions(seq)) for seq in output.seqs if seq.prompt_logprobs is not None]
    prev_rows = None
    if previous is not None:
        prev_rows = {seq.seq_id: row for row, seq in enumerate(previous.output.sampled_seqs)}
    samples = executor.execute(output.seqs, output.is_prefill, prev_rows)
    num_tokens = sum(seq.num_scheduled_tokens for seq in output.seqs) if output.is_prefill else -len(output.seqs)
    scheduler.advance(output)
    return InflightStep(output, samples, prompt_spans, num_tokens)
