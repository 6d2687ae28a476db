"""Ray's cost and data parallelism's gain on bench.py's workload, in one process run: the plain
engine, then `LLM(..., data_parallel_size=N, data_parallel_backend="ray")` (N=1 by default: Ray's
overhead alone), each printed as bench.py prints it, then their ratio.

    python scripts/bench_ray.py                          # one GPU: Ray dp=1 vs the plain engine
    python scripts/bench_ray.py --data-parallel-size 2   # two GPUs: scaling
    python scripts/bench_ray.py --dummy-config Qwen3-8B  # any bench.py option
"""
import copy
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402


def main():
    args = bench.parse_args()
    plain = copy.copy(args)
    plain.data_parallel_size, plain.data_parallel_backend = 1, None
    on_ray = copy.copy(args)
    on_ray.data_parallel_backend = "ray"
    results = {}
    for name, run_args in (("plain", plain), (f"ray dp={args.data_parallel_size}", on_ray)):
        print(f"== {name}")
        with tempfile.TemporaryDirectory(prefix="nanovllm-bench-") as folder:
            llm = bench.make_llm(run_args, folder)
            try:
                results[name] = bench.throughput(llm, run_args)["plain"]
            finally:
                llm.shutdown()
    ray_name = f"ray dp={args.data_parallel_size}"
    print(f"{ray_name} / plain throughput: {results[ray_name] / results['plain']:.3f}")


if __name__ == "__main__":
    main()
