"""Batched next-token sampling on the device, with vLLM's (v0.8.5) per-request settings.

One pass over the [num_rows, vocab_size] logits of a step, in vLLM's order:
  1. logprobs, for the rows that ask: log_softmax of the RAW logits, as vLLM 0.8.5 (V1) reports
     them, i.e. before penalties, min_tokens masking, temperature and top-k/top-p/min-p.
  2. penalties, sparse, on float32 copies of the penalised rows only ("patched" rows; the others
     stay as the model gave them): only the logits of tokens in a row's prompt or output change.
     Repetition (prompt or output tokens: positive logits divided by it, negative multiplied)
     and presence (once, if in the output) are computed from the original logit and written back
     (duplicate pairs write equal values, so no deduplication is needed); then frequency is
     subtracted once per occurrence in the output (no per-token counts).
  3. min_tokens: a row still short of its min_tokens gets its stop ids (EOS unless ignore_eos,
     stop_token_ids) set to -inf (in its patched copy).
  4. top-k, top-p and min-p as one keep threshold per row on the logits (probabilities are
     those after temperature): a row with top-k keeps the logits >= its k-th largest and, with
     top-p too, the most likely of those up to top_p; min-p keeps logits >= the row's largest +
     temperature * log(min_p) (p >= min_p * p_max). On the GPU four Triton kernels compute the
     thresholds of every such row, without sorting (`sampling_select`). A row with top-p alone
     needs its vocabulary sorted, as in vLLM: only such rows are.
  5. the draw (`sampling_race`): temperature, the threshold and Gumbel-max in one pass over the
     logits (one Triton kernel on the GPU); greedy rows (temperature 0) take the argmax. A
     seeded request's noise is keyed by its seed and its number of drawn tokens, so its tokens
     depend on its seed and its logits only, never on the batch it shares.
Each stage reads only the rows that ask for it; a step whose rows all use temperature alone (no
`SamplingBatch`) runs step 5 and nothing else, on the logits as the model gave them. Which stages
run is decided on the host, so nothing syncs with the device before the results are copied back
(one copy per result kind).

`SamplingRows` carries a step's sequences from `ModelRunner.prepare` to the sampler (rank 0 only;
it pickles to None); `SamplingBatch.build` then collects their settings as host lists, once the
forward is queued so that this host work overlaps the GPU's, and `to_device` uploads them as one
int and one float tensor, on a stream of their own so that the copies overlap the forward.
Per-sequence state (`seq.sampling_state`: a numpy mirror of a penalised request's token ids,
grown by the new tokens only) lives on the Sequence.
"""
import math
import random
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampling_race import draw_key, triton
from nanovllm.layers.sampling_select import LogitRows, float_rows, penalize_triton


class _SequenceState:
    """Sampler-side state of one sequence (rank 0)."""
    __slots__ = ("mirror", "num_mirrored")

    def __init__(self):
        self.mirror = np.empty(0, dtype=np.int64)
        self.num_mirrored = 0

    def token_ids(self, seq: Sequence) -> np.ndarray:
        """All of `seq`'s token ids, copying only those appended since the last call."""
        n = seq.num_tokens
        if n > len(self.mirror):
            grown = np.empty(max(n, 2 * len(self.mirror), 64), dtype=np.int64)
            grown[:self.num_mirrored] = self.mirror[:self.num_mirrored]
            self.mirror = grown
        if n == self.num_mirrored + 1:  # the usual case: one new token
            self.mirror[n - 1] = seq.token_ids[-1]
        else:
            self.mirror[self.num_mirrored:n] = seq.token_ids[self.num_mirrored:n]
        self.num_mirrored = n
        return self.mirror[:n]


def _not_sent() -> None:
    return None


class SamplingRows:
    """The sequences of one step's logits rows, in row order, when some row needs more than
    temperature (rank 0 only: pickles to None, so tensor-parallel workers never receive it).
    The ModelRunner builds the SamplingBatch from it only once the forward is queued, so that
    host work overlaps the GPU's."""
    __slots__ = ("seqs",)

    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs

    def __reduce__(self):
        return _not_sent, ()

    @classmethod
    def of(cls, seqs: list[Sequence]) -> "SamplingRows | None":
        """None when every row uses temperature alone (the plain sampling path)."""
        if all(seq.sampling_params.temperature_only for seq in seqs):
            return None
        return cls(seqs)

    def build(self) -> "SamplingBatch":
        return SamplingBatch.build(self.seqs)


