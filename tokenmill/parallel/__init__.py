"""Tensor parallelism: the rank group a model is split over (``group.py``) and the worker processes of ranks 1..N-1
(``workers.py``). See docs/ARCHITECTURE.md, "Tensor parallel"."""
