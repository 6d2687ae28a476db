"""The patched-row copy and the penalty kernel (Triton) against the sampler's torch path: float32
copies of the patched rows exactly; repetition, presence and frequency penalties (a token in both
prompt and output, repeated output tokens) to float32 rounding."""
import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.sample.logits import float_rows
from nanovllm.sample.metadata import SamplingMetadata
from nanovllm.sample.penalties import apply_penalties_, penalize_triton
from nanovllm.sampling_params import SamplingParams


def check(device: str, vocab: int):
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i, params in enumerate([dict(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.25), dict(),
                                dict(frequency_penalty=-1.5, min_tokens=9), dict(repetition_penalty=0.6)]):
        seqs.append(Sequence(i, [1, 2, 3, 3, 40 + i] * 70, SamplingParams(**params), all_stop_token_ids={7}))
        for token in [3, 5, 5, 5, 9, 1] * 60:
            seqs[-1].append_token(token)
    t, t_cpu = SamplingMetadata.build(seqs, torch.device(device), 0), SamplingMetadata.build(seqs, torch.device("cpu"), 0)
    main = (torch.randn(4, vocab, generator=g) * 4).to(device, torch.bfloat16)
    expected = main.cpu()[t_cpu.patched_rows].float()
    got = float_rows(main, t.patched_rows, triton_kernels=True)
    assert torch.equal(got.cpu(), expected)
    apply_penalties_(expected, t_cpu, main.cpu())  # torch's path
    penalize_triton(got, main, t.patched_rows, t.penalty_slots, t.output_starts, t.output_token_ids, t.prompt_starts,
                    t.prompt_token_ids, t.presence_penalties, t.frequency_penalties, t.repetition_penalties)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-5)
