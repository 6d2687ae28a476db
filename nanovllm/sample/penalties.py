"""Penalties and min_tokens: the sampling stages that change logits, on the float32 copies of the
rows they change (`logits.py`), sparse: only the tokens a row has seen are read and written.

vLLM's penalties, from each token's original logit: repetition (prompt or output tokens: positive
logits divided by it, negative multiplied), presence (once, if in the output), then frequency
subtracted once per occurrence in the output (no per-token counts). Duplicate (row, token) pairs
write equal values, so no deduplication is needed. min_tokens sets a short row's stop ids to -inf.
On CUDA one Triton kernel applies the penalties (one program per penalised row); elsewhere torch.
"""
import torch

from nanovllm.sample.metadata import SamplingMetadata
from nanovllm.utils.triton_utils import tl, triton

PENALTY_BLOCK = 256  # token ids per loop iteration of the penalty kernel


def apply_penalties_(patched: torch.Tensor, t: SamplingMetadata, logits: torch.Tensor):
    """vLLM's penalties, in place and sparse on `patched` ([num_patched, vocab_size] float32, the
    patched rows as copied from `logits`): only the penalised slots' prompt and output tokens are
    read and written. Repetition, then presence, from each token's original logit (a token in
    both the prompt and the output gets both); then the frequency penalty subtracted once per
    occurrence. With Triton on CUDA one kernel does it all, reading the originals from `logits`
    (the model's rows; needed there)."""
    if not len(t.penalty_slots):
        return
    if patched.is_cuda and triton is not None:
        return penalize_triton(patched, logits, t.patched_rows, t.penalty_slots, t.output_starts, t.output_token_ids,
                               t.prompt_starts, t.prompt_token_ids, t.presence_penalties, t.frequency_penalties,
                               t.repetition_penalties)
    flat, vocab_size = patched.view(-1), patched.shape[1]
    slots = torch.arange(len(t.penalty_slots), device=patched.device)  # per output / prompt token: its slot
    output_slot = slots.repeat_interleave(t.output_starts.diff(), output_size=len(t.output_token_ids))
    output_index = t.penalty_slots[output_slot] * vocab_size + t.output_token_ids
    values = flat[output_index]  # original logits of the output pairs, read before any write
    if t.any_repetition:
        prompt_slot = slots.repeat_interleave(t.prompt_starts.diff(), output_size=len(t.prompt_token_ids))
        prompt_index = t.penalty_slots[prompt_slot] * vocab_size + t.prompt_token_ids
        flat[prompt_index] = _repetition(flat[prompt_index], t.repetition_penalties[prompt_slot])
        values = _repetition(values, t.repetition_penalties[output_slot])
    flat[output_index] = values - t.presence_penalties[output_slot]  # equal pairs write equal values
    flat.index_put_((output_index,), -t.frequency_penalties[output_slot], accumulate=True)


def _repetition(values: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    return torch.where(values > 0, values / penalties, values * penalties)


def apply_min_tokens_(patched: torch.Tensor, t: SamplingMetadata):
    """Rows still short of their min_tokens: their stop ids (EOS unless ignore_eos, stop_token_ids)
    set to -inf in their patched copies."""
    if len(t.suppressed_slots):
        patched[t.suppressed_slots, t.suppressed_ids] = float("-inf")


def penalize_triton(patched: torch.Tensor, logits: torch.Tensor, patched_rows: torch.Tensor, slots: torch.Tensor,
                    output_starts: torch.Tensor, output_token_ids: torch.Tensor, prompt_starts: torch.Tensor,
                    prompt_token_ids: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor):
    """The sampler's `_apply_penalties_` as one Triton kernel, one program per penalised slot
    (`slots`: into `patched`, whose row s is a copy of logits[patched_rows[s]])."""
    if len(slots):
        _penalty_kernel[(len(slots),)](patched, logits, logits.stride(0), patched_rows, slots, output_starts,
                                       output_token_ids, prompt_starts, prompt_token_ids, presence, frequency,
                                       repetition, patched.shape[1], BLOCK=PENALTY_BLOCK)


if triton is not None:

    @triton.jit
    def _repeated(x, penalty):
        """The repetition penalty: positive logits divided by it, negative ones multiplied (as torch
        rounds them: IEEE division)."""
        return tl.where(x > 0, tl.math.div_rn(x, tl.zeros_like(x) + penalty), x * penalty)

    @triton.jit(do_not_specialize=["patched_rows_ptr", "slots_ptr", "output_starts_ptr", "output_ids_ptr",
                                   "prompt_starts_ptr", "prompt_ids_ptr", "presence_ptr", "frequency_ptr",
                                   "repetition_ptr"])
    def _penalty_kernel(patched_ptr, logits_ptr, row_stride, patched_rows_ptr, slots_ptr, output_starts_ptr,
                        output_ids_ptr, prompt_starts_ptr, prompt_ids_ptr, presence_ptr, frequency_ptr,
                        repetition_ptr, vocab_size, BLOCK: tl.constexpr):
        """Program i: penalised slot i. Writes to one token from different threads are ordered by
        barriers: prompt tokens, then output tokens (a token in both ends with both penalties),
        then the frequency penalty, one atomic subtraction per occurrence."""
        i = tl.program_id(0)
        slot = tl.load(slots_ptr + i)
        out_ptr = patched_ptr + slot * vocab_size
        in_ptr = logits_ptr + tl.load(patched_rows_ptr + slot) * row_stride  # the original logits
        repetition = tl.load(repetition_ptr + i)
        presence = tl.load(presence_ptr + i)
        frequency = tl.load(frequency_ptr + i)
        offsets = tl.arange(0, BLOCK)
        start, end = tl.load(prompt_starts_ptr + i), tl.load(prompt_starts_ptr + i + 1)
        while start < end:
            tokens = tl.load(prompt_ids_ptr + start + offsets, mask=start + offsets < end, other=0)
            x = tl.load(in_ptr + tokens, mask=start + offsets < end, other=0.0).to(tl.float32)
            tl.store(out_ptr + tokens, _repeated(x, repetition), mask=start + offsets < end)
            start += BLOCK
        tl.debug_barrier()
        first, end = tl.load(output_starts_ptr + i), tl.load(output_starts_ptr + i + 1)
        start = first
        while start < end:
            tokens = tl.load(output_ids_ptr + start + offsets, mask=start + offsets < end, other=0)
            x = tl.load(in_ptr + tokens, mask=start + offsets < end, other=0.0).to(tl.float32)
            tl.store(out_ptr + tokens, _repeated(x, repetition) - presence, mask=start + offsets < end)
            start += BLOCK
        tl.debug_barrier()
        if frequency != 0.0:
            start = first
            while start < end:
                tokens = tl.load(output_ids_ptr + start + offsets, mask=start + offsets < end, other=0)
                tl.atomic_add(out_ptr + tokens, tl.zeros((BLOCK,), tl.float32) - frequency, mask=start + offsets < end)
                start += BLOCK
