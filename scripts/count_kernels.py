"""Kernels per decoder layer of a batch-1 decode step, from the profiler's kernel list.

Builds bench.py's random-weight model (`--dummy-config`, Qwen3-0.6B by default) through `LLM`, so
each layer runs what the engine's CUDA graphs capture (on the code before the fused kernels: its
torch.compile'd norms, RoPE and SiLU; pass --enforce-eager for the plain torch layers), warms it
up with a short generate, then profiles, at batch 1 and context 129:
  - one decoder layer (layer 0) called on its own: its kernel list, in launch order, with GPU times;
  - the whole decode forward, eagerly: its kernel count, split into layers x per layer + the rest;
  - one CUDA-graph replay of the step (when graphs are captured): its kernel count.
Memcpy/memset activities are not kernels and are not counted. Only the public pieces of the
model runner are touched, so the script runs unchanged against older code:

    python scripts/count_kernels.py [--dummy-config Qwen3-0.6B] [--enforce-eager]
    PYTHONPATH=/path/to/old/checkout python scripts/count_kernels.py   # the code before

The first line printed names the nanovllm imported (PYTHONPATH's, else an installed one, else this
checkout's).
On a machine without a GPU it counts top-level aten ops instead of kernels (a smoke test).
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: an old checkout there wins
import bench  # noqa: E402
import nanovllm  # noqa: E402
from nanovllm import SamplingParams  # noqa: E402
from nanovllm.attention import AttentionMetadata, forward_context  # noqa: E402
from nanovllm.utils.parallel import tensor_parallel_group  # noqa: E402
from nanovllm.worker.inputs import StepInput  # noqa: E402

CONTEXT_LEN = 129  # the decode token's position is CONTEXT_LEN - 1
NAME_WIDTH = 100   # kernel names are cut to this many characters


def kernels(prof, on_cuda: bool) -> list[tuple[str, float]]:
    """(name, duration in us) of each kernel of `prof`, in launch order (CPU: top-level aten ops)."""
    if on_cuda:
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA
                  and not e.name.startswith(("Memcpy", "Memset"))]
    else:
        events = [e for e in prof.events() if e.name.startswith("aten::")
                  and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    events.sort(key=lambda e: e.time_range.start)
    return [(e.name, e.time_range.elapsed_us()) for e in events]


def profiled(fn, on_cuda: bool) -> list[tuple[str, float]]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        fn()
        sync()
    return kernels(prof, on_cuda)


def decode_step(block_size: int, device: torch.device) -> tuple[StepInput, AttentionMetadata]:
    """Batch 1 at context CONTEXT_LEN over blocks 0, 1, ... (whatever they hold: only the kernels count)."""
    table = list(range(-(-CONTEXT_LEN // block_size)))
    position = CONTEXT_LEN - 1
    slot = table[position // block_size] * block_size + position % block_size
    step = StepInput(is_prefill=False, input_ids=[0], positions=[position], slot_mapping=[slot],
                     block_tables=[table], context_lens=[CONTEXT_LEN], logits_indices=[0])
    meta = AttentionMetadata(is_prefill=False, slot_mapping=torch.tensor([slot], dtype=torch.int32, device=device),
                             context_lens=torch.tensor([CONTEXT_LEN], dtype=torch.int32, device=device),
                             block_tables=torch.tensor([table], dtype=torch.int32, device=device))
    return step, meta


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dummy-config", default="Qwen3-0.6B", choices=sorted(bench.DUMMY_CONFIGS))
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (nor what they bring)")
    args = parser.parse_args()
    bench_args = bench.parse_args(["--dummy-config", args.dummy_config, "--max-model-len", "1024"]
                                  + (["--enforce-eager"] if args.enforce_eager else []))
    with tempfile.TemporaryDirectory(prefix="nanovllm-kernels-") as folder:
        llm = bench.make_llm(bench_args, folder)
        try:
            llm.generate([list(range(1, CONTEXT_LEN))], SamplingParams(max_tokens=4, ignore_eos=True),
                         use_tqdm=False)
            report(llm, args.dummy_config)
        finally:
            llm.shutdown()


@torch.inference_mode()
def report(llm, name: str):
    runner = llm.llm_engine.executor.runner
    model, device = runner.model, runner.device
    on_cuda = device.type == "cuda"
    unit = "kernels" if on_cuda else "top-level aten ops (CPU)"
    config = llm.llm_engine.config.hf_config
    layers = model.model.layers
    step, meta = decode_step(runner.block_size, device)
    input_ids = torch.tensor(step.input_ids, device=device)
    positions = torch.tensor(step.positions, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(1, config.hidden_size, generator=g, device=device, dtype=model.lm_head.weight.dtype)
    residual = torch.randn(hidden.shape, generator=g, device=device, dtype=hidden.dtype)
    with tensor_parallel_group(runner.tp_group), forward_context(meta):
        for _ in range(2):  # warm-up: compilation, autotuning, lazy inits
            layers[0](positions, hidden, residual)
            model(input_ids, positions)
        layer = profiled(lambda: layers[0](positions, hidden, residual), on_cuda)
        forward = profiled(lambda: model(input_ids, positions), on_cuda)
    print(f"nanovllm from {Path(nanovllm.__file__).parent}")
    print(f"{name}, batch-1 decode at context {CONTEXT_LEN}; one decoder layer (layer 0, with a residual):")
    for i, (kernel, us) in enumerate(layer):
        print(f"  {i + 1:2d}. {us:7.1f} us  {kernel[:NAME_WIDTH]}")
    where = "of GPU time" if on_cuda else "on the CPU"
    print(f"{unit} per layer: {len(layer)} ({sum(us for _, us in layer):.1f} us {where})")
    rest = len(forward) - len(layers) * len(layer)
    print(f"decode forward, eager: {len(forward)} {unit} = {len(layers)} layers x {len(layer)} + {rest} outside "
          f"the layers (embedding, final norm) or differing in layer 0 (no residual)")
    if getattr(runner, "graph_runner", None) is not None:
        with tensor_parallel_group(runner.tp_group):
            runner.graph_runner.replay(step)
            replay = profiled(lambda: runner.graph_runner.replay(step), on_cuda)
        print(f"decode forward, one CUDA-graph replay: {len(replay)} {unit}"
              + (" (this profiler reports no kernels inside graphs)" if not replay else ""))


if __name__ == "__main__":
    main()
