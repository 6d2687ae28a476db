"""The FP8 KV cache's accuracy: next-token logits of the same teacher-forced token streams with the
model-dtype cache and with kv_cache_dtype="fp8", through the engine's own decode path (prefill of
each prompt, then decode steps fed the reference tokens, every step reading the cache).

    python scripts/kv_cache_accuracy.py                         # Qwen3-0.6B architecture, random weights
    python scripts/kv_cache_accuracy.py --model PATH            # a checkpoint folder

Prints max / mean absolute logit error, the mean KL(model-dtype || fp8) of the next-token
distributions and the top-1 agreement, over every decode position.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from random import randint, seed

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.py

from nanovllm import LLM
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams
from nanovllm.worker.inputs import prepare_step


@torch.inference_mode()
def teacher_forced_logits(llm: LLM, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """[len(forced), vocab] float32: the logits after the prompt and after each forced token but
    the last, the prompt by one prefill and each forced token by one (eager) decode step."""
    engine = llm.llm_engine
    runner, block_manager = engine.executor.runner, engine.scheduler.block_manager
    seq = Sequence(0, prompt, SamplingParams())
    block_manager.allocate(seq)
    try:
        seq.num_cached_tokens, seq.num_scheduled_tokens = 0, len(prompt)
        rows = [runner.execute_model(prepare_step([seq], True, runner.block_size)).logits.float()]
        for token in forced[:-1]:
            seq.num_cached_tokens, seq.num_scheduled_tokens = seq.num_tokens, 1
            seq.append_token(token)
            assert block_manager.can_append(seq)
            block_manager.may_append(seq)
            rows.append(runner.execute_model(prepare_step([seq], False, runner.block_size)).logits.float())
    finally:
        block_manager.deallocate(seq)
    return torch.cat(rows)


def compare(model: str, prompts: list[list[int]], num_forced: int, **options) -> dict[str, float]:
    """Logit error of kv_cache_dtype="fp8" against the model-dtype cache, forcing the model-dtype
    run's greedy tokens."""
    logits = {}
    for kv_cache_dtype in ("auto", "fp8"):
        llm = LLM(model, kv_cache_dtype=kv_cache_dtype, **options)
        try:
            if kv_cache_dtype == "auto":
                forced = [o.outputs[0].token_ids for o in llm.generate(
                    prompts, SamplingParams(temperature=0, max_tokens=num_forced, ignore_eos=True), use_tqdm=False)]
            logits[kv_cache_dtype] = torch.cat([teacher_forced_logits(llm, p, f) for p, f in zip(prompts, forced)])
        finally:
            llm.shutdown()
    ref, fp8 = logits["auto"], logits["fp8"]
    error = (fp8 - ref).abs()
    kl = torch.nn.functional.kl_div(fp8.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return dict(max_abs=error.max().item(), mean_abs=error.mean().item(), mean_kl=kl.mean().item(),
                logit_std=ref.std(-1).mean().item(),
                top1_agreement=(ref.argmax(-1) == fp8.argmax(-1)).float().mean().item(), positions=len(ref))


def main():
    import bench
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder; default: --dummy-config with random weights")
    parser.add_argument("--dummy-config", default="Qwen3-0.6B", choices=sorted(bench.DUMMY_CONFIGS))
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--num-forced", type=int, default=64)
    args = parser.parse_args()
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, 1000))] for _ in range(args.num_prompts)]
    folder = None
    options = dict(max_model_len=2048, enforce_eager=True)
    if args.model is None:
        folder = tempfile.mkdtemp(prefix="nanovllm-kv-accuracy-")
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(bench.DUMMY_CONFIGS[args.dummy_config], f)
        options.update(load_format="dummy", skip_tokenizer_init=True)
    try:
        result = compare(args.model or folder, prompts, args.num_forced, **options)
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    name = args.model or f"{args.dummy_config} (random weights)"
    print(f"{name}, fp8 vs model-dtype KV cache over {result['positions']} decode positions: max abs logit error "
          f"{result['max_abs']:.4f}, mean abs {result['mean_abs']:.5f}, mean KL {result['mean_kl']:.2e}, "
          f"top-1 agreement {result['top1_agreement']:.4f} (logits' standard deviation {result['logit_std']:.3f})")


if __name__ == "__main__":
    main()
