"""The fused QK-norm + RoPE + KV-store Triton kernel (layers/qk_norm_rope.py) against the unfused
torch layers: q and k within one rounding of the model dtype of `qk_norm_rope_torch`; the cache
holding exactly what `store_kvcache_torch` writes for the kernel's own k and v (model-dtype cache:
the same bytes; FP8: bytes equal or one e4m3 step apart, scales equal); padded slots and slots
outside the mapping untouched; v never written. With and without the norm (Qwen3 / Llama), with
and without a cache (the warm-up forward)."""
import torch

from kernel_checks.interpreter_rounding import round_bf16_to_nearest_even
import kernel_checks.attention  # noqa: F401  (its fixes of Triton's interpreter: FP8 casts)
from nanovllm.attention.kv_store import FP8_DTYPE, PAD_SLOT_ID, LayerKVCache, store_kvcache_torch
from nanovllm.layers.qk_norm_rope import QKNorm, QKVHeads, qk_norm_rope_torch, qk_norm_rope_triton
from nanovllm.layers.rotary_embedding import RotaryEmbedding

round_bf16_to_nearest_even()

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CACHE_DTYPES = {"model": None, "fp8": FP8_DTYPE}


def _cache(shape, dtype, device, fp8: bool) -> LayerKVCache:
    k, v = (torch.full(shape, float("nan"), device=device).to(dtype) for _ in range(2))
    if not fp8:
        return LayerKVCache(k, v)
    return LayerKVCache(k, v, *(torch.full(shape[:3], -1.0, device=device) for _ in range(2)))


def _assert_same_cache(tri: LayerKVCache, ref: LayerKVCache, what: str):
    for a, b in ((tri.k, ref.k), (tri.v, ref.v)):
        if a.dtype == FP8_DTYPE:
            diff = (a.view(torch.uint8).int() - b.view(torch.uint8).int()).abs()
            assert diff.max() <= 1, f"{what}: fp8 bytes differ by {diff.max()}"
        else:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{what}: cache bytes differ"
    if tri.k_scales is not None:
        torch.testing.assert_close(tri.k_scales, ref.k_scales, rtol=1e-6, atol=0)
        torch.testing.assert_close(tri.v_scales, ref.v_scales, rtol=1e-6, atol=0)


def check(device: str, head_dim: int, heads: int = 4, kv_heads: int = 2, dtypes=("bfloat16", "float32"),
          cache_dtypes=("model", "fp8"), num_blocks: int = 4, block_size: int = 4):
    layout = QKVHeads(heads, kv_heads, head_dim)
    width = (heads + 2 * kv_heads) * head_dim
    rope = RotaryEmbedding(head_dim, 512, 10000.0).to(device)
    slots = torch.tensor([0, 5, PAD_SLOT_ID, 13, 2, 11, PAD_SLOT_ID], dtype=torch.int32, device=device)
    num_tokens = slots.numel()
    positions = torch.tensor([0, 1, 7, 100, 511, 3, 2], dtype=torch.int64, device=device)
    for name in dtypes:
        dtype = DTYPES[name]
        g = torch.Generator().manual_seed(head_dim)
        wide = (2 * torch.randn(num_tokens, width + 16, generator=g)).to(dtype).to(device)
        qkv = wide[:, 8:8 + width]  # strided rows
        qkv[3, head_dim * heads:head_dim * (heads + 1)] = 0.0  # a zero k head: scale 1.0 in FP8
        weights = [(1 + 0.2 * torch.randn(head_dim, generator=g)).to(dtype).to(device) for _ in range(2)]
        for norm in (QKNorm(*weights, 1e-6), None):
            what = f"{name}, head_dim={head_dim}, norm={norm is not None}"
            ref_q, ref_k, _ = qk_norm_rope_torch(qkv.clone(), positions, rope.cos_sin_cache, layout, norm)
            for cache_name in (None, *cache_dtypes):
                cache = None
                if cache_name is not None:
                    fp8 = cache_name == "fp8"
                    shape = (num_blocks, block_size, kv_heads, head_dim)
                    cache = _cache(shape, FP8_DTYPE if fp8 else dtype, device, fp8)
                    ref_cache = _cache(shape, FP8_DTYPE if fp8 else dtype, device, fp8)
                fused_in = qkv.clone()
                q, k, v = qk_norm_rope_triton(fused_in, positions, rope.cos_sin_cache, layout, norm, cache, slots)
                torch.testing.assert_close(q, ref_q, msg=f"q ({what})")
                torch.testing.assert_close(k, ref_k, msg=f"k ({what})")
                assert torch.equal(v, layout.split(qkv)[2]), f"v was written ({what})"
                assert q.data_ptr() == fused_in.data_ptr(), "q is not a view of qkv"
                if cache is not None:
                    store_kvcache_torch(k, v, *ref_cache[:2], slots, *ref_cache[2:])
                    _assert_same_cache(cache, ref_cache, f"{what}, cache {cache_name}")
                    untouched = [s for s in range(num_blocks * block_size) if s not in slots.tolist()]
                    assert cache.k.flatten(0, 1)[untouched].float().isnan().all(), f"stray store ({what})"
