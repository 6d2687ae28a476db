"""Engine configuration: what the user asked for, validated once, read-only afterwards.

Values discovered at run time (the number of KV blocks, EOS ids) are not written back here; they
are returned by the component that finds them and passed on.
"""
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, PretrainedConfig

from nanovllm.attention import CacheSpec, resolve_attention_backend
from nanovllm.models.config_utils import head_dim_of
from nanovllm.layers.quantization.config import Fp8Config, resolve_quant_config
from nanovllm.utils.hub import resolve_model_path

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # "auto": the model's dtype; "fp8" means e4m3 (vLLM's names)
# Decode batch sizes captured as CUDA graphs when `cuda_graph_sizes` is not given: small sizes
# one by one up to 8, then every 16 (a batch is padded up to the next captured size).
DEFAULT_CUDA_GRAPH_SIZES = (1, 2, 4, 8, *range(16, 513, 16))


@dataclass(frozen=True)
class Config:
    model: str  # a local folder, or a hub id: replaced by its local snapshot folder at construction
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    max_model_len: int = 4096
    max_num_seqs: int = 512
    max_num_batched_tokens: int = 16384
    gpu_memory_utilization: float = 0.9
    block_size: int | None = None  # tokens per KV block; None: the attention backend's default
    kvcache_block_size: int | None = None  # nano-vllm's name of block_size (an alias)
    attention_backend: str = "auto"  # "auto", "flash_attn", "triton" or "torch"; resolved at construction
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    # decode reads KV blocks shared by several sequences once per group (worker/cascade.py), where the
    # attention backend can (Triton, torch); the flash-attn backend keeps the plain path. None: on with
    # CUDA (a cost rule picks the steps; docs/CASCADE.md), off on the CPU
    enable_cascade_attention: bool | None = None
    num_gpu_blocks_override: int | None = None
    cpu_kvcache_space_gib: float = 1.0  # KV cache budget when running on the CPU
    dtype: str | torch.dtype = "auto"
    seed: int = 0
    device: str | None = None  # None: "cuda" when a GPU is visible, else "cpu"
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    distributed_port: int | None = None  # None: a free port is picked
    cuda_graph_sizes: tuple[int, ...] | None = None
    # None: as the checkpoint's quantization_config says (unquantized without one); "fp8": FP8
    # weights, quantized at load time when the checkpoint is not FP8 already
    quantization: str | None = None
    # Overlap the host with the device: schedule and prepare step N+1 while step N runs, reading
    # its tokens one step late (engine/llm_engine.py). None: on for CUDA, off on the CPU (where
    # nothing runs concurrently, so it only adds a step's work per stop); resolved at construction.
    async_scheduling: bool | None = None
    hf_config: PretrainedConfig = field(init=False, repr=False)
    quant_config: Fp8Config | None = field(init=False, repr=False)  # resolved `quantization`

    def __post_init__(self):
        object.__setattr__(self, "model", resolve_model_path(self.model))  # a hub id becomes its snapshot folder
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"model folder {self.model!r} has no config.json.")
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if self.num_gpu_blocks_override is not None:
            _check_int("num_gpu_blocks_override", self.num_gpu_blocks_override, 1)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}.")
        if not self.cpu_kvcache_space_gib > 0:
            raise ValueError(f"cpu_kvcache_space_gib must be positive, got {self.cpu_kvcache_space_gib!r}.")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}.")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be None, 'cpu' or 'cuda', got {self.device!r}.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for, but no CUDA GPU is visible.")
        if self.distributed_port is not None and not 0 < self.distributed_port < 65536:
            raise ValueError(f"distributed_port must be in (0, 65536), got {self.distributed_port!r}.")
        if self.enable_cascade_attention is None:
            object.__setattr__(self, "enable_cascade_attention", self.device_type == "cuda")
        elif not isinstance(self.enable_cascade_attention, bool):
            raise ValueError(f"enable_cascade_attention must be True, False or None, got "
                             f"{self.enable_cascade_attention!r}.")
        if self.async_scheduling is None:
            object.__setattr__(self, "async_scheduling", self.device_type == "cuda")
        elif not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True, False or None, got {self.async_scheduling!r}.")
        if self.cuda_graph_sizes is not None:
            sizes = tuple(self.cuda_graph_sizes)
            if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes):
                raise ValueError(f"cuda_graph_sizes must be positive integers, got {self.cuda_graph_sizes!r}.")
            object.__setattr__(self, "cuda_graph_sizes", tuple(sorted(set(sizes))))
        object.__setattr__(self, "model", os.fspath(self.model))
        hf_config = AutoConfig.from_pretrained(self.model)
        object.__setattr__(self, "hf_config", hf_config)
        _check_int("max_model_len", self.max_model_len, 1)
        limit = getattr(hf_config, "max_position_embeddings", None)
        if limit is not None and self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={limit}.")
        self.torch_dtype  # validates dtype
        object.__setattr__(self, "quant_config", resolve_quant_config(
            self.quantization, getattr(hf_config, "quantization_config", None)))
        self._resolve_kv_cache()

    def _resolve_kv_cache(self):
        """Validate block_size (or its alias), kv_cache_dtype and attention_backend; replace "auto"
        and None by the backend and block size chosen."""
        block_size = self.block_size
        if self.kvcache_block_size is not None:
            if block_size is not None and block_size != self.kvcache_block_size:
                raise ValueError(f"block_size={block_size} and kvcache_block_size={self.kvcache_block_size} "
                                 f"differ; kvcache_block_size is an alias of block_size: pass one.")
            block_size = self.kvcache_block_size
        if block_size is not None:
            _check_int("block_size", block_size, 1)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}.")
        spec = CacheSpec(device_type=self.device_type, block_size=block_size, fp8_cache=self.fp8_kv_cache,
                         head_dim=head_dim_of(self.hf_config),
                         cuda_graphs=self.device_type == "cuda" and not self.enforce_eager)
        backend, block_size = resolve_attention_backend(self.attention_backend, spec)
        object.__setattr__(self, "attention_backend", backend.name)
        object.__setattr__(self, "block_size", block_size)
        object.__setattr__(self, "kvcache_block_size", block_size)

    @property
    def fp8_kv_cache(self) -> bool:
        return self.kv_cache_dtype in ("fp8", "fp8_e4m3")

    @property
    def device_type(self) -> str:
        if self.device is not None:
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = self.dtype
        if dtype == "auto":
            dtype = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
            if dtype is None:
                return torch.bfloat16
        if isinstance(dtype, torch.dtype):
            if dtype not in _DTYPES.values():
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}.")
            return dtype
        if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
            return _DTYPES[dtype.removeprefix("torch.")]
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}.")

    @property
    def graph_batch_sizes(self) -> list[int]:
        sizes = self.cuda_graph_sizes or DEFAULT_CUDA_GRAPH_SIZES
        capped = [s for s in sizes if s < self.max_num_seqs]
        return capped + [self.max_num_seqs] if self.max_num_seqs <= max(sizes) else capped


def _check_int(name: str, value, minimum: int):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
