"""StructuredOutputs: what a request's output must match (a JSON schema, any JSON object, a regex, one of a list of
choices, or a context-free grammar), as vLLM's ``StructuredOutputsParams`` names them.

Invariants: exactly one constraint is set; the value is frozen and hashable (a schema is kept as compact JSON
text, so equal schemas are equal keys and compile once); a malformed value is a ValueError naming the field.
Whether a schema, regex or grammar is *valid* is the grammar engine's call (``structured/backend.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    json: str | None = None  # a JSON schema, as compact JSON text (a dict is accepted and converted)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # a context-free grammar: GBNF / EBNF (llama.cpp's syntax) or Lark

    def __post_init__(self) -> None:
        if isinstance(self.json, (dict, bool)):
            object.__setattr__(self, "json", canonical_json(self.json))
        elif isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", canonical_json(json.loads(self.json)))
            except ValueError as e:
                raise ValueError(f"structured json: the schema is not valid JSON ({e})") from None
        elif self.json is not None:
            raise ValueError(f"structured json: a JSON schema must be an object, got {type(self.json).__name__}")
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            hint = (" (YAML reads unquoted yes / no / on / off as booleans: quote them)"
                    if any(isinstance(c, bool) for c in self.choice) else "")
            raise ValueError(f"structured choice: must be a non-empty list of non-empty strings{hint}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured {name}: must be a non-empty string")
        if not isinstance(self.json_object, bool):
            raise ValueError("structured json_object: must be true or false")
        n = sum(1 for k in KINDS if getattr(self, k) not in (None, False))
        if n != 1:
            raise ValueError(f"structured outputs need exactly one of {', '.join(KINDS)}; got {n}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @classmethod
    def from_value(cls, value: Any) -> "StructuredOutputs":
        """From a StructuredOutputs or a dict such as ``{"json": {...}}`` / ``{"choice": ["a", "b"]}``."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured outputs must be an object such as {{\"json\": {{...}}}}, got "
                             f"{type(value).__name__}")
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown structured output field(s): {', '.join(unknown)}; known: {', '.join(KINDS)}")
        return cls(**value)

    def describe(self) -> str:
        """A short human description (for messages)."""
        value = getattr(self, self.kind)
        text = value if isinstance(value, str) else json.dumps(list(value)) if self.kind == "choice" else ""
        return f"{self.kind} {text[:60]}{'...' if len(text) > 60 else ''}".strip()


def canonical_json(value: Any) -> str:
    """Compact JSON text. Keys keep their order: a schema's property order is the order the output is written in."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def from_response_format(rf: Any) -> StructuredOutputs | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (None), ``{"type": "json_object"}``, or
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``. Raises ValueError."""
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise ValueError("response_format must be an object with a type (text, json_object or json_schema)")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError("response_format.json_schema must be an object with a name and a schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
            raise ValueError("response_format.json_schema.strict must be true or false")
        return StructuredOutputs(json=schema)
    raise ValueError(f"response_format.type {kind!r} is not supported; use text, json_object or json_schema")
