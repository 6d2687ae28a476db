"""The sampling settings of one step's logits rows: built on the host from the rows' sequences
once the forward is queued (so this host work overlaps the GPU's), uploaded as one int64 and one
float32 copy on a stream of their own (so the copies overlap the forward too).

Each stage has the rows it applies to (indices into the batch) and their parameters, in the same
order; a stage with no rows (an empty tensor: its length is known on the host) does not run. A
step whose rows all use temperature alone is `plain`: only the draw runs.

The sampler's per-sequence state (`seq.sampling_state`: a numpy mirror of a penalised sequence's
token ids, grown by the new tokens only) is created here on the sequence's first penalised step.
With async scheduling a penalised sequence's newest token may still be on the device only (a
placeholder): its slot in the token history is filled on the device from the previous step's
sampled ids, after the upload, so penalties do not make the loop wait for the host.
A row with a grammar (structured outputs) has its token bitmask filled here, on the host, by its
matcher, and uploaded with the rest.
"""
import math
from dataclasses import dataclass, field, fields
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from nanovllm.sample.draw import draw_key
from nanovllm.sampling_params import SamplingParams


class Grammar(Protocol):
    """A sequence's structured-output matcher (engine/structured_output.py)."""
    vocab_size: int

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Write row `index` of `bitmask` ([n, ceil(vocab_size / 32)] int32, on the host): bit
        t % 32 of word t // 32 is set when token t may come next."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class SamplingSequence(Protocol):
    """What the sampler reads of a sequence (the engine's Sequence)."""
    seq_id: int
    sampling_params: SamplingParams
    seed: int | None                   # None: the step's random stream
    token_ids: list[int]
    num_prompt_tokens: int
    all_stop_token_ids: frozenset[int]  # masked while below min_tokens
    sampling_state: Any                 # the sampler's SequenceState, None until first needed
    grammar: Grammar | None             # structured outputs: what may come next

    @property
    def num_tokens(self) -> int: ...  # placeholders (async scheduling) included

    @property
    def num_completion_tokens(self) -> int: ...  # the tokens drawn so far, placeholders included


class SequenceState:
    """Sampler-side state of one sequence (rank 0): its token ids as a numpy array."""
    __slots__ = ("mirror", "num_mirrored")

    def __init__(self):
        self.mirror = np.empty(0, dtype=np.int64)
        self.num_mirrored = 0

    def token_ids(self, seq: SamplingSequence) -> np.ndarray:
        """`seq`'s token ids known on the host (placeholders excluded), copying only those appended
        since the last call."""
        n = len(seq.token_ids)
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


def scatter_prev_sampled(dst: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor, prev_sampled: torch.Tensor):
    """dst[rows] = prev_sampled[indices] on the device, without a sync: placeholders' values (a step's
    input ids, a penalised row's token history). dst: [n] int64; rows, indices: [num_placeholders] int64."""
    dst.index_copy_(0, rows, prev_sampled.index_select(0, indices))


class InFlightTokens(NamedTuple):
    """The step launched just before this one, as the sampler sees it (async scheduling)."""
    token_ids: torch.Tensor  # its sampled ids, on the device
    rows: Mapping[int, int]  # seq_id -> row of token_ids


