"""store_kvcache's Triton kernel against its torch reference: strided K/V rows (views of the fused
qkv output, as in the model), padded slots skipped, untouched slots left as they were."""
import torch

from nanovllm.attention.kv_store import PAD_SLOT_ID, store_kvcache_torch, store_kvcache_triton


def check(device: str, head_dim: int):
    torch.manual_seed(0)
    num_blocks, block_size, heads = 6, 4, 2
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