@dataclass
class SamplingBatch:
    """Everything besides temperature that one step's rows need (host side, rank 0 only).

    Each stage has the rows it applies to (indices into the batch) and their parameters, in the
    same order; a stage with no rows does not run.
    """
    num_rows: int
    # rows with top-k (top-p among the top-k) or min-p: their thresholds come from one selection
    threshold_rows: list[int] = field(default_factory=list)
    top_ks: list[int] = field(default_factory=list)          # 0: no top-k
    top_k_top_ps: list[float] = field(default_factory=list)  # inf: no top-p
    log_min_ps: list[float] = field(default_factory=list)    # -inf: no min-p
    max_top_k: int = 0
    # top-p without top-k: these rows are sorted
    top_p_rows: list[int] = field(default_factory=list)
    top_ps: list[float] = field(default_factory=list)
    # rows that penalties or min_tokens change: the sampler copies these (and only these) to
    # float32; the stages below that change rows name them by slot (index into patched_rows)
    patched_rows: list[int] = field(default_factory=list)
    # penalties; token ids of penalised slot i: output_token_ids[i], prompt_token_ids[i] (empty
    # without a repetition penalty)
    penalty_slots: list[int] = field(default_factory=list)
    presence_penalties: list[float] = field(default_factory=list)
    frequency_penalties: list[float] = field(default_factory=list)
    repetition_penalties: list[float] = field(default_factory=list)
    output_token_ids: list[np.ndarray] = field(default_factory=list)
    prompt_token_ids: list[np.ndarray] = field(default_factory=list)
    # min_tokens: (slot, token id) pairs to mask
    suppressed_slots: list[int] = field(default_factory=list)
    suppressed_ids: list[int] = field(default_factory=list)
    seeded_rows: list[int] = field(default_factory=list)
    seeded_keys: list[int] = field(default_factory=list)  # draw_key of each seeded row's next token
    logprob_rows: list[int] = field(default_factory=list)
    max_logprobs: int = 0  # the largest k asked for by a row of logprob_rows

    @classmethod
    def build(cls, seqs: list[Sequence]) -> "SamplingBatch":
        """The settings of `seqs` (one per logits row, in row order), host only. Creates a
        penalised sequence's `seq.sampling_state` on first use."""
        batch = cls(num_rows=len(seqs))
        for row, seq in enumerate(seqs):
            p = seq.sampling_params
            if p.temperature_only:
                continue
            if p.top_k > 0 or p.min_p > 0:
                batch.threshold_rows.append(row)
                batch.top_ks.append(max(p.top_k, 0))
                batch.top_k_top_ps.append(p.top_p if p.top_k > 0 and p.top_p < 1 else math.inf)
                batch.log_min_ps.append(math.log(p.min_p) if p.min_p > 0 else -math.inf)
                batch.max_top_k = max(batch.max_top_k, p.top_k)
            if p.top_k <= 0 and p.top_p < 1:
                batch.top_p_rows.append(row)
                batch.top_ps.append(p.top_p)
            if seq.seed is not None:
                batch.seeded_rows.append(row)
                batch.seeded_keys.append(draw_key(seq.seed, seq.num_completion_tokens))
            penalised = bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1)
            suppressing = seq.num_completion_tokens < p.min_tokens and bool(seq.all_stop_token_ids)
            slot = len(batch.patched_rows)
            if penalised or suppressing:
                batch.patched_rows.append(row)
            if penalised:
                if seq.sampling_state is None:
                    seq.sampling_state = _SequenceState()
                token_ids = seq.sampling_state.token_ids(seq)
                batch.penalty_slots.append(slot)
                batch.presence_penalties.append(p.presence_penalty)
                batch.frequency_penalties.append(p.frequency_penalty)
                batch.repetition_penalties.append(p.repetition_penalty)
                batch.output_token_ids.append(token_ids[seq.num_prompt_tokens:])
                batch.prompt_token_ids.append(token_ids[:seq.num_prompt_tokens if p.repetition_penalty != 1 else 0])
            if suppressing:
                batch.suppressed_slots.extend([slot] * len(seq.all_stop_token_ids))
                batch.suppressed_ids.extend(seq.all_stop_token_ids)
            if p.logprobs is not None:
                batch.logprob_rows.append(row)
                batch.max_logprobs = max(batch.max_logprobs, p.logprobs)
        return batch

    @property
    def any_repetition(self) -> bool:
        return any(r != 1 for r in self.repetition_penalties)

    @property
    def any_threshold(self) -> bool:
        return bool(self.threshold_rows or self.top_p_rows)

    def to_device(self, device: torch.device, base_key: int = 0) -> "SamplingTensors":
        """Upload the lists: one copy of all ints, one of all floats. The penalties' token ids
        travel once each, with where each slot's tokens start.
        With seeded rows, `keys` holds every row's noise key (`base_key + row` for the others);
        with patched rows, `patched_index` every row's slot (-1: not patched)."""
        output_starts = np.cumsum([0] + [len(a) for a in self.output_token_ids])
        prompt_starts = np.cumsum([0] + [len(a) for a in self.prompt_token_ids])
        int_lists = [self.threshold_rows, self.top_ks, self.top_p_rows, self.patched_rows,
                     self.suppressed_slots, self.suppressed_ids, self.logprob_rows, self.penalty_slots,
                     output_starts, prompt_starts]
        ints = [np.asarray(x, np.int64) for x in int_lists]
        keys = np.empty(0, np.int64)
        if self.seeded_rows:
            keys = np.arange(base_key, base_key + self.num_rows, dtype=np.int64)
            keys[self.seeded_rows] = self.seeded_keys
        patched_index = np.empty(0, np.int64)
        if self.patched_rows:
            patched_index = np.full(self.num_rows, -1, np.int64)
            patched_index[self.patched_rows] = np.arange(len(self.patched_rows))
        ints += [keys, patched_index, *self.output_token_ids, *self.prompt_token_ids]
        sizes = [len(x) for x in int_lists] + [len(keys), len(patched_index), output_starts[-1], prompt_starts[-1]]
        floats = [self.top_k_top_ps, self.log_min_ps, self.top_ps, self.presence_penalties,
                  self.frequency_penalties, self.repetition_penalties]
        int_parts = _upload(torch.from_numpy(np.concatenate(ints)), device).split(sizes)
        float_parts = _upload(torch.tensor([x for f in floats for x in f], dtype=torch.float32),
                              device).split([len(f) for f in floats])
        return SamplingTensors(*int_parts, *float_parts)


