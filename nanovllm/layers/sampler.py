"""Batched next-token sampling on the device, with vLLM's (v0.8.5) per-request settings.

One pass over the [num_rows, vocab_size] logits of a step, in vLLM's order:
  1. logprobs, for the rows that ask: log_softmax of the RAW logits, as vLLM 0.8.5 (V1) reports
     them, i.e. before penalties, min_tokens masking, temperature and top-k/top-p/min-p.
  2. penalties, sparse: only the logits of tokens in a penalised row's prompt or output change.
     Repetition (prompt or output tokens: positive logits divided by it, negative multiplied),
     then frequency (times the token's count in the output) and presence (once, if in the output)
     subtracted. Each (row, token) pair's new value is computed from the original logit and
     written back; duplicate pairs write equal values, so no deduplication is needed.
  3. min_tokens: a row still short of its min_tokens gets its stop ids (EOS unless ignore_eos,
     stop_token_ids) set to -inf.
  4. greedy rows (temperature 0) take the argmax of these logits.
  5. temperature; then top-k, top-p and min-p, each as a per-row logit threshold, applied in one
     masking pass: a row with top-k keeps its k largest logits and, with top-p too, the most
     likely of those up to top_p (one torch.topk of the batch's largest k, no sort); min-p keeps
     logits >= the row's largest + log(min_p) (p >= min_p * p_max). A row with top-p alone needs
     its vocabulary sorted, as in vLLM: only such rows are.
  6. the exponential race (equivalent to Gumbel-max): with E ~ Exp(1) i.i.d., argmax(p / E) is
     distributed as Categorical(p) and needs no normalisation, cumsum or sort. A seeded request
     draws its row's E from its own torch.Generator (on the device; one kernel per seeded row),
     so its tokens depend on its seed and its logits only, never on the batch it shares.
Each stage reads only the rows that ask for it; a step whose rows all use temperature alone (no
`SamplingBatch`) runs steps 4-6 and nothing else. Which stages run is decided on the host, so
nothing syncs with the device before the results are copied back (one copy per result kind).

`SamplingRows` carries a step's sequences from `ModelRunner.prepare` to the sampler (rank 0 only;
it pickles to None); `SamplingBatch.build` then collects their settings as host lists, once the
forward is queued so that this host work overlaps the GPU's, and `to_device` uploads them as one
int and one float tensor. Per-sequence state (`seq.sampling_state`: a seeded request's
generator, a numpy mirror of a penalised request's token ids, grown by the new tokens only)
lives on the Sequence.
"""
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from nanovllm.engine.sequence import Sequence


class _SequenceState:
    """Sampler-side state of one sequence (rank 0)."""
    __slots__ = ("generator", "mirror", "num_mirrored")

    def __init__(self):
        self.generator: torch.Generator | None = None
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

    def build(self, device: torch.device) -> "SamplingBatch":
        return SamplingBatch.build(self.seqs, device)


