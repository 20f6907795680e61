"""The OpenAI-compatible HTTP API over an AsyncEngine: `build_app(async_engine, model_name=..., chat_template=...)`.

  POST /v1/completions, /v1/chat/completions   `stream: true` sends Server-Sent Events: `data: {json}\\n\\n`
                                               chunks, then `data: [DONE]\\n\\n`, as OpenAI's API does
  GET  /v1/models, /health, /metrics           (Prometheus text format)

Every error is OpenAI's JSON, {"error": {"message", "type", "param", "code"}}: 400 for a malformed body,
an unknown or out-of-range parameter, or a prompt longer than the model allows; 404 for an unknown model
(or route); 429 when the engine's waiting queue is full; 503 when the engine is not running.

A client that disconnects has its request aborted, which frees its KV blocks at once: a stream's when
Starlette's disconnect listener cancels it, a plain request's by racing its result against the end of
the connection.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from infer.engine import QueueFull, RequestOutput
from infer.serve import protocol
from infer.serve.async_engine import AsyncEngine, EngineStopped, RequestStream
from infer.serve.protocol import APIError

log = logging.getLogger(__name__)

ChatTemplate = Callable[[list[dict]], str]  # messages -> the prompt text, ending with the assistant's header


class _Server:
  """What the routes share: the engine, the model's name, how tokens and chats become text."""

  def __init__(self, async_engine: AsyncEngine, model_name: str, chat_template: ChatTemplate | None):
    self.async_engine, self.model_name, self.chat_template = async_engine, model_name, chat_template
    self.strings = protocol.TokenStrings(async_engine.engine.tokenizer)
    self.started = int(time.time())

  @property
  def models(self) -> tuple[str, ...]:  # the base, then its LoRA adapters
    return (self.model_name, *self.async_engine.engine.adapter_names)

  def adapter(self, model: str) -> str | None:
    """The LoRA adapter a request's `model` names (None: the base); an unknown name is a 404."""
    if model not in self.models:
      raise APIError(f"the model {model!r} does not exist; this server serves {list(self.models)}", status=404,
                     param="model", code="model_not_found")
    return None if model == self.model_name else model

  async def add(self, prompt, params, request_id: str, *, param: str, adapter: str | None) -> RequestStream:
    try:
      return await self.async_engine.add(prompt, params, request_id, adapter)
    except QueueFull as e:
      raise APIError(f"the server is busy: {e}; retry later", status=429, type="rate_limit_error",
                     code="queue_full") from None
    except EngineStopped as e:
      raise APIError(str(e), status=503, type="server_error") from None
    except ValueError as e:  # the engine's checks: prompt length, token ids, stop_token_ids
      code = "context_length_exceeded" if "max_model_len" in str(e) else None
      param = "stop_token_ids" if "stop_token_ids" in str(e) else param
      raise APIError(str(e), param=param, code=code) from None

  def render_chat(self, messages: list[dict]) -> str:
    if self.chat_template is None:
      raise APIError("this server has no chat template: use /v1/completions", param="messages")
    try:
      return self.chat_template(messages)
    except ValueError as e:
      raise APIError(str(e), param="messages") from None


