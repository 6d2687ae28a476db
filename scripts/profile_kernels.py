"""Where the GPU's time goes on bench.py's default workload (or a --workload): every kernel (CUDA
graphs' included) of one timed generate, from the profiler, summed by name, against the run's wall
time and the GPU's busy time (the union of the kernels' intervals; the rest is the GPU waiting for
the host). bench.py's options pass through, e.g. the FP8 cache or a shared-prefix workload:

    python scripts/profile_kernels.py [--kv-cache-dtype fp8] [--num-seqs 256] [--top 30]
    python scripts/profile_kernels.py --workload shared-prefix [--cascade]

The profiler slows the host a little, so the wall time here is above bench.py's; the kernel
times are the GPU's own. CUDA only.
"""
import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: an old checkout there wins
import bench  # noqa: E402
from nanovllm import SamplingParams  # noqa: E402

NAME_WIDTH = 90


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (us in, s out)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=30, help="kernels listed")
    args, rest = parser.parse_known_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels.py profiles CUDA kernels: it needs a CUDA GPU.")
    bench_args = bench.parse_args(rest)
    warm_up, variants = bench.workloads(bench_args)
    prompts, params = variants["plain"]
    if bench_args.workload != "default":
        prompts, shared = bench.shared_workload(bench_args.workload, bench_args.num_seqs)
        params = [shared] * len(prompts)
    with tempfile.TemporaryDirectory(prefix="nanovllm-profile-") as folder:
        llm = bench.make_llm(bench_args, folder)
        try:
            llm.generate([warm_up], SamplingParams(), use_tqdm=False)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                torch.cuda.synchronize()
                wall = time.perf_counter() - start
        finally:
            llm.shutdown()
    by_name = defaultdict(lambda: [0, 0.0])
    intervals = []
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.time_range.elapsed_us() / 1e6
        intervals.append((e.time_range.start, e.time_range.end))
    tokens = sum(p.n * p.max_tokens for p in params)
    busy = busy_seconds(intervals)
    total = sum(s for _, s in by_name.values())
    print(f"{tokens} tokens in {wall:.2f} s ({tokens / wall:.0f} tok/s under the profiler); GPU busy {busy:.2f} s "
          f"({100 * busy / wall:.0f}% of wall), idle {wall - busy:.2f} s; kernel time summed {total:.2f} s")
    print(f"{'s':>8} {'share':>6} {'calls':>8} {'us/call':>9}  kernel")
    for name, (calls, seconds) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{seconds:8.3f} {100 * seconds / total:5.1f}% {calls:8d} {1e6 * seconds / calls:9.1f}  "
              f"{name[:NAME_WIDTH]}")


if __name__ == "__main__":
    main()
