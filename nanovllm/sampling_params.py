"""Per-request sampling settings, with vLLM's names and defaults.

A SamplingParams is validated once, at construction, and is read-only afterwards: every check
raises ValueError naming the parameter and the value, before any request is scheduled.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy (argmax)
    max_tokens: int = 16
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature!r}.")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
