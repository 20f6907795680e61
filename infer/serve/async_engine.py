"""The Engine behind asyncio: one thread owns it and steps it while there is work.

The engine is not thread-safe, and a step blocks for as long as the device computes; so it lives on a
thread of its own. Request handlers (on the event loop) reach it only through a thread-safe queue of
commands (add, abort), and it hands each request's outputs back with `loop.call_soon_threadsafe`.

  async_engine = AsyncEngine(engine); async_engine.start()
  stream = await async_engine.add(prompt, params, request_id)  # ValueError, QueueFull as add_request
  async for output in stream.outputs(): ...                    # cumulative; the last one finished
  stream.abort()                                               # the client went away (idempotent)

Outputs are cumulative, so a consumer slower than the engine skips to the latest one: nothing is lost
and nothing queues up. The metrics (metrics.py) are recorded here, on the engine's thread.
"""

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence

from infer.engine import Engine, RequestOutput
from infer.sampling_params import SamplingParams
from infer.serve.metrics import Metrics

log = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
  """The engine's thread is not running (not started, shut down, or dead)."""


class RequestStream:
  """One request's outputs, for the asyncio task that added it."""

  def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, abort):
    self.request_id = request_id
    self._loop, self._abort = loop, abort
    self.accepted = loop.create_future()
    self._latest: RequestOutput | None = None
    self._error: BaseException | None = None
    self._ready = asyncio.Event()
    self._done = False  # the consumer saw the last output, or aborted
    self.saw_first_token = False  # the engine thread's: the time to first token is recorded

  async def outputs(self) -> AsyncIterator[RequestOutput]:
    """The request's outputs as they come (cumulative); the last is finished. An engine failure raises."""
    while True:
      await self._ready.wait()
      self._ready.clear()
      if self._error is not None:
        self._done = True
        raise self._error
      output = self._latest
      yield output
      if output.finished:
        self._done = True
        return

  def abort(self) -> None:
    """Stops the request and frees its blocks, unless it finished already."""
    if not self._done:
      self._done = True
      self._abort(self.request_id)

  # -- called on the engine's thread: each hands a value to the event loop -----------------------------

  def _call(self, fn, *args) -> None:
    try:
      self._loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the server is gone, no one is listening
      pass

  def accept(self, error: BaseException | None) -> None:
    self._call(self._set_accepted, error)

  def put(self, output: RequestOutput) -> None:
    self._call(self._set_latest, output)

  def fail(self, error: BaseException) -> None:
    self._call(self._set_error, error)

  # -- on the event loop -----------------------------------------------------------------------------

  def _set_accepted(self, error):
    if self.accepted.done():  # the handler stopped waiting (its client went away)
      return
    if error is None:
      self.accepted.set_result(None)
    else:
      self.accepted.set_exception(error)

  def _set_latest(self, output):
    self._latest = output
    self._ready.set()

  def _set_error(self, error):
    self._error = error
    self._ready.set()


@dataclasses.dataclass(frozen=True)
class _Add:
  request_id: str
  prompt: str | Sequence[int]
  params: SamplingParams
  stream: RequestStream
  adapter: str | None


@dataclasses.dataclass(frozen=True)
class _Abort:
  request_id: str


_STOP = object()


class AsyncEngine:
  def __init__(self, engine: Engine):
    self.engine = engine
    self.metrics = Metrics()
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._streams: dict[str, RequestStream] = {}  # the engine thread's alone
    self._thread: threading.Thread | None = None

  # -- the event loop's side -------------------------------------------------------------------------

  def start(self) -> None:
    if self._thread is None:
      self.metrics.observe_engine(self.engine)
      self._thread = threading.Thread(target=self._run, name="infer-engine", daemon=True)
      self._thread.start()

  def stop(self, timeout: float = 30.0) -> None:
    """Ends the thread after its current step; requests still running end with EngineStopped."""
    if self._thread is not None:
      self._inbox.put(_STOP)
      self._thread.join(timeout)
      self._thread = None

  @property
  def alive(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  async def add(self, prompt: str | Sequence[int], params: SamplingParams, request_id: str,
                adapter: str | None = None) -> RequestStream:
    """Queues a request (with the LoRA adapter named, or the base); returns its stream once the engine
    took it, or raises what add_request raised."""
    if not self.alive:
      raise EngineStopped("the engine is not running")
    stream = RequestStream(request_id, asyncio.get_running_loop(), self.abort)
    self._inbox.put(_Add(request_id, prompt, params, stream, adapter))
    try:
      await stream.accepted
    except asyncio.CancelledError:  # the handler was cancelled: drop the request if it got in
      self.abort(request_id)
      raise
    return stream

  def abort(self, request_id: str) -> None:
    self._inbox.put(_Abort(request_id))

  # -- the engine's thread ---------------------------------------------------------------------------

  def _run(self) -> None:
    engine = self.engine
    try:
      while self._handle_commands(wait=not engine.has_unfinished()):
        if engine.has_unfinished():
          self._step()
        self.metrics.observe_engine(engine)
    finally:
      self._fail_all(EngineStopped("the engine stopped"))
      self.metrics.observe_engine(engine)

  def _handle_commands(self, wait: bool) -> bool:
    """Applies every queued command (waiting for one while the engine is idle); False on stop."""
    try:
      command = self._inbox.get(block=wait)
    except queue.Empty:
      return True
    while command is not _STOP:
      if isinstance(command, _Add):
        self._add(command)
      else:
        self._abort(command.request_id)
      try:
        command = self._inbox.get_nowait()
      except queue.Empty:
        return True
    return False

  def _add(self, command: _Add) -> None:
    try:
      self.engine.add_request(command.prompt, command.params, request_id=command.request_id, adapter=command.adapter)
    except Exception as e:  # noqa: BLE001 (ValueError, QueueFull: the handler turns each into its status)
      command.stream.accept(e)
      return
    self._streams[command.request_id] = command.stream
    command.stream.accept(None)

  def _abort(self, request_id: str) -> None:
    if self._streams.pop(request_id, None) is not None:  # not finished (nor refused) yet
      self.engine.abort(request_id)
      self.metrics.observe_aborted()

  def _step(self) -> None:
    try:
      outputs = self.engine.step()
    except Exception as e:  # noqa: BLE001 (a bug: fail the requests it hit, keep serving new ones)
      log.exception("an engine step failed; its requests are aborted")
      self._fail_all(e)
      return
    for output in outputs:
      stream = self._streams.get(output.request_id)
      if stream is None:
        continue
      if not stream.saw_first_token and output.first_token_time is not None:
        stream.saw_first_token = True
        self.metrics.observe_first_token(output)
      if output.finished:
        del self._streams[output.request_id]
        self.metrics.observe_finished(output)
      stream.put(output)

  def _fail_all(self, error: BaseException) -> None:
    for request_id, stream in list(self._streams.items()):
      try:
        self.engine.abort(request_id)
      except Exception:  # noqa: BLE001 (after a failed step the engine may be inconsistent; free what we can)
        log.exception("aborting %s failed", request_id)
      stream.fail(error)
    self._streams.clear()
