"""Incremental detokenization and stop-string matching, with vLLM's semantics.

`IncrementalDetokenizer` turns a completion into text one token at a time while decoding only a
short window: the text of `token_ids[prefix_offset:]` minus the text of
`token_ids[prefix_offset:read_offset]` is what the new tokens add. Text that ends in U+FFFD (a
UTF-8 character split across tokens) is held back until later tokens complete it. The window
starts on the last prompt tokens, so tokenizers that treat the start of a decode specially
(SentencePiece's leading space) see the same context as a full decode would.

`check_stop_strings` is vLLM's matcher: it searches only where a stop string could end in the
newly added characters (so strings spanning token boundaries are found), and the first string of
`stop`, in list order, that matches wins.
"""
from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded as context before the first output token (vLLM's
# INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.output_text = ""

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, new_token_ids: list[int]) -> int:
        """Append tokens; returns how many characters `output_text` grew by."""
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return 0  # nothing yet (a skipped special token), or an unfinished UTF-8 character
        delta = new_text[len(prefix_text):]
        self.output_text += delta
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return len(delta)


def check_stop_strings(output_text: str, new_char_count: int, stop: list[str],
                       include_in_output: bool) -> tuple[str, int] | None:
    """(stop string, length to cut `output_text` to) when a stop string ends within the last
    `new_char_count` characters, else None. With `include_in_output` the text is cut just after
    the stop string (its whole length when the string ends it)."""
    if not new_char_count or not stop:
        return None
    for stop_str in stop:
        # Only text that could hold a stop string ending in the new characters is searched.
        stop_index = output_text.find(stop_str, 1 - new_char_count - len(stop_str))
        if stop_index == -1:
            continue
        return stop_str, stop_index + len(stop_str) if include_in_output else stop_index
    return None
