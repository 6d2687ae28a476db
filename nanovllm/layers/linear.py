"""Tensor-parallel linear layers (Megatron-style) with per-parameter weight loaders.

- ColumnParallelLinear splits the output features: each rank holds `output_size / tp` rows.
- MergedColumnParallelLinear packs several column-parallel projections (gate and up) into one
  matrix; the loader takes the checkpoint tensor of one of them, by index.
- QKVParallelLinear packs q, k and v; each rank holds its heads of each ("q", "k", "v").
- RowParallelLinear splits the input features and all-reduces the partial sums (unless
  `reduce_results=False`: the caller reduces them); its bias is added once, after the reduction.
Each parameter's `weight_loader(param, loaded_weight[, shard_id])` copies this rank's slice of a
checkpoint tensor into the parameter.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.parallel import all_reduce, divide, tp_rank, tp_size


class LinearBase(nn.Module):

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None):
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _shard(self, loaded: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        return loaded.narrow(dim, self.tp_rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        if self.tp_dim is not None and param.dim() > self.tp_dim:
            loaded = self._shard(loaded, self.tp_dim, param.size(self.tp_dim))
        _copy(param.data, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, tp_dim=None)


class ColumnParallelLinear(LinearBase):

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, divide(output_size, tp_size(), "output features"), bias, tp_dim=0)


class MergedColumnParallelLinear(ColumnParallelLinear):

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int):
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _copy(param.data.narrow(0, offset, size), self._shard(loaded, 0, size))


class QKVParallelLinear(ColumnParallelLinear):

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False):
        tp = tp_size()
        self.head_size = head_size
        self.num_heads = divide(total_num_heads, tp, "num_attention_heads")
        self.num_kv_heads = divide(total_num_kv_heads, tp, "num_key_value_heads")
        output_size = (total_num_heads + 2 * total_num_kv_heads) * head_size
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str):
        q_size, kv_size = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        _copy(param.data.narrow(0, offset, size), self._shard(loaded, 0, size))


class RowParallelLinear(LinearBase):

    def __init__(self, input_size: int, output_size: int, bias: bool = False, reduce_results: bool = True):
        super().__init__(divide(input_size, tp_size(), "input features"), output_size, bias, tp_dim=1)
        assert reduce_results or not bias  # a bias on each rank's partial sum would be added tp times
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.tp_size > 1 and self.reduce_results:
            y = all_reduce(y)
        return y + self.bias if self.bias is not None else y


def _copy(dst: torch.Tensor, src: torch.Tensor):
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter "
                         f"slice of shape {tuple(dst.shape)}")
    dst.copy_(src)
