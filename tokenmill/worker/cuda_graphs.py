"""DecodeGraphs: CUDA graphs of the decode-only step's forward pass, one per batch size of a ladder.

A decode step of ``n`` requests (every chunk one token) runs the graph of the smallest captured size ``B >= n``: the
step's inputs are copied into the graphs' static buffers (rows ``n..B`` padded: slot -1, so nothing is stored, a
context of one key, an all-zero block-table row), the graph replays, and the LM head runs eagerly on the ``n`` real
rows of the static hidden states. That removes the launch and Python overhead of ~10 kernels per layer, which at
decode batch sizes is a large share of a step.

What a graph may depend on is fixed at capture: shapes, and host values read while capturing. So graphs serve only
the Triton kernel family (its attention reads lengths and tables from device tensors), one rank, and steps whose
split-KV choice is 1 (``choose_num_splits`` for the step's real lengths; a long-context small batch, where the
kernels dominate, runs eagerly). Sizes are captured largest first into one memory pool.

``capture`` ends with a self-check: a synthetic decode batch over scratch blocks runs eagerly and through its graph,
and the hidden states must agree; any error or mismatch disables the graphs with a warning (the engine runs eagerly,
as with ``enforce_eager=True``). The scratch blocks are zeroed again by the runner the first time a step uses them.
"""

from __future__ import annotations

import logging

import torch

from tokenmill.attention.backend import AttentionMetadata

log = logging.getLogger("tokenmill")


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 to 64, then every 16: the batch sizes a graph is captured for (up to max_batch)."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(80, 513, 16))
    out = [s for s in sizes if s < max_batch]
    return out + [max_batch] if max_batch not in out else out


class DecodeGraphs:
    def __init__(self, model, kv_caches, backend, max_batch: int, max_blocks: int, device: torch.device) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.sizes = capture_sizes(max_batch)
        self.max_blocks = max_blocks
        self.device = device
        m = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(m, **i64)
        self.positions = torch.zeros(m, **i64)
        self.slot_mapping = torch.full((m,), -1, **i64)
        self.seq_lens = torch.ones(m, **i64)
        self.query_start_loc = torch.arange(m + 1, **i64)
        self.block_tables = torch.zeros(m, max_blocks, **i64)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # per size: the graph's output [B, hidden]
        self.num_replays = 0

    def _meta(self, b: int) -> AttentionMetadata:
        # host lengths of 1: the kernels' launch choices are those of short contexts (split-KV off)
        return AttentionMetadata(query_start_loc=list(range(b + 1)), seq_lens=[1] * b, num_decodes=b,
                                 slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
                                 seq_lens_tensor=self.seq_lens[:b], query_start_loc_tensor=self.query_start_loc[:b + 1])

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, self._meta(b), self.backend)

    @torch.inference_mode()
    def capture(self) -> bool:
        """Captures every size and self-checks; returns False (graphs off, warning logged) on any failure."""
        try:
            pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream(self.device)
            for b in reversed(self.sizes):
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):  # compiles the kernels, sets up cuBLAS workspaces: outside the capture
                        self._forward(b)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.hidden[b] = self._forward(b)
                self.graphs[b] = graph
            torch.cuda.synchronize(self.device)
            self._self_check()
            return True
        except Exception as e:  # noqa: BLE001 (any failure: run eagerly, say why)
            log.warning("CUDA graphs are off (%s: %s); decode steps run eagerly", type(e).__name__, e)
            self.graphs.clear()
            self.hidden.clear()
            return False

    def _self_check(self) -> None:
        """A decode batch of 5 over scratch blocks 1.., eagerly then through the graph of size 8: equal hidden states."""
        n, bs = min(5, self.sizes[-1]), self.kv_caches[0][0].shape[1]
        g = torch.Generator().manual_seed(0)
        vocab = self.model.config.vocab_size
        contexts = [3 + 7 * i for i in range(n)]
        blocks_per = [-(-c // bs) for c in contexts]
        next_block = 1
        for k_cache, v_cache in self.kv_caches:
            k_cache[1:1 + sum(blocks_per)].zero_()
            v_cache[1:1 + sum(blocks_per)].zero_()
        table = torch.zeros(n, self.max_blocks, dtype=torch.int64)
        for i, nb in enumerate(blocks_per):
            table[i, :nb] = torch.arange(next_block, next_block + nb)
            next_block += nb
        pos = torch.tensor([c - 1 for c in contexts])
        slots = table[torch.arange(n), pos // bs] * bs + pos % bs
        ids = torch.randint(0, vocab, (n,), generator=g)
        dev = self.device
        eager_meta = AttentionMetadata(
            query_start_loc=list(range(n + 1)), seq_lens=contexts, num_decodes=n, slot_mapping=slots.to(dev),
            block_tables=table.to(dev), seq_lens_tensor=torch.tensor(contexts, device=dev),
            query_start_loc_tensor=torch.arange(n + 1, device=dev))
        eager = self.model(ids.to(dev), pos.to(dev), self.kv_caches, eager_meta, self.backend)
        replayed = self.run(ids.to(dev), pos.to(dev), slots.to(dev), torch.tensor(contexts, device=dev),
                            table.to(dev))
        if not torch.allclose(eager.float(), replayed.float(), rtol=1e-2, atol=1e-2):
            diff = (eager.float() - replayed.float()).abs().max().item()
            raise RuntimeError(f"a replayed decode step differs from the eager one (max abs diff {diff:.3g})")
        self.num_replays = 0

    def fits(self, num_reqs: int, width: int) -> bool:
        return bool(self.graphs) and num_reqs <= self.sizes[-1] and width <= self.max_blocks

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            seq_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """One decode step of n = len(input_ids) requests through the graph of the next size up; returns its hidden
        states [n, hidden] (a view of the graph's static output, valid until the next replay)."""
        n, width = input_ids.shape[0], block_tables.shape[1]
        b = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.slot_mapping[n:b].fill_(-1)
        self.seq_lens[:n].copy_(seq_lens)
        self.seq_lens[n:b].fill_(1)
        self.block_tables[:b].zero_()
        self.block_tables[:n, :width].copy_(block_tables)
        graph = self.graphs.get(b)
        if graph is None:  # not captured (a CPU, in the tests): the same padded batch, run eagerly
            return self._forward(b)[:n]
        graph.replay()
        self.num_replays += 1
        return self.hidden[b][:n]
