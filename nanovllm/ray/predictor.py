"""LLMPredictor: an LLMEngine as a Ray Data stage (a callable class for `Dataset.map_batches`).

    ds.map_batches(LLMPredictor, concurrency=N, batch_size=B, num_gpus=tensor_parallel_size,
                   fn_constructor_kwargs=dict(model=..., sampling_params=dict(max_tokens=64), **engine_options))

Ray Data runs N actors, each holding one engine on the GPUs it was given. A batch (numpy format,
Ray Data's default) has a column `prompt` (str) or `prompt_token_ids` (both: the ids, `prompt`
kept as their text), and optionally `sampling_params` (a dict per row, over the stage's
`sampling_params`; None values mean "not set", as Arrow fills a struct column's missing fields
with nulls). The output is the batch, every column kept, plus `generated_text`,
`generated_token_ids`, `num_generated_tokens` and `finish_reason`, one completion per row (n=1).
"""
import numpy as np

from nanovllm.engine.input_processor import PromptType, TokensPrompt
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams


class LLMPredictor:

    def __init__(self, model: str, sampling_params: dict | None = None, tokenizer: str | None = None,
                 **engine_options):
        """`sampling_params`: SamplingParams' keyword arguments for every row; None: the model's
        defaults (`LLMEngine.get_default_sampling_params()`). `engine_options`: LLMEngine's.
        Raises TypeError / ValueError for bad sampling params before the engine is built."""
        if sampling_params is not None and not isinstance(sampling_params, dict):
            raise TypeError(f"sampling_params must be a dict of SamplingParams arguments or None, "
                            f"got {type(sampling_params).__name__}.")
        if sampling_params is not None:
            _check_n(SamplingParams(**sampling_params))
        self.engine = LLMEngine(model, tokenizer=tokenizer, **engine_options)
        self.sampling_params = (dict(self.engine.default_sampling_overrides) if sampling_params is None
                                else dict(sampling_params))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Generate for every row of `batch`; raises ValueError / TypeError on a bad row before
        anything runs."""
        if not isinstance(batch, dict):
            raise TypeError(f"LLMPredictor takes numpy batches (map_batches' default batch_format), "
                            f"got {type(batch).__name__}.")
        num_rows = len(next(iter(batch.values()))) if batch else 0
        prompts = [_prompt(batch, row) for row in range(num_rows)]
        row_params = batch.get("sampling_params")
        params = [self._params(None if row_params is None else row_params[row]) for row in range(num_rows)]
        outputs = [o.outputs[0] for o in self.engine.generate(prompts, params, use_tqdm=False)] if prompts else []
        token_ids = np.empty(num_rows, dtype=object)
        token_ids[:] = [list(o.token_ids) for o in outputs]
        return {**batch,
                "generated_text": np.array([o.text for o in outputs], dtype=object),
                "generated_token_ids": token_ids,
                "num_generated_tokens": np.array([len(o.token_ids) for o in outputs], dtype=np.int64),
                "finish_reason": np.array([o.finish_reason for o in outputs], dtype=object)}

    def _params(self, row: dict | None) -> SamplingParams:
        if row is not None and not isinstance(row, dict):
            raise TypeError(f"a row's sampling_params must be a dict, got {type(row).__name__}: {row!r:.80}")
        overrides = {key: _python(value) for key, value in (row or {}).items() if value is not None}
        params = SamplingParams(**{**self.sampling_params, **overrides})
        _check_n(params)
        return params


def _check_n(params: SamplingParams):
    if params.n != 1:
        raise ValueError(f"LLMPredictor writes one completion per row: n must be 1, got {params.n}.")


def _prompt(batch: dict[str, np.ndarray], row: int) -> PromptType:
    if "prompt_token_ids" in batch:
        prompt = TokensPrompt(prompt_token_ids=[int(t) for t in batch["prompt_token_ids"][row]])
        if "prompt" in batch:
            prompt["prompt"] = batch["prompt"][row]
        return prompt
    if "prompt" in batch:
        return batch["prompt"][row]
    raise ValueError(f"LLMPredictor needs a 'prompt' or a 'prompt_token_ids' column, got columns {sorted(batch)}.")


def _python(value):
    """A value read from Arrow (numpy scalars and arrays inside) as plain Python."""
    if isinstance(value, np.ndarray):
        return [_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_python(v) for v in value]
    return value
