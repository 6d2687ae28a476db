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
import itertools
import logging

from nanovllm.beam_search import BeamSearchInstance, BeamSearchOutput, BeamSearchSequence, get_beam_search_score
from nanovllm.engine.input_processor import MAX_LOGPROBS, PromptType, check_text
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import BeamSearchParams, SamplingParams
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

    def beam_search(self, prompts: PromptType | list[PromptType], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """vLLM's (0.8.5) beam search: one BeamSearchOutput per prompt, its sequences best first.

        Built on `generate`: each step runs every live beam as a request of max_tokens=1 with
        logprobs=2 * beam_width, whose prompt is the beam's tokens; each beam's candidates are its
        2 * beam_width most likely next tokens (and the one it sampled), and each prompt keeps the
        beam_width best candidates that are not EOS. A candidate ending in EOS (unless
        ignore_eos) is finished, as is a beam reaching max_model_len. Beams share their prompt's
        KV blocks, and each other's common prefixes, through the prefix cache: a step recomputes
        only the tokens past a beam's last full block, and full blocks are never copied (without
        enable_prefix_caching every step recomputes the beams). Raises ValueError on bad prompts
        and for beam_width > 10 (2 * beam_width logprobs, at most 20).
        """
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}.")
        if 2 * params.beam_width > MAX_LOGPROBS:
            raise ValueError(f"beam_width must be at most {MAX_LOGPROBS // 2} (2 * beam_width logprobs per step), "
                             f"got {params.beam_width}.")
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("beam_search needs a tokenizer, but skip_tokenizer_init=True.")
        engine = self.llm_engine
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        eos, width, max_len = tokenizer.eos_token_id, params.beam_width, engine.config.max_model_len
        instances = []
        for prompt in prompts:
            token_ids = engine.input_processor.parse_prompt(prompt)[1]
            if len(token_ids) > max_len:
                raise ValueError(f"prompt has {len(token_ids)} tokens, more than max_model_len={max_len}.")
            instances.append(BeamSearchInstance([BeamSearchSequence(token_ids, [])]))
        step_params = SamplingParams(logprobs=2 * width, max_tokens=1, temperature=params.temperature)

        def score(beam: BeamSearchSequence) -> float:
            return get_beam_search_score(beam.tokens, beam.cum_logprob, eos, params.length_penalty)

        for _ in range(params.max_tokens):
            for instance in instances:  # a beam at max_model_len cannot grow
                instance.completed.extend(b for b in instance.beams if len(b.tokens) >= max_len)
                instance.beams = [b for b in instance.beams if len(b.tokens) < max_len]
            beams = [beam for instance in instances for beam in instance.beams]
            if not beams:
                break
            outputs = engine.generate([{"prompt_token_ids": beam.tokens} for beam in beams], step_params, False)
            results = iter(zip(beams, outputs))
            for instance in instances:
                candidates = []
                for beam, output in itertools.islice(results, len(instance.beams)):
                    logprobs = output.outputs[0].logprobs[0]
                    for token_id, logprob in logprobs.items():
                        candidate = BeamSearchSequence(beam.tokens + [token_id], beam.logprobs + [logprobs],
                                                       beam.cum_logprob + logprob.logprob)
                        if token_id == eos and not params.ignore_eos:
                            candidate.finish_reason = "stop"
                            instance.completed.append(candidate)
                        else:
                            candidates.append(candidate)
                instance.beams = sorted(candidates, key=score, reverse=True)[:width]
        results = []
        for instance in instances:
            best = sorted(instance.completed + instance.beams, key=score, reverse=True)[:width]
            for beam in best:
                beam.text = tokenizer.decode(beam.tokens)
                beam.finish_reason = beam.finish_reason or "length"
            results.append(BeamSearchOutput(best))
        return results

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
