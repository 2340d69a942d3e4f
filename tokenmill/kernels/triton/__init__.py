"""Triton kernels for the GPU path, one family per file, each beside a torch oracle (``ops/torch_ops.py``):

- ``kv_store.py``: K/V into the paged cache through ``slot_mapping`` (float8 too; -1 skipped);
- ``paged_attention.py``: decodes, prefill chunks and prefix hits of a step in one launch over the block tables,
  GQA rows packed per KV head, optionally split over the context (flash-decoding) with a reduce kernel;
- ``norm.py``: RMSNorm; ``rope.py``: rotary embedding on q and k in place; ``activation.py``: SiLU * mul.

Importing these modules compiles nothing; a kernel is compiled on its first launch (on CUDA), or interpreted on CPU
tensors when ``TRITON_INTERPRET=1`` was set before the import (Triton reads it when the kernels are defined).
``ops/triton_ops.py`` puts them behind the Ops interface.
"""
