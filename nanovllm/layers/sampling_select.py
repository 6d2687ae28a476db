"""A step's logits rows as the sampler reads them, and the keep thresholds of top-k, top-p and min-p.

`LogitRows` holds the logits as the model gave them (`main`, [num_rows, vocab_size], left
unmodified) and, apart, the rows that penalties or min_tokens changed (`patched`, float32, one
row per changed row): the sampler copies only those rows, never the whole batch. Its methods are
the sampler's reads of the rows:
  keep_thresholds_: each selected row's smallest kept logit under top-k, top-p among the top-k,
                    and min-p;
  rows:             selected rows as one dense tensor (the top-p sort);
  draw:             the race (`sampling_race`).
With Triton on CUDA, keep_thresholds_ (k up to SELECT_LANES) is four kernels and no sort of the
vocabulary, each reading `main` and `patched` in place:
  1. lane maxima: the maximum of each lane of a row (columns equal mod SELECT_LANES), one program
     per group of lanes;
  2. per row: its largest logit (the largest lane maximum) and a lower bound of its k-th largest:
     the k-th largest lane maximum, which k of the row's logits reach;
  3. the few logits above the bound, collected (only k - 1 lanes hold any, which bounds their
     number), and those equal to it counted, one program per slice of a row;
  4. per row: the exact k-th largest of the collected logits (or the bound), then top-p among the
     top-k and min-p, written to the row's threshold.
The selections in 2 and 4 are bitwise searches over the floats' order-preserving integer keys, in
registers (32 rounds of counting). Elsewhere (CPU), or for a larger k, the patched rows are merged
into a float32 copy and torch computes the same from the whole rows (torch.topk, a sort of the
top-k): both give the same thresholds.

`float_rows` makes the patched copies and `penalize_triton` applies the penalties to them (one
program per penalised row), the CUDA side of the sampler's torch code.
"""
import torch

from nanovllm.layers.sampling_race import race_torch, race_triton, slices_of, triton

if triton is not None:
    import triton.language as tl

