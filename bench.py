"""Throughput benchmark, the reference nano-vllm workload by default.

    python bench.py                              # Qwen3-0.6B architecture, random weights
    python bench.py --dummy-config Qwen3-8B      # Qwen3-8B architecture, random weights
    python bench.py --model PATH                 # a real checkpoint
    python bench.py --model PATH --load-format dummy   # a folder holding only config.json
    python bench.py --latency                    # decode tok/s and ms/step at batch 1, 8, 64
    python bench.py --quantization fp8           # FP8 weights (random weights: quantized at load time)
    python bench.py --attention-backend triton --kv-cache-dtype fp8 --block-size 16   # the KV path
    python bench.py --data-parallel-size 2       # two replicas on Ray (the `ray` extra)
    python bench.py --workload shared-prefix [--no-cascade]   # shared prefixes [without cascade attention]
    python bench.py --workload n-samples [--no-cascade]
    python bench.py --no-async-scheduling        # the synchronous loop (host work not overlapped)

Default workload: random.seed(0); 256 sequences; prompt i is randint(100, 1024) random token ids
in [0, 10000]; then one SamplingParams(temperature=0.6, ignore_eos=True,
max_tokens=randint(100, 1024)) per sequence; a short warm-up generate; one timed generate.
Lengths are drawn from [min(100, max), max], so any --max-input-len / --max-output-len >= 1 works.
On the CPU the full workload takes long: a progress bar shows how far it got.

Shared-prefix workloads (one `LLM.generate`; decode tok/s: decode steps only, each round of the engine's
loop timed, and its share of the floor where every distinct KV block of a step's batch is read once, plus
the weights, at --bandwidth-tbs). With async scheduling a round's wall time covers the GPU work of the step
before it: where a decode step follows a prefill step (or the other way round), the device is drained first
and that wait is counted with the earlier step's kind.
- shared-prefix: random.seed(0); one 2,048-token random system prompt; --num-seqs (512 unless given)
  prompts = it + randint(32, 256) own random tokens; temperature 0.6, ignore_eos, 128 new tokens each.
- n-samples: random.seed(0); 64 prompts of 1,024 random tokens; n=16, temperature 0.6, ignore_eos,
  256 new tokens each.
"""
import argparse
import json
import os
import tempfile
import time
from random import randint, seed

import torch
from tqdm import tqdm

from nanovllm import LLM, SamplingParams
from nanovllm.worker.cascade import cascade_policy

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
    "Qwen3-30B-A3B": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", attention_bias=False,
                          attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645, decoder_sparse_step=1,
                          head_dim=128, hidden_act="silu", hidden_size=2048, initializer_range=0.02,
                          intermediate_size=6144, max_position_embeddings=40960, max_window_layers=48,
                          mlp_only_layers=[], moe_intermediate_size=768, norm_topk_prob=True,
                          num_attention_heads=32, num_experts=128, num_experts_per_tok=8, num_hidden_layers=48,
                          num_key_value_heads=4, output_router_logits=False, rms_norm_eps=1e-6, rope_scaling=None,
                          rope_theta=1000000.0, router_aux_loss_coef=0.001, sliding_window=None,
                          tie_word_embeddings=False, torch_dtype="bfloat16", use_cache=True,
                          use_sliding_window=False, vocab_size=151936),
}


MIN_LEN = 100  # shortest prompt and completion of the default workload


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder; default: --dummy-config with random weights")
    parser.add_argument("--dummy-config", default="Qwen3-0.6B", choices=sorted(DUMMY_CONFIGS))
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--num-seqs", type=positive_int, default=None, help="default 256 (shared-prefix: 512)")
    parser.add_argument("--max-input-len", type=positive_int, default=1024)
    parser.add_argument("--max-output-len", type=positive_int, default=1024)
    parser.add_argument("--max-model-len", type=positive_int, default=4096)
    parser.add_argument("--tensor-parallel-size", type=positive_int, default=1)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--quantization", choices=["fp8"],
                        help="FP8 weights; a bf16 checkpoint (or the random weights) is quantized at load time")
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "flash_attn", "triton", "torch"])
    parser.add_argument("--block-size", type=positive_int, default=None, help="tokens per KV block (default: the backend's)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"])
    parser.add_argument("--data-parallel-size", type=positive_int, default=1, help="engine replicas, on Ray")
    parser.add_argument("--data-parallel-backend", choices=["ray"],
                        help="'ray': replicas on Ray even with --data-parallel-size 1")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="run the synchronous loop (async scheduling is on by default on CUDA)")
    parser.add_argument("--latency", action="store_true", help="decode latency at batch sizes 1, 8, 64")
    parser.add_argument("--with-latency", action="store_true", help="the throughput workload, then --latency")
    parser.add_argument("--repeat", type=positive_int, default=1, help="time each workload this many times")
    parser.add_argument("--mixed-sampling", action="store_true",
                        help="also run the workload with a mix of greedy, top-k/top-p and penalised requests")
    parser.add_argument("--workload", default="default", choices=["default", *SHARED_WORKLOADS],
                        help="a shared-prefix workload: decode tok/s and its floor (see above)")
    parser.add_argument("--cascade", action=argparse.BooleanOptionalAction, default=None,
                        help="enable_cascade_attention (default: the engine's, on with CUDA)")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.25,
                        help="HBM bandwidth for the floor of --workload (H200, docs/PERF.md's copy ceiling)")
    args = parser.parse_args(argv)
    if args.num_seqs is None:
        args.num_seqs = 512 if args.workload == "shared-prefix" else 256
    return args


