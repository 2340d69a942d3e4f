"""``tokenmill eval``: what a setting costs in quality before a million rows run with it (the seeds' "gated by an
eval").

- Perplexity on a text file: the text is tokenised once and cut into consecutive windows of ``context`` tokens;
  each window is one prefill (``LLMEngine.score``) and every token after a window's first is scored given the ones
  before it in that window. ``perplexity = exp(mean negative log-likelihood)`` over the scored tokens. (Windows do
  not overlap: the first tokens of each have little context, as in most perplexity harnesses with stride =
  context; compare settings with the same ``context``.)
- For a setting other than float32 unquantized (another dtype, ``quantization``, or ``kv_cache_dtype``): the same
  against float32 (with a float32 KV cache), and
  greedy agreement with a float32 reference on a prompt set: the share of prompts whose greedy outputs are
  identical, and the mean share of output tokens before the first divergence.

A small default text ships with the package (``data/eval.txt``, written for the project: ~3,800 tokens of prose on
common topics, encyclopedic passages with a short story and instructions among them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TEXT = Path(__file__).with_name("data") / "eval.txt"
DEFAULT_PROMPTS = ("The capital of France is", "Photosynthesis is the process by which",
                   "A list of prime numbers: 2, 3, 5,", "def fibonacci(n):", "The three states of matter are",
                   "Once upon a time, in a small village,", "The main causes of the French Revolution were",
                   "To make a cup of tea, first")


@dataclass
class Perplexity:
    tokens_scored: int
    windows: int
    mean_nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def perplexity(engine, token_ids: list[int], context: int, limit: int | None = None) -> Perplexity:
    """Perplexity of ``token_ids`` in windows of ``context`` tokens (at most ``limit`` tokens read)."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    ids = token_ids[:limit] if limit else token_ids
    windows = [ids[start:start + context] for start in range(0, len(ids), context)]
    windows = [w for w in windows if len(w) >= 2]
    nll, scored = 0.0, 0
    for logprobs in engine.score_batch(windows):  # every window in one batched run of the engine
        nll -= sum(logprobs)
        scored += len(logprobs)
    windows = len(windows)
    if not scored:
        raise ValueError("the text has fewer than 2 tokens to score")
    return Perplexity(scored, windows, nll / scored)


@dataclass
class Agreement:
    prompts: int
    identical: int
    prefix_share: float  # mean share of the reference's output tokens matched before the first divergence


def greedy_agreement(outputs: list[list[int]], reference: list[list[int]]) -> Agreement:
    """Compares greedy token outputs with a reference's, prompt by prompt."""
    identical, shares = 0, []
    for ours, ref in zip(outputs, reference):
        identical += ours == ref
        same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        shares.append(same / len(ref) if ref else 1.0)
    return Agreement(len(reference), identical, sum(shares) / len(shares) if shares else 1.0)


def read_prompts(path: Path | None) -> list[str]:
    """Prompts for the agreement check: a text file, one per line, or JSONL with a ``prompt`` field."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    import json

    prompts = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}: a JSON line needs a string prompt")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def run_eval(model: str | None, engine_options: dict, text_path: Path | None, context: int, limit: int | None,
             prompts_path: Path | None, max_tokens: int) -> dict:
    """Perplexity of the setting in ``engine_options`` (and of float32 when that setting is not float32), and its
    greedy agreement with float32. Raises ValueError / OSError for bad inputs."""
    from tokenmill.engine.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    path = text_path or DEFAULT_TEXT
    text = path.read_text()
    prompts = read_prompts(prompts_path)
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0)

    def measure(options: dict) -> tuple[str, int, Perplexity, list[list[int]], str | None]:
        llm = LLM(model, **options)
        ids = llm.tokenizer(text, add_special_tokens=False).input_ids
        ctx = min(context, llm.engine.config.max_model_len)
        ppl = perplexity(llm.engine, ids, ctx, limit)
        outs = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        activations = llm.engine.info.activation_dtype  # set where it is not the model's dtype
        return (str(llm.engine.dtype).removeprefix("torch."), llm.engine.weight_bytes, ppl, outs,
                None if activations is None else str(activations).removeprefix("torch."))

    dtype, weight_bytes, ppl, outs, activations = measure(engine_options)
    quantization = engine_options.get("quantization") or "none"
    kv_cache_dtype = engine_options.get("kv_cache_dtype") or "auto"
    parts = [dtype]
    if activations is not None:
        parts.append(f"({activations} activations)")
    if quantization != "none":
        parts.append(quantization)
    if kv_cache_dtype != "auto":
        parts.append(f"kv-cache {kv_cache_dtype}")
    setting = " ".join(parts)
    result = {"text": str(path), "context": context, "dtype": dtype, "quantization": quantization,
              "kv_cache_dtype": kv_cache_dtype, "setting": setting, "weight_bytes": weight_bytes,
              "tokens_scored": ppl.tokens_scored, "windows": ppl.windows, "mean_nll": ppl.mean_nll, "perplexity": ppl.perplexity}
    if setting != "float32":
        _, _, ref, ref_outs, _ = measure({**engine_options, "dtype": "float32", "quantization": "none",
                                       "kv_cache_dtype": "auto"})
        agree = greedy_agreement(outs, ref_outs)
        result["reference"] = {"dtype": "float32", "perplexity": ref.perplexity, "mean_nll": ref.mean_nll}
        result["perplexity_change"] = ppl.perplexity / ref.perplexity - 1
        result["agreement"] = {"prompts": agree.prompts, "identical": agree.identical,
                               "prefix_share": agree.prefix_share}
    return result


def render(r: dict) -> str:
    lines = [f"text:        {r['text']} ({r['tokens_scored']:,} tokens scored in {r['windows']} windows of up to "
             f"{r['context']})",
             f"perplexity:  {r['perplexity']:.3f} ({r['setting']}; mean NLL {r['mean_nll']:.4f}; weights "
             f"{r['weight_bytes'] / 2**20:,.0f} MiB)"]
    if "reference" in r:
        a = r["agreement"]
        lines += [f"float32:     {r['reference']['perplexity']:.3f} ({100 * r['perplexity_change']:+.2f}% for "
                  f"{r['setting']})",
                  f"agreement:   {a['identical']}/{a['prompts']} greedy outputs identical to float32; "
                  f"{100 * a['prefix_share']:.1f}% of tokens before the first divergence"]
    return "\n".join(lines)
