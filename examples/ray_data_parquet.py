"""Batch inference with Ray Data: a Parquet file of prompts in, a Parquet dataset of completions out.

    python examples/ray_data_parquet.py prompts.parquet out/ --model Qwen/Qwen3-0.6B --concurrency 2

The input needs a `prompt` (str) or a `prompt_token_ids` column, optionally a `sampling_params`
column (a dict per row, over --max-tokens / --temperature); every other column is kept. The output
adds `generated_text`, `generated_token_ids`, `num_generated_tokens` and `finish_reason`. Each of
the --concurrency engines takes --tensor-parallel-size GPUs (CPUs without a GPU). To make an input:

    import pandas as pd
    pd.DataFrame({"id": [0, 1], "prompt": ["Hello", "The capital of France is"]}).to_parquet("prompts.parquet")
"""
import argparse

import ray

from nanovllm.ray import LLMPredictor


def run(input_path: str, output_path: str, model: str, sampling_params: dict, concurrency: int = 1,
        batch_size: int = 256, tensor_parallel_size: int = 1, engine_options: dict | None = None):
    """Read `input_path`, generate for every row on `concurrency` engines, write `output_path`."""
    if not ray.is_initialized():
        ray.init()
    on_gpu = ray.cluster_resources().get("GPU", 0) > 0
    resources = dict(num_gpus=tensor_parallel_size) if on_gpu else dict(num_cpus=tensor_parallel_size)
    (ray.data.read_parquet(input_path)
     .map_batches(LLMPredictor, concurrency=concurrency, batch_size=batch_size, **resources,
                  fn_constructor_kwargs=dict(model=model, sampling_params=sampling_params,
                                             tensor_parallel_size=tensor_parallel_size, **(engine_options or {})))
     .write_parquet(output_path))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a Parquet file (or folder) with a prompt or prompt_token_ids column")
    parser.add_argument("output", help="the folder the output Parquet files go to")
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, default=1, help="engines (Ray actors)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="rows per engine call (one generate: larger means fuller batches)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()
    run(args.input, args.output, args.model, dict(max_tokens=args.max_tokens, temperature=args.temperature),
        args.concurrency, args.batch_size, args.tensor_parallel_size)


if __name__ == "__main__":
    main()