SELECT_BLOCK = 1024             # columns per loop iteration of a selection program
SELECT_LANES = 4096             # lanes of top-k's lower bound (k up to this uses the Triton path)
LANE_BLOCK = 256                # lanes per program of the lane maxima
COLLECTED_BLOCK = 128           # collected logits the threshold program holds in registers
BOUND_WARPS = 4                 # warps of the per-row selection programs (32 rounds of reductions
THRESHOLD_WARPS = 1             # each; a sweep on an H100 picked these)
SELECT_TARGET_PROGRAMS = 2048   # rows * slices aimed at, to fill every SM


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

    def keep_thresholds_(self, thresholds: torch.Tensor, index: torch.Tensor, ks: torch.Tensor,
                         top_ps: torch.Tensor, log_min_ps: torch.Tensor, temperatures: torch.Tensor, max_k: int):
        """Raise thresholds[index[i]] ([num_rows] float32) to the smallest logit row index[i]
        keeps under top-k ks[i] (int64, 0: none; ties at the k-th largest kept), then among those
        top-p top_ps[i] (float32, inf: none), and min-p: logit >= largest + T * log_min_ps[i]
        (-inf: none). Probabilities are those after temperature (`temperatures`: [num_rows], 0:
        greedy, counted as 1). `max_k`: the largest of ks, known on the host. Values of ks above
        the vocabulary mean all of it."""
        max_k = min(max_k, self.vocab_size)
        if not self.triton_kernels or max_k > SELECT_LANES:
            divisors = temperatures[index]
            divisors = torch.where(divisors == 0, 1.0, divisors)
            kept = _thresholds_torch(self.rows(index, False).float(), ks.clamp(max=self.vocab_size), top_ps,
                                     log_min_ps, divisors, max_k)
            thresholds[index] = torch.maximum(thresholds[index], kept)
            return
        n, device = len(index), self.main.device
        # 1. lane maxima, lane j holding the columns j mod SELECT_LANES
        lane_max = torch.empty(n, SELECT_LANES, dtype=torch.float32, device=device)
        _lane_max_kernel[(n, SELECT_LANES // LANE_BLOCK)](*self._kernel_args(), index, self.vocab_size, lane_max,
                                                          LANES=SELECT_LANES, BLOCK=LANE_BLOCK)
        # 2. each row's largest logit, and the k-th largest lane maximum (at least k logits reach it)
        bound = torch.empty(n, dtype=torch.float32, device=device)
        row_max = torch.empty(n, dtype=torch.float32, device=device)  # apart: aligned, as compiled
        counters = torch.empty(2, n, dtype=torch.int32, device=device)  # [above the bound, at it], zeroed by 2.
        _bound_kernel[(n,)](lane_max, ks, self.vocab_size, bound, row_max, counters, LANES=SELECT_LANES,
                            num_warps=BOUND_WARPS)
        # 3. the logits above the bound, collected; those equal to it, counted. At most k - 1 lanes
        # hold logits above it, so there are at most (k - 1) * (columns per lane) of them
        capacity = max(1, min(self.vocab_size, (max_k - 1) * triton.cdiv(self.vocab_size, SELECT_LANES)))
        above = torch.empty(n, capacity, dtype=torch.float32, device=device)
        if max_k > 0:
            slice_len, num_slices = slices_of(n, self.vocab_size, SELECT_BLOCK, SELECT_TARGET_PROGRAMS)
            _collect_kernel[(n, num_slices)](*self._kernel_args(), index, ks, self.vocab_size, bound, above,
                                             counters, capacity, slice_len, BLOCK=SELECT_BLOCK)
        # 4. the thresholds
        _threshold_kernel[(n,)](above, counters, capacity, bound, row_max, index, ks, top_ps, log_min_ps,
                                temperatures, self.vocab_size, thresholds, BLOCK=COLLECTED_BLOCK,
                                num_warps=THRESHOLD_WARPS)

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
            if tl.max(x, 0) > bound:  # rarely: only the top few logits of a row are above it
                above = x > bound
                slot = tl.atomic_add(counter_ptr + offsets * 0, 1, mask=above)
                tl.store(out_ptr + slot, x, mask=above & (slot < capacity))  # always: capacity is an upper bound
            col += BLOCK
        return tl.sum(num_at_bound, 0)

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

    @triton.jit(do_not_specialize=["patched_index_ptr", "use_patched", "index_ptr", "ks_ptr", "capacity",
                                   "slice_len"])
    def _collect_kernel(main_ptr, row_stride, patched_ptr, patched_index_ptr, use_patched, index_ptr, ks_ptr,
                        vocab_size, bound_ptr, above_ptr, counters_ptr, capacity, slice_len, BLOCK: tl.constexpr):
        """Program (selected row, piece), for rows with top-k: the slice's logits above the row's
        bound, appended to above[selected] (counters[0, selected] counts them); the number equal
        to it added to counters[1, selected]."""
        selected = tl.program_id(0)
        if tl.load(ks_ptr + selected) > 0:
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

    # Selections by key: a float32's bits as an int32 that orders as the floats do (-0.0 just below
    # +0.0; both compare equal as floats, where the thresholds are used). A search finds the
    # largest key with a property that holds up to some key and not above it, one bit at a time
    # from the sign down (the keys' order is the signed order).
    @triton.jit
    def _key_of(x):
        bits = x.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _value_of(key):
        return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)

    @triton.jit
    def _kth_largest(x, k):
        """The k-th largest of the float32 block x (1 <= k <= its size): the largest key that
        at least k of x's keys reach."""
        keys = _key_of(x)
        key = tl.where(tl.sum((keys >= 0).to(tl.int32), 0) >= k, 0, -2147483648)
        for bit in tl.static_range(30, -1, -1):
            candidate = key | (1 << bit)
            key = tl.where(tl.sum((keys >= candidate).to(tl.int32), 0) >= k, candidate, key)
        return _value_of(key)

    @triton.jit
    def _top_p_key(keys, mass, kth_key, kth_mass, target):
        """The largest key with at least `target` of the mass above it: `mass` [BLOCK] of the
        logits with keys `keys`, and kth_mass at kth_key."""
        above = tl.sum(tl.where(keys > 0, mass, 0.0), 0) + tl.where(kth_key > 0, kth_mass, 0.0)
        key = tl.where(above >= target, 0, -2147483648)
        for bit in tl.static_range(30, -1, -1):
            candidate = key | (1 << bit)
            above = tl.sum(tl.where(keys > candidate, mass, 0.0), 0) + tl.where(kth_key > candidate, kth_mass, 0.0)
            key = tl.where(above >= target, candidate, key)
        return key

    @triton.jit(do_not_specialize=["ks_ptr"])
    def _bound_kernel(lane_max_ptr, ks_ptr, vocab_size, bound_ptr, row_max_ptr, counters_ptr, LANES: tl.constexpr):
        """Program i (selected row): its largest logit, and the k-th largest of its lane maxima
        (rows with top-k); zeroes its counters for the collect kernel."""
        i = tl.program_id(0)
        lane_max = tl.load(lane_max_ptr + i * LANES + tl.arange(0, LANES))
        tl.store(row_max_ptr + i, tl.max(lane_max, 0))
        tl.store(counters_ptr + i, 0)
        tl.store(counters_ptr + tl.num_programs(0) + i, 0)
        k = tl.minimum(tl.load(ks_ptr + i), vocab_size)
        if k > 0:
            tl.store(bound_ptr + i, _kth_largest(lane_max, k))

    # The same searches over more collected logits than one block holds, a block at a time.
    @triton.jit
    def _counts(values_ptr, count, key, value, BLOCK: tl.constexpr):
        """(How many of values[:count] have keys >= key, how many equal value)."""
        offsets = tl.arange(0, BLOCK)
        at_least = tl.zeros((BLOCK,), tl.int32)
        equal = tl.zeros((BLOCK,), tl.int32)
        start = 0
        while start < count:
            valid = start + offsets < count
            x = tl.load(values_ptr + start + offsets, mask=valid, other=float("nan"))
            at_least += ((_key_of(x) >= key) & valid).to(tl.int32)
            equal += (x == value).to(tl.int32)
            start += BLOCK
        return tl.sum(at_least, 0), tl.sum(equal, 0)

    @triton.jit
    def _mass_above(values_ptr, count, key, kth, kth_mass, top, divisor, BLOCK: tl.constexpr):
        """The top-k's mass (exp(x / T - top / T)) of the logits with keys above `key`: those
        of values[:count] above kth, and kth_mass at kth."""
        offsets = tl.arange(0, BLOCK)
        total = tl.zeros((BLOCK,), tl.float32)
        start = 0
        while start < count:
            x = tl.load(values_ptr + start + offsets, mask=start + offsets < count, other=float("-inf"))
            counted = (x > kth) & (_key_of(x) > key)
            total += tl.where(counted, tl.exp(x / divisor - top / divisor), 0.0)
            start += BLOCK
        return tl.sum(total, 0) + tl.where(_key_of(kth) > key, kth_mass, 0.0)

    @triton.jit
    def _top_k_top_p_of_many(values_ptr, count, k, bound, num_at_bound, top_p, top, divisor, BLOCK: tl.constexpr):
        """_threshold_kernel's top-k and top-p over values[:count], count > BLOCK."""
        kth = bound
        if count >= k:
            num_at_least, _ = _counts(values_ptr, count, 0, kth, BLOCK)
            key = tl.where(num_at_least >= k, 0, -2147483648)
            for bit in tl.static_range(30, -1, -1):
                candidate = key | (1 << bit)
                num_at_least, _ = _counts(values_ptr, count, candidate, kth, BLOCK)
                key = tl.where(num_at_least >= k, candidate, key)
            kth = _value_of(key)
        _, num_equal = _counts(values_ptr, count, 0, kth, BLOCK)
        num_kth = num_equal + tl.where(kth == bound, num_at_bound, 0)
        if top_p < float("inf"):
            kth_mass = num_kth.to(tl.float32) * tl.exp(kth / divisor - top / divisor)
            target = top_p * _mass_above(values_ptr, count, -2147483648, kth, kth_mass, top, divisor, BLOCK)
            key = tl.where(_mass_above(values_ptr, count, 0, kth, kth_mass, top, divisor, BLOCK) >= target,
                           0, -2147483648)
            for bit in tl.static_range(30, -1, -1):
                candidate = key | (1 << bit)
                above = _mass_above(values_ptr, count, candidate, kth, kth_mass, top, divisor, BLOCK)
                key = tl.where(above >= target, candidate, key)
            kth = _value_of(key + 1)
        return kth

    @triton.jit(do_not_specialize=["capacity", "index_ptr", "ks_ptr", "top_ps_ptr", "log_min_ps_ptr"])
    def _threshold_kernel(above_ptr, counters_ptr, capacity, bound_ptr, row_max_ptr, index_ptr, ks_ptr, top_ps_ptr,
                          log_min_ps_ptr, temperatures_ptr, vocab_size, thresholds_ptr, BLOCK: tl.constexpr):
        """Program i (selected row): thresholds[row] = max(itself, top-k / top-p threshold, min-p
        threshold). The k-th largest logit is the k-th largest collected one, or the bound when
        fewer than k were above it; top-p keeps the smallest logit v of the top-k such that the
        mass of the logits above v is below top_p times the top-k's mass (vLLM's cumulative sum
        over the sorted top-k): one more than the largest key with at least that mass above it."""
        i = tl.program_id(0)
        row = tl.load(index_ptr + i)
        k = tl.minimum(tl.load(ks_ptr + i), vocab_size)
        top = tl.load(row_max_ptr + i)
        temperature = tl.load(temperatures_ptr + row)
        divisor = tl.where(temperature == 0.0, 1.0, temperature)
        threshold = tl.load(thresholds_ptr + row)
        if k > 0:
            bound = tl.load(bound_ptr + i)
            num_at_bound = tl.load(counters_ptr + tl.num_programs(0) + i)
            count = tl.minimum(tl.load(counters_ptr + i), capacity)
            values_ptr = above_ptr + i.to(tl.int64) * capacity
            top_p = tl.load(top_ps_ptr + i)
            if count <= BLOCK:  # the usual case: the collected logits fit one block, in registers
                offsets = tl.arange(0, BLOCK)
                x = tl.load(values_ptr + offsets, mask=offsets < count, other=float("-inf"))
                kth = bound
                if count >= k:
                    kth = _kth_largest(x, k)
                num_kth = (tl.sum(((x == kth) & (offsets < count)).to(tl.int32), 0)
                           + tl.where(kth == bound, num_at_bound, 0))
                if top_p < float("inf"):
                    mass = tl.where(x > kth, tl.exp(x / divisor - top / divisor), 0.0)
                    kth_mass = num_kth.to(tl.float32) * tl.exp(kth / divisor - top / divisor)
                    target = top_p * (tl.sum(mass, 0) + kth_mass)
                    kth = _value_of(_top_p_key(_key_of(x), mass, _key_of(kth), kth_mass, target) + 1)
            else:
                kth = _top_k_top_p_of_many(values_ptr, count, k, bound, num_at_bound, top_p, top, divisor, BLOCK)
            threshold = tl.maximum(threshold, kth)
        log_min_p = tl.load(log_min_ps_ptr + i)
        threshold = tl.maximum(threshold, top + divisor * log_min_p)
        tl.store(thresholds_ptr + row, threshold)


