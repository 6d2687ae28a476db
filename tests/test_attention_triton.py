"""Triton paged attention (nanovllm.attention: kv_store, triton_decode, triton_prefill) against torch
references (tests/kernel_checks/attention.py): under Triton's interpreter on the CPU with tiny sizes, compiled
on a GPU with real ones, plus a CUDA-graph replay of decode. Input validation and the torch store run here."""
import pytest
import torch

from kernel_checks import run_interpreted
from nanovllm.attention.kv_store import FP8_DTYPE, PAD_SLOT_ID, store_kvcache, store_kvcache_torch

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_attention_kernels_interpreted():
    # block_n 32 between the block sizes: tiles spanning two pages (16) and pages holding two tiles (64);
    # block_m 32: two query tiles in the longest sequence (40 new tokens), each with its own diagonal.
    # merge_chunk 1: the splits merged one per step, rescaled whenever a later one has a larger max
    run_interpreted("attention", block_sizes=[16, 64], head_dims=[64, 128], groups=[1, 2, 4], block_n=32,
                    block_m=32, decode_splits=[None, 3], merge_chunk=1)


def test_store_kvcache_fp8_torch():
    g = torch.Generator().manual_seed(0)
    key, value = torch.randn(5, 2, 64, generator=g).bfloat16(), torch.randn(5, 2, 64, generator=g).bfloat16()
    key[2, 0] = 0.0  # a zero row: scale 1.0, zeros stored
    slots = torch.tensor([3, PAD_SLOT_ID, 17, 0, 31], dtype=torch.int64)
    caches = [torch.zeros(2, 16, 2, 64, dtype=FP8_DTYPE) for _ in range(2)]
    scales = [torch.full((2, 16, 2), -1.0) for _ in range(2)]
    store_kvcache(key, value, *caches, slots, *scales)
    k_rows = caches[0].flatten(0, 1)[slots[slots >= 0]].float() * scales[0].flatten(0, 1)[slots[slots >= 0], :, None]
    assert ((k_rows - key[slots >= 0].float()).norm() / key.float().norm()) < 0.05  # e4m3: 3 mantissa bits
    assert scales[0].flatten(0, 1)[17, 0] == 1.0 and (caches[0].flatten(0, 1)[17, 0].float() == 0).all()
    assert (scales[1].flatten(0, 1)[[1, 2]] == -1.0).all()  # slots outside slot_mapping untouched
    bf16 = [torch.zeros(2, 16, 2, 64, dtype=torch.bfloat16) for _ in range(2)]
    store_kvcache_torch(key, value, *bf16, slots)
    assert torch.equal(bf16[1].flatten(0, 1)[17], value[2])


def test_attention_rejects_unsupported_inputs():
    from nanovllm.attention.triton_decode import paged_decode
    from nanovllm.attention.triton_prefill import paged_prefill
    cache = torch.zeros(4, 16, 2, 96, dtype=torch.bfloat16)
    tables, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim must be one of .* got 96"):
        paged_decode(torch.zeros(1, 4, 96, dtype=torch.bfloat16), cache, cache, tables, lens, 1.0)
    cache = torch.zeros(4, 16, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="cache dtype"):
        paged_decode(torch.zeros(1, 4, 64, dtype=torch.bfloat16), cache, cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="query dtype"):
        paged_decode(torch.zeros(1, 4, 64, dtype=torch.float64), cache, cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="num_heads"):
        paged_decode(torch.zeros(1, 3, 64, dtype=torch.float16), cache, cache, tables, lens, 1.0)
    k = torch.zeros(8, 2, 64, dtype=FP8_DTYPE)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="k_scales and v_scales"):
        paged_prefill(torch.zeros(8, 4, 64, dtype=torch.bfloat16), k, k, cu, cu, 8, 1.0)


@pytest.mark.gpu
@gpu
def test_attention_kernels_gpu():
    from kernel_checks.attention import check
    # decode_splits None: 8 sequences x 2 kv heads are too few for the SMs, so the heuristic splits.
    lengths = dict(decode_lengths=(0, 1, 255, 256, 257, 1000, 3001, 0), decode_splits=(None, 1),
                   q_lens=(1000, 17, 1, 300, 128, 0), cached=(0, 700, 2000, 64, 31, 5))
    check("cuda", block_sizes=(16, 32, 64, 128, 256), head_dims=(64, 128), groups=(1, 2, 4, 8), **lengths)
    check("cuda", block_sizes=(16, 256), head_dims=(256,), groups=(2, 8), query_dtypes=(), **lengths)


@pytest.mark.gpu
@gpu
def test_paged_decode_cuda_graph():
    from kernel_checks.attention import check_cuda_graph
    check_cuda_graph("cuda")
