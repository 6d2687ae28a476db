"""Triton kernels against their torch references (the checks live in `kernel_checks/`): on the CPU
under Triton's interpreter, in a subprocess each; on a GPU compiled, at real sizes."""
import pytest
import torch

from kernel_checks import run_interpreted
from nanovllm.attention.kv_store import PAD_SLOT_ID, store_kvcache_torch

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
interpreted = pytest.mark.skipif(pytest.importorskip("triton") is None, reason="needs Triton")


def test_store_kvcache_torch_skips_padding():
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    k_cache, v_cache = torch.zeros(2, 2, 2, 4), torch.zeros(2, 2, 2, 4)
    store_kvcache_torch(k, v, k_cache, v_cache, torch.tensor([3, PAD_SLOT_ID, 0]))
    assert torch.equal(k_cache.flatten(0, 1)[3], k[0]) and torch.equal(v_cache.flatten(0, 1)[0], v[2])
    assert k_cache.flatten(0, 1)[1:3].abs().sum() == 0


@interpreted
@pytest.mark.parametrize("head_dim", [16, 12])  # 12: row width 24 is not a power of two
def test_store_kvcache_interpreted(head_dim):
    run_interpreted("store_kvcache", head_dim=head_dim)


@interpreted
def test_sampling_race_interpreted():
    run_interpreted("race", block=16, vocab=100, num_draws=600)


@interpreted
def test_thresholds_interpreted():
    run_interpreted("thresholds", vocab=300, block=16, lanes=64, lane_block=16)


@interpreted
def test_penalties_interpreted():
    run_interpreted("penalties", vocab=300)


@interpreted
@pytest.mark.parametrize("hidden", [48, 64])  # 48: a masked tail in the row's block
def test_rms_norm_interpreted(hidden):
    run_interpreted("rms_norm", hidden=hidden)


@interpreted
def test_silu_and_mul_interpreted():
    run_interpreted("silu_and_mul", d=1100)  # two column blocks, the second partial


@interpreted
@pytest.mark.parametrize("head_dim", [16, 12])  # 12: a masked tail, halves of 6
def test_qk_norm_rope_interpreted(head_dim):
    run_interpreted("qk_norm_rope", head_dim=head_dim)


@interpreted
def test_skinny_gemm_interpreted():
    # K 320: a masked tail for every tile; the second config prefetches (three tiles); prologues at rows 1 and 3
    run_interpreted("skinny_gemm", rows=[1, 3, 8], configs=[(8, 128, 4, False), (2, 128, 4, True)])


@pytest.mark.gpu
@gpu
def test_store_kvcache_gpu():
    from kernel_checks.store_kvcache import check
    check("cuda", head_dim=128)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("vocab", [100, 151936])
def test_sampling_race_gpu(vocab):
    from kernel_checks.race import check
    from nanovllm.sample.draw import RACE_BLOCK
    check("cuda", block=RACE_BLOCK, vocab=vocab, num_draws=20000)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("vocab", [300, 151936])
def test_thresholds_gpu(vocab):
    from kernel_checks.thresholds import check
    from nanovllm.sample.thresholds_triton import LANE_BLOCK, SELECT_BLOCK, SELECT_LANES
    check("cuda", vocab=vocab, block=SELECT_BLOCK, lanes=SELECT_LANES, lane_block=LANE_BLOCK)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("vocab", [300, 151936])
def test_penalties_gpu(vocab):
    from kernel_checks.penalties import check
    check("cuda", vocab=vocab)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hidden", [1024, 4096, 5120])  # Qwen3-0.6B, -8B; 5120: not a power of two
def test_rms_norm_gpu(hidden):
    from kernel_checks.rms_norm import check
    check("cuda", hidden=hidden, num_tokens=300)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [3072, 12288, 4864])  # Qwen3-0.6B, -8B, Qwen2.5-0.5B
def test_silu_and_mul_gpu(d):
    from kernel_checks.silu_and_mul import check
    check("cuda", d=d, num_tokens=300)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(128, 16, 8), (64, 14, 2), (80, 4, 2)])
def test_qk_norm_rope_gpu(head_dim, heads, kv_heads):
    from kernel_checks.qk_norm_rope import check
    check("cuda", head_dim=head_dim, heads=heads, kv_heads=kv_heads, num_blocks=8, block_size=16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n,k", [(1024, 2048), (4096, 1024), (1000, 1100)])
def test_skinny_gemm_gpu(n, k):
    from kernel_checks.skinny_gemm import check
    check("cuda", n=n, ks=[k], rows=[1, 2, 5, 8], dtypes=("bfloat16", "float32"),
          configs=[(16, 256, 8, False), (2, 512, 4, True)])
