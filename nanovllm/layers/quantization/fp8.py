"""The FP8 linear method: block-scaled float8_e4m3fn weights, dynamically quantized activations.

A quantized linear holds `weight` float8_e4m3fn [out, in] and `weight_scale_inv` float32
[ceil(out/128), ceil(in/128)], the checkpoint's names: the dequantized weight is `weight` times
the scale of its 128x128 block. The linear layers shard and pack both alike (a row of the
scales covers 128 rows of the weight), so for an FP8 checkpoint no block may straddle two ranks
or two packed shards (`check_block_alignment`).

Quantizing a bf16 checkpoint at load time (`quantization="fp8"`) uses the same 128x128 blocks
rather than one scale per output channel: one format and one GEMM for both paths, and a block's
scale follows the weights' local range more closely than a whole row's.

After loading (`process_weights_after_loading`): on a GPU the layer keeps FP8 weights and `apply`
runs the Triton kernels (one kernel at up to 16 rows and few output tiles: fp8_few_rows.py), or from
65 rows cuBLAS's block-scaled GEMM where torch and the GPU have it; on the CPU the weights are
dequantized into the compute dtype once and the layer runs as an unquantized one (no FP8 GEMM
there), so that CPU outputs are those of the dequantized model.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.quantization import fp8_few_rows
from nanovllm.layers.quantization.config import Fp8Config
from nanovllm.layers.quantization.fp8_kernels import (FP8_DTYPE, FP8_MAX, cublas_block_matmul, cublas_supported,
                                                      fp8_block_matmul, per_token_group_quant_fp8, use_cublas)

# tiny but normal float32: an all-zero block gets this scale instead of a division by zero
SCALE_FLOOR = torch.finfo(torch.float32).tiny


def create_fp8_weights(layer: nn.Module, input_size: int, output_size: int, config: Fp8Config):
    """Register `weight` (and `weight_scale_inv` for an FP8 checkpoint) on `layer`, this rank's
    sizes. For a bf16 / fp32 checkpoint `weight` is in the default dtype until loaded."""
    if not config.is_checkpoint_fp8_serialized:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        return
    block_n, block_k = config.weight_block_size
    layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=FP8_DTYPE), requires_grad=False)
    scale = torch.empty(-(-output_size // block_n), -(-input_size // block_k), dtype=torch.float32)
    layer.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
    layer.weight_scale_inv.block_size = config.weight_block_size  # features per scale, along each dim


def check_block_alignment(prefix: str, config: Fp8Config, tp_dim: int, sizes: list[int], tp_size: int):
    """ValueError naming the layer when an FP8 checkpoint's blocks would straddle ranks or packed
    shards: `sizes` are this rank's features along `tp_dim` that are loaded one piece each."""
    if not config.is_checkpoint_fp8_serialized:
        return  # blocks are cut from this rank's own packed matrix: nothing to straddle
    block = config.weight_block_size[tp_dim]
    what = "output" if tp_dim == 0 else "input"
    for size in sizes:
        if size % block:
            raise ValueError(f"{prefix or 'a linear layer'}: {size} {what} features per rank and packed shard "
                             f"(tensor_parallel_size={tp_size}) is not a multiple of the FP8 block size {block}, "
                             f"so the checkpoint's weight blocks would straddle ranks or shards.")


@torch.no_grad()
def process_weights_after_loading(layer: nn.Module, config: Fp8Config, dtype: torch.dtype):
    """Replace `layer.weight` (and `weight_scale_inv`) by the forms `apply` or the CPU need:
    quantized if loaded from bf16 / fp32, then dequantized into `dtype` off the GPU."""
    if config.is_checkpoint_fp8_serialized:
        weight, scale = layer.weight.data, layer.weight_scale_inv.data
    else:
        weight, scale = quantize_weight_blockwise(layer.weight.data, config.weight_block_size)
    if weight.device.type == "cuda":
        cublas_supported(weight.device)  # tried now, not first inside a CUDA-graph capture
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
    else:
        layer.weight = nn.Parameter(dequantize_weight_blockwise(weight, scale, config.weight_block_size, dtype),
                                    requires_grad=False)
        layer.weight_scale_inv = None


def apply(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
          bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] in the model dtype, FP8 weight [out, in] -> [..., out] in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])  # [num_tokens, in]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if fp8_few_rows.use_few_rows(x2.shape[0], weight.shape[0], x.device):
        y = fp8_few_rows.fp8_few_rows_matmul(x2, weight, weight_scale_inv)
    elif use_cublas(x2.shape[0], weight.shape[0], weight.shape[1], x.device):
        y = cublas_block_matmul(x2, weight, weight_scale_inv, x.dtype)  # [num_tokens, out]
    else:
        y = fp8_block_matmul(*per_token_group_quant_fp8(x2), weight, weight_scale_inv, x.dtype)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])


def quantize_weight_blockwise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], scale float32 [ceil(N/bn), ceil(K/bk)]): per block,
    scale = amax / 448 and w ~= q * scale. Blocks at the edges may be partial."""
    (N, K), (bn, bk) = w.shape, block
    padded = F.pad(w.float(), (0, -K % bk, 0, -N % bn))
    blocks = padded.view(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=SCALE_FLOOR) / FP8_MAX  # [N blocks, K blocks]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(padded.shape)[:N, :K]
    return q.to(FP8_DTYPE), scale


def dequantize_weight_blockwise(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                                dtype: torch.dtype) -> torch.Tensor:
    """q [N, K] FP8, scale [ceil(N/bn), ceil(K/bk)] -> q * scale of its block, [N, K] in dtype."""
    (N, K), (bn, bk) = q.shape, block
    expanded = scale.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)[:N, :K]
    return (q.float() * expanded).to(dtype)
