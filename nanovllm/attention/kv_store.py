"""Write this step's K/V rows into the paged cache (the slot mapping), quantizing for an FP8 cache.

Cache layout per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]; token slot
`s` is row `s % block_size` of block `s // block_size`. Slots equal to PAD_SLOT_ID are skipped.
A float8_e4m3fn cache stores, per (token, kv head), scale = amax(|x|) / FP8_MAX (1.0 for a zero row)
in k_scales / v_scales [num_blocks, block_size, num_kv_heads] float32 and clamp(x / scale) as e4m3,
so that fp8.float() * scale dequantizes; other caches get a plain copy (cast to the cache dtype).
The Triton and torch versions write the same bytes; so does the fused QK-norm/RoPE kernel
(layers/qk_norm_rope.py), which stores through `fp8_quantize_rows` too.
"""
from typing import NamedTuple

import torch

from nanovllm.utils.triton_utils import tl, triton

PAD_SLOT_ID = -1  # slot_mapping entry of a padded (CUDA-graph) row: its K/V are not stored
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


class LayerKVCache(NamedTuple):
    """One layer's paged cache: k, v [num_blocks, block_size, num_kv_heads, head_dim] in the model's
    dtype or FP8_DTYPE; for FP8, k_scales, v_scales [num_blocks, block_size, num_kv_heads] float32
    (None otherwise)."""
    k: torch.Tensor
    v: torch.Tensor
    k_scales: torch.Tensor | None = None
    v_scales: torch.Tensor | None = None


def check_scales(k_cache: torch.Tensor, k_scales: torch.Tensor | None, v_scales: torch.Tensor | None):
    if k_cache.dtype == FP8_DTYPE:
        assert k_scales is not None and v_scales is not None, "an FP8 cache needs k_scales and v_scales"
        assert k_scales.shape == k_cache.shape[:3] and k_scales.dtype == torch.float32 and k_scales.is_contiguous()
        assert v_scales.shape == k_scales.shape and v_scales.dtype == torch.float32 and v_scales.is_contiguous()


if triton is not None:
    @triton.jit
    def fp8_quantize_rows(x, FP8_MAX: tl.constexpr):
        """x float32 [rows, cols] (masked columns 0) -> (e4m3-ready values: x / scale clamped to
        +-FP8_MAX, still float32; scale [rows] = amax(|x|) / FP8_MAX, 1.0 for a zero row). The one
        definition of this file's FP8 contract in Triton: every kernel that stores K/V calls it."""
        amax = tl.max(tl.abs(x), axis=1)  # [rows]
        scale = tl.where(amax == 0.0, 1.0, tl.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32)))
        q = tl.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
        return tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX), scale

    @triton.jit
    def _store_kvcache_kernel(key_ptr, key_stride_t, key_stride_h, value_ptr, value_stride_t, value_stride_h,
                              k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr, slot_mapping_ptr,
                              KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                              BLOCK_D: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr):
        token = tl.program_id(0)
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot == -1:  # PAD_SLOT_ID
            return
        heads = tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < KV_HEADS) & (dims < HEAD_DIM)
        cache_offsets = slot * (KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
        for which in tl.static_range(2):  # 0: key, 1: value
            if which == 0:
                x = tl.load(key_ptr + token * key_stride_t + heads * key_stride_h + dims, mask=mask, other=0.0)
                cache_ptr, scales_ptr = k_cache_ptr, k_scales_ptr
            else:
                x = tl.load(value_ptr + token * value_stride_t + heads * value_stride_h + dims, mask=mask, other=0.0)
                cache_ptr, scales_ptr = v_cache_ptr, v_scales_ptr
            if FP8:
                q, scale = fp8_quantize_rows(x.to(tl.float32), FP8_MAX)
                q = q.to(cache_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
                tl.store(cache_ptr + cache_offsets, q, mask=mask)
                head_ids = tl.arange(0, BLOCK_H)
                tl.store(scales_ptr + slot * KV_HEADS + head_ids, scale, mask=head_ids < KV_HEADS)
            else:
                tl.store(cache_ptr + cache_offsets, x.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, k_scales: torch.Tensor | None = None,
                         v_scales: torch.Tensor | None = None):
    """Triton version of `store_kvcache` (same contract)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and value.shape == key.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == key.shape[1:]
    assert slot_mapping.numel() == num_tokens
    check_scales(k_cache, k_scales, v_scales)
    if num_tokens == 0:
        return
    fp8 = k_cache.dtype == FP8_DTYPE
    scales = (k_scales, v_scales) if fp8 else (k_cache, v_cache)  # unused pointers when not FP8
    _store_kvcache_kernel[(num_tokens,)](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1), k_cache, v_cache, *scales,
        slot_mapping, num_kv_heads, head_dim, triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(head_dim),
        fp8, FP8_MAX)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (e4m3 values [..., head_dim], float32 scales [...]), one scale per row."""
    x = x.float()
    amax = x.abs().amax(-1)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / FP8_MAX)
    return (x / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def store_kvcache_torch(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, k_scales: torch.Tensor | None = None,
                        v_scales: torch.Tensor | None = None):
    """Torch version of `store_kvcache` (same contract)."""
    check_scales(k_cache, k_scales, v_scales)
    keep = slot_mapping != PAD_SLOT_ID
    slots = slot_mapping[keep].long()
    for x, cache, scales in ((key, k_cache, k_scales), (value, v_cache, v_scales)):
        rows = x[keep]  # [num_kept, num_kv_heads, head_dim]
        if cache.dtype == FP8_DTYPE:
            rows, row_scales = quantize_fp8(rows)
            scales.view(-1, scales.shape[-1])[slots] = row_scales
        cache.view(-1, *cache.shape[2:])[slots] = rows.to(cache.dtype)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scales: torch.Tensor | None = None,
                  v_scales: torch.Tensor | None = None):
    """Write key/value [num_tokens, num_kv_heads, head_dim] (rows may be strided, last dim contiguous)
    into the caches at `slot_mapping` [num_tokens] (int32/int64; PAD_SLOT_ID rows are skipped).
    Mutates k_cache, v_cache and, for a float8_e4m3fn cache, k_scales / v_scales (required then,
    ignored otherwise). Triton on CUDA, torch elsewhere."""
    store = store_kvcache_triton if key.is_cuda and triton is not None else store_kvcache_torch
    store(key, value, k_cache, v_cache, slot_mapping, k_scales, v_scales)