@dataclass
class SamplingBatch:
    """Everything besides temperature that one step's rows need (host side, rank 0 only).

    Each stage has the rows it applies to (indices into the batch) and their parameters, in the
    same order; a stage with no rows does not run.
    """
    num_rows: int
    any_greedy: bool = False
    all_greedy: bool = False
    divisors: list[float] = field(default_factory=list)  # per row: its temperature, 1.0 for greedy rows
    # top-k, with top-p among the top-k
    top_k_rows: list[int] = field(default_factory=list)
    top_ks: list[int] = field(default_factory=list)
    top_k_top_ps: list[float] = field(default_factory=list)  # inf: no top-p
    # top-p without top-k: these rows are sorted
    top_p_rows: list[int] = field(default_factory=list)
    top_ps: list[float] = field(default_factory=list)
    min_p_rows: list[int] = field(default_factory=list)
    log_min_ps: list[float] = field(default_factory=list)
    # penalties; token ids of penalised row i: output_token_ids[i], prompt_token_ids[i] (empty
    # without a repetition penalty)
    penalty_rows: list[int] = field(default_factory=list)
    presence_penalties: list[float] = field(default_factory=list)
    frequency_penalties: list[float] = field(default_factory=list)
    repetition_penalties: list[float] = field(default_factory=list)
    output_token_ids: list[np.ndarray] = field(default_factory=list)
    prompt_token_ids: list[np.ndarray] = field(default_factory=list)
    # min_tokens: (row, token id) pairs to mask
    suppressed_rows: list[int] = field(default_factory=list)
    suppressed_ids: list[int] = field(default_factory=list)
    seeded: list[tuple[int, torch.Generator]] = field(default_factory=list)
    logprob_rows: list[int] = field(default_factory=list)
    max_logprobs: int = 0  # the largest k asked for by a row of logprob_rows

    @classmethod
    def build(cls, seqs: list[Sequence], device: torch.device) -> "SamplingBatch":
        """The settings of `seqs` (one per logits row, in row order). Creates
        `seq.sampling_state` on first use."""
        batch = cls(num_rows=len(seqs))
        batch.divisors = [seq.sampling_params.temperature or 1.0 for seq in seqs]
        num_greedy = sum(seq.sampling_params.temperature == 0 for seq in seqs)
        batch.any_greedy, batch.all_greedy = num_greedy > 0, num_greedy == len(seqs)
        for row, seq in enumerate(seqs):
            p = seq.sampling_params
            if p.temperature_only:
                continue
            if p.top_k > 0:
                batch.top_k_rows.append(row)
                batch.top_ks.append(p.top_k)
                batch.top_k_top_ps.append(p.top_p if p.top_p < 1 else math.inf)
            elif p.top_p < 1:
                batch.top_p_rows.append(row)
                batch.top_ps.append(p.top_p)
            if p.min_p > 0:
                batch.min_p_rows.append(row)
                batch.log_min_ps.append(math.log(p.min_p))
            state = seq.sampling_state
            if state is None:
                state = seq.sampling_state = _SequenceState()
            if seq.seed is not None:
                if state.generator is None:
                    state.generator = torch.Generator(device).manual_seed(seq.seed)
                batch.seeded.append((row, state.generator))
            if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1:
                token_ids = state.token_ids(seq)
                batch.penalty_rows.append(row)
                batch.presence_penalties.append(p.presence_penalty)
                batch.frequency_penalties.append(p.frequency_penalty)
                batch.repetition_penalties.append(p.repetition_penalty)
                batch.output_token_ids.append(token_ids[seq.num_prompt_tokens:])
                batch.prompt_token_ids.append(token_ids[:seq.num_prompt_tokens if p.repetition_penalty != 1 else 0])
            if seq.num_completion_tokens < p.min_tokens and seq.all_stop_token_ids:
                batch.suppressed_rows.extend([row] * len(seq.all_stop_token_ids))
                batch.suppressed_ids.extend(seq.all_stop_token_ids)
            if p.logprobs is not None:
                batch.logprob_rows.append(row)
                batch.max_logprobs = max(batch.max_logprobs, p.logprobs)
        return batch

    @property
    def any_repetition(self) -> bool:
        return any(r != 1 for r in self.repetition_penalties)

    def to_device(self, device: torch.device) -> "SamplingTensors":
        """Upload the lists: one copy of all ints, one of all floats. Per (row, token) pair of
        the penalties: the penalised row's index and the batch row, computed here on the host."""
        penalised = np.arange(len(self.penalty_rows))
        rows = np.asarray(self.penalty_rows, np.int64)
        output_lens = [len(a) for a in self.output_token_ids]
        prompt_lens = [len(a) for a in self.prompt_token_ids]
        int_lists = [self.top_k_rows, self.top_ks, self.top_p_rows, self.min_p_rows,
                     self.suppressed_rows, self.suppressed_ids, self.logprob_rows]
        ints = [np.asarray(x, np.int64) for x in int_lists]
        ints += [np.repeat(penalised, output_lens), np.repeat(rows, output_lens), *self.output_token_ids,
                 np.repeat(penalised, prompt_lens), np.repeat(rows, prompt_lens), *self.prompt_token_ids]
        sizes = [len(x) for x in int_lists] + [sum(output_lens)] * 3 + [sum(prompt_lens)] * 3
        floats = [self.divisors, self.top_k_top_ps, self.top_ps, self.log_min_ps, self.presence_penalties,
                  self.frequency_penalties, self.repetition_penalties]
        int_parts = _upload(torch.from_numpy(np.concatenate(ints)), device).split(sizes)
        float_parts = _upload(torch.tensor([x for f in floats for x in f], dtype=torch.float32),
                              device).split([len(f) for f in floats])
        return SamplingTensors(*int_parts, *float_parts)


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