def make_llm(args, folder: str) -> LLM:
    """The engine; with no --model, random weights of --dummy-config, whose config.json is written
    into `folder` (a temporary folder the caller removes)."""
    options = dict(enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
                   tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
                   attention_backend=args.attention_backend, block_size=args.block_size,
                   kv_cache_dtype=args.kv_cache_dtype, data_parallel_size=args.data_parallel_size,
                   data_parallel_backend=args.data_parallel_backend,
                   enable_cascade_attention=args.cascade,
                   async_scheduling=False if args.no_async_scheduling else None)
    if args.model is None:
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
    input_lens = (min(MIN_LEN, args.max_input_len), args.max_input_len)
    output_lens = (min(MIN_LEN, args.max_output_len), args.max_output_len)
    prompt_token_ids = [[randint(0, 10000) for _ in range(randint(*input_lens))] for _ in range(args.num_seqs)]
    sampling_params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(*output_lens))
                       for _ in range(args.num_seqs)]
    warm_up = [randint(0, 10000) for _ in range(16)]
    variants = {"plain": (prompt_token_ids, sampling_params)}
    if args.mixed_sampling:
        variants["mixed"] = ([[randint(0, 10000) for _ in p] for p in prompt_token_ids],
                             [SamplingParams(ignore_eos=True, max_tokens=sp.max_tokens, **MIXED_SAMPLING[i % 4])
                              for i, sp in enumerate(sampling_params)])
    return warm_up, variants


def throughput(llm: LLM, args, show_progress: bool = False) -> dict[str, float]:
    """Tokens per second of each workload variant, printed and returned."""
    warm_up, variants = workloads(args)
    llm.generate([warm_up], SamplingParams(), use_tqdm=False)
    results = {}
    for name, (prompts, params) in [item for _ in range(args.repeat) for item in variants.items()]:
        start = time.time()
        llm.generate(prompts, params, use_tqdm=show_progress)
        elapsed = time.time() - start
        total_tokens = sum(sp.max_tokens for sp in params)
        results[name] = total_tokens / elapsed
        label = "" if name == "plain" else f"[{name} sampling] "
        print(f"{label}Total: {total_tokens}tok, Time: {elapsed:.2f}s, Throughput: {results[name]:.2f}tok/s")
    if args.mixed_sampling:
        print(f"mixed / plain throughput: {results['mixed'] / results['plain']:.3f}")
    return results


SHARED_WORKLOADS = ("shared-prefix", "n-samples")


def shared_workload(name: str, num_seqs: int) -> tuple[list[list[int]], SamplingParams]:
    """(prompt token ids, sampling params) of a --workload (see the module docstring)."""
    seed(0)
    if name == "shared-prefix":
        system = [randint(0, 10000) for _ in range(2048)]
        prompts = [system + [randint(0, 10000) for _ in range(randint(32, 256))] for _ in range(num_seqs)]
        return prompts, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=128)
    prompts = [[randint(0, 10000) for _ in range(1024)] for _ in range(64)]
    return prompts, SamplingParams(n=16, temperature=0.6, ignore_eos=True, max_tokens=256)