@dataclass
class SamplingMetadata:
    """One step's sampling settings on the device (int64 / float32 tensors) and the few host-side
    facts that decide which stages run."""
    num_rows: int
    plain: bool                 # every row uses temperature alone
    max_top_k: int              # the largest top-k of threshold_rows (0: none)
    max_logprobs: int           # the largest k of logprob_rows
    any_repetition: bool        # a penalised row has a repetition penalty
    logprob_rows_host: list[int]
    temperatures: torch.Tensor  # [num_rows] float32, 0: greedy
    # rows with top-k (top-p among the top-k) or min-p: their thresholds come from one selection
    threshold_rows: torch.Tensor
    top_ks: torch.Tensor           # 0: no top-k
    top_k_top_ps: torch.Tensor     # inf: no top-p
    log_min_ps: torch.Tensor       # -inf: no min-p
    # top-p without top-k: these rows are sorted
    top_p_rows: torch.Tensor
    top_ps: torch.Tensor
    # rows that penalties or min_tokens change (copied to float32, see logits.py); the stages
    # that change them name them by slot (index into patched_rows)
    patched_rows: torch.Tensor
    patched_index: torch.Tensor    # [num_rows] each row's slot, -1: unpatched; empty when none is
    penalty_slots: torch.Tensor
    presence_penalties: torch.Tensor
    frequency_penalties: torch.Tensor
    repetition_penalties: torch.Tensor
    output_starts: torch.Tensor    # [num_penalised + 1]: penalised slot i's output tokens are
    output_token_ids: torch.Tensor  # output_token_ids[output_starts[i]:output_starts[i + 1]]
    prompt_starts: torch.Tensor    # likewise its prompt tokens (none without a repetition penalty)
    prompt_token_ids: torch.Tensor
    suppressed_slots: torch.Tensor  # min_tokens: (slot, token id) pairs set to -inf
    suppressed_ids: torch.Tensor
    keys: torch.Tensor             # [num_rows] noise keys; empty without seeded rows (see draw.py)
    logprob_rows: torch.Tensor
    guided_slots: torch.Tensor     # structured outputs: the slots of the rows with a grammar
    bitmask: torch.Tensor          # [num_guided, ceil(vocab_size / 32)] int32: their allowed tokens

    @classmethod
    def build(cls, seqs: list[SamplingSequence], device: torch.device, base_key: int,
              in_flight: InFlightTokens | None = None) -> "SamplingMetadata":
        """The settings of `seqs` (one per logits row, in row order). `base_key`: the step's noise
        key of unseeded rows (row r draws with base_key + r). `in_flight`: the previous step's sampled
        ids, for penalised sequences whose newest token is a placeholder."""
        if all(seq.sampling_params.temperature_only for seq in seqs):  # the common case, kept cheap
            return cls.plain_rows([seq.sampling_params.temperature for seq in seqs], device)
        host = _HostLists()
        for row, seq in enumerate(seqs):
            host.add(row, seq, in_flight)
        return host.upload(len(seqs), device, base_key, in_flight)

    @classmethod
    def plain_rows(cls, temperatures: list[float], device: torch.device) -> "SamplingMetadata":
        """Rows that use temperature alone: one upload, on the current stream; every stage empty."""
        host = torch.tensor(temperatures, dtype=torch.float32)
        temps = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
        ints, floats = torch.empty(0, dtype=torch.int64, device=device), temps[:0]
        empty = {name: floats if name in _FLOAT_FIELDS else ints for name in _TENSOR_FIELDS}
        return cls(len(temperatures), True, 0, 0, False, [], **(empty | {"temperatures": temps}))


_TENSOR_FIELDS = tuple(f.name for f in fields(SamplingMetadata) if f.type is torch.Tensor)
_FLOAT_FIELDS = ("top_k_top_ps", "log_min_ps", "top_ps", "presence_penalties", "frequency_penalties",
                 "repetition_penalties")


