"""An OpenAI-compatible HTTP server on the generation engine (``python -m llama.server``).

Endpoints: ``POST /v1/chat/completions`` (the Llama 2 chat format), ``POST /v1/completions``,
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus) and a chat page at ``/``.
Needs the ``server`` extra (``pip install -e ".[server]"``: FastAPI and uvicorn).

Modules: :mod:`.cli` (arguments, loading, ranks), :mod:`.app` (routes, streaming),
:mod:`.protocol` (validation, the OpenAI JSON shapes), :mod:`.engine_thread` (the
engine's thread, requests in flight, health), :mod:`.metrics` (Prometheus text).
"""
