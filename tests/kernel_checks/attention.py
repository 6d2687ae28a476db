"""Triton paged attention (kv_store, triton_decode, triton_prefill) against float32 torch references.

The references gather keys through the block tables, dequantize FP8 with the scales (fp8.float() * scale)
and take a masked softmax. Tolerance: ||out - ref|| / ||ref|| below 1e-2 for 16-bit queries (the kernels
round P, or P * v_scale, to the query dtype before the P @ V dot: ~2^-9 per element) and 1e-4 for float32;
FP8 caches are held to the same bound because the reference uses the dequantized cache values, so e4m3
rounding is not part of the error. Unused cache rows and padded block-table entries hold NaN, so a read
outside a sequence's context shows; outputs are NaN-poisoned before each run.
"""
import os

import torch

from nanovllm.attention.kv_store import FP8_DTYPE, PAD_SLOT_ID, quantize_fp8, store_kvcache_torch, \
    store_kvcache_triton
from nanovllm.attention import triton_decode
from nanovllm.attention.triton_decode import paged_decode
from nanovllm.attention.triton_prefill import paged_prefill

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _fix_interpreter():
    """Two bugs of Triton's interpreter (not of compiled kernels) that these kernels meet: bfloat16 is
    stored as uint16 and np.matmul gets those integers; float32 -> e4m3 rounding that carries into the
    exponent loses it (124.3 becomes 64, not 128). Dots get exact float32 operands instead; float32 -> e4m3
    goes through torch's conversion (round to nearest even, as the GPU's cvt.rn)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    create_dot, create_fp_to_fp = builder.create_dot, builder.create_fp_to_fp

    def as_float32(x):
        if x.dtype != tl.bfloat16:
            return x
        bits = x.data.astype(np.uint32) << np.uint32(16)
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def fixed_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, as_float32(a), as_float32(b), d, input_precision, max_num_imprecise_acc)

    def fixed_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            fp8 = torch.from_numpy(np.ascontiguousarray(src.data)).to(FP8_DTYPE).view(torch.uint8).numpy()
            return interpreter.TensorHandle(fp8, dst_type.scalar)
        return create_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.create_dot, builder.create_fp_to_fp = fixed_dot, fixed_fp_to_fp


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _assert_close(out, ref, tol, what):
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = _rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


def _dequantized(cache: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    return cache.float() * scales.unsqueeze(-1) if cache.dtype == FP8_DTYPE else cache.float()


def _attend(q, k, v, scale, mask):
    """q [n, H, D], k/v [L, KvH, D] float32, mask [n, L] (True = keep) -> [n, H, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)  # an empty row: zeros
    return torch.einsum("hnl,lhd->nhd", probs, v)


