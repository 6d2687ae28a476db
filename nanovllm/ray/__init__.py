"""nano-vllm on Ray: data-parallel replicas behind `LLM(..., data_parallel_size=N)`
(data_parallel.py, replica.py) and a Ray Data stage (`LLMPredictor`). Needs the `ray` extra."""
try:
    import ray  # noqa: F401
except ImportError as error:
    raise ImportError("nanovllm.ray needs Ray: pip install nano-vllm[ray]") from error

from nanovllm.ray.data_parallel import DataParallelEngine
from nanovllm.ray.predictor import LLMPredictor

__all__ = ["DataParallelEngine", "LLMPredictor"]