@dataclass
class _HostLists:
    """SamplingMetadata's contents as host lists, while they are collected."""
    temperatures: list[float] = field(default_factory=list)
    threshold_rows: list[int] = field(default_factory=list)
    top_ks: list[int] = field(default_factory=list)
    top_k_top_ps: list[float] = field(default_factory=list)
    log_min_ps: list[float] = field(default_factory=list)
    top_p_rows: list[int] = field(default_factory=list)
    top_ps: list[float] = field(default_factory=list)
    patched_rows: list[int] = field(default_factory=list)
    penalty_slots: list[int] = field(default_factory=list)
    presence_penalties: list[float] = field(default_factory=list)
    frequency_penalties: list[float] = field(default_factory=list)
    repetition_penalties: list[float] = field(default_factory=list)
    output_token_ids: list[np.ndarray] = field(default_factory=list)
    in_flight_slots: list[int] = field(default_factory=list)  # penalised slots whose last token is a placeholder
    in_flight_rows: list[int] = field(default_factory=list)  # its row of the previous step's ids
    prompt_token_ids: list[np.ndarray] = field(default_factory=list)
    suppressed_slots: list[int] = field(default_factory=list)
    suppressed_ids: list[int] = field(default_factory=list)
    seeded_rows: list[int] = field(default_factory=list)
    seeded_keys: list[int] = field(default_factory=list)
    logprob_rows: list[int] = field(default_factory=list)
    guided_slots: list[int] = field(default_factory=list)
    grammars: list[Grammar] = field(default_factory=list)
    max_top_k: int = 0
    max_logprobs: int = 0
    plain: bool = True

    def add(self, row: int, seq: SamplingSequence, in_flight: InFlightTokens | None = None):
        p = seq.sampling_params
        self.temperatures.append(p.temperature)
        if p.temperature_only:
            return
        self.plain = False
        if p.top_k > 0 or p.min_p > 0:
            self.threshold_rows.append(row)
            self.top_ks.append(max(p.top_k, 0))
            self.top_k_top_ps.append(p.top_p if p.top_k > 0 and p.top_p < 1 else math.inf)
            self.log_min_ps.append(math.log(p.min_p) if p.min_p > 0 else -math.inf)
            self.max_top_k = max(self.max_top_k, p.top_k)
        if p.top_k <= 0 and p.top_p < 1:
            self.top_p_rows.append(row)
            self.top_ps.append(p.top_p)
        if seq.seed is not None:
            self.seeded_rows.append(row)
            self.seeded_keys.append(draw_key(seq.seed, seq.num_completion_tokens))
        penalised = bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1)
        suppressing = seq.num_completion_tokens < p.min_tokens and bool(seq.all_stop_token_ids)
        guided = seq.grammar is not None
        slot = len(self.patched_rows)
        if penalised or suppressing or guided:
            self.patched_rows.append(row)
        if penalised:
            if seq.sampling_state is None:
                seq.sampling_state = SequenceState()
            token_ids = seq.sampling_state.token_ids(seq)
            self.penalty_slots.append(slot)
            self.presence_penalties.append(p.presence_penalty)
            self.frequency_penalties.append(p.frequency_penalty)
            self.repetition_penalties.append(p.repetition_penalty)
            output_ids = token_ids[seq.num_prompt_tokens:]
            if seq.num_tokens > len(token_ids):  # its newest token is still on the device: a slot for it
                assert seq.num_tokens == len(token_ids) + 1 and in_flight is not None \
                    and seq.seq_id in in_flight.rows, "a placeholder is the previous step's sample"
                self.in_flight_slots.append(len(self.output_token_ids))
                self.in_flight_rows.append(in_flight.rows[seq.seq_id])
                output_ids = np.append(output_ids, 0)
            self.output_token_ids.append(output_ids)
            self.prompt_token_ids.append(token_ids[:seq.num_prompt_tokens if p.repetition_penalty != 1 else 0])
        if suppressing:
            self.suppressed_slots.extend([slot] * len(seq.all_stop_token_ids))
            self.suppressed_ids.extend(seq.all_stop_token_ids)
        if guided:
            self.guided_slots.append(slot)
            self.grammars.append(seq.grammar)
        if p.logprobs is not None:
            self.logprob_rows.append(row)
            self.max_logprobs = max(self.max_logprobs, p.logprobs)

    def upload(self, num_rows: int, device: torch.device, base_key: int,
               in_flight: InFlightTokens | None = None) -> SamplingMetadata:
        """One copy of all ints, one of all floats. The penalties' token ids travel once each,
        with where each slot's tokens start; placeholders are then filled on the device."""
        output_starts = np.cumsum([0] + [len(a) for a in self.output_token_ids])
        prompt_starts = np.cumsum([0] + [len(a) for a in self.prompt_token_ids])
        keys = np.empty(0, np.int64)
        if self.seeded_rows:
            keys = np.arange(base_key, base_key + num_rows, dtype=np.int64)
            keys[self.seeded_rows] = self.seeded_keys
        patched_index = np.empty(0, np.int64)
        if self.patched_rows:
            patched_index = np.full(num_rows, -1, np.int64)
            patched_index[self.patched_rows] = np.arange(len(self.patched_rows))
        ints = dict(threshold_rows=self.threshold_rows, top_ks=self.top_ks, top_p_rows=self.top_p_rows,
                    patched_rows=self.patched_rows, patched_index=patched_index, penalty_slots=self.penalty_slots,
                    output_starts=output_starts, output_token_ids=_concat(self.output_token_ids),
                    prompt_starts=prompt_starts, prompt_token_ids=_concat(self.prompt_token_ids),
                    suppressed_slots=self.suppressed_slots, suppressed_ids=self.suppressed_ids, keys=keys,
                    logprob_rows=self.logprob_rows, guided_slots=self.guided_slots,
                    in_flight_positions=output_starts[1:][self.in_flight_slots] - 1, in_flight_rows=self.in_flight_rows)
        floats = dict(temperatures=self.temperatures, top_k_top_ps=self.top_k_top_ps, log_min_ps=self.log_min_ps,
                      top_ps=self.top_ps, presence_penalties=self.presence_penalties,
                      frequency_penalties=self.frequency_penalties, repetition_penalties=self.repetition_penalties)
        int_host = torch.from_numpy(np.concatenate([np.asarray(v, np.int64) for v in ints.values()]))
        float_host = torch.tensor([x for v in floats.values() for x in v], dtype=torch.float32)
        tensors = dict(zip(ints, upload(int_host, device).split([len(v) for v in ints.values()])))
        tensors["bitmask"] = upload(self._bitmask(), device)
        tensors.update(zip(floats, upload(float_host, device).split([len(v) for v in floats.values()])))
        positions, rows = tensors.pop("in_flight_positions"), tensors.pop("in_flight_rows")
        if self.in_flight_slots:  # each such slot's last entry, after the upload, on the stream that sampled them
            scatter_prev_sampled(tensors["output_token_ids"], positions, rows, in_flight.token_ids)
        return SamplingMetadata(num_rows, self.plain, self.max_top_k, self.max_logprobs,
                                any(r != 1 for r in self.repetition_penalties), self.logprob_rows, **tensors)


    def _bitmask(self) -> torch.Tensor:
        """[num_guided, words] int32: each guided row's allowed tokens, filled by its grammar."""
        if not self.grammars:
            return torch.empty(0, 0, dtype=torch.int32)
        bitmask = torch.empty(len(self.grammars), bitmask_words(self.grammars[0].vocab_size), dtype=torch.int32)
        for i, grammar in enumerate(self.grammars):
            grammar.fill_bitmask(bitmask, i)
        return bitmask


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, np.int64)


_upload_streams: dict[torch.device, torch.cuda.Stream] = {}


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`. On CUDA the copy runs on a stream of its own, so that it overlaps the
    forward queued before it instead of waiting for it; the current stream waits for the copy."""
    if device.type != "cuda":
        return host
    if not host.numel():  # a plain step's ints: nothing to copy
        return torch.empty(0, dtype=host.dtype, device=device)
    stream = _upload_streams.get(device)
    if stream is None:
        stream = _upload_streams[device] = torch.cuda.Stream(device)
    host, current = host.pin_memory(), torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        on_device = host.to(device, non_blocking=True)
    current.wait_stream(stream)
    on_device.record_stream(current)  # its memory is the upload stream's: not reused while current reads it
    return on_device
