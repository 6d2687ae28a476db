"""A step's logits rows as the sampler reads them, and the selections its keep thresholds need.

`LogitRows` holds the logits as the model gave them (`main`, [num_rows, vocab_size], left
unmodified) and, apart, the rows that penalties or min_tokens changed (`patched`, float32, one
row per changed row): the sampler copies only those rows, never the whole batch. Its methods are
the sampler's reads of the rows:
  top_k:   each selected row's k-th largest logit, how many logits equal it, and (optionally)
           the logits above it (for top-p within the top-k);
  row_max: each selected row's largest logit (min-p);
  rows:    selected rows as one dense tensor (the top-p sort);
  draw:    the race (`sampling_race`).
With Triton on CUDA each of these reads `main` and `patched` in place, one program per slice of a
row. top_k (k up to SELECT_LANES) needs no sort of the vocabulary: a first pass takes the maximum
of each lane (columns equal mod SELECT_LANES), and the k-th largest of these lane maxima is a value
that k of the row's logits reach (a lower bound of the k-th largest); a second pass collects the
few logits above it (only k - 1 lanes hold any, which bounds their number) and counts those equal
to it; torch.topk of the collected values then gives the exact k-th largest. Elsewhere (CPU),
or for a larger k, the patched rows are merged into a float32 copy and torch.topk selects from the
whole rows: both give the same values.

`float_rows` makes the patched copies and `penalize_triton` applies the penalties to them (one
program per penalised row), the CUDA side of the sampler's torch code.
"""
from typing import NamedTuple

import torch

from nanovllm.layers.sampling_race import race_torch, race_triton, slices_of, triton

if triton is not None:
    import triton.language as tl

SELECT_BLOCK = 1024             # columns per loop iteration of a selection program
SELECT_LANES = 4096             # lanes of top-k's lower bound (k up to this uses the Triton path)
LANE_BLOCK = 256                # lanes per program of the lane maxima
SELECT_TARGET_PROGRAMS = 2048   # rows * slices aimed at, to fill every SM


class TopK(NamedTuple):
    """Per selected row: `kth` its k-th largest logit (float32), `num_kth` how many of its logits
    equal kth (int32), `greater` [num_selected, max_k] float32 its logits above kth in any order,
    -inf padded (None unless asked for; fewer than k per row, so they always fit)."""
    kth: torch.Tensor
    num_kth: torch.Tensor
    greater: torch.Tensor | None


