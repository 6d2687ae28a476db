"""Per-request sampling settings: vLLM's `SamplingParams` (v0.8.5), names, defaults and checks.

A SamplingParams is validated once, at construction, and is read-only afterwards. Every check
raises ValueError (TypeError for a wrong type) naming the parameter and the value, with vLLM's
wording, before any request is scheduled. Construction normalises like vLLM does: `stop` becomes
a list, `seed=-1` becomes None, `logprobs=True` becomes 1, temperatures in (0, 0.01) are raised to
0.01, and greedy sampling (temperature 0) turns top-p, top-k and min-p off.

Field order is vLLM's, so positional and keyword calls written for vLLM mean the same here.
Fields of vLLM that change nothing here are accepted only at their default (`best_of` may equal
`n`); anything else raises, so no setting is silently ignored. `output_kind` (vLLM's
`RequestOutputKind`) says what `LLMEngine.step()` reports for a request: CUMULATIVE, every step
it progresses; FINAL_ONLY, once, when it finishes (`generate` always reports once).

Also here, as in vLLM: `GuidedDecodingParams` (structured outputs: one of json, regex, choice,
grammar, json_object; checked against the grammar engine when a request is added) and
`BeamSearchParams` (`LLM.beam_search`).
"""
import logging
import math
from dataclasses import dataclass, field
from enum import Enum
from functools import partial

logger = logging.getLogger(__name__)

_MAX_TEMP = 1e-2  # vLLM's floor for non-zero temperatures (below it, softmax overflows)


