"""LLM: the offline entry point, with vLLM's (v0.8.5) API.

    llm = LLM("Qwen/Qwen3-0.6B")                  # a local folder or a Hugging Face hub id
    outputs = llm.generate(["Hello"], SamplingParams(temperature=0.6, max_tokens=256))
    outputs = llm.chat([{"role": "user", "content": "Hello"}])

Engine options are those of `nanovllm.config.Config`; an unknown option raises TypeError, so a
typo is never dropped silently. So that vLLM scripts run unchanged, the vLLM options listed in
VLLM_OPTIONS_WITHOUT_EFFECT are accepted and ignored (they tune machinery this engine does not
have), those in VLLM_OPTIONS_AT_DEFAULT are accepted at their default values only, `seed=None`
means the default seed, and `revision` / `download_dir` pick the hub snapshot of `model`.
Scripts written for nano-vllm keep working: `generate(prompts, sampling_params, use_tqdm)` with
`use_tqdm` third, and results indexed as `out["text"]` / `out["token_ids"]`.
"""
import logging

from nanovllm.engine.input_processor import PromptType, check_text
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.hub import resolve_model_path

logger = logging.getLogger(__name__)

VLLM_OPTIONS_WITHOUT_EFFECT = ("trust_remote_code", "swap_space", "disable_log_stats", "disable_custom_all_reduce",
                               "max_seq_len_to_capture", "disable_async_output_proc", "enable_chunked_prefill")
VLLM_OPTIONS_AT_DEFAULT = {"pipeline_parallel_size": (1,), "cpu_offload_gb": (0,),
                           "task": ("auto", "generate"), "tokenizer_mode": ("auto",)}

ChatMessage = dict  # {"role": str, "content": str | [{"type": "text", "text": str}, ...]}


class LLM:
    """Owns one LLMEngine (`llm.llm_engine`), or with `data_parallel_size` > 1 (or
    `data_parallel_backend="ray"`) a DataParallelEngine of that many replicas on Ray (nanovllm/ray/;
    needs the `ray` extra), whose `llm_engine` has `generate` but no `add_request` / `step` loop."""

    def __init__(self, model: str, tokenizer: str | None = None, *, revision: str | None = None,
                 download_dir: str | None = None, data_parallel_size: int = 1,
                 data_parallel_backend: str | None = None, **kwargs):
        for name in VLLM_OPTIONS_WITHOUT_EFFECT:
            if name in kwargs:
                logger.info("vLLM option %s=%r has no effect here", name, kwargs.pop(name))
        for name, allowed in VLLM_OPTIONS_AT_DEFAULT.items():
            if name in kwargs and kwargs.pop(name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed} here (not supported otherwise).")
        if kwargs.get("seed", 0) is None:
            del kwargs["seed"]
        if revision is not None or download_dir is not None:
            model = resolve_model_path(model, revision, download_dir)
        if data_parallel_backend not in (None, "ray"):
            raise ValueError(f"data_parallel_backend must be 'ray' (or None), got {data_parallel_backend!r}.")
        if data_parallel_size != 1 or data_parallel_backend == "ray":
            from nanovllm.ray.data_parallel import DataParallelEngine
            self.llm_engine = DataParallelEngine(model, tokenizer, data_parallel_size, **kwargs)
        else:
            self.llm_engine = LLMEngine(model, tokenizer=tokenizer, **kwargs)

    def generate(self, prompts: PromptType | list[PromptType] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[int] | list[list[int]] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in input order.

        `prompts`: a str, a list of token ids, {"prompt": str}, {"prompt_token_ids": [...]}, or a
        list of any of these. `sampling_params`: one for all, one per prompt, or None for
        `get_default_sampling_params()`. `prompt_token_ids`: vLLM's deprecated way to pass token
        ids instead of `prompts`. Raises ValueError / TypeError before anything runs on bad input.
        """
        if isinstance(prompt_token_ids, bool):  # nano-vllm's order: generate(prompts, sampling_params, use_tqdm)
            prompt_token_ids, use_tqdm = None, prompt_token_ids
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("pass prompts or prompt_token_ids, not both.")
            prompts = prompt_token_ids
        if prompts is None:
            raise ValueError("prompts must be given.")
        return self.llm_engine.generate(prompts, sampling_params, use_tqdm)

    def chat(self, messages: list[ChatMessage] | list[list[ChatMessage]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or to a list of them, each
        rendered with the tokenizer's chat template (or `chat_template`). `chat_template_kwargs`
        go to the template (e.g. {"enable_thinking": False}). RequestOutput.prompt is the
        rendered text."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer, but skip_tokenizer_init=True.")
        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a list of messages or of conversations, got {type(messages).__name__}.")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                [_text_message(m) for m in conversation], tokenize=False, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                tools=tools, **(chat_template_kwargs or {}))
            check_text(text, "the rendered conversation")
            # The template already holds any BOS: no special tokens are added again.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.llm_engine.generate(prompts, sampling_params, use_tqdm)

    def get_tokenizer(self):
        """The tokenizer (None with skip_tokenizer_init=True)."""
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `sampling_params=None` means: SamplingParams() with generation_config.json's
        temperature, top_k, top_p, min_p, repetition_penalty and max_new_tokens where present."""
        return self.llm_engine.get_default_sampling_params()

    def shutdown(self):
        """Release GPU memory, worker processes and shared memory now (also done on `del`); with
        data parallelism, the replicas' Ray actors and placement groups. Every later call raises
        RuntimeError."""
        self.llm_engine.shutdown()


def _text_message(message: ChatMessage) -> ChatMessage:
    """`message` with OpenAI-style text parts joined into one string (vLLM's "string" format)."""
    if not isinstance(message, dict):
        raise TypeError(f"a chat message must be a dict with 'role' and 'content', got {message!r:.80}")
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text"):
            raise ValueError(f"only text message parts are supported, got {part!r:.80}")
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}
