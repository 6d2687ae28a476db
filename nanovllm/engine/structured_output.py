"""Structured outputs (vLLM's guided decoding) with xgrammar, on rank 0's host.

`StructuredOutputManager` compiles each distinct `GuidedDecodingParams` once (cached) against the
tokenizer, and gives every sequence that uses it a `StructuredOutputGrammar`: its matcher, which
fills the sequence's row of the step's token bitmask (sample/metadata.py, while the GPU runs the
forward) and is advanced by the engine with each sampled token. The grammar's end is reached by
a stop token (EOS), after which the matcher is terminated and the sequence ends with "stop".

xgrammar is the optional extra `structured` (`pip install nano-vllm[structured]`), imported on
the first request that uses guided decoding. Invalid schemas, regexes and grammars raise
ValueError when the request is added. JSON schemas are compiled without free whitespace between
tokens (vLLM's `disable-any-whitespace`): with it, small models tend to emit whitespace forever. The model's vocabulary may be larger than the tokenizer's:
xgrammar never allows the padding ids.
"""
import json
import logging

from transformers import PreTrainedTokenizerBase

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import GuidedDecodingParams

logger = logging.getLogger(__name__)

COMPILER_THREADS = 2


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ImportError("guided_decoding needs xgrammar: pip install nano-vllm[structured]") from e
    return xgrammar


def _grammar_spec(params: GuidedDecodingParams) -> tuple[str, str]:
    """(kind, text) of the grammar `params` asks for; also the cache key."""
    if params.json is not None:
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"guided_decoding.json is not valid JSON: {e}; got {params.json!r:.200}") from None
        return "json", json.dumps(schema, sort_keys=True)
    if params.regex is not None:
        return "regex", params.regex
    if params.choice is not None:  # a grammar: one of the strings, each an EBNF string literal
        return "grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
    if params.grammar is not None:
        return "grammar", params.grammar
    return "json_object", ""


class StructuredOutputGrammar:
    """One sequence's matcher: what may come next, advanced token by token."""
    __slots__ = ("matcher", "vocab_size")

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def fill_bitmask(self, bitmask, index: int):
        self.matcher.fill_next_token_bitmask(bitmask, index)

    def accept_token(self, token_id: int) -> bool:
        """Advance by `token_id`; False (state unchanged) when the grammar forbids it."""
        return self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token was accepted."""
        return self.matcher.is_terminated()


class StructuredOutputManager:
    """`tokenizer`: the engine's; `vocab_size`: the model's (its logits' width);
    `stop_token_ids`: the tokens that may end a complete grammar (the engine's EOS ids)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, stop_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler = None
        self._compiled: dict[tuple[str, str], object] = {}  # (kind, text) -> CompiledGrammar

    def compile(self, params: GuidedDecodingParams):
        """The compiled grammar of `params` (compiled on first use). Raises ValueError when it is
        invalid, ImportError without xgrammar."""
        if self.tokenizer is None:
            raise ValueError("guided_decoding needs a tokenizer, but skip_tokenizer_init=True.")
        key = _grammar_spec(params)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._compile(*key)
        return compiled

    def _compile(self, kind: str, text: str):
        xgr = _import_xgrammar()
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILER_THREADS)
        try:
            if kind == "json":  # no free whitespace: small models can loop on it (vLLM's disable-any-whitespace)
                return self._compiler.compile_json_schema(text, any_whitespace=False)
            if kind == "regex":
                return self._compiler.compile_regex(text)
            if kind == "grammar":
                return self._compiler.compile_grammar(text)
            return self._compiler.compile_builtin_json_grammar()
        except RuntimeError as e:  # xgrammar's parse errors
            field = {"json": "json", "regex": "regex", "grammar": "grammar or choice"}[kind]
            raise ValueError(f"guided_decoding.{field} is invalid: {str(e).strip()[-300:]}; got {text!r:.200}") from None

    def grammar(self, compiled) -> StructuredOutputGrammar:
        """A fresh matcher of `compiled` (one per sequence)."""
        return StructuredOutputGrammar(_import_xgrammar().GrammarMatcher(compiled), self.vocab_size)


def advance_grammars(seqs: list[Sequence]) -> list[Sequence]:
    """Advance the grammars of the unfinished `seqs` with their newest token; returns those whose
    grammar this ends (complete, or the token is outside it: then a warning is logged)."""
    ended = []
    for seq in seqs:
        if seq.grammar is None or seq.is_finished:
            continue
        if not seq.grammar.accept_token(seq.last_token):
            logger.warning("sequence %d: token %d is outside its grammar; ending it", seq.seq_id, seq.last_token)
        elif not seq.grammar.is_terminated():
            continue
        ended.append(seq)
    return ended
