"""tokenmill: an offline (batch) LLM inference engine."""

import logging as _logging

# Notices (a first-use kernel build, a fallback) go to stderr as "tokenmill: ..." unless the application set up
# logging for this logger itself.
_log = _logging.getLogger("tokenmill")
if not _log.handlers:
    _handler = _logging.StreamHandler()
    _handler.setFormatter(_logging.Formatter("tokenmill: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(_logging.INFO)
    _log.propagate = False

# The public names load on first use (PEP 562), so importing a light module (tokenmill.core, tokenmill.config) does
# not pull in torch and the model code.
_EXPORTS = {
    "LLM": "tokenmill.engine.llm",
    "Embedder": "tokenmill.embed.embedder",
    "LLMEngine": "tokenmill.engine.llm_engine",
    "EngineConfig": "tokenmill.config",
    "ConfigError": "tokenmill.config",
    "SamplingParams": "tokenmill.sampling_params",
    "RequestOutput": "tokenmill.outputs",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
