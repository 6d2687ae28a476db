"""Throughput benchmark, the reference nano-vllm workload by default.

    python bench.py                              # Qwen3-0.6B architecture, random weights
    python bench.py --dummy-config Qwen3-8B      # Qwen3-8B architecture, random weights
    python bench.py --model PATH                 # a real checkpoint
    python bench.py --model PATH --load-format dummy   # a folder holding only config.json
    python bench.py --latency                    # decode tok/s and ms/step at batch 1, 8, 64
    python bench.py --data-parallel-size 2       # two replicas on Ray (the `ray` extra)

Default workload: random.seed(0); 256 sequences; prompt i is randint(100, 1024) random token ids
in [0, 10000]; then one SamplingParams(temperature=0.6, ignore_eos=True,
max_tokens=randint(100, 1024)) per sequence; a short warm-up generate; one timed generate.
"""
import argparse
import json
import os
import tempfile
import time
from random import randint, seed

from nanovllm import LLM, SamplingParams

# Published configurations (config.json of the Hugging Face repositories), for random-weight runs.
_QWEN3_COMMON = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
                     attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645, head_dim=128,
                     hidden_act="silu", initializer_range=0.02, max_position_embeddings=40960,
                     num_key_value_heads=8, rms_norm_eps=1e-6, rope_scaling=None, rope_theta=1000000,
                     sliding_window=None, use_sliding_window=False, torch_dtype="bfloat16",
                     use_cache=True, vocab_size=151936)
DUMMY_CONFIGS = {
    "Qwen3-0.6B": dict(_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                       num_hidden_layers=28, max_window_layers=28, tie_word_embeddings=True),
    "Qwen3-8B": dict(_QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                     num_hidden_layers=36, max_window_layers=36, tie_word_embeddings=False),
    "Qwen2.5-0.5B": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_dropout=0.0,
                         bos_token_id=151643, eos_token_id=151643, hidden_act="silu", hidden_size=896,
                         initializer_range=0.02, intermediate_size=4864, max_position_embeddings=32768,
                         max_window_layers=24, num_attention_heads=14, num_hidden_layers=24,
                         num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768,
                         tie_word_embeddings=True, torch_dtype="bfloat16", use_cache=True,
                         use_sliding_window=False, vocab_size=151936),
    "Llama-3.2-1B": dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False,
                         attention_dropout=0.0, bos_token_id=128000, eos_token_id=128001, head_dim=64,
                         hidden_act="silu", hidden_size=2048, initializer_range=0.02, intermediate_size=8192,
                         max_position_embeddings=131072, mlp_bias=False, num_attention_heads=32,
                         num_hidden_layers=16, num_key_value_heads=8, rms_norm_eps=1e-5,
                         rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                         rope_theta=500000.0, tie_word_embeddings=True, torch_dtype="bfloat16",
                         use_cache=True, vocab_size=128256),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder; default: --dummy-config with random weights")
    parser.add_argument("--dummy-config", default="Qwen3-0.6B", choices=sorted(DUMMY_CONFIGS))
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--data-parallel-size", type=int, default=1, help="engine replicas, on Ray")
    parser.add_argument("--data-parallel-backend", choices=["ray"],
                        help="'ray': replicas on Ray even with --data-parallel-size 1")
    parser.add_argument("--latency", action="store_true", help="decode latency at batch sizes 1, 8, 64")
    parser.add_argument("--mixed-sampling", action="store_true",
                        help="also run the workload with a mix of greedy, top-k/top-p and penalised requests")
    return parser.parse_args()


def make_llm(args) -> LLM:
    options = dict(enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
                   tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
                   data_parallel_backend=args.data_parallel_backend)
    if args.model is None:
        folder = tempfile.mkdtemp(prefix="nanovllm-bench-")
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(DUMMY_CONFIGS[args.dummy_config], f)
        print(f"No --model given: {args.dummy_config} architecture with random weights (load_format='dummy').")
        return LLM(folder, load_format="dummy", skip_tokenizer_init=True, **options)
    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model!r}: no such folder.")
    return LLM(args.model, load_format=args.load_format,
               skip_tokenizer_init=args.load_format == "dummy", **options)


