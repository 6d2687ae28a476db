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
