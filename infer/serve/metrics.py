"""The server's Prometheus metrics, in a registry of their own (one per app, so two apps in one process,
as in the tests, never share or clash over the global registry).

The engine thread (async_engine.py) records them; GET /metrics renders them in Prometheus' text format.
"""

import prometheus_client as prom

# Seconds; from a few milliseconds (a small model on an accelerator) to minutes (a long queue).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
  def __init__(self):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.running = prom.Gauge("infer_num_requests_running", "Requests with sequences in the running batch.",
                              registry=r)
    self.waiting = prom.Gauge("infer_num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
    self.kv_blocks_used = prom.Gauge("infer_kv_cache_blocks_used", "KV-cache blocks held by sequences.", registry=r)
    self.kv_blocks_total = prom.Gauge("infer_kv_cache_blocks_total", "KV-cache blocks in the pool.", registry=r)
    self.prompt_tokens = prom.Counter("infer_prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
    self.generation_tokens = prom.Counter("infer_generation_tokens", "Tokens generated.", registry=r)
    self.finished = prom.Counter("infer_completions_finished", "Completions finished, by reason (stop, length).",
                                 ["finish_reason"], registry=r)
    self.aborted = prom.Counter("infer_requests_aborted", "Requests aborted unfinished (their client went away).",
                                registry=r)
    self.time_to_first_token = prom.Histogram(
        "infer_time_to_first_token_seconds", "From a request's arrival to its first generated token.",
        buckets=_TTFT_BUCKETS, registry=r)
    self.time_per_output_token = prom.Histogram(
        "infer_time_per_output_token_seconds", "A finished request's mean time between its output tokens.",
        buckets=_TPOT_BUCKETS, registry=r)
    self._counted = {"prompt_tokens": 0, "generation_tokens": 0}

  def observe_engine(self, engine) -> None:
    """The gauges and token counters from the engine's state (call from the thread that owns it)."""
    self.running.set(engine.num_running)
    self.waiting.set(engine.num_waiting)
    self.kv_blocks_used.set(engine.block_manager.num_used)
    self.kv_blocks_total.set(engine.block_manager.num_blocks)
    for name, counter in (("prompt_tokens", self.prompt_tokens), ("generation_tokens", self.generation_tokens)):
      total = engine.counters[name]
      counter.inc(total - self._counted[name])  # prometheus counters only go up: add what is new
      self._counted[name] = total

  def observe_first_token(self, output) -> None:
    self.time_to_first_token.observe(output.first_token_time - output.arrival_time)

  def observe_finished(self, output) -> None:
    """A finished RequestOutput: its completions' finish reasons, its mean inter-token time (of its longest)."""
    for completion in output.outputs:
      self.finished.labels(finish_reason=completion.finish_reason).inc()
    tokens = max(len(o.token_ids) for o in output.outputs)
    if output.first_token_time is not None and output.finished_time is not None and tokens > 1:
      self.time_per_output_token.observe((output.finished_time - output.first_token_time) / (tokens - 1))

  def observe_aborted(self) -> None:
    self.aborted.inc()

  def render(self) -> tuple[bytes, str]:
    """(body, content type) for GET /metrics."""
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