class LogitRows:
    """`main`: [num_rows, vocab_size] the model's logits (read only); `patched`: None, or
    [num_patched, vocab_size] float32 rows that replace main's rows `patched_rows` ([num_patched]
    int64, on the device); `patched_index`: [num_rows] int64, each row's index in `patched` or -1.
    `triton_kernels`: use the Triton kernels (default: on CUDA when Triton is installed; tests set
    it to run them under the interpreter on the CPU)."""

    def __init__(self, main: torch.Tensor, patched: torch.Tensor | None = None,
                 patched_rows: torch.Tensor | None = None, patched_index: torch.Tensor | None = None,
                 triton_kernels: bool | None = None):
        self.triton_kernels = main.is_cuda and triton is not None if triton_kernels is None else triton_kernels
        self.vocab_size = main.shape[1]
        self.patched = self.patched_index = None
        if patched is not None and not self.triton_kernels:  # one dense float32 copy for torch
            main = main.to(torch.float32, copy=True)
            main[patched_rows] = patched
        elif patched is not None:
            self.patched, self.patched_index = patched.contiguous(), patched_index
        self.main = main

    def _kernel_args(self) -> tuple:
        """(main, its row stride, patched, patched_index, use_patched) as the kernels take them;
        unused pointers get a tensor of the right dtype, never read."""
        if self.patched is None:
            return (self.main, self.main.stride(0), self.main.new_empty(1, dtype=torch.float32),
                    self.main.new_empty(1, dtype=torch.int64), 0)
        return self.main, self.main.stride(0), self.patched, self.patched_index, 1

    def rows(self, index: torch.Tensor, every_row: bool) -> torch.Tensor:
        """[len(index), vocab_size] the rows `index` (all rows in order when `every_row`: no copy
        where nothing is patched); in main's dtype unless rows are patched, then float32."""
        if self.patched is None:
            return self.main if every_row else self.main[index]
        where = self.patched_index[index]
        dense = self.main[index].float()
        return torch.where((where >= 0).unsqueeze(1), self.patched[where.clamp(min=0)], dense)

    def row_max(self, index: torch.Tensor) -> torch.Tensor:
        """[len(index)] float32: the largest logit of each row of `index`."""
        if not self.triton_kernels:
            return self.rows(index, False).amax(-1).float()
        slice_len, num_slices = slices_of(len(index), self.vocab_size, SELECT_BLOCK, SELECT_TARGET_PROGRAMS)
        maxima = torch.empty(len(index), num_slices, dtype=torch.float32, device=self.main.device)
        _row_max_kernel[(len(index), num_slices)](*self._kernel_args(), index, self.vocab_size, maxima,
                                                  slice_len, num_slices, BLOCK=SELECT_BLOCK)
        return maxima.amax(1)

    def top_k(self, index: torch.Tensor, ks: torch.Tensor, max_k: int, with_greater: bool) -> TopK:
        """The k-th largest logit of each row of `index` (`ks`: [len(index)] int64, each in
        [1, vocab_size]; `max_k`: their maximum, known on the host), with ties counted."""
        if not self.triton_kernels or max_k > SELECT_LANES:
            x = self.rows(index, False)
            values = x.topk(max_k, -1).values.float()  # [n, max_k] descending
            kth = values.gather(1, (ks - 1).unsqueeze(1))
            num_kth = (x.float() == kth).sum(-1, dtype=torch.int32)
            greater = values.masked_fill(values <= kth, float("-inf")) if with_greater else None
            return TopK(kth.squeeze(1), num_kth, greater)
        # 1. a lower bound of each row's k-th largest: the k-th largest of its lane maxima, lane
        # j holding the columns j mod SELECT_LANES (at least k logits reach it)
        n, device = len(index), self.main.device
        lane_max = torch.empty(n, SELECT_LANES, dtype=torch.float32, device=device)
        _lane_max_kernel[(n, SELECT_LANES // LANE_BLOCK)](*self._kernel_args(), index, self.vocab_size, lane_max,
                                                          LANES=SELECT_LANES, BLOCK=LANE_BLOCK)
        bound = lane_max.topk(max_k, -1).values.gather(1, (ks - 1).unsqueeze(1)).squeeze(1)  # [n]
        # 2. the logits above the bound, collected; those equal to it, counted. At most k - 1 lanes
        # hold logits above it, so there are at most (k - 1) * (columns per lane) of them
        capacity = min(self.vocab_size, max(max_k, (max_k - 1) * triton.cdiv(self.vocab_size, SELECT_LANES)))
        above = torch.full((n, capacity), float("-inf"), device=device)
        counters = torch.zeros(2, n, dtype=torch.int32, device=device)  # [above, at the bound]
        slice_len, num_slices = slices_of(n, self.vocab_size, SELECT_BLOCK, SELECT_TARGET_PROGRAMS)
        _collect_kernel[(n, num_slices)](*self._kernel_args(), index, self.vocab_size, bound, above, counters,
                                         capacity, slice_len, BLOCK=SELECT_BLOCK)
        # 3. the k-th largest of the collected logits, or the bound where fewer than k were above it
        bound = bound.unsqueeze(1)  # [n, 1]
        top = above.topk(max_k, -1).values  # [n, max_k] descending, -inf padded
        kth = torch.maximum(top.gather(1, (ks - 1).unsqueeze(1)), bound)
        num_kth = (above == kth).sum(-1, dtype=torch.int32) + torch.where(kth == bound, counters[1:].T, 0).squeeze(1)
        greater = top.masked_fill(top <= kth, float("-inf")) if with_greater else None
        return TopK(kth.squeeze(1), num_kth, greater)

    def draw(self, temperatures: torch.Tensor, thresholds: torch.Tensor | None, base_key: int,
             keys: torch.Tensor | None) -> torch.Tensor:
        """[num_rows] int64: the race over every row (see sampling_race)."""
        if not self.triton_kernels:
            return race_torch(self.main, temperatures, thresholds, base_key, keys)
        return race_triton(self.main, temperatures, thresholds, base_key, keys,
                           patched=self.patched, patched_index=self.patched_index)


if triton is not None:

    @triton.jit
    def _lane_max_of(row_ptr, vocab_size, first, LANES: tl.constexpr, BLOCK: tl.constexpr):
        """The maxima of lanes first + [0, BLOCK): lane j holds the columns j mod LANES."""
        offsets = tl.arange(0, BLOCK)
        lane_max = tl.full((BLOCK,), float("-inf"), tl.float32)
        col = first
        while col < vocab_size:
            cols = col + offsets
            lane_max = tl.maximum(lane_max, tl.load(row_ptr + cols, mask=cols < vocab_size,
                                                    other=float("-inf")).to(tl.float32))
            col += LANES
        return lane_max

    @triton.jit
    def _collect_slice(row_ptr, start, end, bound, out_ptr, counter_ptr, capacity, BLOCK: tl.constexpr):
        """Append the logits of columns [start, end) above `bound` to out (slots from the
        counter); return how many equal it."""
        offsets = tl.arange(0, BLOCK)
        num_at_bound = tl.zeros((BLOCK,), tl.int32)
        col = start
        while col < end:
            cols = col + offsets
            x = tl.load(row_ptr + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
            num_at_bound += ((x == bound) & (cols < end)).to(tl.int32)
            above = x > bound
            slot = tl.atomic_add(counter_ptr + offsets * 0, 1, mask=above)
            tl.store(out_ptr + slot, x, mask=above & (slot < capacity))  # always: capacity is an upper bound
            col += BLOCK
        return tl.sum(num_at_bound, 0)

    @triton.jit
    def _slice_max(row_ptr, start, end, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        best = tl.full((BLOCK,), float("-inf"), tl.float32)
        col = start
        while col < end:
            cols = col + offsets
            best = tl.maximum(best, tl.load(row_ptr + cols, mask=cols < end, other=float("-inf")).to(tl.float32))
            col += BLOCK
        return tl.max(best, 0)

    # As in the race: only dtypes pick compiled variants (see sampling_race).
    @triton.jit(do_not_specialize=["patched_index_ptr", "use_patched", "index_ptr", "slice_len", "num_slices"])
    def _row_max_kernel(main_ptr, row_stride, patched_ptr, patched_index_ptr, use_patched, index_ptr, vocab_size,
                        maxima_ptr, slice_len, num_slices, BLOCK: tl.constexpr):
        """Program (selected row, piece): the largest logit of the slice."""
        selected = tl.program_id(0)
        piece = tl.program_id(1)
        row = tl.load(index_ptr + selected)
        patched_row = tl.where(use_patched != 0, tl.load(patched_index_ptr + row * use_patched), -1)
        start = piece * slice_len
        end = tl.minimum(start + slice_len, vocab_size)
        if patched_row >= 0:
            best = _slice_max(patched_ptr + patched_row * vocab_size, start, end, BLOCK)
        else:
            best = _slice_max(main_ptr + row * row_stride, start, end, BLOCK)
        tl.store(maxima_ptr + selected * num_slices + piece, best)

    @triton.jit(do_not_specialize=["patched_index_ptr", "use_patched", "index_ptr"])
    def _lane_max_kernel(main_ptr, row_stride, patched_ptr, patched_index_ptr, use_patched, index_ptr, vocab_size,
                         lane_max_ptr, LANES: tl.constexpr, BLOCK: tl.constexpr):
        """Program (selected row, group): lane_max[selected, group * BLOCK + [0, BLOCK)]."""
        selected = tl.program_id(0)
        first = tl.program_id(1) * BLOCK
        row = tl.load(index_ptr + selected)
        patched_row = tl.where(use_patched != 0, tl.load(patched_index_ptr + row * use_patched), -1)
        if patched_row >= 0:
            lane_max = _lane_max_of(patched_ptr + patched_row * vocab_size, vocab_size, first, LANES, BLOCK)
        else:
            lane_max = _lane_max_of(main_ptr + row * row_stride, vocab_size, first, LANES, BLOCK)
        tl.store(lane_max_ptr + selected * LANES + first + tl.arange(0, BLOCK), lane_max)

    @triton.jit(do_not_specialize=["patched_index_ptr", "use_patched", "index_ptr", "capacity", "slice_len"])
    def _collect_kernel(main_ptr, row_stride, patched_ptr, patched_index_ptr, use_patched, index_ptr, vocab_size,
                        bound_ptr, above_ptr, counters_ptr, capacity, slice_len, BLOCK: tl.constexpr):
        """Program (selected row, piece): the slice's logits above the row's bound, appended to
        above[selected] (counters[0, selected] counts them); the number equal to it added to
        counters[1, selected]."""
        selected = tl.program_id(0)
        piece = tl.program_id(1)
        row = tl.load(index_ptr + selected)
        bound = tl.load(bound_ptr + selected)
        patched_row = tl.where(use_patched != 0, tl.load(patched_index_ptr + row * use_patched), -1)
        start = piece * slice_len
        end = tl.minimum(start + slice_len, vocab_size)
        out_ptr = above_ptr + selected.to(tl.int64) * capacity
        if patched_row >= 0:
            num_at_bound = _collect_slice(patched_ptr + patched_row * vocab_size, start, end, bound, out_ptr,
                                          counters_ptr + selected, capacity, BLOCK)
        else:
            num_at_bound = _collect_slice(main_ptr + row * row_stride, start, end, bound, out_ptr,
                                          counters_ptr + selected, capacity, BLOCK)
        tl.atomic_add(counters_ptr + tl.num_programs(0) + selected, num_at_bound)


PENALTY_BLOCK = 256  # token ids per loop iteration of the penalty kernel


def float_rows(logits: torch.Tensor, rows: torch.Tensor, triton_kernels: bool | None = None) -> torch.Tensor:
    """[len(rows), vocab_size] float32 copies of logits[rows] (one Triton pass on CUDA;
    `triton_kernels` as in LogitRows)."""
    if not (logits.is_cuda and triton is not None if triton_kernels is None else triton_kernels):
        return logits.index_select(0, rows).float()
    out = torch.empty(len(rows), logits.shape[1], dtype=torch.float32, device=logits.device)
    slice_len, num_slices = slices_of(len(rows), logits.shape[1], SELECT_BLOCK, SELECT_TARGET_PROGRAMS)
    _float_rows_kernel[(len(rows), num_slices)](logits, logits.stride(0), rows, out, logits.shape[1], slice_len,
                                                BLOCK=SELECT_BLOCK)
    return out


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

    @triton.jit(do_not_specialize=["rows_ptr", "slice_len"])
    def _float_rows_kernel(logits_ptr, row_stride, rows_ptr, out_ptr, vocab_size, slice_len, BLOCK: tl.constexpr):
        """Program (i, piece): out[i] = logits[rows[i]] over the piece's columns, as float32."""
        i = tl.program_id(0)
        start = tl.program_id(1) * slice_len
        end = tl.minimum(start + slice_len, vocab_size)
        in_ptr = logits_ptr + tl.load(rows_ptr + i) * row_stride
        out_ptr += i.to(tl.int64) * vocab_size
        offsets = tl.arange(0, BLOCK)
        col = start
        while col < end:
            cols = col + offsets
            tl.store(out_ptr + cols, tl.load(in_ptr + cols, mask=cols < end).to(tl.float32), mask=cols < end)
            col += BLOCK
