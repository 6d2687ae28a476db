"""Small elementwise layers whose pure-torch kernel can be swapped for a torch.compile'd one.

Each subclass names a module-level pure function as `kernel`. `use_compiled()` points the
instance at one shared `torch.compile` of that function (shared, so that the many instances of a
layer do not each trigger a recompilation). The model runner calls it on the GPU unless
`enforce_eager`; on the CPU the plain kernels run.
"""
import functools
from typing import Callable

import torch
from torch import nn


@functools.cache
def compiled(fn: Callable) -> Callable:
    return torch.compile(fn)


class CompilableOp(nn.Module):
    kernel: Callable

    def __init__(self):
        super().__init__()
        self.impl = type(self).kernel

    def use_compiled(self):
        self.impl = compiled(type(self).kernel)