_upload_streams: dict[torch.device, torch.cuda.Stream] = {}


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`. On CUDA the copy runs on a stream of its own, so that it overlaps the
    forward queued before it instead of waiting for it; the current stream waits for the copy."""
    if device.type != "cuda":
        return host
    stream = _upload_streams.get(device)
    if stream is None:
        stream = _upload_streams[device] = torch.cuda.Stream(device)
    host, current = host.pin_memory(), torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        on_device = host.to(device, non_blocking=True)
    current.wait_stream(stream)
    on_device.record_stream(current)  # its memory is the upload stream's: not reused while current reads it
    return on_device


class SamplingTensors(NamedTuple):
    """SamplingBatch's lists on the device (int64 / float32), same names and orders."""
    threshold_rows: torch.Tensor
    top_ks: torch.Tensor
    top_p_rows: torch.Tensor
    patched_rows: torch.Tensor
    suppressed_slots: torch.Tensor
    suppressed_ids: torch.Tensor
    logprob_rows: torch.Tensor
    penalty_slots: torch.Tensor
    output_starts: torch.Tensor          # [num_penalised + 1]: penalised slot i's output tokens are
    prompt_starts: torch.Tensor          # output_token_ids[starts[i]:starts[i + 1]]; likewise prompt
                                         # tokens (none without a repetition penalty)
    keys: torch.Tensor                   # [num_rows] noise keys; empty without seeded rows
    patched_index: torch.Tensor          # [num_rows] slot of each row, -1: unpatched; empty without
    output_token_ids: torch.Tensor       # the penalised rows' output tokens, one row after another
    prompt_token_ids: torch.Tensor       # likewise their prompt tokens
    top_k_top_ps: torch.Tensor
    log_min_ps: torch.Tensor
    top_ps: torch.Tensor
    presence_penalties: torch.Tensor
    frequency_penalties: torch.Tensor
    repetition_penalties: torch.Tensor


class SampledTokens(NamedTuple):
    """One step's samples on the host, in logits-row order.

    For a row that asked for logprobs (None entries for the others; None altogether when no row
    asked): `logprob_token_ids[i]` / `logprobs[i]` hold the sampled token first, then the batch's
    largest-k top tokens, most likely first (trim to the row's own k); `ranks[i]` is the sampled
    token's rank among all tokens (1 = most likely)."""
    token_ids: list[int]
    logprob_token_ids: list[list[int] | None] | None = None
    logprobs: list[list[float] | None] | None = None
    ranks: list[int | None] | None = None


class SamplerOutput(NamedTuple):
    """One step's samples on the device."""
    token_ids: torch.Tensor                          # [num_rows] int64
    logprob_rows: list[int] | None = None            # host: the rows the tensors below describe
    logprob_token_ids: torch.Tensor | None = None    # [num_logprob_rows, 1 + k]: sampled, then top-k
    logprobs: torch.Tensor | None = None             # [num_logprob_rows, 1 + k] float32
    ranks: torch.Tensor | None = None                # [num_logprob_rows] int64

    def tolist(self) -> SampledTokens:
        """Copy to the host: one transfer per result kind for the whole batch."""
        token_ids = self.token_ids.tolist()
        if self.logprob_rows is None:
            return SampledTokens(token_ids)
        ints = torch.cat([self.ranks.unsqueeze(1), self.logprob_token_ids], 1).tolist()
        values = self.logprobs.tolist()
        ids, logprobs, ranks = [None] * len(token_ids), [None] * len(token_ids), [None] * len(token_ids)
        for row, row_ints, row_values in zip(self.logprob_rows, ints, values):
            ranks[row], ids[row], logprobs[row] = row_ints[0], row_ints[1:], row_values
        return SampledTokens(token_ids, ids, logprobs, ranks)


class Sampler(nn.Module):
    """`seed`: the seed of the noise of unseeded requests (None: from the OS); rank 0 only."""

    def __init__(self, seed: int | None = None):
        super().__init__()
        self._rng = random.Random(seed)

    def warm_up(self, vocab_size: int, dtype: torch.dtype, device: torch.device):
        """Compile the GPU kernels (the draw, the thresholds, the patched copies and penalties) for
        logits of `dtype` now, so that no request waits for Triton's compiler."""
        if device.type == "cuda" and triton is not None:
            logits = torch.zeros(2, vocab_size, dtype=dtype, device=device)
            first = torch.zeros(1, dtype=torch.int64, device=device)
            rows = LogitRows(logits, logits[:1].float(), first, torch.tensor([0, -1], device=device))
            thresholds = torch.full((2,), float("-inf"), device=device)
            rows.keep_thresholds_(thresholds, first, first + 1, torch.full((1,), 0.5, device=device),
                                  torch.full((1,), -1.0, device=device), torch.ones(2, device=device), 1)
            rows.draw(torch.ones(2, device=device), torch.zeros(2, device=device), 1 << 61, None)
            patched = float_rows(logits, first)
            empty, one = torch.zeros(2, dtype=torch.int64, device=device), torch.ones(1, device=device)
            penalize_triton(patched, logits, first, first, empty, empty, empty, empty, one, one, one)

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor,
                batch: SamplingBatch | None = None) -> SamplerOutput:
        """logits: [num_rows, vocab_size] (left unmodified); temperatures: [num_rows] float32 on
        the same device; batch: the rows' other settings, None when they use temperature alone."""
        base_key = (1 << 61) | self._rng.getrandbits(60)  # this step's noise: keys base_key + row
        if batch is None:  # plain temperature sampling
            return SamplerOutput(LogitRows(logits).draw(temperatures, None, base_key, None))

        t = batch.to_device(logits.device, base_key)
        raw_logprobs = torch.log_softmax(logits[t.logprob_rows].float(), -1) if batch.logprob_rows else None
        rows = LogitRows(logits)
        if batch.patched_rows:  # float32 copies of the rows that change, changed in place
            patched = float_rows(logits, t.patched_rows)  # [num_patched, vocab_size]
            if batch.penalty_slots:
                _apply_penalties_(patched, t, batch.any_repetition, logits)
            if batch.suppressed_slots:
                patched[t.suppressed_slots, t.suppressed_ids] = float("-inf")
            rows = LogitRows(logits, patched, t.patched_rows, t.patched_index)
        thresholds = _thresholds(rows, temperatures, batch, t) if batch.any_threshold else None
        tokens = rows.draw(temperatures, thresholds, base_key, t.keys if batch.seeded_rows else None)

        if raw_logprobs is None:
            return SamplerOutput(tokens)
        sampled = tokens[t.logprob_rows].unsqueeze(1)  # [num_logprob_rows, 1]
        token_logprobs = raw_logprobs.gather(1, sampled)
        ranks = (raw_logprobs >= token_logprobs).sum(-1)
        ids, values = sampled, token_logprobs
        if batch.max_logprobs > 0:
            top = raw_logprobs.topk(batch.max_logprobs, -1)
            ids, values = torch.cat([ids, top.indices], 1), torch.cat([values, top.values], 1)
        return SamplerOutput(tokens, batch.logprob_rows, ids, values, ranks)


def _thresholds(rows: LogitRows, temperatures: torch.Tensor, batch: SamplingBatch,
                t: SamplingTensors) -> torch.Tensor:
    """[num_rows] float32: the smallest logit each row keeps (-inf: all); for top-k and top-p
    exactly the logit of the last token kept, so that the draw's "logit >= threshold" is exact."""
    thresholds = torch.full((batch.num_rows,), float("-inf"), device=temperatures.device)
    if batch.top_p_rows:  # top-p without top-k: a sort of just these rows
        divisors = temperatures[t.top_p_rows]
        thresholds[t.top_p_rows] = _top_p_threshold(rows.rows(t.top_p_rows, len(batch.top_p_rows) == batch.num_rows),
                                                    torch.where(divisors == 0, 1.0, divisors), t.top_ps)
    if batch.threshold_rows:  # top-k, top-p among the top-k, min-p
        rows.keep_thresholds_(thresholds, t.threshold_rows, t.top_ks, t.top_k_top_ps, t.log_min_ps, temperatures,
                              batch.max_top_k)
    return thresholds


def _apply_penalties_(patched: torch.Tensor, t: SamplingTensors, any_repetition: bool,
                      logits: torch.Tensor | None = None):
    """vLLM's penalties, in place and sparse on `patched` ([num_patched, vocab_size] float32, the
    patched rows as copied from `logits`): only the penalised slots' prompt and output tokens are
    read and written. Repetition, then presence, from each token's original logit (a token in
    both the prompt and the output gets both); then the frequency penalty subtracted once per
    occurrence. With Triton on CUDA one kernel does it all, reading the originals from `logits`
    (the model's rows; needed there)."""
    if patched.is_cuda and triton is not None:
        return penalize_triton(patched, logits, t.patched_rows, t.penalty_slots, t.output_starts, t.output_token_ids,
                               t.prompt_starts, t.prompt_token_ids, t.presence_penalties, t.frequency_penalties,
                               t.repetition_penalties)
    flat, vocab_size = patched.view(-1), patched.shape[1]
    slots = torch.arange(len(t.penalty_slots), device=patched.device)  # per output / prompt token: its slot
    output_slot = slots.repeat_interleave(t.output_starts.diff(), output_size=len(t.output_token_ids))
    output_index = t.penalty_slots[output_slot] * vocab_size + t.output_token_ids
    values = flat[output_index]  # original logits of the output pairs, read before any write
    if any_repetition:
        prompt_slot = slots.repeat_interleave(t.prompt_starts.diff(), output_size=len(t.prompt_token_ids))
        prompt_index = t.penalty_slots[prompt_slot] * vocab_size + t.prompt_token_ids
        flat[prompt_index] = _repetition(flat[prompt_index], t.repetition_penalties[prompt_slot])
        values = _repetition(values, t.repetition_penalties[output_slot])
    flat[output_index] = values - t.presence_penalties[output_slot]  # equal pairs write equal values
    flat.index_put_((output_index,), -t.frequency_penalties[output_slot], accumulate=True)


def _repetition(values: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    return torch.where(values > 0, values / penalties, values * penalties)


def _top_p_threshold(logits: torch.Tensor, divisors: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """[num_rows]: the smallest logit each row keeps under vLLM's top-p, rows that all have
    top_p < 1, in one ascending sort: the smallest tokens whose cumulative probability is
    <= 1 - top_p are dropped; the largest token is always kept."""
    sorted_logits = logits.sort(-1).values.float()  # ascending
    cumulative = (sorted_logits / divisors.unsqueeze(1)).softmax(-1).cumsum(-1)  # after temperature
    num_dropped = (cumulative <= (1 - top_ps).unsqueeze(1)).sum(-1, keepdim=True)  # a prefix: cumsum grows
    return sorted_logits.gather(1, num_dropped.clamp(max=logits.shape[1] - 1)).squeeze(1)
