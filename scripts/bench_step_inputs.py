"""Host time of one decode step's inputs, no GPU needed: `prepare_step` (the lists every rank
receives) and the CUDA-graph staging fill of the block tables (worker/cuda_graph.py `TableRows`), for
a batch like bench.py's (contexts of 200-2000 tokens), at a given block size: every row written (a
staging buffer's first step, or a new batch), and a steady decode step (each row gains a block every
block_size steps; the buffer holds the rest). Host work that is not hidden behind the GPU adds to every step.

    python scripts/bench_step_inputs.py [--num-seqs 256] [--block-size 16] [--max-model-len 4096]
"""
import argparse
import random
import time

import numpy as np

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams
from nanovllm.worker.cuda_graph import TableRows
from nanovllm.worker.inputs import prepare_step


def decode_batch(num_seqs: int, block_size: int) -> list[Sequence]:
    random.seed(0)
    seqs = []
    for i in range(num_seqs):
        n = random.randint(200, 2000)
        seq = Sequence(i, list(range(n)), SamplingParams(temperature=0.6))
        seq.block_table = list(range(i * 200, i * 200 + -(-n // block_size)))
        seq.num_cached_tokens, seq.num_scheduled_tokens = n - 1, 1
        seqs.append(seq)
    return seqs


def ms_per_call(fn, iters: int = 50) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args()
    seqs = decode_batch(args.num_seqs, args.block_size)
    width = -(-args.max_model_len // args.block_size)
    tables = np.zeros((args.num_seqs, width), dtype=np.int32)  # the staging buffer's table rows
    step = prepare_step(seqs, False, args.block_size)

    steady = TableRows(args.num_seqs)
    steady.fill(tables, step.block_tables)
    growing = [seq.block_table for seq in seqs][::args.block_size]  # the rows that gain a block this step

    def steady_step():
        for table in growing:
            table.append(table[-1] + 1)
        steady.fill(tables, step.block_tables)
    print(f"{args.num_seqs} sequences, block {args.block_size}: prepare_step "
          f"{ms_per_call(lambda: prepare_step(seqs, False, args.block_size)):.3f} ms; block-table staging "
          f"{ms_per_call(lambda: TableRows(args.num_seqs).fill(tables, step.block_tables)):.3f} ms with every row "
          f"written, {ms_per_call(steady_step):.3f} ms in a steady decode step")


if __name__ == "__main__":
    main()
