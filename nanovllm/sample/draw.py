"""The last stage of sampling: temperature, the per-row keep threshold, and the draw.

For each row of `logits` ([num_rows, vocab_size], any float dtype, read only):
  tokens whose logit is below the row's threshold are out (top-k / top-p / min-p, computed by
  the caller on the raw logits, usually one of the row's own logit values: comparing raw values
  is exact, where scaled ones could differ in the last bit between torch and the kernel);
  x = logits / temperature; the token is argmax(x + G) with G i.i.d. Gumbel(0, 1) (Gumbel-max:
  distributed as Categorical(softmax(x)), no normalisation, cumsum or sort).
  A greedy row (temperature 0) takes argmax(logits), first index on ties.

Noise is a pure function of a 64-bit key per row: `keys[row]` for a seeded row (`draw_key`:
its seed and the number of tokens it drew before, so its tokens depend on neither the batch nor
the step it shares), `base_key + row` otherwise, with `base_key` drawn from the sampler's own
random stream each step. On CUDA, `race_triton` is one Triton pass over the logits: Philox
noise generated in registers, never written to memory; each program scans a slice of a row and
a tiny torch argmax combines the slices. `race_torch` is the reference (CPU): the same math
with a torch.Generator per key, so the CPU and GPU draws agree in distribution, not bit for bit.
"""
import torch

from nanovllm.sample.logits import PatchedLogits
from nanovllm.utils.triton_utils import slices_of, tl, triton

MASK64 = (1 << 64) - 1
MAX_KEY = (1 << 62) - 1  # keys stay below 2**63 even after adding a row index
RACE_BLOCK = 512         # columns per sub-block; one Philox call yields noise for 4 sub-blocks
RACE_TARGET_PROGRAMS = 2048  # rows * slices aimed at, to fill every SM


def draw_key(seed: int, draw: int) -> int:
    """The noise key of a seeded sequence's `draw`-th token: splitmix64 of (seed, draw)."""
    z = (seed * 0x9E3779B97F4A7C15 + draw + 1) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) & MAX_KEY


def draw(logits: PatchedLogits, temperatures: torch.Tensor, thresholds: torch.Tensor | None, base_key: int,
         keys: torch.Tensor | None) -> torch.Tensor:
    """[num_rows] int64: the race over every row of `logits`, as race_torch describes."""
    if not logits.triton_kernels:
        return race_torch(logits.dense(), temperatures, thresholds, base_key, keys)
    return race_triton(logits.main, temperatures, thresholds, base_key, keys, patched=logits.patched,
                       patched_index=logits.patched_index)


def race_torch(logits: torch.Tensor, temperatures: torch.Tensor, thresholds: torch.Tensor | None,
               base_key: int, keys: torch.Tensor | None = None) -> torch.Tensor:
    """[num_rows] int64 tokens. `temperatures`, `thresholds`: [num_rows] float32 (thresholds None:
    keep every token); `keys`: [num_rows] int64, None for `base_key + row`."""
    greedy = temperatures == 0
    logits = logits.float()
    if thresholds is not None:
        logits = logits.masked_fill(logits < thresholds.unsqueeze(1), float("-inf"))
    scaled = logits / torch.where(greedy, 1.0, temperatures).unsqueeze(1)
    noise = torch.empty_like(scaled)  # Exp(1): argmax(p / E) is the Gumbel-max draw
    keys = range(base_key, base_key + len(scaled)) if keys is None else keys.tolist()
    for row, key in enumerate(keys):
        noise[row].exponential_(1, generator=torch.Generator(scaled.device).manual_seed(key))
    sampled = (scaled.softmax(-1) / noise).argmax(-1)
    return torch.where(greedy, scaled.argmax(-1), sampled)


def race_triton(logits: torch.Tensor, temperatures: torch.Tensor, thresholds: torch.Tensor | None,
                base_key: int, keys: torch.Tensor | None = None, block: int = RACE_BLOCK,
                patched: torch.Tensor | None = None, patched_index: torch.Tensor | None = None) -> torch.Tensor:
    """race_torch's contract, in one Triton pass (CUDA, or CPU under TRITON_INTERPRET=1);
    `block`: columns per sub-block (a power of two). Rows the sampler changed may live apart:
    row r is read from `patched[patched_index[r]]` ([num_patched, vocab_size] float32; index
    int64, -1: from `logits`) when `patched` is given."""
    num_rows, vocab_size = logits.shape
    assert logits.stride(1) == 1 and (patched is None or patched.is_contiguous())
    slice_len, num_slices = slices_of(num_rows, vocab_size, 4 * block, RACE_TARGET_PROGRAMS)
    best = torch.empty(num_rows, num_slices, dtype=torch.float32, device=logits.device)
    best_token = torch.empty(num_rows, num_slices, dtype=torch.int64, device=logits.device)
    # unused pointers get any tensor of the right dtype: the flags keep the kernel from reading them
    _race_kernel[(num_rows, num_slices)](
        logits, logits.stride(0), best if patched is None else patched,
        best_token if patched is None else patched_index, int(patched is not None), vocab_size, temperatures,
        temperatures if thresholds is None else thresholds, int(thresholds is not None),
        best_token if keys is None else keys, int(keys is not None),
        base_key, best, best_token, slice_len, num_slices, BLOCK=block)
    winner = best.argmax(1, keepdim=True)  # first slice holding the maximum: first index on ties
    return best_token.gather(1, winner).squeeze(1)


