"""Every Triton kernel compiles for the GPU (sm_90), checked on the CPU: the launches of the
interpreted kernel checks are recorded, then compiled for a CUDA target (kernel_checks/sm90.py).
The interpreter runs Python, not Triton's compiler: a kernel it accepts may still fail to compile."""
import json
import os
import subprocess
import sys

import pytest

from kernel_checks import ROOT, TESTS, run_interpreted
from nanovllm.utils.triton_utils import tl, triton

try:
    from triton.backends import backends as _triton_backends
    HAS_CUDA_BACKEND = "nvidia" in _triton_backends
except ImportError:
    HAS_CUDA_BACKEND = False

pytestmark = pytest.mark.skipif(triton is None or not HAS_CUDA_BACKEND, reason="needs Triton's CUDA backend")

# One small run of each kernel check: every kernel, the bf16 and FP8 variants, one block size.
CHECKS = [
    ("attention", dict(block_sizes=[16], head_dims=[128], groups=[2], query_dtypes=[])),
    ("attention", dict(block_sizes=[16], head_dims=[128], groups=[2], query_dtypes=[], fp8=False,
                       block_n=32)),  # two tiles: split-KV and its merge
    ("cascade", dict(block_sizes=[16], head_dims=[128], groups=[2], query_dtypes=[])),
    ("store_kvcache", dict(head_dim=128)),
    ("rms_norm", dict(hidden=128)),
    ("silu_and_mul", dict(d=128)),
    ("qk_norm_rope", dict(head_dim=128)),
    ("fused_moe", dict(num_tokens=3, num_experts=8, top_k=2, hidden=32, intermediate=32)),
    ("fp8_gemm", dict(M=5, N=192, K=320)),
    ("skinny_gemm", dict(n=64, ks=[320], rows=[1, 5], configs=[(2, 128, 4, True)])),  # + prologues, prefetch
    ("thresholds", dict(vocab=300, block=16, lanes=64, lane_block=16)),
    ("penalties", dict(vocab=300)),
    ("race", dict(block=16, vocab=100, num_draws=60)),
]


def compile_recorded(path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "kernel_checks.sm90", str(path)], env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90(tmp_path):
    path = tmp_path / "launches.jsonl"
    for module, kwargs in CHECKS:
        run_interpreted(module, record=str(path), **kwargs)
    recorded = {(launch["module"], launch["name"]) for launch in map(json.loads, path.read_text().splitlines())}
    assert len(recorded) >= 23, sorted(recorded)
    result = compile_recorded(path)
    assert not result["failures"], "\n".join(result["failures"])


if triton is not None:
    @triton.jit
    def _arange_kernel(out_ptr, N: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, N), tl.zeros([N], tl.float32))


def test_a_kernel_that_cannot_compile_is_reported(tmp_path):
    path = tmp_path / "launches.jsonl"
    launch = {"module": "test_kernels_compile", "name": "_arange_kernel", "options": {"num_warps": 4}}
    lines = [json.dumps(launch | {"args": {"out_ptr": {"ptr": "fp32"}, "N": {"int": n}}}) for n in (64, 100)]
    path.write_text("\n".join(lines) + "\n")
    result = compile_recorded(path)
    assert result["compiled"] == 2
    assert len(result["failures"]) == 1 and "'N': {'int': 100}" in result["failures"][0]  # arange needs 2^k
