"""Batched next-token sampling on the device, with vLLM's (v0.8.5) per-request settings.

`Sampler.forward` is the pipeline, in vLLM's order, each stage in its own module and run only on
the rows that ask for it:
  1. logprobs of the RAW logits (before penalties, min_tokens, the grammar, temperature,
     top-k/p, min-p), as vLLM 0.8.5 (V1) reports them (`logprobs.py`);
  2. penalties, on float32 copies of the penalised rows only (`logits.py`, `penalties.py`);
  3. min_tokens: a row below its min_tokens gets its stop ids set to -inf (in its copy);
  4. structured outputs: a row with a grammar gets the tokens it forbids set to -inf (`guided.py`);
  5. keep thresholds of top-k, top-p and min-p (`thresholds.py`);
  6. the draw: temperature, threshold and Gumbel-max in one pass (`draw.py`); greedy rows take
     the argmax. A seeded request's noise depends on its seed and its number of drawn tokens only.
A step whose rows all use temperature alone runs the draw and nothing else. Which stages run is
decided on the host, so nothing syncs with the device before the results are copied back (one
copy per result kind). Rank 0 only.
"""
import random
from typing import NamedTuple

import torch

from nanovllm.sample.draw import draw
from nanovllm.sample.guided import apply_grammar_bitmask_
from nanovllm.sample.logits import PatchedLogits, float_rows
from nanovllm.sample.logprobs import LogprobsLists, LogprobsTensors, token_logprobs
from nanovllm.sample.metadata import InFlightTokens, SamplingMetadata, SamplingSequence
from nanovllm.sample.penalties import apply_min_tokens_, apply_penalties_, penalize_triton
from nanovllm.sample.thresholds import keep_thresholds, keep_thresholds_
from nanovllm.utils.triton_utils import triton


class SampledTokens(NamedTuple):
    """One step's samples on the host, in logits-row order.

    For a row that asked for logprobs (None entries for the others; None altogether when no row
    asked): `logprob_token_ids[i]` / `logprobs[i]` hold the sampled token first, then the batch's
    largest-k top tokens, most likely first (trim to the row's own k); `ranks[i]` is the sampled
    token's rank among all tokens (1 = most likely). `prompt_logprobs`: the step's prompt
    logprobs rows (see worker/inputs.py), None when it has none."""
    token_ids: list[int]
    logprob_token_ids: list[list[int] | None] | None = None
    logprobs: list[list[float] | None] | None = None
    ranks: list[int | None] | None = None
    prompt_logprobs: LogprobsLists | None = None


class SamplerOutput(NamedTuple):
    """One step's samples on the device."""
    token_ids: torch.Tensor                          # [num_rows] int64
    logprob_rows: list[int] | None = None            # host: the rows `logprobs` describes
    logprobs: LogprobsTensors | None = None          # the sampled token, then the top-k (raw logits)

    def tolist(self) -> SampledTokens:
        """Copy to the host: one transfer per result kind for the whole batch."""
        token_ids = self.token_ids.tolist()
        if self.logprob_rows is None:
            return SampledTokens(token_ids)
        lists = self.logprobs.tolist()
        ids, logprobs, ranks = [None] * len(token_ids), [None] * len(token_ids), [None] * len(token_ids)
        for i, row in enumerate(self.logprob_rows):
            ranks[row], ids[row], logprobs[row] = lists.ranks[i], lists.logprob_token_ids[i], lists.logprobs[i]
        return SampledTokens(token_ids, ids, logprobs, ranks)


class Sampler:
    """`seed`: the seed of the noise of unseeded requests (None: from the OS)."""

    def __init__(self, seed: int | None = None):
        self._rng = random.Random(seed)

    def warm_up(self, vocab_size: int, dtype: torch.dtype, device: torch.device):
        """Compile the GPU kernels (the draw, the thresholds, the patched copies and penalties) for
        logits of `dtype` now, so that no request waits for Triton's compiler."""
        if device.type != "cuda" or triton is None:
            return
        logits = torch.zeros(2, vocab_size, dtype=dtype, device=device)
        first = torch.zeros(1, dtype=torch.int64, device=device)
        rows = PatchedLogits(logits, float_rows(logits, first), first, torch.tensor([0, -1], device=device))
        thresholds = torch.full((2,), float("-inf"), device=device)
        keep_thresholds_(rows, thresholds, first, first + 1, torch.full((1,), 0.5, device=device),
                         torch.full((1,), -1.0, device=device), torch.ones(2, device=device), 1)
        draw(rows, torch.ones(2, device=device), thresholds, 1 << 61, None)
        empty, one = torch.zeros(2, dtype=torch.int64, device=device), torch.ones(1, device=device)
        penalize_triton(rows.patched, logits, first, first, empty, empty, empty, empty, one, one, one)

    def forward(self, logits: torch.Tensor, seqs: list[SamplingSequence],
                in_flight: InFlightTokens | None = None) -> SamplerOutput:
        """logits: [num_rows, vocab_size] (left unmodified), row i for seqs[i]. `in_flight`: the
        previous step's samples, where some of `seqs` have their newest token as a placeholder."""
        base_key = (1 << 61) | self._rng.getrandbits(60)  # this step's noise of unseeded rows: base_key + row
        t = SamplingMetadata.build(seqs, logits.device, base_key, in_flight)
        if t.plain:
            return SamplerOutput(draw(PatchedLogits(logits), t.temperatures, None, base_key, None))
        rows = PatchedLogits(logits)
        if len(t.patched_rows):
            patched = float_rows(logits, t.patched_rows)  # [num_patched, vocab_size] float32
            apply_penalties_(patched, t, logits)                                                 # 2.
            apply_min_tokens_(patched, t)                                                        # 3.
            apply_grammar_bitmask_(patched, t)                                                   # 4.
            rows = PatchedLogits(logits, patched, t.patched_rows, t.patched_index)
        thresholds = keep_thresholds(rows, t)                                                    # 5.
        tokens = draw(rows, t.temperatures, thresholds, base_key, t.keys if len(t.keys) else None)  # 6.
        if not t.logprob_rows_host:
            return SamplerOutput(tokens)
        raw_logits = logits[t.logprob_rows]  # 1. (`logits` is never modified: these are the raw rows)
        return SamplerOutput(tokens, t.logprob_rows_host,
                             token_logprobs(raw_logits, tokens[t.logprob_rows], t.max_logprobs))

    __call__ = forward
