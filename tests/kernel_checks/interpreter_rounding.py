"""Triton's interpreter casts float32 -> bfloat16 by truncating the mantissa; compiled kernels round
to nearest even (cvt.rn), as torch does. `round_bf16_to_nearest_even()` routes the interpreter's
cast through torch's conversion, so bfloat16 results compare with torch's at the rounding the GPU
gives (a no-op outside TRITON_INTERPRET=1; patching twice is harmless)."""
import os

import numpy as np
import torch


def round_bf16_to_nearest_even():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "rounds_bf16", False):
        return
    cast_impl = builder.cast_impl

    def rounded_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bf16 = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(bf16.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    rounded_cast.rounds_bf16 = True
    builder.cast_impl = rounded_cast
