"""Writing this step's K/V into the paged cache.

Cache layout per layer: k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads, head_dim];
token slot `s` is row `s % block_size` of block `s // block_size` (the slot mapping). A slot of
PAD_SLOT_ID (a padded CUDA-graph row, or the warm-up pass) stores nothing. On CUDA the Triton
kernel, elsewhere torch; both write the same bytes.
"""
import torch

from nanovllm.utils.triton_utils import tl, triton

PAD_SLOT_ID = -1  # slot_mapping entry of a token whose K/V are not stored


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor):
    """key, value: [num_tokens, num_kv_heads, head_dim] (rows may be strided); caches contiguous."""
    store = store_kvcache_triton if key.is_cuda and triton is not None else store_kvcache_torch
    store(key, value, k_cache, v_cache, slot_mapping)


def store_kvcache_torch(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor):
    keep = slot_mapping != PAD_SLOT_ID
    slots = slot_mapping[keep]
    k_cache.view(-1, *key.shape[1:])[slots] = key[keep]
    v_cache.view(-1, *value.shape[1:])[slots] = value[keep]


def store_kvcache_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor):
    num_tokens, num_heads, head_dim = key.shape
    D = num_heads * head_dim
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    assert key.stride(1) == head_dim and value.stride(1) == head_dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.numel() == num_tokens
    _store_kvcache_kernel[(num_tokens,)](key, key.stride(0), value, value.stride(0), k_cache, v_cache,
                                         slot_mapping, D, triton.next_power_of_2(D))


if triton is not None:
    PAD_SLOT_ID_CONST = tl.constexpr(PAD_SLOT_ID)

    @triton.jit
    def _store_kvcache_kernel(key_ptr, key_stride, value_ptr, value_stride, k_cache_ptr, v_cache_ptr,
                              slot_mapping_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr):
        token = tl.program_id(0)
        slot = tl.load(slot_mapping_ptr + token)
        if slot == PAD_SLOT_ID_CONST:
            return
        offsets = tl.arange(0, BLOCK_D)
        mask = offsets < D
        key = tl.load(key_ptr + token * key_stride + offsets, mask=mask)
        value = tl.load(value_ptr + token * value_stride + offsets, mask=mask)
        tl.store(k_cache_ptr + slot * D + offsets, key, mask=mask)
        tl.store(v_cache_ptr + slot * D + offsets, value, mask=mask)
