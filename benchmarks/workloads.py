"""Benchmark workloads, generated deterministically from a seed so every engine sees the same token ids.

- W (headline): chat-templated prompts whose lengths spread evenly over 32..256 tokens, fixed output length
  (greedy, ignore_eos).
- mixed (scheduler comparison): prompt and output lengths drawn from wide log-uniform distributions; each request's
  output length is set with max_tokens + ignore_eos.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue side "
         "kind head house service friend father power hour game line end member law car city community name").split()


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]  # token ids, chat template already applied
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def _chat_prompt(tokenizer, rng: random.Random, target_len: int) -> list[int]:
    """Adds random words to a user message until the templated prompt reaches target_len tokens."""
    words: list[str] = []
    while True:
        text = tokenizer.apply_chat_template([{"role": "user", "content": " ".join(words)}], tokenize=False,
                                             add_generation_prompt=True) if tokenizer.chat_template else " ".join(words)
        ids = tokenizer(text, add_special_tokens=not tokenizer.chat_template).input_ids
        if len(ids) >= target_len or len(words) > 4 * target_len:
            return ids
        words.extend(rng.choice(WORDS) for _ in range(max(1, (target_len - len(ids)) // 2)))


def workload_w(tokenizer, num_prompts: int = 128, min_len: int = 32, max_len: int = 256, output_len: int = 128,
               seed: int = 0) -> Workload:
    rng = random.Random(seed)
    targets = [round(min_len + (max_len - min_len) * i / max(1, num_prompts - 1)) for i in range(num_prompts)]
    rng.shuffle(targets)
    prompts = [_chat_prompt(tokenizer, rng, t) for t in targets]
    return Workload("W", prompts, [output_len] * num_prompts)


def workload_mixed(tokenizer, num_prompts: int = 96, prompt_range=(16, 512), output_range=(8, 256),
                   seed: int = 1) -> Workload:
    rng = random.Random(seed)

    def log_uniform(lo: int, hi: int) -> int:
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))

    prompts = [_chat_prompt(tokenizer, rng, log_uniform(*prompt_range)) for _ in range(num_prompts)]
    outputs = [log_uniform(*output_range) for _ in range(num_prompts)]
    return Workload("mixed", prompts, outputs)
