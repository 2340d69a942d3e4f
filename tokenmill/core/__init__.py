"""Pure-Python engine core: requests, the block pool, the KV cache manager and the scheduler. No torch here."""
