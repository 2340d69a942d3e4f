"""Structured outputs: constrained decoding to a JSON schema, any JSON object, a regex, a choice or a grammar.

``params.py`` holds what a request asks for (no grammar engine needed to import it); ``backend.py`` compiles
constraints with the grammar engine and applies the token masks of a step's constrained requests in one batched
operation.
"""

from tokenmill.structured.params import StructuredOutputs

__all__ = ["StructuredOutputs"]
