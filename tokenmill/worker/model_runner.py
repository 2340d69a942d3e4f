"""ModelRunner: SchedulerOutput -> flat batch -> model -> sampled tokens.

It owns the KV cache tensors and the sampler. Each step it lays the scheduled chunks out as one flat, unpadded batch
(decodes first), runs the model once, runs the LM head only on the last token of each chunk that samples, and
samples those rows. The rows of requests with structured outputs are first masked to what their grammar allows
(``structured/backend.py``: one batched operation; the matchers advance by the sampled tokens). Before the forward
pass it copies the blocks the scheduler swaps out to host memory or in from it (``preemption_mode="swap"``;
``swap_caches``, pinned on CUDA).

Under tensor parallelism every rank has a runner over its slice of the model and of the KV cache (its KV heads).
Rank 0's ``execute`` broadcasts each step's shape and integer inputs (the StepBuffers prefix, as it lies) before its
forward pass; ranks 1..N-1 sit in ``follow``, receive them into their own StepBuffers, and run the same forward and
LM head (their collectives meet rank 0's); only rank 0 samples.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.config import EngineConfig
from tokenmill.core.step import ModelRunnerOutput, SchedulerOutput
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.sampler import Sampler
from tokenmill.parallel.group import TPGroup
from tokenmill.structured.backend import GrammarBackend, StructuredState
from tokenmill.worker.memory import kv_cache_dtype
from tokenmill.worker.prompt_logprobs import flat_rows, follow_rows, prompt_logprobs, wanted_rows
from tokenmill.worker.step_inputs import StepBuffers, StepInputs, StepShape

STOP, STEP = 0, 1  # the commands rank 0 broadcasts to tensor-parallel workers


def _copy_blocks(src_caches: list, dst_caches: list, pairs: list[tuple[int, int]]) -> None:
    """Block ``s`` of every layer's K and V in ``src_caches`` -> block ``d`` in ``dst_caches``, for each (s, d)."""
    src, dst = (torch.tensor(c, dtype=torch.int64) for c in zip(*pairs))
    for layer_src, layer_dst in zip(src_caches, dst_caches):
        for s, d in zip(layer_src, layer_dst):  # K, then V
            d.index_copy_(0, dst.to(d.device), s.index_select(0, src.to(s.device)).to(d.device))


