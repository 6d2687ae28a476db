"""Time the sampler alone on the GPU: one decode step's logits ([num_rows, vocab] bf16) for a
batch of plain temperature rows, for bench.py's --mixed-sampling mix (greedy, top-k + top-p,
penalised, min-p rows, with prompts and outputs of bench-like lengths), and for every row with
Qwen3's generation_config defaults (temperature 0.6, top-k 20, top-p 0.95). Prints milliseconds per
step (wall, host work included; in the engine that host work overlaps the forward), the GPU time
per step (the sum of its kernels' times) and the top kernels of each.

    python scripts/bench_sampler.py [--rows 256] [--vocab 151936]
"""
import argparse
import math
import random
import time

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.sample.logits import PatchedLogits
from nanovllm.sample.sampler import Sampler
from nanovllm.sample.thresholds import keep_thresholds_
from nanovllm.sampling_params import SamplingParams

MIXED = (dict(temperature=0.0), dict(temperature=0.6, top_k=50, top_p=0.9),
         dict(temperature=0.6, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.2),
         dict(temperature=0.6, min_p=0.05))


VARIANTS = {"plain": (dict(temperature=0.6),), "mixed": MIXED,
            "qwen3-defaults": (dict(temperature=0.6, top_k=20, top_p=0.95),)}


def make_seqs(rows: int, variant: tuple[dict, ...]) -> list[Sequence]:
    seqs = []
    for i in range(rows):
        params = SamplingParams(ignore_eos=True, max_tokens=2048, **variant[i % len(variant)])
        seq = Sequence(i, [random.randint(0, 10000) for _ in range(random.randint(100, 1024))], params)
        for _ in range(random.randint(0, 1024)):
            seq.append_token(random.randint(0, 10000))
        seqs.append(seq)
    return seqs


def step(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]):
    return sampler(logits, seqs).tolist()


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--kernels", type=int, default=12, help="kernels listed per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    random.seed(0)
    sampler = Sampler()
    logits = torch.randn(args.rows, args.vocab, device="cuda", dtype=torch.bfloat16) * 3
    inf = float("inf")
    for rows, k, top_p in ((args.rows, 20, 0.95), (args.rows // 4, 50, 0.9), (args.rows // 4, 0, inf)):
        x = PatchedLogits(logits[:rows])  # the threshold stage alone: top-k + top-p (k = 0: min-p 0.05)
        index, temperatures = torch.arange(rows, device="cuda"), torch.full((rows,), 0.6, device="cuda")
        ks, top_ps = torch.full((rows,), k, device="cuda"), torch.full((rows,), top_p, device="cuda")
        log_min_ps = torch.full((rows,), -inf if k else math.log(0.05), device="cuda")
        thresholds = torch.full((rows,), -inf, device="cuda")
        args_ = (thresholds, index, ks, top_ps, log_min_ps, temperatures, k)
        x.triton_kernels = False
        slow = time_ms(lambda: keep_thresholds_(x, *args_), args.iters)
        x.triton_kernels = True
        print(f"thresholds of {rows} rows, top-k {k}, top-p {top_p}: torch {slow:.3f} ms, "
              f"kernels {time_ms(lambda: keep_thresholds_(x, *args_), args.iters):.3f} ms")
    for name in args.variants:
        variant = VARIANTS[name]
        seqs = make_seqs(args.rows, variant)
        for _ in range(5):
            step(sampler, logits, seqs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            step(sampler, logits, seqs)
        torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - start) / args.iters
        print(f"{name}: {ms:.3f} ms/step ({args.rows} rows, vocab {args.vocab})")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step(sampler, logits, seqs)
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_ms = sum(e.self_device_time_total for e in events) / 10 / 1000
        print(f"{name}: GPU {gpu_ms:.3f} ms/step (sum of kernel times)")
        kernels = sorted((e for e in events if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
        for e in kernels[:args.kernels]:
            print(f"  {e.self_device_time_total / 10:8.1f} us/step {e.count / 10:4.1f} calls  {e.key[:70]}")


if __name__ == "__main__":
    main()
