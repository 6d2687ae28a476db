"""The quantization scheme of a model, resolved once from the `quantization` option and the
checkpoint's `quantization_config` (config.json), as vLLM reads them.

Supported: fine-grained FP8 (vLLM's "fp8"; the DeepSeek-V3 / Qwen3-*-FP8 layout): float8_e4m3fn
weights with one float32 `weight_scale_inv` per 128x128 block, activations quantized dynamically.
A checkpoint in that format is loaded as is; `quantization="fp8"` on a bf16 / fp32 checkpoint
quantizes its linear weights at load time into the same format. The result is a frozen
`Fp8Config` (or None: unquantized) that the model build hands to its linear layers.
"""
from dataclasses import dataclass
from typing import Sequence

SUPPORTED_QUANTIZATION = ("fp8",)
FP8_FORMATS = ("e4m3",)
FP8_ACTIVATION_SCHEMES = ("dynamic",)
FP8_BLOCK_SIZES = ((128, 128),)


@dataclass(frozen=True)
class Fp8Config:
    """Block-scaled FP8 weights. `ignored_layers` are module names (checkpoint names, e.g. "lm_head",
    "model.layers.0.mlp") whose linears stay unquantized; one matches a module when its dot-separated
    parts appear, in order and contiguous, in the module's name."""
    weight_block_size: tuple[int, int] = (128, 128)  # (rows, columns) = (output, input) features
    is_checkpoint_fp8_serialized: bool = False  # False: quantize a bf16 / fp32 checkpoint at load time
    ignored_layers: tuple[str, ...] = ()

    def for_layer(self, names: Sequence[str]) -> "Fp8Config | None":
        """This scheme for the linear that holds checkpoint modules `names` (several for a packed
        layer), or None when they are ignored. ValueError when only some of them are."""
        ignored = [_matches(name, self.ignored_layers) for name in names]
        if all(ignored):
            return None
        if any(ignored):
            raise ValueError(f"quantization_config ignores {[n for n, i in zip(names, ignored) if i]} but not "
                             f"{[n for n, i in zip(names, ignored) if not i]}, which are packed into one layer.")
        return self


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(f".{pattern}." in f".{name}." for pattern in patterns)


def resolve_quant_config(quantization: str | None, checkpoint_config: dict | None) -> Fp8Config | None:
    """The scheme for the `quantization` option (None or "fp8") and the checkpoint's
    `quantization_config` (None when config.json has none). ValueError naming the unsupported
    value and the supported ones."""
    if quantization is not None and quantization not in SUPPORTED_QUANTIZATION:
        raise ValueError(f"quantization must be None or one of {list(SUPPORTED_QUANTIZATION)}, got {quantization!r}.")
    if checkpoint_config is None:
        return Fp8Config() if quantization == "fp8" else None
    if not isinstance(checkpoint_config, dict):
        checkpoint_config = checkpoint_config.to_dict()
    _check_field(checkpoint_config, "quant_method", None, SUPPORTED_QUANTIZATION)
    _check_field(checkpoint_config, "fmt", "e4m3", FP8_FORMATS)
    _check_field(checkpoint_config, "activation_scheme", "dynamic", FP8_ACTIVATION_SCHEMES)
    block = checkpoint_config.get("weight_block_size")
    block = tuple(block) if isinstance(block, (list, tuple)) else block
    if block not in FP8_BLOCK_SIZES:
        raise ValueError(f"quantization_config.weight_block_size {block!r} is not supported; supported: "
                         f"{[list(b) for b in FP8_BLOCK_SIZES]} (None is per-tensor FP8).")
    ignored = [*(checkpoint_config.get("ignored_layers") or ()),
               *(checkpoint_config.get("modules_to_not_convert") or ())]
    return Fp8Config(weight_block_size=block, is_checkpoint_fp8_serialized=True, ignored_layers=tuple(ignored))


def _check_field(config: dict, name: str, default, supported: tuple):
    value = config.get(name, default)
    if value not in supported:
        raise ValueError(f"quantization_config.{name} {value!r} is not supported; supported: {list(supported)}.")
