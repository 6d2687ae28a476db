"""The attention block's step between the qkv projection and attention: per-head RMSNorm of q and k
(Qwen3; optional), NeoX RoPE of q and k, and the store of this step's K/V into the paged cache.

On CUDA it is one Triton kernel, one program per (token, head): q and k heads are normalised and
rotated in place in the qkv buffer, and k and v heads are written into the cache at the slot
mapping (PAD_SLOT_ID rows skipped), quantized for an FP8 cache through kv_store's
`fp8_quantize_rows`, so the cache holds the same bytes as `store_kvcache` would write. Elsewhere:
torch (rms_norm, rotate_qk, then store_kvcache). Both paths round where the unfused layers do:
the normalised head is cast to the model dtype before the weight multiplies it, the weighted head
before RoPE, the rotated head before it is stored.
"""
from typing import NamedTuple

import torch

from nanovllm.attention.kv_store import FP8_DTYPE, FP8_MAX, LayerKVCache, check_scales, store_kvcache
from nanovllm.layers.layernorm import rms_norm
from nanovllm.layers.rotary_embedding import rotate_qk
from nanovllm.utils.triton_utils import tl, triton, use_pdl

if triton is not None:
    from nanovllm.attention.kv_store import fp8_quantize_rows


class QKVHeads(NamedTuple):
    """The layout of one rank's qkv projection output [num_tokens, (num_heads + 2 * num_kv_heads)
    * head_dim]: the q heads, then the k heads, then the v heads, each head_dim wide."""
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv -> q [num_tokens, num_heads, head_dim], k, v [num_tokens, num_kv_heads, head_dim] (views)."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return (q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim),
                v.view(-1, self.num_kv_heads, self.head_dim))


class QKNorm(NamedTuple):
    """The per-head RMSNorm of q and k: weights [head_dim] in the model dtype, and epsilon."""
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float


