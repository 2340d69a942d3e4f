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

from tokenmill.config import ConfigError, EngineConfig
from tokenmill.embed.embedder import Embedder
from tokenmill.engine.llm import LLM
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

__all__ = ["LLM", "Embedder", "LLMEngine", "EngineConfig", "ConfigError", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"
