"""The batch job runner (``tokenmill run``), built only on the engine's public API."""