class ModelRunner:
    def __init__(self, config: EngineConfig, model: LlamaForCausalLM, num_blocks: int, device: torch.device,
                 grammars: GrammarBackend | None = None, num_swap_blocks: int = 0) -> None:
        """The kernels are the model's (``model.ops``, chosen when it was built)."""
        self.config = config
        self.model = model
        self.device = device
        self.block_size = config.block_size
        self.ops = model.ops
        self.backend = model.ops.attention
        self.sampler = Sampler(config.seed, device, model.ops.argmax, token_logprobs=model.ops.token_logprobs,
                               sample_plain=model.ops.sample_plain, sample_filtered=model.ops.sample_filtered)
        self.structured = StructuredState(grammars) if grammars is not None else None
        self.tp: TPGroup = model.tp
        mc = model.config
        dtype = kv_cache_dtype(config, model.activation_dtype)
        kv_heads = model.layers[0].self_attn.num_kv_heads  # this rank's
        shape = (num_blocks, self.block_size, kv_heads, mc.head_dim)
        # Allocated uninitialised (zeroing gigabytes costs seconds at start-up); each block is zeroed the first time
        # a step uses it, because attention reads whole blocks and masked slots must hold finite values.
        self.kv_caches = [
            (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(mc.num_hidden_layers)
        ]  # per layer: (k, v), each [num_blocks, block_size, num_kv_heads, head_dim]
        self._block_zeroed = np.zeros(num_blocks, dtype=bool)
        self._num_unzeroed = num_blocks  # 0 once every block has been zeroed: then nothing is left to check
        swap_shape = (num_swap_blocks, *shape[1:])
        pin = device.type == "cuda"  # host memory the copies can run from asynchronously
        self.swap_caches = [
            (torch.empty(swap_shape, dtype=dtype, pin_memory=pin), torch.empty(swap_shape, dtype=dtype, pin_memory=pin))
            for _ in range(mc.num_hidden_layers if num_swap_blocks else 0)
        ]  # per layer: (k, v) in host memory, each [num_swap_blocks, block_size, num_kv_heads, head_dim]
        max_blocks = -(-config.max_model_len // self.block_size) if config.max_model_len else 1
        rotary = getattr(model, "rotary", None)
        long_from = mc.rope.long_rope_from()
        self.buffers = StepBuffers(config.max_num_batched_tokens, config.max_num_seqs, max_blocks, device,
                                   None if long_from is None or rotary is None else (long_from, rotary.long_offset))
        self.graphs = self._capture_graphs(max_blocks)  # None: every step eager

    def _capture_graphs(self, max_blocks: int):
        """CUDA graphs of decode steps (worker/cuda_graphs.py) where they can serve: CUDA, the Triton family, one
        rank, no LoRA adapters (their rows change every step), and not ``enforce_eager``. Sliding windows and capped
        scores are the Triton kernel's own (passed whether or not they bite), so Gemma and Mistral decode through
        graphs too."""
        if (self.device.type != "cuda" or self.config.enforce_eager or self.ops.name != "triton"
                or self.tp.size > 1 or self.model.loras is not None):
            return None
        from tokenmill.worker.cuda_graphs import DecodeGraphs

        self._zero_new_blocks(np.zeros((1, 1), dtype=np.int64))  # the padding block the graphs' padded rows read
        graphs = DecodeGraphs(self.model, self.kv_caches, self.backend, min(self.config.max_num_seqs, 512),
                              max_blocks, self.device)
        return graphs if graphs.capture() else None

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req in out.finished:  # its block-table row and grammar matcher go with it
            if req.worker_state is not None:
                self.buffers.block_table.release(req.worker_state)
                req.worker_state = None
        if out.is_empty:  # nothing scheduled (e.g. every request was aborted): nothing to run
            return ModelRunnerOutput({})
        # Decodes (one new token) first: the attention backend batches them. With LoRA adapters, each part ordered
        # by adapter, so an adapter's rows are contiguous runs (model/lora.py).
        if self.model.loras is None:
            chunks = sorted(out.scheduled, key=lambda s: s.num_scheduled_tokens != 1)
        else:
            chunks = sorted(out.scheduled, key=lambda s: (s.num_scheduled_tokens != 1, s.request.sampling_params.lora
                                                          or ""))
        num_decodes = sum(1 for s in chunks if s.num_scheduled_tokens == 1)

        step = self.buffers.fill(chunks, self.block_size)  # one host-to-device copy (none on CPU)
        wanted = wanted_rows(chunks, step.query_start_loc_list)  # rows whose prompt logprobs a request asked for
        adapters = [s.request.sampling_params.lora for s in chunks] if self.model.loras is not None else None
        if self.tp.size > 1:
            self._send_step(self.buffers.shape, num_decodes, flat_rows(wanted), out, adapters)
        self._swap(out.blocks_to_swap_out, out.blocks_to_swap_in)
        sampling = [(i, s) for i, s in enumerate(chunks) if s.samples]
        ids = [s.request_id for _, s in sampling]
        params = [s.request.sampling_params for _, s in sampling]
        # the grammar masks of this step's constrained rows are filled while the model runs
        states = [s.request.worker_state for _, s in sampling]  # made by the fill above
        masks = self.structured.start_masks(states, params) if self.structured is not None else None
        if adapters is not None:  # each request's rows to its adapter, for every adapted layer
            self.model.loras.set_step(adapters, step.query_start_loc_list)
        hidden = self._forward(step, num_decodes)  # [num_tokens, hidden]
        prompt_lp = prompt_logprobs(self.model, wanted, hidden)
        if not sampling:
            return ModelRunnerOutput({}, prompt_logprobs=prompt_lp)
        sampled = hidden[step.sample_rows]  # [num_sampled, hidden]
        if masks is None and all(p.greedy and p.logprobs is None for p in params):  # tokens alone are wanted
            token_ids = self.model.greedy_tokens(sampled)  # [num_sampled], or None: no fused head here
            if token_ids is not None:
                return ModelRunnerOutput(dict(zip(ids, token_ids.tolist())), {}, prompt_lp)
        logits = self.model.compute_logits(sampled, as_float32=False)  # [num_sampled, vocab]
        constrained = self.structured.apply_masks(logits, masks) if masks is not None else []
        result = self.sampler(logits, params, [s.request.num_output_tokens for _, s in sampling])
        if constrained:
            self.structured.accept(states, constrained, result.token_ids)
        logprobs = {rid: lp for rid, lp in zip(ids, result.logprobs) if lp is not None}
        return ModelRunnerOutput(dict(zip(ids, result.token_ids)), logprobs, prompt_lp)

    def _forward(self, step: StepInputs, num_decodes: int) -> torch.Tensor:
        """The model over a step's flat batch: [num_tokens, hidden]. A decode-only step runs through its CUDA graph
        where one fits (then num_tokens = num_reqs)."""
        self._zero_new_blocks(step.block_table_np)
        if self._graph_fits(step, num_decodes):
            return self.graphs.run(step.input_ids, step.positions, step.slot_mapping, step.seq_lens,
                                   step.block_tables)  # [num_reqs, hidden]
        meta = AttentionMetadata(
            query_start_loc=step.query_start_loc_list,
            seq_lens=step.seq_lens_list,
            num_decodes=num_decodes,
            slot_mapping=step.slot_mapping,
            block_tables=step.block_tables,
            seq_lens_tensor=step.seq_lens,
            query_start_loc_tensor=step.query_start_loc,
        )
        return self.model(step.input_ids, step.positions, self.kv_caches, meta, self.backend)  # [num_tokens, hidden]

    def _graph_fits(self, step: StepInputs, num_decodes: int) -> bool:
        if self.graphs is None or num_decodes != len(step.seq_lens_list):
            return False
        if not self.graphs.fits(num_decodes, step.block_tables.shape[1]):
            return False
        from tokenmill.kernels.triton.paged_attention import choose_num_splits

        b = self.backend  # a graph is captured without split-KV: steps that would split run eagerly
        return choose_num_splits(num_decodes, self.kv_caches[0][0].shape[2], max(step.seq_lens_list),
                                 b.num_programs_target, b.min_keys_per_split) == 1

    def _swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copies whole blocks, every layer: device -> host for ``swap_out`` (device, host) pairs, host -> device for
        ``swap_in`` (host, device) pairs (the scheduler never gives both in one step)."""
        if swap_out:
            _copy_blocks(self.kv_caches, self.swap_caches, swap_out)
        if swap_in:
            _copy_blocks(self.swap_caches, self.kv_caches, swap_in)
            self._mark_zeroed(np.asarray([d for _, d in swap_in], dtype=np.int64))  # every slot written

    # ---------------------------------------------------------------- tensor parallel
    def _header(self) -> torch.Tensor:
        return torch.empty(12, dtype=torch.int64, device=self.buffers.dev.device)

    def _send_step(self, shape: StepShape, num_decodes: int, prompt_rows: list[int], out: SchedulerOutput,
                   adapters: list[str | None] | None = None) -> None:
        """The step's header (shape, decodes, how many prompt-logprob rows and swapped block pairs, buffer capacity),
        its integer inputs, then the prompt-logprob rows and the swap pairs, if any, then (with LoRA adapters) each
        request's adapter slot (-1: the base model)."""
        header = self._header()
        swaps = out.blocks_to_swap_out or out.blocks_to_swap_in
        header.copy_(torch.tensor([STEP, shape.num_tokens, shape.num_reqs, shape.width, shape.num_sampled,
                                   num_decodes, len(prompt_rows), len(out.blocks_to_swap_out),
                                   len(out.blocks_to_swap_in), *self.buffers.capacity()]))
        self.tp.broadcast(header)
        self.tp.broadcast(self.buffers.dev[: self.buffers.used(shape)])
        if prompt_rows:
            self.tp.broadcast(torch.tensor(prompt_rows, dtype=torch.int64, device=self.buffers.dev.device))
        if swaps:
            self.tp.broadcast(torch.tensor(swaps, dtype=torch.int64, device=self.buffers.dev.device))
        if adapters is not None:
            slots = [-1 if a is None else self.model.loras.slots[a] for a in adapters]
            self.tp.broadcast(torch.tensor(slots, dtype=torch.int64, device=self.buffers.dev.device))

    def stop_followers(self) -> None:
        """Ends the ``follow`` loops of ranks 1..N-1 (rank 0, once, when the engine closes)."""
        header = self._header().zero_()  # STOP
        self.tp.broadcast(header)

    @torch.inference_mode()
    def follow(self) -> None:
        """A worker rank's loop: each step rank 0 sends runs here too, until STOP."""
        buffers = self.buffers
        while True:
            header = self._header()
            self.tp.broadcast(header)
            cmd, t, r, w, n_sampled, num_decodes, n_prompt_rows, n_out, n_in, *capacity = header.tolist()
            if cmd == STOP:
                return
            buffers.ensure_capacity(tuple(capacity))
            shape = StepShape(t, r, w, n_sampled)
            used = buffers.used(shape)
            self.tp.broadcast(buffers.dev[:used])
            if buffers.dev is not buffers.host:
                buffers.host[:used].copy_(buffers.dev[:used])  # the host views attention's metadata reads
            step = buffers.views(shape)
            prompt_rows = None
            if n_prompt_rows:
                prompt_rows = torch.empty(n_prompt_rows, dtype=torch.int64, device=buffers.dev.device)
                self.tp.broadcast(prompt_rows)
            if n_out or n_in:
                pairs = torch.empty((n_out + n_in, 2), dtype=torch.int64, device=buffers.dev.device)
                self.tp.broadcast(pairs)
                pairs = [tuple(p) for p in pairs.tolist()]
                self._swap(pairs if n_out else [], pairs if n_in else [])
            if self.model.loras is not None:  # rank 0's adapter per request, for this rank's slice of each update
                slots = torch.empty(r, dtype=torch.int64, device=buffers.dev.device)
                self.tp.broadcast(slots)
                names = list(self.model.loras.slots)  # in slot order
                self.model.loras.set_step([None if i < 0 else names[i] for i in slots.tolist()],
                                          step.query_start_loc_list)
            hidden = self._forward(step, num_decodes)
            if prompt_rows is not None:
                follow_rows(self.model, hidden, prompt_rows)
            if n_sampled:  # the LM head's all-gather meets rank 0's
                self.model.compute_logits(hidden[step.sample_rows], as_float32=False)

    def _zero_new_blocks(self, block_tables: np.ndarray) -> None:
        """Zeroes the blocks (and the padding block 0) that no step has used yet. A gather over the table finds them
        (~10 us at 256 x 64 where np.unique over the table took ~1.4 ms here); once every block of the pool has been
        zeroed, which a long job reaches early, not even that."""
        if self._num_unzeroed == 0:
            return
        fresh = block_tables[~self._block_zeroed[block_tables]]
        if fresh.size == 0:
            return
        new = np.unique(fresh)  # sorted, distinct: the few blocks this step uses for the first time
        self._mark_zeroed(new)
        # Blocks come off the free list mostly in runs: zero each run as one slice (a memset). index_fill_ over the
        # same blocks ran at ~0.5 GB/s and took 8% of a prefill step.
        runs = np.split(new, np.flatnonzero(np.diff(new) != 1) + 1)  # new is sorted (np.unique)
        for k_cache, v_cache in self.kv_caches:
            for run in runs:
                k_cache[run[0] : run[-1] + 1].zero_()
                v_cache[run[0] : run[-1] + 1].zero_()

    def _mark_zeroed(self, blocks: np.ndarray) -> None:
        """``blocks`` (distinct) hold finite values in every slot from now on."""
        self._num_unzeroed -= int(np.count_nonzero(~self._block_zeroed[blocks]))
        self._block_zeroed[blocks] = True
