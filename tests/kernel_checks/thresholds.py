"""The keep thresholds' Triton kernels (top-k, top-p among the top-k, min-p) against the torch path
on the same rows: bf16 and float32 rows, patched float32 rows among bf16 ones, ties at the k-th
value and -inf entries, k above the lanes (torch's path) and above the vocabulary; small blocks
so that rows span several slices, and collected logits in blocks or in one. Top-k-only rows must
match exactly; min-p rows to 1e-6 relative (a multiply-add the compiler may fuse). Then the draw
reading patched rows."""
import math

import torch

from nanovllm.sample import thresholds_triton
from nanovllm.sample.draw import draw
from nanovllm.sample.logits import PatchedLogits
from nanovllm.sample.thresholds import keep_thresholds_


def check(device: str, vocab: int, block: int, lanes: int, lane_block: int):
    thresholds_triton.SELECT_BLOCK, thresholds_triton.SELECT_LANES, thresholds_triton.LANE_BLOCK = block, lanes, lane_block
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        main = (torch.randn(6, vocab, generator=g) * 4).to(dtype)
        main[1, :40] = main[1, 0]               # a 40-way tie
        main[2, 5:9] = float("-inf")
        main = main.to(device)
        patched_rows = torch.tensor([1, 4], device=device)
        patched = main[patched_rows].float() + torch.randn(2, vocab, generator=g).to(device) / 1000
        patched[0, :40] = 3.0                   # ties among the float32 values too
        patched_index = torch.tensor([-1, 0, -1, -1, 1, -1], device=device)
        for args in ((main,), (main, patched, patched_rows, patched_index)):
            fast, slow = PatchedLogits(*args, triton_kernels=True), PatchedLogits(*args, triton_kernels=False)
            index = torch.tensor([0, 1, 2, 4, 5], device=device)
            temperatures = torch.tensor([0.7, 0.0, 1.3, 1.0, 0.5, 2.0], device=device)
            inf = float("inf")
            for ks, top_ps, min_ps in (([1, 20, 45, 3, 64], [inf, 0.9, 0.5, inf, 0.99], [0, 0, 0.1, 0, 0]),
                                       ([7, 40, 41, 0, 2], [0.3, inf, 0.95, inf, 0.6], [0, 0.05, 0, 0.2, 0]),
                                       ([0, 0, 0, 0, 0], [inf] * 5, [0.1, 0.3, 0.01, 0.5, 0.9]),
                                       ([5, 3, 1, vocab, 60], [0.8, inf, 0.5, 0.9, inf], [0] * 5),  # k > lanes
                                       ([vocab + 5, 2, 9, 1, 4], [0.9, 0.2, inf, 0.5, inf], [0] * 5)):
                ks_t = torch.tensor(ks, device=device)
                top_ps_t = torch.tensor(top_ps, device=device)
                log_min_ps = torch.tensor([math.log(p) if p else -inf for p in min_ps], device=device)
                start = torch.full((6,), -inf, device=device)
                start[2], start[3] = -1.0, 0.5          # a selected row with a threshold already, an unselected one
                b = start.clone()
                keep_thresholds_(slow, b, index, ks_t, top_ps_t, log_min_ps, temperatures, max(ks))
                exact = torch.tensor([p == 0 for p in min_ps[:3]] + [True] + [p == 0 for p in min_ps[3:]])
                for collected_block in (4, 256):  # most rows' collected logits in blocks, or in one
                    thresholds_triton.COLLECTED_BLOCK = collected_block
                    a = start.clone()
                    keep_thresholds_(fast, a, index, ks_t, top_ps_t, log_min_ps, temperatures, max(ks))
                    assert torch.equal(a[exact.to(device)], b[exact.to(device)]), (dtype, ks, top_ps, a, b)
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)  # min-p: a multiply-add, maybe fused
            greedy = torch.zeros(6, device=device)
            assert torch.equal(draw(fast, greedy, None, 1, None), draw(slow, greedy, None, 1, None))
