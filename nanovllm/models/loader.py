"""Weight loading from safetensors, through each parameter's `weight_loader`.

Checkpoint names are mapped through the model's `packed_modules_mapping` (q/k/v -> qkv_proj,
gate/up -> gate_up_proj) and, in MoE models, its `expert_params_mapping` (experts.{e}.gate_proj ->
experts.w13_weight as expert e's shard "w1"; see `layers.fused_moe`). A checkpoint tensor with no
matching parameter, or a parameter (or a packed shard, or an expert's shard) that no tensor filled,
raises ValueError naming them. `load_dummy_weights` fills parameters with small random values
instead (for benchmarks without a checkpoint); both paths touch every parameter, then call each
module's `process_weights_after_loading()` where it has one (FP8 linears quantize or dequantize
their weights there).
"""
import os
from glob import glob

import torch
from safetensors import safe_open
from torch import nn

from nanovllm.layers.quantization.fp8_kernels import FP8_DTYPE, FP8_MAX

DUMMY_RANGE = 1e-3
# Checkpoint entries that hold no parameter (precomputed RoPE tables of older exports).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor):
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter "
                         f"of shape {tuple(param.shape)}")
    param.data.copy_(loaded)


def _resolve(name: str, packed: dict, experts: dict) -> tuple[str, tuple]:
    """(parameter name, the weight_loader's arguments after the tensor) of checkpoint tensor `name`."""
    prefix, *tail = name.rsplit(".", 4)  # "model.layers.0.mlp", "experts", "3", "gate_proj", "weight"
    expert = experts.get(".".join(tail))
    if expert is not None:
        return f"{prefix}.{expert.param_name}", (expert.expert_id, expert.shard_id)
    for ckpt_name, (param_name, shard_id) in packed.items():
        if f".{ckpt_name}." in name:
            return name.replace(f".{ckpt_name}.", f".{param_name}."), (shard_id,)
    return name, ()


def load_model(model: nn.Module, path: str):
    files = sorted(glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in model folder {path!r}.")
    params = dict(model.named_parameters())  # tied weights appear once, under their first name
    packed = getattr(model, "packed_modules_mapping", {})
    experts = {m.weight_name: m for m in getattr(model, "expert_params_mapping", [])}
    tied = getattr(model, "tie_word_embeddings", False)
    filled: dict[str, set] = {}
    unexpected = []
    for file in files:
        with safe_open(file, "pt", "cpu") as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                param_name, shard = _resolve(name, packed, experts)
                param = params.get(param_name)
                if param is None:
                    unexpected.append(name)
                    continue
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    loader(param, f.get_tensor(name), *shard)
                except ValueError as e:
                    raise ValueError(f"cannot load checkpoint tensor {name!r}: {e}") from None
                filled.setdefault(param_name, set()).add(shard)
    if unexpected:
        raise ValueError(f"checkpoint {path!r} has weights the model does not expect: {unexpected[:10]}"
                         + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
    missing = _missing(params, filled, packed, experts)
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks weights for: {missing[:10]}"
                         + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    _process_weights_after_loading(model)


def _process_weights_after_loading(model: nn.Module):
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()


def _missing(params: dict, filled: dict[str, set], packed: dict, experts: dict) -> list[str]:
    """The parameters that were not filled (wholly, or every packed shard), and for the stacked
    expert parameters the checkpoint names of the expert tensors that never came."""
    packed_shards: dict[str, set] = {}
    for param_name, shard_id in packed.values():
        packed_shards.setdefault(param_name, set()).add((shard_id,))
    expert_shards: dict[str, dict[tuple, str]] = {}
    for m in experts.values():
        expert_shards.setdefault(m.param_name, {})[(m.expert_id, m.shard_id)] = m.weight_name
    missing = []
    for name in params:
        got = filled.get(name, set())
        parent, _, leaf = name.rpartition(".")
        module_prefix, _, module = parent.rpartition(".")
        by_shard = expert_shards.get(f"{module}.{leaf}")
        if by_shard is not None:
            missing += [f"{module_prefix}.{weight}" for shard, weight in by_shard.items() if shard not in got]
        elif not packed_shards.get(module, {()}) <= got:
            missing.append(name)
    return missing


@torch.no_grad()
def load_dummy_weights(model: nn.Module, seed: int):
    """Random weights, uniform in [-1e-3, 1e-3] (as vLLM's dummy format); norms stay at one.
    FP8 weights are uniform over the FP8 range with block scales that bring them to the same range."""
    generators = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        if name.endswith("weight_scale_inv"):
            param.fill_(DUMMY_RANGE / FP8_MAX)
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        generator = generators[param.device]
        if param.dtype == FP8_DTYPE:  # drawn in float32 and cast: uniform_ has no FP8 kernel
            values = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            param.copy_(values.uniform_(-FP8_MAX, FP8_MAX, generator=generator))
        else:
            param.uniform_(-DUMMY_RANGE, DUMMY_RANGE, generator=generator)
    _process_weights_after_loading(model)
