"""Readers of Hugging Face config fields whose location differs across transformers versions."""
from transformers import PretrainedConfig


def head_dim_of(config: PretrainedConfig) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim if head_dim else config.hidden_size // config.num_attention_heads


def rope_settings(config: PretrainedConfig) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None). transformers 5 keeps both in `config.rope_parameters`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.pop("rope_theta", None) or getattr(config, "rope_theta", None)
    if theta is None:
        raise ValueError("the model config has no rope_theta (neither config.rope_theta nor "
                         "config.rope_parameters['rope_theta']).")
    scaling = getattr(config, "rope_scaling", None) or params or None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta), scaling


def sliding_window_of(config: PretrainedConfig) -> int | None:
    """The attention window the config asks for, or None for full causal attention.

    Qwen2/Qwen3 configs carry a `sliding_window` that applies only with `use_sliding_window`, and
    only to the layers that `layer_types` marks "sliding_attention"; Mistral's applies whenever set.
    """
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)
