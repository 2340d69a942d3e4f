"""Memory plan from the dataset's length statistics (the seeds' BatchMemoryPlanner, made concrete).

Given prompt lengths and max_tokens per request, the model's KV bytes per block and the KV budget, it says how many
sequences fit at once on average, a safe concurrency with a 1.3x margin for long sequences, and recommends
``max_num_seqs`` and ``max_num_batched_tokens``. ``tokenmill run`` uses the same plan for options left unset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SAFETY_MARGIN = 1.3
MAX_NUM_SEQS_CAP = 256  # beyond this a CPU step gains nothing; the engine's own default
MIN_BATCHED_TOKENS = 2048
MAX_BATCHED_TOKENS = 16384


@dataclass
class MemoryPlan:
    num_requests: int
    prompt_avg: float
    prompt_p50: float
    prompt_p95: float
    prompt_max: int
    total_avg: float  # prompt + max_tokens, capped at max_model_len
    total_p95: float
    total_max: int
    block_size: int
    kv_bytes_per_block: int
    num_blocks: int
    kv_budget_gib: float
    blocks_per_seq_avg: int
    blocks_per_seq_p95: int
    max_concurrent: int
    safe_concurrent: int
    recommended_max_num_seqs: int
    recommended_max_num_batched_tokens: int
    parameters: int = 0  # the model's (every expert of a MoE)
    active_parameters: int = 0  # those one token uses (a MoE: its top-k experts)
    weight_gib: float = 0.0  # the weights as loaded (dtype / quantization), LoRA adapters' factors included
    lora_gib: float = 0.0  # of which the LoRA adapters' stacked factors
    num_loras: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        gib = self.kv_budget_gib
        model = []
        if self.parameters:
            active = (f" ({self.active_parameters / 1e9:.2f} B active per token)"
                      if self.active_parameters != self.parameters else "")
            loras = (f" (of which {self.num_loras} LoRA adapter{'s' * (self.num_loras > 1)}: "
                     f"{self.lora_gib:.3f} GiB)" if self.num_loras else "")
            model = [f"model:                    {self.parameters / 1e9:.2f} B parameters{active}, weights "
                     f"{self.weight_gib:.2f} GiB{loras}"]
        return "\n".join(model + [
            f"requests:                 {self.num_requests}",
            f"prompt tokens:            avg {self.prompt_avg:.1f}  p50 {self.prompt_p50:.0f}  p95 {self.prompt_p95:.0f}  "
            f"max {self.prompt_max}",
            f"expected total tokens:    avg {self.total_avg:.1f}  p95 {self.total_p95:.0f}  max {self.total_max} "
            f"(prompt + max_tokens)",
            f"KV bytes per block:       {self.kv_bytes_per_block:,} ({self.block_size} tokens)",
            f"KV blocks available:      {self.num_blocks:,} ({gib:.2f} GiB)",
            f"blocks per sequence:      avg {self.blocks_per_seq_avg}  p95 {self.blocks_per_seq_p95}",
            f"max concurrent sequences: {self.max_concurrent}",
            f"safe concurrency:         {self.safe_concurrent} (x{SAFETY_MARGIN} margin for long sequences)",
            f"recommended:              max_num_seqs={self.recommended_max_num_seqs}  "
            f"max_num_batched_tokens={self.recommended_max_num_batched_tokens}",
        ])


def plan_memory(prompt_lens, max_tokens, max_model_len: int, block_size: int, kv_bytes_per_block: int,
                num_blocks: int) -> MemoryPlan:
    prompts = np.asarray(prompt_lens, dtype=np.int64)
    if prompts.size == 0:
        prompts = np.zeros(1, dtype=np.int64)
        outs = np.zeros(1, dtype=np.int64)
        n = 0
    else:
        outs = np.asarray(max_tokens, dtype=np.int64)
        n = int(prompts.size)
    totals = np.minimum(prompts + outs, max_model_len)
    bps_avg = max(1, int(np.ceil(totals.mean() / block_size)))
    bps_p95 = max(1, int(np.ceil(np.percentile(totals, 95) / block_size)))
    max_concurrent = num_blocks // bps_avg
    safe = int(num_blocks / (bps_avg * SAFETY_MARGIN))
    rec_seqs = max(1, min(safe, MAX_NUM_SEQS_CAP, max(n, 1)))
    p95_prompt = int(np.percentile(prompts, 95))
    rec_tokens = int(min(MAX_BATCHED_TOKENS, max(MIN_BATCHED_TOKENS, rec_seqs + p95_prompt)))
    return MemoryPlan(
        num_requests=n,
        prompt_avg=float(prompts.mean()),
        prompt_p50=float(np.percentile(prompts, 50)),
        prompt_p95=float(np.percentile(prompts, 95)),
        prompt_max=int(prompts.max()),
        total_avg=float(totals.mean()),
        total_p95=float(np.percentile(totals, 95)),
        total_max=int(totals.max()),
        block_size=block_size,
        kv_bytes_per_block=kv_bytes_per_block,
        num_blocks=num_blocks,
        kv_budget_gib=num_blocks * kv_bytes_per_block / 2**30,
        blocks_per_seq_avg=bps_avg,
        blocks_per_seq_p95=bps_p95,
        max_concurrent=max_concurrent,
        safe_concurrent=safe,
        recommended_max_num_seqs=rec_seqs,
        recommended_max_num_batched_tokens=rec_tokens,
    )
