"""Chat with a Qwen3 checkpoint: python example.py [MODEL] (a local folder or a Hugging Face hub id;
default Qwen/Qwen3-0.6B, downloaded on first use)."""
import sys

from nanovllm import LLM, SamplingParams


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "Qwen/Qwen3-0.6B"
    llm = LLM(path, enforce_eager=True, tensor_parallel_size=1)
    tokenizer = llm.get_tokenizer()
    sampling_params = SamplingParams(temperature=0.6, max_tokens=256)
    questions = ["introduce yourself", "list all prime numbers within 100"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    for prompt, output in zip(prompts, llm.generate(prompts, sampling_params)):
        print(f"\nPrompt: {prompt!r}\nCompletion: {output.outputs[0].text!r}")


if __name__ == "__main__":
    main()