class SamplingTensors(NamedTuple):
    """SamplingBatch's lists on the device (int64 / float32), same names and orders."""
    top_k_rows: torch.Tensor
    top_ks: torch.Tensor
    top_p_rows: torch.Tensor
    min_p_rows: torch.Tensor
    suppressed_rows: torch.Tensor
    suppressed_ids: torch.Tensor
    logprob_rows: torch.Tensor
    output_pair_penalised: torch.Tensor  # per output token of a penalised row: index into penalty_rows
    output_pair_rows: torch.Tensor       # ... its batch row
    output_token_ids: torch.Tensor       # ... the token id
    prompt_pair_penalised: torch.Tensor  # likewise for the prompt tokens of rows with a repetition penalty
    prompt_pair_rows: torch.Tensor
    prompt_token_ids: torch.Tensor
    divisors: torch.Tensor
    top_k_top_ps: torch.Tensor
    top_ps: torch.Tensor
    log_min_ps: torch.Tensor
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

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor,
                batch: SamplingBatch | None = None) -> SamplerOutput:
        """logits: [num_rows, vocab_size] (left unmodified); temperatures: [num_rows] on the same
        device; batch: the rows' other settings, None when they use temperature alone."""
        if batch is None:  # plain temperature sampling
            logits = logits.float()
            greedy_tokens = logits.argmax(-1)
            probs = torch.softmax(logits / temperatures.clamp(min=1e-5).unsqueeze(1), -1)
            sampled = (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)
            return SamplerOutput(torch.where(temperatures == 0, greedy_tokens, sampled))

        t = batch.to_device(logits.device)
        logits = logits.to(torch.float32, copy=True)  # [num_rows, vocab_size], modified in place below
        raw_logprobs = torch.log_softmax(logits[t.logprob_rows], -1) if batch.logprob_rows else None
        if batch.penalty_rows:
            _apply_penalties_(logits, t, batch.any_repetition)
        if batch.suppressed_rows:
            logits[t.suppressed_rows, t.suppressed_ids] = float("-inf")
        greedy_tokens = logits.argmax(-1) if batch.any_greedy else None
        if batch.all_greedy:
            tokens = greedy_tokens
        else:
            logits.div_(t.divisors.unsqueeze(1))
            if batch.top_p_rows:  # top-p without top-k: a sort of just these rows
                logits[t.top_p_rows] = _apply_top_p(logits[t.top_p_rows], t.top_ps)
            if batch.top_k_rows or batch.min_p_rows:  # one logit threshold per row, one masking pass
                threshold = torch.full((batch.num_rows, 1), float("-inf"), device=logits.device)
                if batch.top_k_rows:
                    threshold[t.top_k_rows] = _top_k_top_p_threshold(logits[t.top_k_rows], t.top_ks,
                                                                     t.top_k_top_ps, max(batch.top_ks))
                if batch.min_p_rows:  # p < min_p * p_max  <=>  logit < max logit + log(min_p)
                    min_p = logits[t.min_p_rows].amax(-1, keepdim=True) + t.log_min_ps.unsqueeze(1)
                    threshold[t.min_p_rows] = torch.maximum(threshold[t.min_p_rows], min_p)
                logits.masked_fill_(logits < threshold, float("-inf"))
            probs = torch.softmax(logits, -1)
            noise = torch.empty_like(probs).exponential_(1)
            for row, generator in batch.seeded:
                noise[row].exponential_(1, generator=generator)
            tokens = (probs / noise).argmax(-1)
            if batch.any_greedy:
                tokens = torch.where(temperatures == 0, greedy_tokens, tokens)

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


def _apply_penalties_(logits: torch.Tensor, t: SamplingTensors, any_repetition: bool):
    """vLLM's penalties, in place and sparse: only the (row, token) pairs of the penalised rows'
    prompt and output tokens are read and written."""
    flat, vocab_size = logits.view(-1), logits.shape[1]
    # occurrences of each output token in its row: [num_penalised * vocab_size], read at the pairs
    keys = t.output_pair_penalised * vocab_size + t.output_token_ids
    counts = torch.zeros(len(t.frequency_penalties) * vocab_size, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))
    output_index = t.output_pair_rows * vocab_size + t.output_token_ids
    values = flat[output_index]  # original logits of the output pairs, read before any write
    if any_repetition:
        prompt_index = t.prompt_pair_rows * vocab_size + t.prompt_token_ids
        flat[prompt_index] = _repetition(flat[prompt_index], t.repetition_penalties[t.prompt_pair_penalised])
        values = _repetition(values, t.repetition_penalties[t.output_pair_penalised])
    values -= (t.frequency_penalties[t.output_pair_penalised] * counts[keys]
               + t.presence_penalties[t.output_pair_penalised])
    flat[output_index] = values  # after the prompt pairs: a token in both gets all penalties


def _repetition(values: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    return torch.where(values > 0, values / penalties, values * penalties)


def _top_k_top_p_threshold(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                           max_top_k: int) -> torch.Tensor:
    """[num_rows, 1]: the smallest logit each row keeps under top-k, then top-p among the top-k,
    as vLLM: the k largest logits (ties with the k-th kept), then of those the most likely ones
    until the mass of the larger ones reaches top_p (probabilities renormalised over the top-k;
    top_p inf: all k). One torch.topk of the largest k: no sort of the vocabulary."""
    max_k = min(max_top_k, logits.shape[1])
    values = logits.topk(max_k, -1).values  # [num_rows, max_k], descending
    in_top_k = torch.arange(max_k, device=logits.device) < top_ks.unsqueeze(1)
    values = values.masked_fill(~in_top_k, float("-inf"))
    probs = values.softmax(-1)
    keep = in_top_k & (probs.cumsum(-1) - probs < top_ps.unsqueeze(1))  # mass of the larger ones < top_p
    return values.gather(1, keep.sum(-1, keepdim=True).clamp(min=1) - 1)


def _apply_top_p(logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """vLLM's top-p on rows that all have top_p < 1, in one ascending sort: drop the smallest
    tokens whose cumulative probability is <= 1 - top_p; the largest token is always kept."""
    sorted_logits, order = logits.sort(-1)  # ascending
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative <= (1 - top_ps).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
