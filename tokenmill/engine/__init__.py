"""LLMEngine (add_request / step / abort) and LLM, the offline API on top of it."""