def build_app(async_engine: AsyncEngine, *, model_name: str, chat_template: ChatTemplate | None = None) -> FastAPI:
  """The app; its lifespan starts and stops the engine's thread."""
  if async_engine.engine.tokenizer is None:
    raise ValueError("the engine has no tokenizer: serving text needs one (infer.Engine(module, tokenizer, ...))")
  server = _Server(async_engine, model_name, chat_template)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    async_engine.start()
    yield
    async_engine.stop()

  app = FastAPI(title="ingredients OpenAI-compatible server", lifespan=lifespan)
  _install_error_handlers(app)

  @app.get("/health")
  async def health():
    if not async_engine.alive:
      raise APIError("the engine is not running", status=503, type="server_error")
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics():
    body, content_type = async_engine.metrics.render()
    return Response(body, media_type=content_type)

  @app.get("/v1/models")
  async def models():
    cards = [{"id": name, "object": "model", "created": server.started, "owned_by": "ingredients",
              "root": model_name, "parent": None if name == model_name else model_name,
              "max_model_len": async_engine.engine.max_model_len} for name in server.models]
    return {"object": "list", "data": cards}

  @app.post("/v1/completions")
  async def completions(request: Request):
    body = protocol.parse_completion(await _json(request))
    adapter = server.adapter(body.model)
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    stream = await server.add(body.prompt, body.params, request_id, param="prompt", adapter=adapter)
    if body.stream:
      return _sse(_completion_chunks(server, stream, body, request_id, created), stream)
    output = await _final(request, stream)
    if output is None:
      return Response(status_code=499)  # the client is gone; nobody reads this
    choices = [{"index": o.index, "text": o.text, "finish_reason": o.finish_reason,
                "logprobs": None if o.logprobs is None else protocol.completion_logprobs(o.logprobs, server.strings)}
               for o in output.outputs]
    return protocol.completion_object(request_id, created, body.model, choices, protocol.usage(output))

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body = protocol.parse_chat(await _json(request))
    adapter = server.adapter(body.model)
    prompt = server.render_chat(body.messages)
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stream = await server.add(prompt, body.params, request_id, param="messages", adapter=adapter)
    if body.stream:
      return _sse(_chat_chunks(server, stream, body, request_id, created), stream)
    output = await _final(request, stream)
    if output is None:
      return Response(status_code=499)
    choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text}, "finish_reason": o.finish_reason,
                "logprobs": None if o.logprobs is None else protocol.chat_logprobs(o.logprobs, server.strings)}
               for o in output.outputs]
    return protocol.chat_object(request_id, created, body.model, choices, protocol.usage(output), chunk=False)

  return app


async def _json(request: Request):
  raw = await request.body()
  try:
    return json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise APIError(f"the request body is not valid JSON: {e}", code="invalid_json") from None


# -- whole responses: the last output, unless the client leaves first ----------------------------------


async def _final(request: Request, stream: RequestStream) -> RequestOutput | None:
  """The request's finished output; None (and the request aborted) if the client disconnected first."""
  async def last():
    output = None
    async for output in stream.outputs():
      pass
    return output

  result, gone = asyncio.ensure_future(last()), asyncio.ensure_future(_disconnected(request))
  try:
    await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
  finally:
    gone.cancel()
    if not result.done():
      result.cancel()
      stream.abort()
  return result.result() if result.done() else None  # a cancelled task is done only once it ran again


async def _disconnected(request: Request) -> None:
  # The body is read: the next ASGI message is the disconnect (the server sends no other until then).
  while (await request.receive())["type"] != "http.disconnect":
    pass


# -- streams -------------------------------------------------------------------------------------------


def _sse(chunks: AsyncIterator[dict], stream: RequestStream) -> StreamingResponse:
  """`data: {json}` events, then `data: [DONE]`. However the response ends (finished, the client gone,
  the server stopping), the request is aborted if it still runs: in the generator's `finally` when the
  stream is cancelled inside it, in the background task when cancelled while sending."""
  async def events():
    try:
      try:
        async for chunk in chunks:
          yield f"data: {json.dumps(chunk)}\n\n"
      except Exception as e:  # noqa: BLE001 (the status is sent already: the stream itself says what failed)
        log.exception("a stream failed")
        yield f"data: {json.dumps(_error(e).body())}\n\n"
      yield "data: [DONE]\n\n"
    finally:
      stream.abort()

  return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                           background=BackgroundTask(stream.abort))


