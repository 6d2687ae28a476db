"""The batched Sampler on random logits (CPU), against direct computations: every SamplingParams
field's effect on which tokens can be drawn, penalties and logprobs value by value, seeded rows
independent of the batch they are in. Sequences are real `Sequence`s, no model is needed."""
import itertools
import math

import pytest
import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.sample.metadata import InFlightTokens, SamplingMetadata
from nanovllm.sample.penalties import apply_penalties_
from nanovllm.sample.sampler import Sampler
from nanovllm.sampling_params import SamplingParams

VOCAB = 64
_ids = itertools.count()
sampler = Sampler()
DEVICE = torch.device("cpu")


@pytest.fixture(autouse=True, params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def device(request):
    """Every test runs on the CPU, and on the GPU where there is one."""
    global DEVICE
    DEVICE = torch.device(request.param)
    yield DEVICE
    DEVICE = torch.device("cpu")


def seq(prompt=(1, 2, 3), output=(), seed=None, stop_ids=frozenset(), **params) -> Sequence:
    s = Sequence(next(_ids), list(prompt), SamplingParams(seed=seed, **params), seed=seed,
                 all_stop_token_ids=stop_ids)
    for t in output:
        s.append_token(t)
    return s


def sample(logits: torch.Tensor, seqs: list[Sequence]):
    """What the model runner does with a step's logits."""
    return sampler(logits.to(DEVICE), seqs)


def random_logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def support(logits_row: torch.Tensor, make_seq, draws: int = 3000) -> set[int]:
    """The tokens drawn in `draws` rows that all hold `logits_row`."""
    seqs = [make_seq() for _ in range(draws)]
    return set(sample(logits_row.expand(draws, -1).clone(), seqs).token_ids.tolist())


def test_plain_batches_take_the_temperature_only_path():
    assert SamplingMetadata.build([seq(temperature=0.7), seq(temperature=0)], torch.device("cpu"), 0).plain
    assert not SamplingMetadata.build([seq(temperature=0.7), seq(top_k=3)], torch.device("cpu"), 0).plain


def test_greedy_and_top_k_1_equal_argmax():
    logits = random_logits(8)
    seqs = [seq(temperature=0) if i % 2 else seq(temperature=1.3, top_k=1) for i in range(8)]
    assert sample(logits, seqs).token_ids.tolist() == logits.argmax(-1).tolist()
    plain = [seq(temperature=0) for _ in range(8)]
    assert SamplingMetadata.build(plain, torch.device("cpu"), 0).plain
    assert sample(logits, plain).token_ids.tolist() == logits.argmax(-1).tolist()


def test_input_logits_are_left_unchanged():
    logits = random_logits(3)
    before = logits.clone()
    sample(logits, [seq(repetition_penalty=2.0, output=[1, 2]), seq(min_tokens=2, stop_ids=frozenset({4})),
                    seq(top_p=0.5, logprobs=2)])
    assert torch.equal(logits, before)


def test_top_k_keeps_exactly_the_k_largest():
    row = random_logits(1, seed=1)[0]
    expected = set(row.topk(5).indices.tolist())
    assert support(row, lambda: seq(temperature=2.0, top_k=5)) == expected
    # mixed with unrestricted rows (the top-k-only path, no sort): those keep their whole support
    assert len(support(row, lambda: seq(temperature=50.0, top_k=-1))) > 5


def test_bf16_logits_keep_exact_supports():
    """Thresholds are computed in the logits' dtype and compared exactly: top-k keeps k tokens."""
    row = random_logits(1, seed=9)[0].bfloat16()
    assert len(set(row.float().topk(5).values.tolist())) == 5  # no tie at the top-k boundary
    assert support(row, lambda: seq(temperature=0.8, top_k=4)) == set(row.float().topk(4).indices.tolist())
    assert sample(row[None], [seq(temperature=0)]).token_ids.item() == row.float().argmax().item()


def _top_p_set(row: torch.Tensor, p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches p (direct computation)."""
    probs = torch.softmax(row.double(), -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, total = set(), 0.0
    for i in order:
        kept.add(i)
        total += probs[i]
        if total >= p:
            return kept
    return kept


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_masks_exactly_the_tail(top_p):
    row = random_logits(1, seed=2)[0] / 3  # flatter: several tokens per nucleus
    assert support(row, lambda: seq(temperature=1.0, top_p=top_p)) == _top_p_set(row, top_p)


def test_top_k_then_top_p():
    row = random_logits(1, seed=3)[0] / 3
    top4 = row.topk(4).indices
    masked = torch.full_like(row, float("-inf"))
    masked[top4] = row[top4]
    assert support(row, lambda: seq(top_k=4, top_p=0.7)) == _top_p_set(masked, 0.7)


def test_min_p_drops_tokens_below_its_share_of_the_top_probability():
    row = random_logits(1, seed=4)[0] / 2
    probs = torch.softmax(row, -1)
    expected = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    assert 1 < len(expected) < VOCAB
    assert support(row, lambda: seq(min_p=0.2), draws=4000) == expected


def _penalised_reference(logits: torch.Tensor, prompt, output, presence, frequency, repetition) -> torch.Tensor:
    """vLLM's penalties, one token at a time in plain Python."""
    out = logits.clone()
    for token in range(len(out)):
        if token in prompt or token in output:
            out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
        count = list(output).count(token)
        out[token] -= frequency * count + presence * (count > 0)
    return out


def test_penalties_match_a_direct_computation():
    cases = [dict(prompt=[1, 2, 3, 3], output=[3, 5, 5, 5, 7], presence_penalty=0.5, frequency_penalty=0.25,
                  repetition_penalty=1.7),
             dict(prompt=[9, 10], output=[], presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=0.5),
             dict(prompt=[4], output=[4, 4, 11], presence_penalty=-1.0, frequency_penalty=2.0, repetition_penalty=1.0)]
    seqs = [seq(top_k=3)] + [seq(**c) for c in cases]  # an unpenalised row in the same batch
    logits = random_logits(len(seqs), seed=5).to(DEVICE)
    t = SamplingMetadata.build(seqs, DEVICE, 0)
    assert t.patched_rows.tolist() == [1, 2, 3] and t.penalty_slots.tolist() == [0, 1, 2]
    got = logits[t.patched_rows].float()  # the sampler's float32 copies of the patched rows
    apply_penalties_(got, t, logits)
    logits, got = logits.cpu(), got.cpu()
    for i, c in enumerate(cases):
        expected = _penalised_reference(logits[i + 1], c["prompt"], c["output"], c["presence_penalty"],
                                        c["frequency_penalty"], c["repetition_penalty"])
        torch.testing.assert_close(got[i], expected)
    logits = logits[1:]
    # and greedy sampling picks the argmax of the penalised logits
    greedy = [seq(temperature=0, **c) for c in cases]
    expected = [_penalised_reference(logits[i], c["prompt"], c["output"], c["presence_penalty"],
                                     c["frequency_penalty"], c["repetition_penalty"]).argmax().item()
                for i, c in enumerate(cases)]
    assert sample(logits[:3], greedy).token_ids.tolist() == expected


def test_penalties_take_a_placeholder_token_from_the_device():
    """Async scheduling: a sequence's newest token is still on the device (a placeholder); its place in
    the penalties' history is filled from the previous step's sampled ids, by the sequence's row there."""
    c = dict(prompt=[1, 2, 3], presence_penalty=0.5, frequency_penalty=0.75, repetition_penalty=1.9)
    pending, known = seq(output=[3, 5], **c), seq(output=[6], **c)
    pending.num_output_placeholders = 1  # its third output token (5) was sampled by the previous step
    previous = torch.tensor([9, 8, 5, 9], device=DEVICE)  # that step's samples; pending's is row 2
    in_flight = InFlightTokens(previous, {pending.seq_id: 2, known.seq_id: 0})
    logits = random_logits(2, seed=7).to(DEVICE)
    t = SamplingMetadata.build([pending, known], DEVICE, 0, in_flight)
    assert t.output_token_ids.tolist() == [3, 5, 5, 6] and t.output_starts.tolist() == [0, 3, 4]
    got = logits[t.patched_rows].float()  # the sampler's float32 copies of the patched rows
    apply_penalties_(got, t, logits)
    for i, output in enumerate(([3, 5, 5], [6])):
        expected = _penalised_reference(logits[i].cpu(), c["prompt"], output, c["presence_penalty"],
                                        c["frequency_penalty"], c["repetition_penalty"])
        torch.testing.assert_close(got[i].cpu(), expected)
    pending.append_token(5)  # the host reads it: the mirror takes it, no placeholder is left
    assert SamplingMetadata.build([pending], DEVICE, 0).output_token_ids.tolist() == [3, 5, 5]


def test_penalty_token_mirror_follows_new_tokens():
    s = seq(prompt=[1, 2], frequency_penalty=1.0)
    for _ in range(3):
        tensors = SamplingMetadata.build([s], torch.device("cpu"), 0)
        assert tensors.output_token_ids.tolist() == s.completion_token_ids
        assert tensors.output_starts.tolist() == [0, s.num_completion_tokens] and tensors.penalty_slots.tolist() == [0]
        assert tensors.prompt_token_ids.tolist() == []  # no repetition penalty: the prompt is not needed
        s.append_token(7)
    assert s.completion_token_ids == [7, 7, 7]


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(2, VOCAB)
    logits[:, 9] = 100.0  # the stop id dominates
    below = seq(temperature=0, min_tokens=3, output=[1, 2], stop_ids=frozenset({9}))
    reached = seq(temperature=0, min_tokens=3, output=[1, 2, 3], stop_ids=frozenset({9}))
    tokens = sample(logits, [below, reached]).token_ids.tolist()
    assert tokens[0] != 9 and tokens[1] == 9
    sampled = sample(logits[:1], [seq(temperature=1.0, min_tokens=1, stop_ids=frozenset({9}))]).token_ids.item()
    assert sampled != 9


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = random_logits(6, seed=6)
    target = logits[2]

    def run(position: int, batch_size: int, seed: int = 1234, **params) -> list[int]:
        s = seq(seed=seed, temperature=0.9, **params)
        others = [seq(temperature=1.0) for _ in range(batch_size - 1)]
        tokens = []
        for step in range(5):
            rows = others[:position] + [s] + others[position:]
            batch_logits = random_logits(batch_size, seed=100 + step)
            batch_logits[position] = target
            tokens.append(sample(batch_logits, rows).token_ids[position].item())
            s.append_token(tokens[-1])  # as the engine does: the next draw has the next key
        return tokens

    reference = run(0, 1)
    assert run(3, 6) == reference and run(1, 2) == reference
    assert len(set(reference)) > 1  # the noise changes from one drawn token to the next
    assert run(0, 4, top_p=0.999) == run(2, 3, top_p=0.999)
    assert run(0, 1, seed=99) != reference


def test_logprobs_are_those_of_the_raw_logits():
    logits = random_logits(4, seed=7)
    seqs = [seq(temperature=0.5, logprobs=3, repetition_penalty=1.5, output=[int(logits[0].argmax())]),
            seq(temperature=0, logprobs=0),
            seq(temperature=1.0),  # no logprobs asked: still a row of the batch result
            seq(temperature=1.0, top_k=2, logprobs=5)]
    out = sample(logits, seqs).tolist()
    raw = torch.log_softmax(logits, -1)
    for row in (0, 1, 3):
        token = out.token_ids[row]
        assert out.logprob_token_ids[row][0] == token
        assert math.isclose(out.logprobs[row][0], raw[row, token].item(), rel_tol=1e-5, abs_tol=1e-6)
        assert out.ranks[row] == int((raw[row] >= raw[row, token]).sum())
        top = raw[row].topk(5)
        assert out.logprob_token_ids[row][1:] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(out.logprobs[row][1:]), top.values)
    assert out.ranks[1] == 1  # greedy takes the most likely token


def test_sampling_follows_the_distribution():
    """Temperature sampling with every stage active except the one under test stays unbiased."""
    row = torch.log(torch.tensor([0.5, 0.3, 0.2] + [1e-9] * (VOCAB - 3)))
    draws = 6000
    seqs = [seq(temperature=1.0, top_p=0.99, seed=i) for i in range(draws)]
    tokens = sample(row.expand(draws, -1).clone(), seqs).token_ids
    freq = torch.bincount(tokens.cpu(), minlength=3)[:3].double() / draws
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.03, rtol=0)


