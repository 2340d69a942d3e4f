"""The processes of ranks 1..N-1 of a tensor-parallel engine, and the process group that joins them to rank 0.

Rank 0 is the engine's own process: it owns the scheduler, the sampler and the outputs. ``start_workers`` spawns one
process per other rank (``spawn``, daemonic: they end with the engine's process) and joins the group: gloo on CPU
(over loopback: ``GLOO_SOCKET_IFNAME=lo`` unless set), NCCL on CUDA (rank r on ``cuda:r``). A worker loads its slice
of the model, receives the KV pool's size from rank 0 (one plan for all ranks), allocates its slice of the cache and
runs ``ModelRunner.follow`` until rank 0 broadcasts STOP (``TPWorkers.close``). The group rendezvous through a file in
a fresh temporary directory (removed by ``close``), so no port is opened for it.
"""

from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.config import EngineConfig
from tokenmill.parallel.group import TPGroup


def _init_group(rank: int, size: int, device: torch.device, rendezvous: str) -> TPGroup:
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel engine already runs in this process; close it first (LLM.close())")
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Workers wait in a broadcast for rank 0's next step however long the engine idles (a server between requests):
    # the collectives' timeout must not end them.
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=size,
                            timeout=timedelta(days=7))
    return TPGroup(rank, size)


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def rank_threads(size: int) -> int:
    """Each rank's share of the machine's threads on CPU (the ranks run side by side)."""
    return max(1, torch.get_num_threads() // size)


@dataclass
class TPWorkers:
    """Rank 0's handle on the group: its TPGroup, the worker processes, and the runner that talks to them."""

    tp: TPGroup
    processes: list
    runner: object | None = None  # rank 0's ModelRunner, once built
    closed: bool = False
    rendezvous_dir: str | None = None  # the group's temporary directory, removed by close

    def send_num_blocks(self, num_blocks: int, num_swap_blocks: int, device: torch.device) -> None:
        self.tp.broadcast(torch.tensor([num_blocks, num_swap_blocks], dtype=torch.int64, device=device))

    def close(self) -> None:
        """STOP to every worker, wait for them, leave the group. Idempotent."""
        if self.closed:
            return
        self.closed = True
        import torch.distributed as dist

        try:
            if self.runner is not None and all(p.is_alive() for p in self.processes):
                self.runner.stop_followers()
                for p in self.processes:
                    p.join(timeout=30)
        finally:
            for p in self.processes:
                if p.is_alive():
                    p.terminate()
            if dist.is_initialized():
                dist.destroy_process_group()
            if self.rendezvous_dir is not None:
                shutil.rmtree(self.rendezvous_dir, ignore_errors=True)


def start_workers(config: EngineConfig, device: torch.device) -> TPWorkers:
    """Spawns ranks 1..N-1 for ``config.tensor_parallel_size`` = N and joins the group as rank 0."""
    size = config.tensor_parallel_size
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs, this machine has {torch.cuda.device_count()}")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    rendezvous_dir = tempfile.mkdtemp(prefix="tokenmill-tp-")
    rendezvous = str(Path(rendezvous_dir) / "group")
    threads = rank_threads(size)
    ctx = mp.get_context("spawn")
    processes = [ctx.Process(target=worker_main, args=(config, rank, size, device.type, rendezvous, threads),
                             name=f"tokenmill-tp{rank}", daemon=True) for rank in range(1, size)]
    for p in processes:
        p.start()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        tp = _init_group(0, size, rank_device(device, 0), rendezvous)
    except BaseException:
        for p in processes:
            p.terminate()
        shutil.rmtree(rendezvous_dir, ignore_errors=True)
        raise
    return TPWorkers(tp, processes, rendezvous_dir=rendezvous_dir)


def worker_main(config: EngineConfig, rank: int, size: int, device_type: str, rendezvous: str, threads: int) -> None:
    """One worker rank, in its own process: its slice of the model and of the KV cache, then the step loop."""
    from tokenmill.model.loader import load_model
    from tokenmill.ops import make_ops
    from tokenmill.worker.model_runner import ModelRunner

    device = rank_device(torch.device(device_type), rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads)
    tp = _init_group(rank, size, device, rendezvous)
    import torch.distributed as dist

    try:
        ops = make_ops(config.attention_backend, device)
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        loaded = load_model(config.model, config.dtype, device, config.max_model_len, cache_dir, config.quantization,
                            config.load_format, config.cpu_gemm, ops, config.activation_dtype, tp,
                            config.lora_adapters)
        resolved = config.resolve(loaded.model_config.max_position_embeddings)
        num_blocks = torch.zeros(2, dtype=torch.int64, device=device)  # the KV pool's blocks, the swap space's
        tp.broadcast(num_blocks)
        runner = ModelRunner(resolved, loaded.model, int(num_blocks[0]), device, num_swap_blocks=int(num_blocks[1]))
        runner.follow()
    finally:
        dist.destroy_process_group()
