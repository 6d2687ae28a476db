"""Where a step's time goes, host and GPU, for bench.py's workload (plain) and its --mixed-sampling
variant (the same requests): per decode round of the engine's loop, the host time before the forward is
queued (scheduling, inputs), the time the host spends queuing the forward and the sampler, its
wait for a step's results (with async scheduling: the previous step's), the rest of the round
(postprocess), the GPU time of the forward and of the sampler (CUDA events, so a sampler whose
kernels are queued slower than the GPU runs them counts its gaps too), and the GPU's idle time
before the step (from the previous step's end to this one's start: host time not hidden behind
the GPU). Averages by batch size, then totals. CUDA only, one GPU.

    python scripts/profile_steps.py [--num-seqs 256] [--no-async-scheduling] [bench.py's options]
    python scripts/profile_steps.py --workload shared-prefix --cascade   # that workload alone
"""
import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402
from nanovllm import SamplingParams  # noqa: E402
from nanovllm.worker.async_output import AsyncSampledTokens  # noqa: E402


class StepClock:
    """Wraps the engine's step, the runner's forward, logits, sampler and sampling with timers."""

    def __init__(self, llm):
        engine = llm.llm_engine
        runner = engine.executor.runner
        self.records, self.current = [], None
        step, execute_model, sample = engine._step, runner.execute_model, runner.sample
        compute_logits, sampler = runner.model.compute_logits, runner.sampler

        def timed_step():
            self.current = record = dict(start=time.perf_counter(), wait=0.0)
            result = step()
            record["end"] = time.perf_counter()
            if "gpu_start" in record:
                self.records.append(record)
            return result

        def timed_execute(inputs, *targets):
            record = self.current
            record["batch"], record["prefill"] = len(inputs.logits_indices), inputs.is_prefill
            record["execute"] = time.perf_counter()
            record["gpu_start"] = _event()
            return execute_model(inputs, *targets)

        def timed_sample(*args):
            result = sample(*args)
            self.current["results"] = time.perf_counter()
            return result

        def timed_logits(hidden_states):
            logits = compute_logits(hidden_states)
            self.current["logits"], self.current["gpu_logits"] = time.perf_counter(), _event()
            return logits

        def timed_sampler(*args):
            output = sampler(*args)
            self.current["sampled"], self.current["gpu_sampled"] = time.perf_counter(), _event()
            return output

        def timed_get_output(samples):
            start = time.perf_counter()
            result = get_output(samples)
            if self.current is not None:
                self.current["wait"] += time.perf_counter() - start
            return result

        engine._step, runner.execute_model, runner.sample = timed_step, timed_execute, timed_sample
        runner.model.compute_logits, runner.sampler = timed_logits, timed_sampler
        get_output = AsyncSampledTokens.get_output
        AsyncSampledTokens.get_output = timed_get_output

    def report(self, name: str):
        torch.cuda.synchronize()
        buckets = defaultdict(lambda: defaultdict(float))
        prefill = [r["end"] - r["start"] for r in self.records if r["prefill"]]
        previous = None
        for r in self.records:
            before, previous = previous, r
            if r["prefill"] or "sampled" not in r:
                continue
            key = next(b for b in (128, 32, 8, 1) if r["batch"] >= b)
            b = buckets[key]
            b["steps"] += 1
            b["wall"] += r["end"] - r["start"]
            b["before"] += r["execute"] - r["start"]
            b["queue_forward"] += r["logits"] - r["execute"]
            b["queue_sampler"] += r["sampled"] - r["logits"]
            b["wait"] += r["wait"]
            b["after"] += r["end"] - r["results"] - r["wait"]
            b["gpu_forward"] += r["gpu_start"].elapsed_time(r["gpu_logits"]) / 1e3
            b["gpu_sampler"] += r["gpu_logits"].elapsed_time(r["gpu_sampled"]) / 1e3
            if before is not None and "gpu_sampled" in before:
                b["gpu_idle"] += before["gpu_sampled"].elapsed_time(r["gpu_start"]) / 1e3
        fields = ["wall", "before", "queue_forward", "queue_sampler", "wait", "after", "gpu_forward", "gpu_sampler",
                  "gpu_idle"]
        print(f"[{name}] decode rounds, ms per round (host: before = scheduling + inputs, queue_* = queuing, "
              f"wait = for a step's results, after = the rest (postprocess); gpu_* from CUDA events, "
              f"gpu_idle = from the previous step's end to this one's start)")
        print(f"{'batch':>8} {'steps':>6} " + " ".join(f"{f:>13}" for f in fields))
        total = defaultdict(float)
        for key in sorted(buckets, reverse=True):
            b = buckets[key]
            for f in ["steps"] + fields:
                total[f] += b[f]
            per_step = " ".join(f"{1e3 * b[f] / b['steps']:>13.3f}" for f in fields)
            print(f"{'>=' + str(key):>8} {int(b['steps']):>6} {per_step}")
        print(f"{'total s':>8} {int(total['steps']):>6} " + " ".join(f"{total[f]:>13.3f}" for f in fields))
        print(f"[{name}] prefill steps: {len(prefill)}, {sum(prefill):.3f} s, longest {max(prefill, default=0):.3f} s")
        self.records = []


def compiled_variants() -> dict[str, int]:
    """How many compiled variants each sampling kernel has: more than one means a recompile at
    run time (a specialisation the warm-up did not cover)."""
    from nanovllm.sample import draw, logits, penalties, thresholds_triton
    counts = {}
    for module in (draw, logits, penalties, thresholds_triton):
        for name, kernel in vars(module).items():
            caches = getattr(kernel, "device_caches", None)
            if caches is not None:
                counts[name] = sum(len(cache[0]) for cache in caches.values())
    return counts


def _event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--no-async-scheduling", action="store_true")
    args, rest = parser.parse_known_args()  # the rest goes to bench.py's parser, e.g. --kv-cache-dtype fp8
    folder = tempfile.TemporaryDirectory(prefix="nanovllm-profile-")
    bench_args = bench.parse_args(rest + (["--no-async-scheduling"] if args.no_async_scheduling else []))
    llm = bench.make_llm(bench_args, folder.name)  # bench.py's defaults
    warm_up, variants = bench.workloads(argparse.Namespace(num_seqs=args.num_seqs, max_input_len=1024,
                                                           max_output_len=1024, mixed_sampling=True))
    if bench_args.workload in bench.SHARED_WORKLOADS:  # --workload shared-prefix / n-samples instead
        prompts, params = bench.shared_workload(bench_args.workload, bench_args.num_seqs)
        variants = {bench_args.workload: (prompts, [params] * len(prompts))}
    llm.generate([warm_up], SamplingParams(), use_tqdm=False)
    clock = StepClock(llm)
    for name, (prompts, params) in variants.items():
        num_tokens = sum(p.max_tokens * p.n for p in params)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        print(f"[{name}] {num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.0f} tok/s")
        clock.report(name)
        print(f"[{name}] compiled variants of the sampling kernels: {compiled_variants()}")
    llm.shutdown()
    folder.cleanup()


if __name__ == "__main__":
    main()
