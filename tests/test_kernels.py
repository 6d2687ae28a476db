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