class RequestOutputKind(Enum):
    CUMULATIVE = 0  # everything so far, every step
    DELTA = 1       # not supported
    FINAL_ONLY = 2  # only the finished output


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1                          # completions per prompt
    best_of: int | None = None          # None or n (no beam search / best-of-n ranking here)
    presence_penalty: float = 0.0       # subtracted once from every token already in the output
    frequency_penalty: float = 0.0      # subtracted per occurrence in the output
    repetition_penalty: float = 1.0     # divides positive / multiplies negative logits of prompt+output tokens
    temperature: float = 1.0            # 0 means greedy (argmax)
    top_p: float = 1.0
    top_k: int = -1                     # -1 or 0: off
    min_p: float = 0.0
    seed: int | None = None             # per-request noise; None: the engine's random stream
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16         # None: up to max_model_len
    min_tokens: int = 0                 # EOS, stop_token_ids and stop strings cannot end it sooner
    logprobs: int | None = None         # top-k logprobs per sampled position (plus the sampled token's)
    prompt_logprobs: int | None = None  # top-k logprobs per prompt token (plus the prompt token's)
    detokenize: bool = True             # False: text is ""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # True only (what fast tokenizers do)
    logits_processors: list | None = None       # not supported: None only
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None   # keep only the last k prompt tokens
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    guided_decoding: "GuidedDecodingParams | None" = None  # structured outputs: completions follow it
    # Derived at construction: True when only `temperature` matters to the sampler, so a batch of
    # such requests takes the plain temperature-sampling path.
    temperature_only: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        set_ = partial(object.__setattr__, self)  # the dataclass is frozen
        _check_number("temperature", self.temperature)
        if 0 < self.temperature < _MAX_TEMP:
            logger.warning("temperature %s is less than %s, which may cause numerical errors nan or inf "
                           "in tensors. We have maxed it out to %s.", self.temperature, _MAX_TEMP, _MAX_TEMP)
            set_("temperature", _MAX_TEMP)
        if self.seed == -1:
            set_("seed", None)
        if self.stop is None:
            set_("stop", [])
        elif isinstance(self.stop, str):
            set_("stop", [self.stop])
        else:
            set_("stop", list(self.stop))
        set_("stop_token_ids", [] if self.stop_token_ids is None else list(self.stop_token_ids))
        if self.logprobs is True:
            set_("logprobs", 1)
        if self.prompt_logprobs is True:
            set_("prompt_logprobs", 1)
        self._verify_args()
        if self.temperature == 0:
            set_("top_p", 1.0)
            set_("top_k", 0)
            set_("min_p", 0.0)
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")
        set_("temperature_only", self.top_k <= 0 and self.top_p == 1 and self.min_p == 0
             and self.presence_penalty == 0 and self.frequency_penalty == 0 and self.repetition_penalty == 1
             and self.seed is None and self.logprobs is None and self.min_tokens == 0
             and self.guided_decoding is None)

    def _verify_args(self):
        _check_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must be None or equal to n={self.n} (no best-of-n ranking here), "
                             f"got {self.best_of}.")
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "top_p", "min_p"):
            _check_number(name, getattr(self, name))
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not self.repetition_penalty > 0.0 or math.isinf(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not self.temperature >= 0.0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                             f"got {self.min_tokens}.")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if self.logprobs < 0:
                raise ValueError(f"logprobs must be non-negative, got {self.logprobs}.")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs)
            if self.prompt_logprobs < 0:
                raise ValueError(f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.")
        if self.guided_decoding is not None and not isinstance(self.guided_decoding, GuidedDecodingParams):
            raise TypeError(f"guided_decoding must be a GuidedDecodingParams, "
                            f"got {type(self.guided_decoding).__name__}.")
        if self.logits_processors:
            raise ValueError(f"logits_processors are not supported, got {self.logits_processors!r}.")
        if self.spaces_between_special_tokens is not True:
            raise ValueError(f"spaces_between_special_tokens=False is not supported, "
                             f"got {self.spaces_between_special_tokens!r}.")
        if self.truncate_prompt_tokens is not None:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens)
            if self.truncate_prompt_tokens < 1:
                raise ValueError(f"truncate_prompt_tokens must be >= 1, got {self.truncate_prompt_tokens}")
        if self.output_kind not in (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY):
            raise ValueError(f"output_kind must be RequestOutputKind.CUMULATIVE or FINAL_ONLY, "
                             f"got {self.output_kind!r}.")
        if not all(isinstance(s, str) for s in self.stop):
            raise TypeError(f"stop must be a str or a list of str, got {self.stop!r}.")
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True. "
                             "Set detokenize=True to use stop.")
        for token_id in self.stop_token_ids:
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}.")

    def clone(self, **changes) -> "SamplingParams":
        """A copy with `changes` applied (and validated again)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "temperature_only"}
        return SamplingParams(**(values | changes))


@dataclass(frozen=True)
class GuidedDecodingParams:
    """Structured outputs (vLLM's names): exactly one of `json` (a JSON schema, as a dict or a
    str), `regex`, `choice` (the completion is one of the strings), `grammar` (EBNF, in the
    GBNF dialect of llama.cpp / xgrammar) or `json_object=True` (any JSON object). Only the
    xgrammar backend exists (`backend` None, "auto" or "xgrammar"). Whether the schema, regex or
    grammar is valid is checked when a request uses it (ValueError)."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    backend: str | None = None
    whitespace_pattern: str | None = None  # not supported: None only
    structural_tag: str | None = None      # not supported: None only

    def __post_init__(self):
        kinds = [k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError(f"You can only use one kind of guided decoding ('json', 'regex', 'choice', 'grammar', "
                             f"'json_object'), got {kinds}.")
        if not kinds:
            raise ValueError("guided_decoding needs one of 'json', 'regex', 'choice', 'grammar' or 'json_object'.")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise TypeError(f"json must be a JSON schema as a str or a dict, got {type(self.json).__name__}.")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}.")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise TypeError(f"choice must be a list of str, got {self.choice!r:.80}.")
            if not self.choice:
                raise ValueError("choice must list at least one string, got [].")
            object.__setattr__(self, "choice", list(self.choice))
        if self.json_object is not None and self.json_object is not True:
            raise ValueError(f"json_object must be True or None, got {self.json_object!r}.")
        if self.backend not in (None, "auto", "xgrammar"):
            raise ValueError(f"backend must be None, 'auto' or 'xgrammar' (the only one here), got {self.backend!r}.")
        for name in ("whitespace_pattern", "structural_tag"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is not supported, got {getattr(self, name)!r:.80}; pass None.")


@dataclass(frozen=True)
class BeamSearchParams:
    """`LLM.beam_search`'s settings (vLLM's names and defaults): `beam_width` beams, each at most
    `max_tokens` new tokens; `temperature` of the token each beam samples (its candidates are
    its 2 * beam_width most likely next tokens whatever the temperature); a sequence's score is
    cum_logprob / len(tokens) ** length_penalty (tokens: prompt included, a final EOS not)."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # False only

    def __post_init__(self):
        _check_int("beam_width", self.beam_width)
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}.")
        _check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        _check_number("temperature", self.temperature)
        if self.temperature < 0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        _check_number("length_penalty", self.length_penalty)
        if math.isinf(self.length_penalty):
            raise ValueError(f"length_penalty must be finite, got {self.length_penalty}.")
        if self.include_stop_str_in_output is not False:
            raise ValueError(f"include_stop_str_in_output=True is not supported in beam search, "
                             f"got {self.include_stop_str_in_output!r}.")


def _check_int(name: str, value):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}.")


def _check_number(name: str, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}.")