class _Deltas:
  """What each completion has shown of its cumulative output: the text and the log-probs since."""

  def __init__(self, n: int):
    self.text, self.logged, self.offset, self.done = [""] * n, [0] * n, [0] * n, [False] * n

  def new(self, completion) -> tuple[str, list, bool] | None:
    """(new text, new log-prob entries, finished), or None when there is nothing to show yet."""
    i = completion.index
    if self.done[i]:
      return None
    shown = self.text[i]
    # The engine holds back what may still change, so its text only grows; were it ever to change
    # what was shown, nothing more is sent until the end rather than contradicting the client.
    delta = completion.text[len(shown):] if completion.text.startswith(shown) else ""
    finished = completion.finish_reason is not None
    if not delta and not finished:
      return None
    entries = (completion.logprobs or [])[self.logged[i]:]
    self.text[i] += delta
    self.logged[i] += len(entries)
    self.done[i] = finished
    return delta, entries, finished


async def _new_text(stream: RequestStream, deltas: _Deltas, final: list) -> AsyncIterator[tuple]:
  """(completion, new text, new logprob entries, finished) for each completion that moved; `final`
  ends up holding the last RequestOutput (for the usage)."""
  async for output in stream.outputs():
    final[:] = [output]
    for completion in output.outputs:
      new = deltas.new(completion)
      if new is not None:
        yield (completion, *new)


async def _completion_chunks(server: _Server, stream: RequestStream, body: protocol.CompletionRequest,
                             request_id: str, created: int) -> AsyncIterator[dict]:
  deltas, final = _Deltas(body.params.n), []
  for_logprobs = body.params.logprobs is not None
  async for completion, text, entries, finished in _new_text(stream, deltas, final):
    logprobs = None
    if for_logprobs:
      logprobs = protocol.completion_logprobs(entries, server.strings, deltas.offset[completion.index])
      deltas.offset[completion.index] += sum(len(t) for t in logprobs["tokens"])
    choice = {"index": completion.index, "text": text, "logprobs": logprobs,
              "finish_reason": completion.finish_reason if finished else None}
    yield protocol.completion_object(request_id, created, body.model, [choice], None)
  if body.include_usage and final:
    yield protocol.completion_object(request_id, created, body.model, [], protocol.usage(final[-1]))


async def _chat_chunks(server: _Server, stream: RequestStream, body: protocol.ChatRequest,
                       request_id: str, created: int) -> AsyncIterator[dict]:
  def chunk(choices, usage=None):
    return protocol.chat_object(request_id, created, body.model, choices, usage, chunk=True)

  for index in range(body.params.n):  # OpenAI's first chunk of each choice: the role, no content yet
    yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}])
  deltas, final = _Deltas(body.params.n), []
  async for completion, text, entries, finished in _new_text(stream, deltas, final):
    logprobs = None if body.params.logprobs is None else protocol.chat_logprobs(entries, server.strings)
    delta = {"content": text} if text or not finished else {}
    yield chunk([{"index": completion.index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": completion.finish_reason if finished else None}])
  if body.include_usage and final:
    yield chunk([], protocol.usage(final[-1]))


# -- errors, all in OpenAI's shape ---------------------------------------------------------------------


def _error(e: Exception) -> APIError:
  if isinstance(e, APIError):
    return e
  if isinstance(e, EngineStopped):
    return APIError(str(e), status=503, type="server_error")
  return APIError(f"internal error: {type(e).__name__}: {e}", status=500, type="server_error")


def _install_error_handlers(app: FastAPI) -> None:
  def respond(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)

  @app.exception_handler(APIError)
  async def api_error(request, e: APIError):
    return respond(e)

  @app.exception_handler(RequestValidationError)  # FastAPI's 422: none of our routes declare a body model,
  async def validation_error(request, e):  # but keep every error OpenAI-shaped and 400
    return respond(APIError(f"invalid request: {e.errors()}"))

  @app.exception_handler(HTTPException)  # an unknown route (404), a wrong method (405)
  async def http_error(request, e: HTTPException):
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    return respond(APIError(str(e.detail), status=e.status_code, type=kind))

  @app.exception_handler(Exception)  # Starlette re-raises it after this response, and uvicorn logs it
  async def internal_error(request, e: Exception):
    return respond(_error(e))
