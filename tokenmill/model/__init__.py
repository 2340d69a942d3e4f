"""Llama-family model code, weight loaders (HF safetensors directories and GGUF files) and the sampler."""