def test_mixed_batch_each_row_keeps_its_own_support():
    """Rows with top-k + top-p, top-p alone, top-k alone, min-p and nothing share one batch."""
    row = random_logits(1, seed=8)[0] / 3
    kinds = {"top_k_top_p": dict(top_k=6, top_p=0.5), "top_p": dict(top_p=0.4), "top_k": dict(top_k=3),
             "min_p": dict(min_p=0.5), "plain": dict(repetition_penalty=1.0, seed=None)}
    probs = torch.softmax(row, -1)
    top6 = torch.full_like(row, float("-inf"))
    top6[row.topk(6).indices] = row[row.topk(6).indices]
    expected = {"top_k_top_p": _top_p_set(top6, 0.5), "top_p": _top_p_set(row, 0.4),
                "top_k": set(row.topk(3).indices.tolist()),
                "min_p": set(torch.nonzero(probs >= 0.5 * probs.max()).flatten().tolist())}
    names = list(kinds) * 800
    tokens = sample(row.expand(len(names), -1).clone(), [seq(**kinds[n]) for n in names]).token_ids.tolist()
    drawn = {name: {t for n, t in zip(names, tokens) if n == name} for name in kinds}
    for name, support_set in expected.items():
        assert drawn[name] == support_set, name
    assert len(drawn["plain"]) > 10
