"""LLM: the offline entry point, `LLM(model, **engine_options).generate(prompts, sampling_params)`."""
from nanovllm.engine.llm_engine import LLMEngine, PromptType
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams


class LLM:
    """Owns one LLMEngine (`llm.llm_engine`). Engine options are those of `nanovllm.config.Config`;
    an unknown option raises TypeError."""

    def __init__(self, model: str, **kwargs):
        self.llm_engine = LLMEngine(model, **kwargs)

    def generate(self, prompts: PromptType | list[PromptType],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        return self.llm_engine.generate(prompts, sampling_params, use_tqdm)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def shutdown(self):
        """Release GPU memory, worker processes and shared memory now (also done on `del`)."""
        self.llm_engine.shutdown()
