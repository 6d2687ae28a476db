"""Kernels against their torch reference. The Triton kernels (store_kvcache, the sampling race and
selections) run under Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set before Triton
compiles anything, so each check runs in a subprocess); on a GPU they run compiled."""
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


# The sampling race (Triton) against direct computations: greedy rows are torch's argmax (first
# index on ties, also across slices of a row), a threshold keeps exactly the tokens at or above it,
# draws follow softmax(logits / temperature), and a row's noise depends on its key alone. The
# interpreter is slow per program: small vocabularies, with small blocks so that rows still span
# several loop iterations and slices.
RACE_CHECK = textwrap.dedent("""
    import torch
    from nanovllm.layers.sampling_race import race_torch, race_triton
    device, block, vocab, num_draws = "{device}", {block}, {vocab}, {num_draws}
    base = 1 << 61
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=g) * 3
    logits[1, 3] = logits[1, vocab - 5] = 50.0  # a tie in different slices: the first wins
    logits[2] = 0.0                             # all tied: column 0
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(device, dtype)
        tokens = race_triton(x, torch.zeros(4, device=device), None, base, block=block)
        assert tokens.tolist() == x.float().argmax(-1).tolist() and tokens[1] == 3 and tokens[2] == 0, tokens

    def draws(row, temperature, rows, thresholds=None, keys=None, key=base):
        batch = row.expand(rows, -1).contiguous().to(device)
        temperatures = torch.full((rows,), temperature, device=device)
        return race_triton(batch, temperatures, thresholds, key, keys, block=block).cpu()

    row = torch.randn(vocab, generator=g)
    kept = row.topk(5).indices
    threshold = torch.full((300,), row[kept[-1]].item(), device=device)  # a raw logit: kept, exactly
    assert set(draws(row, 0.7, 300, threshold).tolist()) == set(kept.tolist())

    row = torch.full((vocab,), -1000.0)  # no mass outside cols, even at temperature 2 over a large vocabulary
    cols = [1, vocab // 2, vocab - 2]
    row[cols] = torch.tensor([0.5, 0.3, 0.2]).log()
    for temperature in (1.0, 2.0):
        p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64) ** (1 / temperature)
        tokens = draws(row, temperature, num_draws, key=base + 10**6 * int(temperature))
        freq = torch.tensor([(tokens == c).sum().item() for c in cols], dtype=torch.float64) / num_draws
        assert (freq - p / p.sum()).abs().max() < 4 * (0.25 / num_draws) ** 0.5, (temperature, freq)

    flat = torch.zeros(vocab)
    keys = torch.arange(base, base + 64, device=device)
    first = draws(flat, 1.0, 64, keys=keys)
    assert torch.equal(draws(flat, 1.0, 64, keys=keys.flip(0)), first.flip(0))  # key, not position
    assert torch.equal(draws(flat, 1.0, 64, key=base), first)                   # base_key + row
    assert not torch.equal(draws(flat, 1.0, 64, key=base + 64), first)
    assert len(set(first.tolist())) > 20
    print("race ok")
""")


# The selections behind top-k and min-p (Triton) against torch on the same rows: the k-th largest
# logit, its count and the logits above it, the row maximum and the draw reading patched rows, for
# bf16 and float32 rows, patched float32 rows among bf16 ones, ties at the k-th value and -inf
# entries; small blocks, so that rows span several slices (and k may exceed the lanes: torch's
# path). Then the penalty kernel against the sampler's torch penalties.
SELECT_CHECK = textwrap.dedent("""
    import math
    import torch
    from nanovllm.layers import sampling_select
    from nanovllm.layers.sampling_select import LogitRows
    device, vocab = "{device}", {vocab}
    sampling_select.SELECT_BLOCK, sampling_select.SELECT_LANES, sampling_select.LANE_BLOCK = {block}, {lanes}, {lane_block}
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
            fast, slow = LogitRows(*args, triton_kernels=True), LogitRows(*args, triton_kernels=False)
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
                slow.keep_thresholds_(b, index, ks_t, top_ps_t, log_min_ps, temperatures, max(ks))
                exact = torch.tensor([p == 0 for p in min_ps[:3]] + [True] + [p == 0 for p in min_ps[3:]])
                for collected_block in (4, 256):  # most rows' collected logits in blocks, or in one
                    sampling_select.COLLECTED_BLOCK = collected_block
                    a = start.clone()
                    fast.keep_thresholds_(a, index, ks_t, top_ps_t, log_min_ps, temperatures, max(ks))
                    assert torch.equal(a[exact.to(device)], b[exact.to(device)]), (dtype, ks, top_ps, a, b)
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)  # min-p: a multiply-add, maybe fused
            greedy = torch.zeros(6, device=device)
            assert torch.equal(fast.draw(greedy, None, 1, None), slow.draw(greedy, None, 1, None))

    # the penalty kernel against the sampler's torch path
    from nanovllm.engine.sequence import Sequence
    from nanovllm.layers.sampler import SamplingBatch, _apply_penalties_
    from nanovllm.layers.sampling_select import penalize_triton
    from nanovllm.sampling_params import SamplingParams
    seqs = []
    for i, params in enumerate([dict(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.25), dict(),
                                dict(frequency_penalty=-1.5, min_tokens=9), dict(repetition_penalty=0.6)]):
        seqs.append(Sequence(i, [1, 2, 3, 3, 40 + i] * 70, SamplingParams(**params), all_stop_token_ids={{7}}))
        for token in [3, 5, 5, 5, 9, 1] * 60:
            seqs[-1].append_token(token)
    batch = SamplingBatch.build(seqs)
    t, t_cpu = batch.to_device(torch.device(device)), batch.to_device(torch.device("cpu"))
    main = (torch.randn(4, vocab, generator=g) * 4).to(device, torch.bfloat16)
    expected = main.cpu()[t_cpu.patched_rows].float()
    got = sampling_select.float_rows(main, t.patched_rows, triton_kernels=True)
    assert torch.equal(got.cpu(), expected)
    _apply_penalties_(expected, t_cpu, batch.any_repetition)  # torch's path
    penalize_triton(got, main, t.patched_rows, t.penalty_slots, t.output_starts, t.output_token_ids, t.prompt_starts,
                    t.prompt_token_ids, t.presence_penalties, t.frequency_penalties, t.repetition_penalties)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-5)
    print("select ok")
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


def test_sampling_race_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", RACE_CHECK.format(device="cpu", block=16, vocab=100, num_draws=600)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "race ok" in result.stdout


def test_sampling_select_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", SELECT_CHECK.format(device="cpu", block=16, lanes=64, lane_block=16, vocab=300)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "select ok" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("vocab", [300, 151936])
def test_sampling_select_triton_gpu(vocab):
    from nanovllm.layers.sampling_select import LANE_BLOCK, SELECT_BLOCK, SELECT_LANES
    exec(SELECT_CHECK.format(device="cuda", block=SELECT_BLOCK, lanes=SELECT_LANES, lane_block=LANE_BLOCK,
                             vocab=vocab), {})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("vocab", [100, 151936])
def test_sampling_race_triton_gpu(vocab):
    from nanovllm.layers.sampling_race import RACE_BLOCK
    exec(RACE_CHECK.format(device="cuda", block=RACE_BLOCK, vocab=vocab, num_draws=20000), {})
