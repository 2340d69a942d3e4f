"""llama.cpp as a peer, through llama-cpp-python's low-level API, with many sequences decoding together.

Each step builds one ``llama_batch`` holding the next token of every decoding sequence plus prompt tokens of
sequences still prefilling (each with its own ``seq_id``), calls ``llama_decode`` once, and takes the argmax of the
logits of each sequence's last token: continuous batching over ``n_parallel`` slots, as llama.cpp's own
``batched`` / ``parallel`` examples do. Install it with ``make bench-peers`` (it compiles llama.cpp: minutes).
"""

from __future__ import annotations

import time
from collections import deque


def _first(module, *names):
    for n in names:
        if hasattr(module, n):
            return getattr(module, n)
    raise AttributeError(f"llama_cpp has none of {names}")


def run_llama_cpp(gguf_path: str, prompts: list[list[int]], output_lens: list[int], n_parallel: int,
                  n_threads: int, n_batch: int = 2048) -> dict:
    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = _first(L, "llama_model_load_from_file", "llama_load_model_from_file")(gguf_path.encode(), mp)
    max_seq = max(len(p) + o for p, o in zip(prompts, output_lens))
    cp = L.llama_context_default_params()
    cp.n_ctx = n_parallel * max_seq
    cp.n_batch = n_batch
    cp.n_ubatch = min(n_batch, 512)
    cp.n_seq_max = n_parallel
    cp.n_threads = n_threads
    cp.n_threads_batch = n_threads
    ctx = _first(L, "llama_init_from_model", "llama_new_context_with_model")(model, cp)
    if hasattr(L, "llama_model_get_vocab"):
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    else:
        n_vocab = L.llama_n_vocab(model)
    if hasattr(L, "llama_get_memory"):
        mem = L.llama_get_memory(ctx)

        def clear_seq(s: int) -> None:
            L.llama_memory_seq_rm(mem, s, -1, -1)
    else:
        seq_rm = _first(L, "llama_kv_self_seq_rm", "llama_kv_cache_seq_rm")

        def clear_seq(s: int) -> None:
            seq_rm(ctx, s, -1, -1)

    batch = L.llama_batch_init(n_batch, 0, 1)
    queue = deque(range(len(prompts)))
    # slot state: request index, next position, tokens still to feed (prompt or the last sampled), outputs left
    slots: dict[int, dict] = {}
    generated = 0
    steps = 0
    t0 = time.perf_counter()
    while queue or slots:
        for s in range(n_parallel):
            if s not in slots and queue:
                i = queue.popleft()
                slots[s] = {"req": i, "pos": 0, "feed": list(prompts[i]), "left": output_lens[i]}
        n = 0
        sampled_at: dict[int, int] = {}
        # decoding sequences first (one token each), then prompt chunks, within n_batch tokens
        for s, st in sorted(slots.items(), key=lambda kv: len(kv[1]["feed"]) > 1):
            take = min(len(st["feed"]), n_batch - n)
            if take <= 0:
                continue
            for k in range(take):
                batch.token[n] = st["feed"][k]
                batch.pos[n] = st["pos"] + k
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = s
                batch.logits[n] = 0
                n += 1
            st["pos"] += take
            st["feed"] = st["feed"][take:]
            if not st["feed"]:
                batch.logits[n - 1] = 1
                sampled_at[s] = n - 1
        batch.n_tokens = n
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed (KV cache full?)")
        steps += 1
        for s, idx in sampled_at.items():
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, idx), shape=(n_vocab,))
            st = slots[s]
            st["left"] -= 1
            generated += 1
            if st["left"] == 0:
                clear_seq(s)
                del slots[s]
            else:
                st["feed"] = [int(logits.argmax())]
    wall = time.perf_counter() - t0
    L.llama_batch_free(batch)
    _first(L, "llama_free")(ctx)
    _first(L, "llama_model_free", "llama_free_model")(model)
    prompt_tokens = sum(len(p) for p in prompts)
    return {"engine": f"llama.cpp Q4_1 n_parallel={n_parallel}", "wall_s": wall, "prompt_tokens": prompt_tokens,
            "output_tokens": generated, "output_tok_s": generated / wall,
            "total_tok_s": (prompt_tokens + generated) / wall, "steps": steps}
