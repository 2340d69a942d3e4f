"""tokenmill: an offline (batch) LLM inference engine."""

from tokenmill.config import ConfigError, EngineConfig
from tokenmill.embed.embedder import Embedder
from tokenmill.engine.llm import LLM
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

__all__ = ["LLM", "Embedder", "LLMEngine", "EngineConfig", "ConfigError", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"
