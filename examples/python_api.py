"""A real batch on the embedded default model: chat prompts in, completions and a throughput line out."""

import time

from tokenmill import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "What does a compiler do?",
    "Name two primary colours.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Suggest a name for a pet turtle.",
    "What is 12 times 11?",
    "List three uses of a paperclip.",
    "What is the boiling point of water at sea level?",
    "Describe a cat in five words.",
    "What is machine learning?",
]


def main() -> None:
    t0 = time.perf_counter()
    llm = LLM()
    print(f"loaded {llm.engine.model_path.name} in {llm.engine.load_seconds:.2f} s")
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    t1 = time.perf_counter()
    outputs = llm.chat(conversations, SamplingParams(max_tokens=64, temperature=0.0))
    wall = time.perf_counter() - t1
    for q, out in zip(QUESTIONS, outputs):
        print(f"\n### {q}\n{out.text.strip()}  [{out.finish_reason}, {out.num_completion_tokens} tokens]")
    prompt_tokens = sum(o.num_prompt_tokens for o in outputs)
    gen_tokens = sum(o.num_completion_tokens for o in outputs)
    print(
        f"\n{len(outputs)} requests, {prompt_tokens} prompt + {gen_tokens} generated tokens in {wall:.2f} s: "
        f"{gen_tokens / wall:.1f} generated tok/s, {(prompt_tokens + gen_tokens) / wall:.1f} total tok/s "
        f"(process start to done: {time.perf_counter() - t0:.2f} s)"
    )


if __name__ == "__main__":
    main()
