"""Kernel checks: each module's `check(device, **sizes)` compares a Triton kernel with its torch
reference and raises on a mismatch. Tests run them compiled on a GPU, or on the CPU under Triton's
interpreter through `run_interpreted` (TRITON_INTERPRET=1 must be set before Triton compiles
anything, so those runs need a process of their own)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")


def run_interpreted(module: str, timeout: float = 600, record: str | None = None, **kwargs):
    """Run `tests.kernel_checks.<module>.check(device="cpu", **kwargs)` under TRITON_INTERPRET=1 in
    a subprocess; AssertionError with the subprocess's stderr tail when it fails. `record`: a file
    to append the kernel launches to (see kernel_checks/sm90.py)."""
    code = (f"import json; from kernel_checks.{module} import check; "
            f"check(device='cpu', **json.loads({json.dumps(json.dumps(kwargs))}))")
    if record is not None:
        code = f"from kernel_checks.sm90 import record_launches; record_launches({record!r}); " + code
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{module}.check({kwargs}) failed:\n{result.stderr[-4000:]}"
