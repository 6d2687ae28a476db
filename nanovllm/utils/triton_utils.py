"""Triton, where installed (CPU-only installs may lack it: the torch paths cover them), and the
grid helpers the kernels share.

Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start while the kernel
before it in the stream is still running, once every program of that one has started (or called
gdc_launch_dependents). The kernels that use it (a PDL constexpr) call gdc_launch_dependents first
thing, load what no kernel writes (weights, the step's host-copied inputs) and then gdc_wait, which
returns when the kernel before has finished and its writes are visible; everything a kernel reads
from an earlier one, and every store, comes after it. In a decode step at batch 1 (a few microseconds
per kernel) this overlaps each kernel's launch and first weight loads with the end of the one before.
NANOVLLM_PDL=0 turns it off.
"""
import functools
import os

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


@functools.lru_cache(maxsize=None)
def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch (see above): CUDA devices of
    compute capability 9.0 or later, unless NANOVLLM_PDL=0."""
    if device.type != "cuda" or triton is None or os.environ.get("NANOVLLM_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def slices_of(num_rows: int, row_len: int, step: int, target_programs: int) -> tuple[int, int]:
    """(slice_len, num_slices): each row split into slices of a multiple of `step` columns, so that
    num_rows * num_slices comes near `target_programs` (one Triton program per slice)."""
    num_slices = min(triton.cdiv(row_len, step), max(1, triton.cdiv(target_programs, num_rows)))
    slice_len = triton.cdiv(triton.cdiv(row_len, num_slices), step) * step
    return slice_len, triton.cdiv(row_len, slice_len)