def _thresholds_torch(x: torch.Tensor, ks: torch.Tensor, top_ps: torch.Tensor, log_min_ps: torch.Tensor,
                      divisors: torch.Tensor, max_k: int) -> torch.Tensor:
    """keep_thresholds_ in torch, on the selected rows x ([n, vocab_size] float32): [n]."""
    kept = torch.full((len(x),), float("-inf"), device=x.device)
    if max_k > 0:
        values = x.topk(max_k, -1).values  # [n, max_k] descending
        kth = values.gather(1, (ks - 1).clamp(min=0).unsqueeze(1))  # [n, 1]
        num_kth = (x == kth).sum(-1)
        greater = values.masked_fill(values <= kth, float("-inf"))
        kept = torch.where(ks > 0, _top_p_of_top_k(greater, kth.squeeze(1), num_kth, divisors, top_ps), kept)
    return torch.maximum(kept, x.amax(-1) + divisors * log_min_ps)


def _top_p_of_top_k(greater: torch.Tensor, kth: torch.Tensor, num_kth: torch.Tensor, divisors: torch.Tensor,
                    top_ps: torch.Tensor) -> torch.Tensor:
    """[n]: the smallest logit each row keeps under top-k, then top-p among the top-k, as vLLM:
    the logits >= the k-th largest `kth` (ties kept; `greater` [n, max_k]: those above it, -inf
    padded), then of those the most likely ones while the mass of the larger ones is below top_p
    (probabilities after temperature, renormalised over the top-k, ties at kth counted `num_kth`
    times; top_p inf: all)."""
    greater = greater.sort(-1, descending=True).values  # -inf padding last
    values = torch.cat([greater, kth.unsqueeze(1)], 1)  # descending but for the padding
    weights = torch.cat([torch.ones_like(greater), num_kth.unsqueeze(1).float()], 1)
    scaled = values / divisors.unsqueeze(1)
    mass = weights * torch.exp(scaled - scaled.amax(-1, keepdim=True))  # padding: 0
    larger = mass.cumsum(-1) - mass  # mass of the larger logits
    keep = (larger < top_ps.unsqueeze(1) * mass.sum(-1, keepdim=True)) & (values > float("-inf"))
    return torch.where(keep, values, float("inf")).amin(-1)


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
