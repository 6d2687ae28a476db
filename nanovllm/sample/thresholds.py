"""The keep thresholds: per row, the smallest logit that top-k, top-p and min-p keep.

A row with top-k keeps the logits >= its k-th largest (ties kept) and, with top-p too, the most
likely of those up to top_p; min-p keeps the logits >= the row's largest + temperature *
log(min_p) (p >= min_p * p_max). Probabilities are those after temperature. For top-k and top-p
the threshold is exactly the logit of the last token kept, so that the draw's "logit >=
threshold" on raw logits is exact. On CUDA the threshold rows (k up to SELECT_LANES) take four
Triton kernels and no sort (`thresholds_triton.py`); elsewhere, or for a larger k, torch computes
the same from the whole rows (torch.topk, a sort of the top-k). A row with top-p alone needs its
vocabulary sorted, as in vLLM: only such rows are.
"""
import torch

from nanovllm.sample.logits import PatchedLogits
from nanovllm.sample.metadata import SamplingMetadata
from nanovllm.sample import thresholds_triton


def keep_thresholds(logits: PatchedLogits, t: SamplingMetadata) -> torch.Tensor | None:
    """[num_rows] float32: the smallest logit each row keeps (-inf: all); None when no row has
    top-k, top-p or min-p."""
    if not len(t.threshold_rows) and not len(t.top_p_rows):
        return None
    thresholds = torch.full((t.num_rows,), float("-inf"), device=t.temperatures.device)
    if len(t.top_p_rows):  # top-p without top-k: a sort of just these rows
        divisors = t.temperatures[t.top_p_rows]
        thresholds[t.top_p_rows] = _top_p_threshold(logits.rows(t.top_p_rows, len(t.top_p_rows) == t.num_rows),
                                                    torch.where(divisors == 0, 1.0, divisors), t.top_ps)
    if len(t.threshold_rows):  # top-k, top-p among the top-k, min-p
        keep_thresholds_(logits, thresholds, t.threshold_rows, t.top_ks, t.top_k_top_ps, t.log_min_ps, t.temperatures,
                         t.max_top_k)
    return thresholds


def keep_thresholds_(logits: PatchedLogits, thresholds: torch.Tensor, index: torch.Tensor, ks: torch.Tensor,
                     top_ps: torch.Tensor, log_min_ps: torch.Tensor, temperatures: torch.Tensor, max_k: int):
    """Raise thresholds[index[i]] ([num_rows] float32) to the smallest logit row index[i]
    keeps under top-k ks[i] (int64, 0: none; ties at the k-th largest kept), then among those
    top-p top_ps[i] (float32, inf: none), and min-p: logit >= largest + T * log_min_ps[i]
    (-inf: none). Probabilities are those after temperature (`temperatures`: [num_rows], 0:
    greedy, counted as 1). `max_k`: the largest of ks, known on the host. Values of ks above
    the vocabulary mean all of it."""
    max_k = min(max_k, logits.vocab_size)
    if not logits.triton_kernels or max_k > thresholds_triton.SELECT_LANES:
        divisors = temperatures[index]
        divisors = torch.where(divisors == 0, 1.0, divisors)
        kept = _thresholds_torch(logits.rows(index, False).float(), ks.clamp(max=logits.vocab_size), top_ps,
                                 log_min_ps, divisors, max_k)
        thresholds[index] = torch.maximum(thresholds[index], kept)
        return
    thresholds_triton.keep_thresholds_triton_(logits, thresholds, index, ks, top_ps, log_min_ps, temperatures, max_k)


def _thresholds_torch(x: torch.Tensor, ks: torch.Tensor, top_ps: torch.Tensor, log_min_ps: torch.Tensor,
                      divisors: torch.Tensor, max_k: int) -> torch.Tensor:
    """keep_thresholds_ in torch, on the selected rows x ([n, vocab_size] float32): [n]."""
    kept = torch.full((len(x),), float("-inf"), device=x.device)
    if max_k > 0:
        values = x.topk(max_k, -1).values  # [n, max_k] descending
        kth = values.gather(1, (ks - 1).clamp(min=0).unsqueeze(1))  # [n, 1]
        num_kth = (x == kth).sum(-1)
        greater = values.masked_fill(values <= kth, float("-inf"))
        kept = torch.where(ks > 0, _top_p_of_top_k(greater, kth.squeeze(1), num_kth, divisors, top_ps), kept)
    return torch.maximum(kept, x.amax(-1) + divisors * log_min_ps)


def _top_p_of_top_k(greater: torch.Tensor, kth: torch.Tensor, num_kth: torch.Tensor, divisors: torch.Tensor,
                    top_ps: torch.Tensor) -> torch.Tensor:
    """[n]: the smallest logit each row keeps under top-k, then top-p among the top-k, as vLLM:
    the logits >= the k-th largest `kth` (ties kept; `greater` [n, max_k]: those above it, -inf
    padded), then of those the most likely ones while the mass of the larger ones is below top_p
    (probabilities after temperature, renormalised over the top-k, ties at kth counted `num_kth`
    times; top_p inf: all)."""
    greater = greater.sort(-1, descending=True).values  # -inf padding last
    values = torch.cat([greater, kth.unsqueeze(1)], 1)  # descending but for the padding
    weights = torch.cat([torch.ones_like(greater), num_kth.unsqueeze(1).float()], 1)
    scaled = values / divisors.unsqueeze(1)
    mass = weights * torch.exp(scaled - scaled.amax(-1, keepdim=True))  # padding: 0
    larger = mass.cumsum(-1) - mass  # mass of the larger logits
    keep = (larger < top_ps.unsqueeze(1) * mass.sum(-1, keepdim=True)) & (values > float("-inf"))
    return torch.where(keep, values, float("inf")).amin(-1)


def _top_p_threshold(logits: torch.Tensor, divisors: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """[num_rows]: the smallest logit each row keeps under vLLM's top-p, rows that all have
    top_p < 1, in one ascending sort: the smallest tokens whose cumulative probability is
    <= 1 - top_p are dropped; the largest token is always kept."""
    sorted_logits = logits.sort(-1).values.float()  # ascending
    cumulative = (sorted_logits / divisors.unsqueeze(1)).softmax(-1).cumsum(-1)  # after temperature
    num_dropped = (cumulative <= (1 - top_ps).unsqueeze(1)).sum(-1, keepdim=True)  # a prefix: cumsum grows
    return sorted_logits.gather(1, num_dropped.clamp(max=logits.shape[1] - 1)).squeeze(1)