# The --mixed-sampling variants, cycled over the requests (each keeps its own max_tokens).
MIXED_SAMPLING = (dict(temperature=0.0), dict(temperature=0.6, top_k=50, top_p=0.9),
                  dict(temperature=0.6, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.2),
                  dict(temperature=0.6, min_p=0.05))


def workloads(args) -> tuple[list[int], dict[str, tuple[list[list[int]], list[SamplingParams]]]]:
    """(warm-up prompt, {name: (prompt token ids, sampling params)}): "plain", and "mixed" with
    --mixed-sampling: fresh prompt tokens of the same lengths (no prefix-cache hits), the same
    max_tokens, the MIXED_SAMPLING variants cycled over the requests."""
    seed(0)
    prompt_token_ids = [[randint(0, 10000) for _ in range(randint(100, args.max_input_len))]
                        for _ in range(args.num_seqs)]
    sampling_params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, args.max_output_len))
                       for _ in range(args.num_seqs)]
    warm_up = [randint(0, 10000) for _ in range(16)]
    variants = {"plain": (prompt_token_ids, sampling_params)}
    if args.mixed_sampling:
        variants["mixed"] = ([[randint(0, 10000) for _ in p] for p in prompt_token_ids],
                             [SamplingParams(ignore_eos=True, max_tokens=sp.max_tokens, **MIXED_SAMPLING[i % 4])
                              for i, sp in enumerate(sampling_params)])
    return warm_up, variants


def throughput(llm: LLM, args) -> dict[str, float]:
    """Tokens per second of each workload variant, printed and returned."""
    warm_up, variants = workloads(args)
    llm.generate([warm_up], SamplingParams(), use_tqdm=False)
    results = {}
    for name, (prompts, params) in variants.items():
        start = time.time()
        llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.time() - start
        total_tokens = sum(sp.max_tokens for sp in params)
        results[name] = total_tokens / elapsed
        label = "" if name == "plain" else f"[{name} sampling] "
        print(f"{label}Total: {total_tokens}tok, Time: {elapsed:.2f}s, Throughput: {results[name]:.2f}tok/s")
    if args.mixed_sampling:
        print(f"mixed / plain throughput: {results['mixed'] / results['plain']:.3f}")
    return results


def decode_latency(llm: LLM, batch_size: int, prompt_len: int = 128, max_tokens: int = 512) -> tuple[float, float]:
    """(decode tok/s, ms per decode step) of one batch, prefill excluded."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens)
    for _ in range(batch_size):
        engine.add_request(f"latency-{engine.get_num_unfinished_requests()}",
                           [randint(0, 10000) for _ in range(prompt_len)], params)
    while engine.scheduler.waiting:  # prefill steps
        engine.step()
    steps, start = 0, time.perf_counter()
    while not engine.is_finished():
        engine.step()
        steps += 1
    elapsed = time.perf_counter() - start
    return batch_size * steps / elapsed, 1000 * elapsed / steps


def latency(llm: LLM):
    seed(0)
    for batch_size in (1, 8, 64):
        decode_latency(llm, batch_size)  # warm-up of the same batch size
        tok_s, ms = decode_latency(llm, batch_size)
        print(f"Decode batch {batch_size}: {tok_s:.1f}tok/s, {ms:.3f}ms/step")


def main():
    args = parse_args()
    if args.latency and (args.data_parallel_size > 1 or args.data_parallel_backend):
        raise SystemExit("--latency steps one engine: it does not go with --data-parallel-size / -backend.")
    llm = make_llm(args)
    try:
        latency(llm) if args.latency else throughput(llm, args)
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
