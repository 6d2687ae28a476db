"""Do the Triton kernels compile for the GPU (sm_90, H100/H200)? Triton compiles for a CUDA target
without a GPU (ptxas ships with it), so the CPU suite catches a kernel that runs under the
interpreter but would not compile.

`record_launches(path)`, called in an interpreted process (`run_interpreted(..., record=path)`),
appends every kernel launch to `path` as one JSON line: the kernel's module and name, each argument
(a tensor's dtype, or a scalar's value) and the launch options. `compile_recorded(path)` then
compiles each distinct launch with the real `triton.jit` functions, in a process without
TRITON_INTERPRET (`python -m kernel_checks.sm90 PATH`), and returns the failures.
"""
import importlib
import inspect
import json
import sys

import torch

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def _describe(value) -> dict:
    if isinstance(value, torch.Tensor):  # a launch specializes on 16-byte aligned pointers: so does the compile
        return {"ptr": TRITON_TYPES[value.dtype], "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return {"value": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    if hasattr(value, "value"):  # a tl.constexpr
        return {"value": value.value}
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def record_launches(path: str):
    """From now on, append each interpreted kernel launch of this process to `path`."""
    from triton.runtime.interpreter import InterpretedFunction
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = list(inspect.signature(self.fn).parameters)
        bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
        with open(path, "a") as f:
            f.write(json.dumps({"module": self.fn.__module__, "name": self.fn.__name__, "options": options,
                                "args": {k: _describe(v) for k, v in bound.items()}}) + "\n")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def _signature(fn, args: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a JITFunction for the recorded arguments; attrs: the divisibility by
    16 that a launch would specialize on (aligned pointers, and ints that are multiples of 16 unless the
    kernel says do_not_specialize)."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name, spec = param.name, args.get(param.name)
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = next(iter(spec.values())) if spec else param.default
            if name == "PDL":  # off under the interpreter, on where sm_90 launches it (utils/triton_utils.use_pdl)
                constexprs[(i,)] = True
        elif spec is None or "value" in spec and spec["value"] is None:
            signature[name] = "constexpr"
            constexprs[(i,)] = None
        elif "ptr" in spec:
            signature[name] = "*" + spec["ptr"]
            if spec.get("aligned"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif "int" in spec:
            signature[name] = "i32" if -2 ** 31 <= spec["int"] < 2 ** 31 else "i64"
            if spec["int"] % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif "float" in spec:
            signature[name] = "fp32"
        else:  # a bool or str passed to a non-constexpr parameter
            signature[name] = "i1"
    return signature, constexprs, attrs


def compile_recorded(path: str, arch: int = 90) -> tuple[int, list[str]]:
    """(number of distinct launches compiled, failures) for `path`'s launches, for sm_`arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    with open(path) as f:
        launches = {line: json.loads(line) for line in f}.values()
    failures = []
    for launch in launches:
        fn = getattr(importlib.import_module(launch["module"]), launch["name"])
        signature, constexprs, attrs = _signature(fn, launch["args"])
        try:
            pdl = {"launch_pdl": True} if "PDL" in signature else {}
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options=launch["options"] | pdl)
        except Exception as e:  # noqa: BLE001 - reported with the launch that failed
            failures.append(f"{launch['module']}.{launch['name']} {launch['options']} "
                            f"{ {k: v for k, v in launch['args'].items() if 'ptr' not in v} }: "
                            f"{type(e).__name__}: {str(e)[:400]}")
    return len(launches), failures


if __name__ == "__main__":
    count, failed = compile_recorded(sys.argv[1])
    print(json.dumps({"compiled": count, "failures": failed}))
