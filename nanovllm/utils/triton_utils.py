"""Triton, where installed (CPU-only installs may lack it: the torch paths cover them), and the
grid helpers the kernels share."""
import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


NUM_SMS_OFF_GPU = 4  # what grid heuristics assume under Triton's interpreter: a few programs, splits still split


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (NUM_SMS_OFF_GPU off CUDA)."""
    if device.type != "cuda":
        return NUM_SMS_OFF_GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def slices_of(num_rows: int, row_len: int, step: int, target_programs: int) -> tuple[int, int]:
    """(slice_len, num_slices): each row split into slices of a multiple of `step` columns, so that
    num_rows * num_slices comes near `target_programs` (one Triton program per slice)."""
    num_slices = min(triton.cdiv(row_len, step), max(1, triton.cdiv(target_programs, num_rows)))
    slice_len = triton.cdiv(triton.cdiv(row_len, num_slices), step) * step
    return slice_len, triton.cdiv(row_len, slice_len)
