"""Tensor-parallel linear layers (Megatron-style) with per-parameter weight loaders.

- ColumnParallelLinear splits the output features: each rank holds `output_size / tp` rows.
- MergedColumnParallelLinear packs several column-parallel projections (gate and up) into one
  matrix; the loader takes the checkpoint tensor of one of them, by index.
- QKVParallelLinear packs q, k and v; each rank holds its heads of each ("q", "k", "v").
- RowParallelLinear splits the input features and all-reduces the partial sums (unless
  `reduce_results=False`: the caller reduces them); its bias is added once, after the reduction.
Each parameter's `weight_loader(param, loaded_weight[, shard_id])` copies this rank's slice of a
checkpoint tensor into the parameter.

With an `Fp8Config` (`quant_config`; None: unquantized) a layer holds FP8 weights and their block
scales (`nanovllm.layers.quantization.fp8`), sharded and packed like the weight: one row of the
scales covers `block_size` rows of the weight. `prefix` names the layer in errors.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.activation import PendingSiluMul
from nanovllm.layers.layernorm import PendingNorm
from nanovllm.layers.quantization import fp8
from nanovllm.layers.quantization.config import Fp8Config
from nanovllm.layers.skinny_gemm import prefer_skinny, skinny_linear
from nanovllm.utils.parallel import all_reduce, divide, tp_rank, tp_size

Pending = PendingNorm | PendingSiluMul  # an input some linears compute in their kernel's prologue


class LinearBase(nn.Module):

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None,
                 quant_config: Fp8Config | None = None, prefix: str = ""):
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.quant_config = quant_config
        self.params_dtype = torch.get_default_dtype()
        if quant_config is None:
            self.weight = nn.Parameter(torch.empty(output_size, input_size))
        else:
            if tp_dim is not None:
                fp8.check_block_alignment(prefix, quant_config, tp_dim, self._loaded_sizes(input_size, output_size),
                                          self.tp_size)
            fp8.create_fp8_weights(self, input_size, output_size, quant_config)
        for param in (self.weight, getattr(self, "weight_scale_inv", None)):
            if param is not None:
                param.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _loaded_sizes(self, input_size: int, output_size: int) -> list[int]:
        """This rank's features along tp_dim of each checkpoint tensor loaded into it."""
        return [output_size if self.tp_dim == 0 else input_size] if self.tp_size > 1 else []

    def _shard(self, loaded: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        return loaded.narrow(dim, self.tp_rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        if self.tp_dim is not None and param.dim() > self.tp_dim:
            loaded = self._shard(loaded, self.tp_dim, param.size(self.tp_dim))
        _copy(param.data, loaded)

    def process_weights_after_loading(self):
        if self.quant_config is not None:
            fp8.process_weights_after_loading(self, self.quant_config, self.params_dtype)

    def _linear(self, x: torch.Tensor | Pending, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W^T (+ bias); x may be a norm or activation still to compute (Pending): the one-row kernel
        computes it in its prologue where that kernel is taken."""
        scale = self.weight_scale_inv if self.weight.dtype == fp8.FP8_DTYPE else None
        pending = isinstance(x, Pending)
        rows = x.rows if pending else x
        if prefer_skinny(rows, self.weight, scale, lambda: self._default(rows, bias, scale), prologue=pending):
            if pending:  # one row (decode at batch 1)
                x, prologue = x.prologue()
                return skinny_linear(x, self.weight, bias, scale, prologue=prologue)
            return skinny_linear(x, self.weight, bias, scale)
        return self._default(x.value() if pending else x, bias, scale)

    def _default(self, x: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
        if scale is not None:
            return fp8.apply(x, self.weight, scale, bias)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor | Pending) -> torch.Tensor:
        return self._linear(x, self.bias)


class ReplicatedLinear(LinearBase):

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: Fp8Config | None = None, prefix: str = ""):
        super().__init__(input_size, output_size, bias, None, quant_config, prefix)


class ColumnParallelLinear(LinearBase):

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: Fp8Config | None = None, prefix: str = ""):
        super().__init__(input_size, divide(output_size, tp_size(), "output features"), bias, 0,
                         quant_config, prefix)


class MergedColumnParallelLinear(ColumnParallelLinear):

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 quant_config: Fp8Config | None = None, prefix: str = ""):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, quant_config, prefix)

    def _loaded_sizes(self, input_size: int, output_size: int) -> list[int]:
        return [size // self.tp_size for size in self.output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int):
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _copy_rows(param, offset, size, self._shard(loaded, 0, _rows(param, size)))


class QKVParallelLinear(ColumnParallelLinear):

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False, quant_config: Fp8Config | None = None,
                 prefix: str = ""):
        tp = tp_size()
        self.head_size = head_size
        self.num_heads = divide(total_num_heads, tp, "num_attention_heads")
        self.num_kv_heads = divide(total_num_kv_heads, tp, "num_key_value_heads")
        output_size = (total_num_heads + 2 * total_num_kv_heads) * head_size
        super().__init__(hidden_size, output_size, bias, quant_config, prefix)

    def _loaded_sizes(self, input_size: int, output_size: int) -> list[int]:
        return [self.num_heads * self.head_size, self.num_kv_heads * self.head_size]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str):
        q_size, kv_size = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        _copy_rows(param, offset, size, self._shard(loaded, 0, _rows(param, size)))


class RowParallelLinear(LinearBase):

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: Fp8Config | None = None, prefix: str = "", reduce_results: bool = True):
        super().__init__(divide(input_size, tp_size(), "input features"), output_size, bias, 1,
                         quant_config, prefix)
        assert reduce_results or not bias  # a bias on each rank's partial sum would be added tp times
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor | Pending) -> torch.Tensor:
        y = self._linear(x, None)
        if self.tp_size > 1 and self.reduce_results:
            y = all_reduce(y)
        return y + self.bias if self.bias is not None else y


def _rows(param: nn.Parameter, features: int) -> int:
    """Rows of `param` that hold `features` output features (a row of block scales holds a block)."""
    block = getattr(param, "block_size", (1, 1))[0]
    assert features % block == 0, (features, block)  # check_block_alignment refused the layer otherwise
    return features // block


def _copy_rows(param: nn.Parameter, offset: int, size: int, src: torch.Tensor):
    """Copy `src` into the rows of `param` that hold output features [offset, offset + size)."""
    _copy(param.data.narrow(0, _rows(param, offset), _rows(param, size)), src)


def _copy(dst: torch.Tensor, src: torch.Tensor):
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter "
                         f"slice of shape {tuple(dst.shape)}")
    dst.copy_(src)
