"""The package's layering: imports run one way, down the layers, and no module is too long to read
in one sitting. A package may import itself and any package below it, never one above it."""
import ast
import os

import nanovllm

ROOT = os.path.dirname(nanovllm.__file__)
# Top to bottom. The top-level modules (llm, config, sampling_params, outputs) are placed by what
# they import: llm.py at the top (ray/ below it: LLM may build its data-parallel engine), config.py
# above models and attention (it reads the model config and resolves the attention backend), the
# plain data definitions at the bottom with utils.
LAYERS = [
    {"llm"},
    {"ray"},
    {"engine"},
    {"worker"},
    {"config"},
    {"models"},
    {"sample", "attention", "layers"},
    {"utils", "sampling_params", "outputs", "beam_search"},
]
MAX_LINES = 350


def _layer(name: str) -> int:
    return next(i for i, group in enumerate(LAYERS) if name in group)


def _modules():
    for folder, _, files in os.walk(ROOT):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                yield path, parts[0]


def test_imports_run_down_the_layers():
    upward = []
    for path, unit in _modules():
        if unit == "__init__":
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanovllm."):
                target = node.module.split(".")[1]
                if target != unit and _layer(target) < _layer(unit):
                    upward.append(f"{os.path.relpath(path, ROOT)} imports {node.module}")
    assert not upward, upward


def test_modules_are_short():
    long = {os.path.relpath(p, ROOT): n for p, _ in _modules() if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