def _gather(flat: torch.Tensor, table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(length, device=flat.device)
    return flat[table[pos // block_size].long() * block_size + pos % block_size]


def decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale, k_scales=None, v_scales=None):
    block_size = k_cache.shape[1]
    flat_k = _dequantized(k_cache, k_scales).flatten(0, 1)
    flat_v = _dequantized(v_cache, v_scales).flatten(0, 1)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for i, n in enumerate(context_lens.tolist()):
        keys, values = (_gather(f, block_tables[i], n, block_size) for f in (flat_k, flat_v))
        out[i] = _attend(q[i:i + 1], keys, values, scale, torch.ones(1, n, dtype=torch.bool, device=q.device))[0]
    return out


def prefill_reference(q, k, v, cu_q, cu_k, scale, block_tables=None, k_scales=None, v_scales=None):
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    if block_tables is not None:
        block_size = k.shape[1]
        flat_k, flat_v = _dequantized(k, k_scales).flatten(0, 1), _dequantized(v, v_scales).flatten(0, 1)
    for i in range(len(cu_q) - 1):
        n, length = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        if block_tables is None:
            keys, values = k[cu_k[i]:cu_k[i + 1]].float(), v[cu_k[i]:cu_k[i + 1]].float()
        else:
            keys, values = (_gather(f, block_tables[i], length, block_size) for f in (flat_k, flat_v))
        causal = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
        out[cu_q[i]:cu_q[i + 1]] = _attend(q[cu_q[i]:cu_q[i + 1]], keys, values, scale, causal)
    return out


def _strided(rows: int, heads: int, head_dim: int, dtype, device, g) -> torch.Tensor:
    """[rows, heads, head_dim] as a view with a wider row stride, like a slice of the fused qkv output."""
    wide = torch.randn(rows, (heads + 3) * head_dim, generator=g).to(device, dtype)
    return wide[:, head_dim:(heads + 1) * head_dim].view(rows, heads, head_dim)


def _paged_cache(lengths: list[int], block_size: int, kv_heads: int, head_dim: int, cache_dtype, device, g,
                 width: int | None = None):
    """Caches with each sequence's keys in shuffled blocks; every other row NaN. Returns (k_cache, v_cache,
    k_scales, v_scales, block_tables); table rows are padded with ids of NaN blocks."""
    blocks = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks) + 2  # two spare blocks: padding targets
    width = width or max(max(blocks), 1)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(lengths), width), int(perm[-1]), dtype=torch.int32)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches, scales = [], []
    for _ in range(2):
        values = torch.randn(shape, generator=g) * (1 + torch.rand(shape[:3] + (1,), generator=g) * 4)
        if cache_dtype == FP8_DTYPE:
            fp8, scale = quantize_fp8(values)
            caches.append(fp8.view(torch.uint8).to(device))
            scales.append(scale.to(device))
        else:
            caches.append(values.to(device, cache_dtype))
            scales.append(None)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    used = 0
    for i, (n, b) in enumerate(zip(lengths, blocks)):
        tables[i, :b] = perm[used:used + b]
        used += b
        pos = torch.arange(n)
        written[tables[i, pos // block_size].long() * block_size + pos % block_size] = True
    unwritten = ~written.to(device).view(num_blocks, block_size)
    for cache, scale in zip(caches, scales):
        if cache_dtype == FP8_DTYPE:
            cache[unwritten] = 0x7F  # e4m3fn NaN
            scale[unwritten] = float("nan")
        else:
            cache[unwritten] = float("nan")
    if cache_dtype == FP8_DTYPE:
        caches = [c.view(FP8_DTYPE) for c in caches]
    return caches[0], caches[1], scales[0], scales[1], tables.to(device)


def check_store(device, head_dim=64, kv_heads=2, num_blocks=6, block_size=16):
    g = torch.Generator().manual_seed(0)
    num_tokens = 9
    key = _strided(num_tokens, kv_heads, head_dim, torch.bfloat16, device, g)
    value = _strided(num_tokens, kv_heads, head_dim, torch.bfloat16, device, g)
    key[2, 1] = 0.0  # a zero row: scale 1.0, zeros stored
    value[3, 0, :5] = 1e4  # a large dynamic range: the row's other entries fall to e4m3 subnormals
    slots = torch.tensor([0, 5, 6, 7, PAD_SLOT_ID, 23, 12, PAD_SLOT_ID, 1], dtype=torch.int32, device=device)
    for cache_dtype in (torch.bfloat16, FP8_DTYPE):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        outputs = []
        for store in (store_kvcache_triton, store_kvcache_torch):
            caches = [torch.full(shape, float("nan"), device=device).to(cache_dtype) for _ in range(2)]
            scales = [torch.full(shape[:3], float("nan"), device=device) for _ in range(2)]
            store(key, value, *caches, slots, *(scales if cache_dtype == FP8_DTYPE else (None, None)))
            outputs.append((caches, scales))
        (tri_caches, tri_scales), (ref_caches, ref_scales) = outputs
        for tri, ref in zip(tri_caches, ref_caches):
            if cache_dtype == FP8_DTYPE:  # bytes equal, or one e4m3 step apart
                diff = (tri.view(torch.uint8).int() - ref.view(torch.uint8).int()).abs()
                assert diff.max() <= 1, f"fp8 store: bytes differ by {diff.max()}"
            else:
                assert torch.equal(tri.view(torch.int16), ref.view(torch.int16)), "bf16 store is not bit-exact"
        if cache_dtype == FP8_DTYPE:
            for tri, ref in zip(tri_scales, ref_scales):
                torch.testing.assert_close(tri, ref, rtol=1e-6, atol=0, equal_nan=True)
            written = tri_caches[0].flatten(0, 1)
            assert tri_scales[0].flatten(0, 1)[6, 1] == 1.0 and (written[6, 1].float() == 0).all()
            dequant = written.float() * tri_scales[0].flatten(0, 1).unsqueeze(-1)
            assert _rel_err(dequant[[0, 5, 23]], key[[0, 1, 5]].float()) < 0.05
        else:
            assert torch.equal(tri_caches[0].flatten(0, 1)[23], key[5])
        assert torch.isnan(tri_caches[0].flatten(0, 1)[2].float()).all(), "a slot outside slot_mapping was written"


def check_decode(device, block_size, head_dim, group, cache_dtype, dtype=torch.bfloat16, kv_heads=2,
                 lengths=(0, 1, 17, 40, 63), splits=(None, 1, 3), block_n=None):
    g = torch.Generator().manual_seed(block_size * 1000 + head_dim + group)
    lengths = list(lengths)
    k_cache, v_cache, k_scales, v_scales, tables = _paged_cache(lengths, block_size, kv_heads, head_dim,
                                                                cache_dtype, device, g)
    q = _strided(len(lengths), kv_heads * group, head_dim, dtype, device, g)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    ref = decode_reference(q, k_cache, v_cache, tables, context_lens, scale, k_scales, v_scales)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    extra = {} if block_n is None else {"block_n": block_n}
    for num_splits in splits:
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
        paged_decode(q, k_cache, v_cache, tables, context_lens, scale, k_scales, v_scales, out=out,
                     num_splits=num_splits, **extra)
        what = (f"decode block_size={block_size} head_dim={head_dim} group={group} cache={cache_dtype} "
                f"q={dtype} splits={num_splits}")
        _assert_close(out, ref, tol, what)
        assert (out[context_lens == 0] == 0).all(), f"{what}: context 0 rows are not zeros"


def check_prefill(device, block_size, head_dim, group, cache_dtype, dtype=torch.bfloat16, kv_heads=2,
                  q_lens=(23, 5, 1, 40), cached=(0, 30, 17, 9), block_m=None, block_n=None):
    """Paged: sequence i has cached[i] keys before its q_lens[i] new ones (a prefix cache hit or an
    earlier chunk); contiguous (16-bit caches only): the same lengths from a strided [total_k, ...] tensor."""
    g = torch.Generator().manual_seed(block_size * 1000 + head_dim + group + 7)
    q_lens, cached = list(q_lens), list(cached)
    k_lens = [a + b for a, b in zip(q_lens, cached)]
    num_heads = kv_heads * group
    q = _strided(sum(q_lens), num_heads, head_dim, dtype, device, g)
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).int().to(device)
    cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0).int().to(device)
    scale = head_dim ** -0.5
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    tunables = {name: value for name, value in (("block_m", block_m), ("block_n", block_n)) if value is not None}
    k_cache, v_cache, k_scales, v_scales, tables = _paged_cache(k_lens, block_size, kv_heads, head_dim,
                                                                cache_dtype, device, g, width=max(k_lens) // 8 + 8)
    cases = [("paged", k_cache, v_cache, tables, k_scales, v_scales)]
    if cache_dtype != FP8_DTYPE:
        k = _strided(sum(k_lens), kv_heads, head_dim, dtype, device, g)
        v = _strided(sum(k_lens), kv_heads, head_dim, dtype, device, g)
        cases.append(("contiguous", k, v, None, None, None))
    for name, k, v, block_tables, ks, vs in cases:
        ref = prefill_reference(q, k, v, cu_q, cu_k, scale, block_tables, ks, vs)
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
        paged_prefill(q, k, v, cu_q, cu_k, max(q_lens), scale, block_tables, ks, vs, out=out, **tunables)
        _assert_close(out, ref, tol, f"prefill {name} block_size={block_size} head_dim={head_dim} "
                                     f"group={group} cache={cache_dtype} q={dtype}")


def check(device, block_sizes=(16, 32), head_dims=(64, 128), groups=(1, 2, 4), fp8=True,
          query_dtypes=("float16", "float32"), decode_lengths=(0, 1, 17, 40, 63), decode_splits=(None, 1, 3),
          q_lens=(23, 5, 1, 40), cached=(0, 30, 17, 9), block_m=None, block_n=None, merge_chunk=None):
    """Store, decode and prefill for every block size x head_dim x cache dtype (bf16, and FP8 if `fp8`),
    the GQA groups cycled across them; then each extra query dtype once with a same-dtype cache.
    `merge_chunk`: split partials merged per loop step (a small one: several steps, a partial last one)."""
    torch.manual_seed(0)
    if merge_chunk is not None:
        triton_decode.MERGE_CHUNK = merge_chunk
    check_store(device)
    cache_dtypes = [torch.bfloat16] + ([FP8_DTYPE] if fp8 else [])
    configs = [(b, d, c) for b in block_sizes for d in head_dims for c in cache_dtypes]
    for i, (block_size, head_dim, cache_dtype) in enumerate(configs):
        group = groups[i % len(groups)]
        check_decode(device, block_size, head_dim, group, cache_dtype, lengths=decode_lengths,
                     splits=decode_splits, block_n=block_n)
        check_prefill(device, block_size, head_dim, group, cache_dtype, q_lens=q_lens, cached=cached,
                      block_m=block_m, block_n=block_n)
    for name in query_dtypes:
        dtype = DTYPES[name]
        check_decode(device, block_sizes[0], head_dims[0], groups[-1], dtype, dtype, lengths=decode_lengths,
                     splits=decode_splits[:1], block_n=block_n)
        check_prefill(device, block_sizes[0], head_dims[0], groups[-1], dtype, dtype, q_lens=q_lens, cached=cached,
                      block_m=block_m, block_n=block_n)


def check_cuda_graph(device="cuda", block_size=16, head_dim=128, group=2, kv_heads=4):
    """paged_decode captured once in a CUDA graph, then replayed on new queries, context lengths and block
    tables written into the captured buffers: the grid and workspace must not depend on their values."""
    g = torch.Generator().manual_seed(1)
    cached = [1200, 1000, 300, 77]  # keys held per table row
    replays = [([0, 1, 2, 3], [5, 1000, 0, 77]), ([1, 0, 3, 2], [999, 1200, 77, 0])]  # (table rows, lengths)
    for cache_dtype in (torch.bfloat16, FP8_DTYPE):
        k_cache, v_cache, k_scales, v_scales, tables = _paged_cache(cached, block_size, kv_heads, head_dim,
                                                                    cache_dtype, device, g)
        q = torch.zeros(len(cached), kv_heads * group, head_dim, dtype=torch.bfloat16, device=device)
        table_buf, lens_buf = tables.clone(), torch.tensor(cached, dtype=torch.int32, device=device)
        args = (k_cache, v_cache, table_buf, lens_buf, head_dim ** -0.5, k_scales, v_scales)
        paged_decode(q, *args)  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = paged_decode(q, *args)
        for rows, lengths in replays:
            q.copy_(torch.randn(q.shape, generator=g))
            table_buf.copy_(tables[rows])
            lens_buf.copy_(torch.tensor(lengths, dtype=torch.int32))
            out.fill_(float("nan"))
            graph.replay()
            ref = decode_reference(q, *args)
            _assert_close(out, ref, 1e-2, f"CUDA-graph replay cache={cache_dtype} lengths={lengths}")
