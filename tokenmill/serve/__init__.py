"""``tokenmill serve``: an OpenAI-compatible HTTP server on the same engine (FastAPI + uvicorn).

Layout (as vLLM's entrypoints/openai): ``app.py`` the app and routes, ``protocol.py`` request checks and response
bodies, ``async_engine.py`` the loop that steps the engine while requests arrive, ``detokenizer.py`` incremental
text for streams, ``metrics.py`` Prometheus metrics. The engine never imports from here.
"""