def qk_norm_rope_torch(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, heads: QKVHeads,
                       norm: QKNorm | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused reference: (q, k) normalised and rotated as new tensors, v a view of qkv."""
    q, k, v = heads.split(qkv)
    if norm is not None:
        q, k = rms_norm(q, norm.q_weight, norm.eps), rms_norm(k, norm.k_weight, norm.eps)
    q, k = rotate_qk(positions, q, k, cos_sin_cache)
    return q, k, v


if triton is not None:
    @triton.jit
    def _store_head(x, cache_ptr, scales_ptr, slot, kv_head, dims, mask, KV_HEADS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr):
        """x float32 [1, BLOCK_D]: one head's row -> cache row (slot, kv_head), as store_kvcache."""
        offsets = slot * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + dims
        if FP8:
            q, scale = fp8_quantize_rows(x, FP8_MAX)
            tl.store(cache_ptr + offsets, q.to(cache_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
            tl.store(scales_ptr + slot * KV_HEADS + kv_head + tl.arange(0, 1), scale)
        else:
            tl.store(cache_ptr + offsets, x.to(cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(qkv_ptr, qkv_stride, positions_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr, eps,
                             k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr, slot_mapping_ptr,
                             HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                             HALF: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr, STORE: tl.constexpr,
                             FP8: tl.constexpr, FP8_MAX: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # (nanovllm/utils/triton_utils.py) qkv is the kernel before's output
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)  # q heads, then k heads, then (when storing) v heads
        dtype = qkv_ptr.dtype.element_ty
        dims = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
        mask = dims < HEAD_DIM
        row_ptr = qkv_ptr + token * qkv_stride + head * HEAD_DIM
        x = tl.load(row_ptr + dims, mask=mask, other=0.0).to(tl.float32)
        if head < HEADS + KV_HEADS:
            # NeoX RoPE pairs dim i with i + HALF: each lane also loads its partner
            partner = tl.where(dims < HALF, dims + HALF, dims - HALF)
            sign = tl.where(dims < HALF, -1.0, 1.0)
            xp = tl.load(row_ptr + partner, mask=mask, other=0.0).to(tl.float32)
            if HAS_NORM:
                inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
                if head < HEADS:
                    w = tl.load(q_weight_ptr + dims, mask=mask, other=0.0).to(tl.float32)
                    wp = tl.load(q_weight_ptr + partner, mask=mask, other=0.0).to(tl.float32)
                else:
                    w = tl.load(k_weight_ptr + dims, mask=mask, other=0.0).to(tl.float32)
                    wp = tl.load(k_weight_ptr + partner, mask=mask, other=0.0).to(tl.float32)
                x = (w * (x * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
                xp = (wp * (xp * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            pos = tl.load(positions_ptr + token).to(tl.int64)
            pair = tl.where(dims < HALF, dims, dims - HALF)
            cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + pair, mask=mask, other=0.0)
            sin = tl.load(cos_sin_ptr + pos * HEAD_DIM + HALF + pair, mask=mask, other=0.0)
            x = (x * cos + sign * xp * sin).to(dtype)
            tl.store(row_ptr + dims, x, mask=mask)
            x = x.to(tl.float32)
        if STORE:
            slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
            if (head >= HEADS) & (slot != -1):  # -1: PAD_SLOT_ID
                if head < HEADS + KV_HEADS:
                    _store_head(x, k_cache_ptr, k_scales_ptr, slot, head - HEADS, dims, mask, KV_HEADS, HEAD_DIM,
                                FP8, FP8_MAX)
                else:
                    _store_head(x, v_cache_ptr, v_scales_ptr, slot, head - HEADS - KV_HEADS, dims, mask, KV_HEADS,
                                HEAD_DIM, FP8, FP8_MAX)


def qk_norm_rope_triton(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, heads: QKVHeads,
                        norm: QKNorm | None, cache: LayerKVCache | None = None,
                        slot_mapping: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: q and k normalised and rotated in place in qkv (returned as views of it, with v);
    with `cache`, k and v written into it at `slot_mapping` [num_tokens] (mutates the cache)."""
    num_tokens, width = qkv.shape
    num_heads, num_kv_heads, head_dim = heads
    assert width == (num_heads + 2 * num_kv_heads) * head_dim and qkv.stride(-1) == 1 and head_dim % 2 == 0
    assert cos_sin_cache.is_contiguous() and cos_sin_cache.shape[1] == head_dim and positions.numel() == num_tokens
    if norm is not None:
        assert norm.q_weight.shape == norm.k_weight.shape == (head_dim,)
    if cache is not None:
        assert cache.k.is_contiguous() and cache.v.is_contiguous() and cache.k.shape[2:] == (num_kv_heads, head_dim)
        assert slot_mapping is not None and slot_mapping.numel() == num_tokens
        check_scales(cache.k, cache.k_scales, cache.v_scales)
    if num_tokens:
        # pointers a disabled stage never reads are passed as some tensor of the call
        q_w, k_w = (norm.q_weight, norm.k_weight) if norm is not None else (cos_sin_cache, cos_sin_cache)
        k_cache, v_cache = (cache.k, cache.v) if cache is not None else (qkv, qkv)
        fp8 = cache is not None and cache.k.dtype == FP8_DTYPE
        scales = (cache.k_scales, cache.v_scales) if fp8 else (cos_sin_cache, cos_sin_cache)
        grid = (num_tokens, num_heads + num_kv_heads * (2 if cache is not None else 1))
        # programmatic dependent launch at one token only (as the decode kernel after it): at batch 8, after
        # cuBLAS's qkv product, the step was slower with it (H200: 1.449 against 1.404 ms)
        pdl = use_pdl(qkv.device) and num_tokens == 1
        _qk_norm_rope_kernel[grid](qkv, qkv.stride(0), positions, cos_sin_cache, q_w, k_w,
                                   norm.eps if norm is not None else 0.0, k_cache, v_cache, *scales,
                                   slot_mapping if cache is not None else positions, num_heads, num_kv_heads,
                                   head_dim, head_dim // 2, triton.next_power_of_2(head_dim), norm is not None,
                                   cache is not None, fp8, FP8_MAX, pdl, num_warps=1, launch_pdl=pdl)
    return heads.split(qkv)


def qk_norm_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, heads: QKVHeads,
                       norm: QKNorm | None, cache: LayerKVCache | None,
                       slot_mapping: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim] -> (q [num_tokens, num_heads,
    head_dim], k, v [num_tokens, num_kv_heads, head_dim]): q and k normalised (`norm`; None: not)
    and rotated at `positions` [num_tokens]; with `cache` (None: nothing stored), k and v written into
    it at `slot_mapping`. Triton on CUDA (qkv overwritten, one launch), torch elsewhere."""
    if qkv.is_cuda and triton is not None:
        return qk_norm_rope_triton(qkv, positions, cos_sin_cache, heads, norm, cache, slot_mapping)
    q, k, v = qk_norm_rope_torch(qkv, positions, cos_sin_cache, heads, norm)
    if cache is not None:
        store_kvcache(k, v, cache.k, cache.v, slot_mapping, cache.k_scales, cache.v_scales)
    return q, k, v
