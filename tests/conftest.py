"""Shared pytest fixtures: tiny random Qwen3 checkpoints in HF layout, and an engine on one."""

import os
import sys

import pytest

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from fixtures.checkpoints import ENGINE_ARGS, write_tiny_qwen3  # noqa: E402
from nanovllm import LLM  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


@pytest.fixture(scope="session")
def qwen3_tied(tmp_path_factory) -> str:
    """Tiny Qwen3 (2 layers, hidden 64) with tied embeddings, float32."""
    return write_tiny_qwen3(tmp_path_factory.mktemp("qwen3_tied"), tie_word_embeddings=True, seed=0)


@pytest.fixture(scope="session")
def qwen3_untied(tmp_path_factory) -> str:
    """Same shape as qwen3_tied but with a separate lm_head and another seed."""
    return write_tiny_qwen3(tmp_path_factory.mktemp("qwen3_untied"), tie_word_embeddings=False, seed=1)


@pytest.fixture(scope="module")
def llm(qwen3_tied):
    """An engine on qwen3_tied with ENGINE_ARGS, one per test module."""
    engine = LLM(qwen3_tied, **ENGINE_ARGS)
    yield engine
    engine.shutdown()
