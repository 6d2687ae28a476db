"""nano-vllm: a compact offline LLM inference engine with vLLM's API."""
from nanovllm.engine.input_processor import TextPrompt, TokensPrompt
from nanovllm.llm import LLM
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.beam_search import BeamSearchOutput, BeamSearchSequence
from nanovllm.sampling_params import BeamSearchParams, GuidedDecodingParams, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "TextPrompt", "TokensPrompt",
           "GuidedDecodingParams", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence"]