if triton is not None:

    @triton.jit
    def _race_block(row_ptr, cols, end, bits, inv_t, greedy, threshold, best, best_col):
        """Fold the columns `cols` into each lane's running (best score, its column)."""
        logit = tl.load(row_ptr + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        if greedy:
            score = logit
        else:  # + Gumbel(0, 1) from 24 random bits: u in (0, 1), never 0 or 1
            u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = logit * inv_t - tl.log(-tl.log(u))
        better = (score > best) & (logit >= threshold)  # strict: a lane's earlier column keeps a tie
        return tl.where(better, score, best), tl.where(better, cols, best_col)

    @triton.jit
    def _race_slice(row_ptr, start, end, key, inv_t, greedy, threshold, BLOCK: tl.constexpr):
        """Each lane's best (score, column) over the columns [start, end) of one row, 4 * BLOCK
        columns per iteration. Noise is made only where it can matter: not for greedy rows, and
        not where every column falls below the threshold (most of a top-k or min-p row)."""
        offsets = tl.arange(0, BLOCK)
        best = tl.full((BLOCK,), float("-inf"), tl.float32)
        best_col = tl.zeros((BLOCK,), tl.int32)
        no_bits = tl.zeros((BLOCK,), tl.uint32)
        col = start
        while col < end:  # a while loop: older Triton interpreters cannot range() over runtime ints
            c0, c1, c2, c3 = col + offsets, col + BLOCK + offsets, col + 2 * BLOCK + offsets, col + 3 * BLOCK + offsets
            live = threshold == threshold  # true
            if threshold > float("-inf"):  # a first look (the loads below then hit the cache)
                x = tl.maximum(tl.maximum(tl.load(row_ptr + c0, mask=c0 < end, other=float("-inf")),
                                          tl.load(row_ptr + c1, mask=c1 < end, other=float("-inf"))),
                               tl.maximum(tl.load(row_ptr + c2, mask=c2 < end, other=float("-inf")),
                                          tl.load(row_ptr + c3, mask=c3 < end, other=float("-inf"))))
                live = tl.max(x.to(tl.float32), 0) >= threshold
            if live:
                if greedy:  # no noise
                    b0, b1, b2, b3 = no_bits, no_bits, no_bits, no_bits
                else:  # Philox counter col // 4 + i: unique per (row key, column) in the row
                    b0, b1, b2, b3 = tl.randint4x(key, col // 4 + offsets)
                best, best_col = _race_block(row_ptr, c0, end, b0, inv_t, greedy, threshold, best, best_col)
                best, best_col = _race_block(row_ptr, c1, end, b1, inv_t, greedy, threshold, best, best_col)
                best, best_col = _race_block(row_ptr, c2, end, b2, inv_t, greedy, threshold, best, best_col)
                best, best_col = _race_block(row_ptr, c3, end, b3, inv_t, greedy, threshold, best, best_col)
            col += 4 * BLOCK
        return best, best_col

    # Only the logits' dtype and the model's vocabulary size pick a compiled variant: the flags, the
    # batch-dependent sizes and the small per-row tensors (often views at any offset of one upload)
    # are runtime values (Triton would otherwise specialise integers equal to 1 or divisible by 16
    # and pointers aligned to 16 bytes), so a new batch size or sampling mix never compiles mid-run.
    @triton.jit(do_not_specialize=["patched_index_ptr", "use_patched", "temperatures_ptr", "thresholds_ptr",
                                   "use_thresholds", "keys_ptr", "use_keys", "base_key", "slice_len",
                                   "num_slices"])
    def _race_kernel(logits_ptr, row_stride, patched_ptr, patched_index_ptr, use_patched, vocab_size,
                     temperatures_ptr, thresholds_ptr, use_thresholds, keys_ptr, use_keys, base_key,
                     best_ptr, best_token_ptr, slice_len, num_slices, BLOCK: tl.constexpr):
        """Program (row, piece): the best score of the row's columns [piece * slice_len, +slice_len)
        and its first column. Each lane keeps its own running best over the loop; one reduction
        at the end."""
        row = tl.program_id(0)
        piece = tl.program_id(1)
        temperature = tl.load(temperatures_ptr + row)
        greedy = temperature == 0.0
        inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
        threshold = tl.where(use_thresholds != 0, tl.load(thresholds_ptr + row * use_thresholds), float("-inf"))
        key = tl.where(use_keys != 0, tl.load(keys_ptr + row * use_keys).to(tl.int64), base_key + row)
        patched_row = tl.where(use_patched != 0, tl.load(patched_index_ptr + row * use_patched), -1)
        start = piece * slice_len
        end = tl.minimum(start + slice_len, vocab_size)
        if patched_row >= 0:
            best, best_col = _race_slice(patched_ptr + patched_row * vocab_size, start, end, key, inv_t, greedy,
                                         threshold, BLOCK)
        else:
            best, best_col = _race_slice(logits_ptr + row.to(tl.int64) * row_stride, start, end, key, inv_t, greedy,
                                         threshold, BLOCK)
        top = tl.max(best, 0)
        first = tl.min(tl.where(best == top, best_col, 2147483647), 0)  # first column on ties
        tl.store(best_ptr + row * num_slices + piece, top)
        tl.store(best_token_ptr + row * num_slices + piece, first.to(tl.int64))
