"""Output processing: sampled tokens -> what the caller sees (`RequestOutput`), with vLLM's semantics.

Per step, only for tracked completions (see request.py): logprobs, incremental detokenization and
stop strings. A stop string is matched on the incrementally detokenized text, across token
boundaries; the text is cut before it (unless include_stop_str_in_output), `token_ids` keep the
token that completed it. Other completions are decoded once, when they finish.
Prompt logprobs are recorded per request as the steps that compute its prompt produce them.
"""
from collections.abc import Mapping

from transformers import PreTrainedTokenizerBase

from nanovllm.engine.request import Completion, Request
from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sample.logprobs import LogprobsLists
from nanovllm.sample.sampler import SampledTokens
from nanovllm.utils.detokenizer import check_stop_strings


class OutputProcessor:

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None):
        self.tokenizer = tokenizer

    def update(self, completion: Completion, sampled: SampledTokens, row: int) -> bool:
        """Account for the token the completion's sequence got in this step (row `row` of
        `sampled`). Returns True when a stop string ends it: the caller then finishes the
        sequence, unless it already finished by length in this step (then "stop" wins, as in
        vLLM: its finish_reason is set here)."""
        seq, params = completion.seq, completion.request.params
        if completion.logprobs is not None:
            self._record_logprobs(completion, sampled, row)
        detokenizer = completion.detokenizer
        stopped_by_token = seq.finish_reason == "stop"
        if detokenizer is None or (stopped_by_token and not params.include_stop_str_in_output):
            return False
        new_chars = detokenizer.update([seq.last_token])
        if not params.stop or stopped_by_token or seq.num_output_tokens <= params.min_tokens:
            return False
        hit = check_stop_strings(detokenizer.output_text, new_chars, params.stop, params.include_stop_str_in_output)
        if hit is None:
            return False
        seq.stop_reason, cut = hit
        detokenizer.output_text = detokenizer.output_text[:cut]
        completion.stopped_by_string = True
        if seq.is_finished:
            seq.finish_reason = "stop"
        return True

    def _record_logprobs(self, completion: Completion, sampled: SampledTokens, row: int):
        logprobs = sampled.logprobs[row]
        completion.logprobs.append(self._entry(sampled.logprob_token_ids[row], logprobs, sampled.ranks[row],
                                               completion.request.params.logprobs))
        completion.cumulative_logprob += logprobs[0]

    def record_step_prompt_logprobs(self, spans: list[tuple[Sequence, range]], lists: LogprobsLists,
                                    completions: Mapping[int, Completion]):
        """Hand each sequence's rows of a step's prompt logprobs to its request. `spans`: the
        sequences and their positions, in row order; `completions`: the unfinished ones by seq_id
        (one aborted since the step was launched is skipped)."""
        row = 0
        for seq, positions in spans:
            first_row, row = row, row + len(positions)
            completion = completions.get(seq.seq_id)
            if completion is None:
                continue
            request = completion.request
            self.record_prompt_logprobs(request, positions, lists, first_row)
            if len(request.prompt_logprobs) == seq.num_prompt_tokens:
                seq.prompt_logprobs = None  # done: later recomputes (preemption) need none

    def record_prompt_logprobs(self, request: Request, positions: range, lists: LogprobsLists, first_row: int):
        """Add the prompt logprobs that rows first_row.. of `lists` give: the row of prompt
        position p scores prompt token p + 1. Positions recorded before (a recomputed prefix)
        are skipped."""
        for row, position in enumerate(positions, first_row):
            if position + 1 == len(request.prompt_logprobs):
                request.prompt_logprobs.append(self._entry(lists.logprob_token_ids[row], lists.logprobs[row],
                                                           lists.ranks[row], request.params.prompt_logprobs))

    def _entry(self, token_ids: list[int], logprobs: list[float], rank: int, k: int) -> dict[int, Logprob]:
        """{token: Logprob} for one position: the position's token first (with its rank), then the
        top k (ranks 1..k) that are not it."""
        entry = {token_ids[0]: Logprob(logprobs[0], rank, self._token_text(token_ids[0]))}
        for top_rank, (token_id, logprob) in enumerate(zip(token_ids[1:k + 1], logprobs[1:k + 1]), 1):
            if token_id not in entry:
                entry[token_id] = Logprob(logprob, top_rank, self._token_text(token_id))
        return entry

    def _token_text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def completion_output(self, completion: Completion) -> CompletionOutput:
        seq, params = completion.seq, completion.request.params
        token_ids = seq.completion_token_ids
        if completion.stopped_by_string:
            text = completion.detokenizer.output_text
        elif seq.is_finished and params.detokenize and self.tokenizer is not None:
            stop_token = seq.finish_reason == "stop" and not params.include_stop_str_in_output
            text = self.tokenizer.decode(token_ids[:-1] if stop_token else token_ids,
                                         skip_special_tokens=params.skip_special_tokens)
        elif completion.detokenizer is not None:  # in progress: hold back what may start a stop string
            text = completion.detokenizer.output_text
            if params.stop and not params.include_stop_str_in_output:
                text = text[:max(0, len(text) - (max(map(len, params.stop)) - 1))]
        else:
            text = ""
        return CompletionOutput(completion.index, text, token_ids, completion.cumulative_logprob,
                                completion.logprobs, seq.finish_reason, seq.stop_reason)

    def request_output(self, request: Request) -> RequestOutput:
        """The cumulative RequestOutput of `request` as it stands."""
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is not None and len(prompt_logprobs) < len(request.prompt_token_ids):
            prompt_logprobs = None  # the prompt is not done yet
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             [self.completion_output(c) for c in request.completions],
                             finished=request.num_unfinished == 0,
                             num_cached_tokens=request.completions[0].seq.num_prefix_cached_tokens,
                             prompt_logprobs=prompt_logprobs)
