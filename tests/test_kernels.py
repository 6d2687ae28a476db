"""Kernels against their torch reference. The Triton store_kvcache kernel runs under Triton's
interpreter on the CPU (TRITON_INTERPRET=1 must be set before Triton compiles anything, so the
check runs in a subprocess); on a GPU it runs compiled."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nanovllm.layers.attention import store_kvcache_torch
from nanovllm.utils.context import PAD_SLOT_ID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent("""
    import torch
    from nanovllm.layers.attention import store_kvcache_torch, store_kvcache_triton
    from nanovllm.utils.context import PAD_SLOT_ID
    device = "{device}"
    torch.manual_seed(0)
    num_blocks, block_size, heads, head_dim = 6, 4, 2, {head_dim}
    qkv = torch.randn(9, (4 + 2 * heads) * head_dim, device=device)
    k = qkv[:, 4 * head_dim:(4 + heads) * head_dim].view(9, heads, head_dim)  # strided rows, as in the model
    v = qkv[:, (4 + heads) * head_dim:].view(9, heads, head_dim)
    slots = torch.tensor([0, 5, 6, 7, PAD_SLOT_ID, 23, 12, PAD_SLOT_ID, 1], dtype=torch.int32, device=device)
    caches = [torch.full((num_blocks, block_size, heads, head_dim), float("nan"), device=device) for _ in range(4)]
    store_kvcache_triton(k, v, caches[0], caches[1], slots)
    store_kvcache_torch(k, v, caches[2], caches[3], slots)
    torch.testing.assert_close(caches[0], caches[2], equal_nan=True)
    torch.testing.assert_close(caches[1], caches[3], equal_nan=True)
    written = caches[0].flatten(0, 1)
    assert torch.equal(written[23], k[5]) and torch.isnan(written[2]).all()
    print("store_kvcache ok")
""")


def test_store_kvcache_torch_skips_padding():
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    k_cache, v_cache = torch.zeros(2, 2, 2, 4), torch.zeros(2, 2, 2, 4)
    store_kvcache_torch(k, v, k_cache, v_cache, torch.tensor([3, PAD_SLOT_ID, 0]))
    assert torch.equal(k_cache.flatten(0, 1)[3], k[0]) and torch.equal(v_cache.flatten(0, 1)[0], v[2])
    assert k_cache.flatten(0, 1)[1:3].abs().sum() == 0


@pytest.mark.parametrize("head_dim", [16, 12])  # 12: row width 24 is not a power of two
def test_store_kvcache_triton_interpreter(head_dim):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", CHECK.format(device="cpu", head_dim=head_dim)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "store_kvcache ok" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_store_kvcache_triton_gpu():
    exec(CHECK.format(device="cuda", head_dim=128), {})
