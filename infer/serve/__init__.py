"""An OpenAI-compatible HTTP server over infer.Engine (FastAPI + uvicorn).

  python -m infer.serve --config=configs/infer/serve.py --config.checkpoint=DIR

POST /v1/completions and /v1/chat/completions (streamed as Server-Sent Events with `stream: true`),
GET /v1/models, /health and /metrics (Prometheus). The pieces, each importable on its own:

  protocol.py       OpenAI's request bodies -> SamplingParams; its response objects
  async_engine.py   AsyncEngine: one thread owns the Engine; asyncio handlers reach it through a queue
  app.py            build_app(async_engine, model_name=..., chat_template=...): the routes and errors
  metrics.py        the Prometheus metrics, in a registry per app
  chat_template.py  a Hugging Face directory's jinja chat template, rendered as transformers does
  server.py         run(config, chat_templates=...): the body of `python -m infer.serve`

Public API: build_app, AsyncEngine, RequestStream, Metrics, APIError, run, validate.
"""

from infer.serve.app import build_app
from infer.serve.async_engine import AsyncEngine, EngineStopped, RequestStream
from infer.serve.metrics import Metrics
from infer.serve.protocol import APIError
from infer.serve.server import run, validate

__all__ = ["APIError", "AsyncEngine", "EngineStopped", "Metrics", "RequestStream", "build_app", "run", "validate"]
