"""The sampling race (Triton) against direct computations: greedy rows are torch's argmax (first
index on ties, also across slices of a row), a threshold keeps exactly the tokens at or above it,
draws follow softmax(logits / temperature), and a row's noise depends on its key alone. The
interpreter is slow per program: use small vocabularies, with small blocks so that rows still span
several loop iterations and slices."""
import torch

from nanovllm.sample.draw import race_triton


def check(device: str, block: int, vocab: int, num_draws: int):
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