def shared_throughput(llm: LLM, args):
    """Run --workload through `LLM.generate`: decode tok/s (decode steps only) and its share of the floor,
    printed. Each round of the engine's loop is timed; what the bench itself records per step (the step's
    kind, rows and block tables) is a few list entries, and the distinct KV blocks behind the floor are
    counted after the run, so no bench work hides in a step's time."""
    engine = llm.llm_engine
    hf = engine.config.hf_config
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv_bytes = 1 if args.kv_cache_dtype != "auto" else 2
    token_bytes = 2 * hf.num_hidden_layers * hf.num_key_value_heads * head_dim * kv_bytes  # K and V, all layers
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.executor.runner.model.parameters())
    block_size = engine.config.block_size
    on_cuda = engine.config.device_type == "cuda"
    # per scheduled step: (is_prefill, rows, [(block table, its length then)], s drained before it)
    scheduler, steps, rounds = engine.scheduler, [], []  # rounds: (s, the step scheduled in it or None)
    schedule, loop_step = scheduler.schedule, engine._step

    def recording_schedule():
        output = schedule()
        drained = 0.0
        if steps and steps[-1][0] != output.is_prefill and on_cuda:  # the other kind's steps end here
            start = time.perf_counter()
            torch.cuda.synchronize()
            drained = time.perf_counter() - start
        tables = [] if output.is_prefill else [(seq.block_table, len(seq.block_table)) for seq in output.seqs]
        steps.append((output.is_prefill, len(output.seqs), tables, drained))
        return output

    def timed_round():
        num_steps, start = len(steps), time.perf_counter()
        result = loop_step()
        rounds.append((time.perf_counter() - start, steps[-1] if len(steps) > num_steps else None))
        return result
    llm.generate([[0] * 16], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    prompts, params = shared_workload(args.workload, args.num_seqs)
    scheduler.schedule, engine._step = recording_schedule, timed_round
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        del scheduler.schedule, engine._step  # the methods again
    decode_s = prefill_s = floor_s = 0.0
    decode_tokens, is_prefill = 0, False
    for elapsed, step in rounds:
        drained = 0.0
        if step is not None:  # (else a round that only read the last step's tokens: counted with its kind)
            is_prefill, rows, tables, drained = step
            if not is_prefill:
                decode_tokens += rows
                blocks = len({b for table, length in tables for b in table[:length]})
                floor_s += (weight_bytes + blocks * block_size * token_bytes) / (args.bandwidth_tbs * 1e12)
        if is_prefill:
            prefill_s, decode_s = prefill_s + elapsed - drained, decode_s + drained
        else:
            decode_s, prefill_s = decode_s + elapsed - drained, prefill_s + drained
    num_decode = sum(1 for s in steps if not s[0])
    cascade = "on" if cascade_policy(engine.config) is not None else "off"  # the flag, where the backend has it
    print(f"[{args.workload}, cascade {cascade}] decode: {decode_tokens}tok in {num_decode} steps, {decode_s:.2f}s, "
          f"{decode_tokens / decode_s:.0f}tok/s, {1000 * decode_s / num_decode:.2f}ms/step; floor {floor_s:.2f}s "
          f"({100 * floor_s / decode_s:.0f}% of it); prefill {prefill_s:.2f}s")


def decode_latency(llm: LLM, batch_size: int, prompt_len: int = 128, max_tokens: int = 512,
                   progress: tqdm | None = None) -> tuple[float, float]:
    """(decode tok/s, ms per decode step) of one batch, prefill excluded; `progress` counts the steps."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens)
    for _ in range(batch_size):
        engine.add_request(f"latency-{engine.get_num_unfinished_requests()}",
                           [randint(0, 10000) for _ in range(prompt_len)], params)
    started = set()
    while len(started) < batch_size:  # the prefill, until its tokens reached the host
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    steps, start = 0, time.perf_counter()
    while not engine.is_finished():
        engine.step()
        steps += 1
        if progress is not None:
            progress.update(1)
    elapsed = time.perf_counter() - start
    return batch_size * steps / elapsed, 1000 * elapsed / steps


def latency(llm: LLM, show_progress: bool, repeat: int = 1):
    seed(0)
    with tqdm(desc="Decode steps", disable=not show_progress) as progress:
        for batch_size in (1, 8, 64):
            decode_latency(llm, batch_size, progress=progress)  # warm-up of the same batch size
            for _ in range(repeat):
                tok_s, ms = decode_latency(llm, batch_size, progress=progress)
                progress.write(f"Decode batch {batch_size}: {tok_s:.1f}tok/s, {ms:.3f}ms/step")


def main():
    args = parse_args()
    if args.workload != "default" and (args.data_parallel_size > 1 or args.data_parallel_backend
                                       or args.tensor_parallel_size > 1):
        raise SystemExit("--workload steps one engine on one GPU: no --data-parallel-size / --tensor-parallel-size.")
    if args.latency and (args.data_parallel_size > 1 or args.data_parallel_backend):
        raise SystemExit("--latency steps one engine: it does not go with --data-parallel-size / -backend.")
    on_cpu = not torch.cuda.is_available()
    if on_cpu:  # progress bars only here: they cost time on a fast GPU run
        print("No GPU: running on the CPU, where the default workload (256 sequences of up to 1024 + 1024 "
              "tokens) and --latency take a long time. For a quick run: --num-seqs 8 --max-input-len 64 "
              "--max-output-len 16.", flush=True)
    with tempfile.TemporaryDirectory(prefix="nanovllm-bench-") as folder:
        llm = make_llm(args, folder)
        try:
            if args.workload != "default":
                for _ in range(args.repeat):
                    shared_throughput(llm, args)
            elif not args.latency:
                throughput(llm, args, on_cpu)
            if args.latency or args.with_latency:
                latency(llm, on_cpu, args.repeat)
        finally:
            llm.shutdown()


if __name__ == "__main__":
    main()
