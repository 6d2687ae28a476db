"""The Triton kernels of the keep thresholds (`thresholds.py`): top-k, top-p among the top-k and
min-p for every threshold row, in four kernels and no sort of the vocabulary, each reading the
model's rows and the patched copies in place:
  1. lane maxima: the maximum of each lane of a row (columns equal mod SELECT_LANES), one program
     per group of lanes;
  2. per row: its largest logit (the largest lane maximum) and a lower bound of its k-th largest:
     the k-th largest lane maximum, which k of the row's logits reach;
  3. the few logits above the bound, collected (only k - 1 lanes hold any, which bounds their
     number), and those equal to it counted, one program per slice of a row;
  4. per row: the exact k-th largest of the collected logits (or the bound), then top-p among the
     top-k and min-p, written to the row's threshold.
The selections in 2 and 4 are bitwise searches over the floats' order-preserving integer keys, in
registers (32 rounds of counting).
"""
import torch

from nanovllm.sample.logits import PatchedLogits
from nanovllm.utils.triton_utils import slices_of, tl, triton

SELECT_BLOCK = 1024             # columns per loop iteration of a selection program
SELECT_LANES = 4096             # lanes of top-k's lower bound (k up to this uses these kernels)
LANE_BLOCK = 256                # lanes per program of the lane maxima
COLLECTED_BLOCK = 128           # collected logits the threshold program holds in registers
BOUND_WARPS = 4                 # warps of the per-row selection programs (32 rounds of reductions
THRESHOLD_WARPS = 1             # each; a sweep on an H100 picked these)
SELECT_TARGET_PROGRAMS = 2048   # rows * slices aimed at, to fill every SM


def keep_thresholds_triton_(logits: PatchedLogits, thresholds: torch.Tensor, index: torch.Tensor, ks: torch.Tensor,
                            top_ps: torch.Tensor, log_min_ps: torch.Tensor, temperatures: torch.Tensor, max_k: int):
    """`thresholds.keep_thresholds_`'s contract, for max_k <= min(SELECT_LANES, vocab_size)."""
    n, device = len(index), logits.main.device
    # 1. lane maxima, lane j holding the columns j mod SELECT_LANES
    lane_max = torch.empty(n, SELECT_LANES, dtype=torch.float32, device=device)
    _lane_max_kernel[(n, SELECT_LANES // LANE_BLOCK)](*logits.kernel_args(), index, logits.vocab_size, lane_max,
                                                      LANES=SELECT_LANES, BLOCK=LANE_BLOCK)
    # 2. each row's largest logit, and the k-th largest lane maximum (at least k logits reach it)
    bound = torch.empty(n, dtype=torch.float32, device=device)
    row_max = torch.empty(n, dtype=torch.float32, device=device)  # apart: aligned, as compiled
    counters = torch.empty(2, n, dtype=torch.int32, device=device)  # [above the bound, at it], zeroed by 2.
    _bound_kernel[(n,)](lane_max, ks, logits.vocab_size, bound, row_max, counters, LANES=SELECT_LANES,
                        num_warps=BOUND_WARPS)
    # 3. the logits above the bound, collected; those equal to it, counted. At most k - 1 lanes
    # hold logits above it, so there are at most (k - 1) * (columns per lane) of them
    capacity = max(1, min(logits.vocab_size, (max_k - 1) * triton.cdiv(logits.vocab_size, SELECT_LANES)))
    above = torch.empty(n, capacity, dtype=torch.float32, device=device)
    if max_k > 0:
        slice_len, num_slices = slices_of(n, logits.vocab_size, SELECT_BLOCK, SELECT_TARGET_PROGRAMS)
        _collect_kernel[(n, num_slices)](*logits.kernel_args(), index, ks, logits.vocab_size, bound, above,
                                         counters, capacity, slice_len, BLOCK=SELECT_BLOCK)
    # 4. the thresholds
    _threshold_kernel[(n,)](above, counters, capacity, bound, row_max, index, ks, top_ps, log_min_ps,
                            temperatures, logits.vocab_size, thresholds, BLOCK=COLLECTED_BLOCK,
                            num_warps=THRESHOLD_WARPS)


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
