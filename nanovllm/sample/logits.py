"""A step's logits as the sampling stages read them: the model's rows, and float32 copies of the
rows that penalties or min_tokens change.

`PatchedLogits.main` ([num_rows, vocab_size], the model's dtype) is never modified; the rows that
change are copied (`float_rows`, one Triton pass on CUDA) into `patched` ([num_patched,
vocab_size] float32), and each later stage reads row r from `patched[patched_index[r]]` when that
index is >= 0, else from `main`. So the sampler copies only the rows that change, never the batch.
On the torch path (CPU) the patched rows are merged into one dense float32 copy instead.
"""
import torch

from nanovllm.utils.triton_utils import slices_of, tl, triton

COPY_BLOCK = 1024             # columns per loop iteration of the copy program
COPY_TARGET_PROGRAMS = 2048   # rows * slices aimed at, to fill every SM


class PatchedLogits:
    """`main`: [num_rows, vocab_size] the model's logits (read only); `patched`: None, or
    [num_patched, vocab_size] float32 rows that replace main's rows `patched_rows` ([num_patched]
    int64, on the device); `patched_index`: [num_rows] int64, each row's index in `patched` or -1.
    `triton_kernels`: whether the stages use their Triton kernels (default: on CUDA when Triton is
    installed; tests set it to run them under the interpreter on the CPU)."""

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

    def kernel_args(self) -> tuple:
        """(main, its row stride, patched, patched_index, use_patched) as the kernels take them;
        unused pointers get a tensor of the right dtype, never read."""
        if self.patched is None:
            return (self.main, self.main.stride(0), self.main.new_empty(1, dtype=torch.float32),
                    self.main.new_empty(1, dtype=torch.int64), 0)
        return self.main, self.main.stride(0), self.patched, self.patched_index, 1

    def dense(self) -> torch.Tensor:
        """[num_rows, vocab_size]: every row as the stages see it (torch path: main itself)."""
        assert self.patched is None, "dense() is for the torch path, where patched rows are merged"
        return self.main

    def rows(self, index: torch.Tensor, every_row: bool) -> torch.Tensor:
        """[len(index), vocab_size] the rows `index` (all rows in order when `every_row`: no copy
        where nothing is patched); in main's dtype unless rows are patched, then float32."""
        if self.patched is None:
            return self.main if every_row else self.main[index]
        where = self.patched_index[index]
        dense = self.main[index].float()
        return torch.where((where >= 0).unsqueeze(1), self.patched[where.clamp(min=0)], dense)


def float_rows(logits: torch.Tensor, rows: torch.Tensor, triton_kernels: bool | None = None) -> torch.Tensor:
    """[len(rows), vocab_size] float32 copies of logits[rows] (one Triton pass on CUDA;
    `triton_kernels` as in PatchedLogits)."""
    if not (logits.is_cuda and triton is not None if triton_kernels is None else triton_kernels):
        return logits.index_select(0, rows).float()
    out = torch.empty(len(rows), logits.shape[1], dtype=torch.float32, device=logits.device)
    slice_len, num_slices = slices_of(len(rows), logits.shape[1], COPY_BLOCK, COPY_TARGET_PROGRAMS)
    _float_rows_kernel[(len(rows), num_slices)](logits, logits.stride(0), rows, out, logits.shape[1], slice_len,
                                                BLOCK=COPY_BLOCK)
    return out


if triton is not None:

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
