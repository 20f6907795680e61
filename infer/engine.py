"""The serving engine: continuous batching over a paged KV cache, with prefix caching.

    engine = infer.Engine(module, tokenizer, infer.EngineConfig(max_num_seqs=32))
    request_id = engine.add_request("Once upon a time", infer.SamplingParams(max_tokens=32))
    while engine.has_unfinished():
      for output in engine.step(): ...   # RequestOutputs with new tokens (cumulative) or finished
    engine.generate(prompts, params)   # an offline batch: the finished RequestOutputs, in order

Each step the scheduler (infer/scheduler.py) picks the running sequences' next tokens (a decode
token, or a prompt chunk) and admits waiting requests; infer/paged_step.py runs them on device as
one flattened row and samples every sequence that reached its last token; the host appends the
tokens, detokenizes, and finishes sequences at a stop token, a stop string, max_tokens or the
model's length. Requests join and leave at every step.
"""

import dataclasses
import itertools
import time
import zlib
from collections.abc import Mapping
from collections.abc import Sequence as SequenceOf

import jax
import numpy as np
from flax import nnx

from infer.blocks import BlockManager
from infer.decoding import bucket, mesh_of, power_of_two
from infer.detokenize import Detokenizer
from infer.paged_step import StepInputs, empty_cache, paged_step
from infer.row_sampling import RowSampling
from infer.sampling_params import SamplingParams, check_token_ids
from infer.scheduler import Scheduler, Sequence
from model import multi_lora, sharding


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  block_size: int = 16  # tokens per KV-cache block
  num_blocks: int | None = None  # the cache's blocks; None: max_num_seqs sequences of max_model_len
  max_num_seqs: int = 32  # sequences running at once
  max_num_batched_tokens: int = 256  # tokens computed in one step (decodes and prompt chunks)
  max_model_len: int | None = None  # prompt + output; None: the model's max_position_embeddings
  enable_prefix_caching: bool = True
  max_waiting: int = 1024  # requests waiting beyond this are refused (QueueFull)
  seed: int = 0  # seeds requests that give none
  add_bos: bool = True  # text prompts start with the tokenizer's bos

  def __post_init__(self):
    for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"EngineConfig.{name}={value!r} must be a positive int")
    for name in ("num_blocks", "max_model_len"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"EngineConfig.{name}={value!r} must be a positive int or None")


class QueueFull(RuntimeError):
  """The waiting queue holds max_waiting requests already."""


@dataclasses.dataclass
class TokenLogprob:
  token_id: int
  logprob: float
  top: list[tuple[int, float]]  # the most likely tokens and their log-probs, as many as asked


@dataclasses.dataclass
class CompletionOutput:
  index: int
  text: str  # the output so far (held back where it might begin a stop string, until finished)
  token_ids: list[int]
  finish_reason: str | None  # "stop", "length", "abort", or None while running
  logprobs: list[TokenLogprob] | None  # when the request asked for logprobs
  cumulative_logprob: float


@dataclasses.dataclass
class RequestOutput:
  request_id: str
  prompt: str | None
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]
  finished: bool
  arrival_time: float
  first_token_time: float | None
  finished_time: float | None


@dataclasses.dataclass(eq=False)
class _Request:
  request_id: str
  prompt: str | None
  prompt_ids: list[int]
  params: SamplingParams
  seed: int
  stop_ids: frozenset
  arrival_time: float
  sequences: list[Sequence] = dataclasses.field(default_factory=list)
  completions: list = dataclasses.field(default_factory=list)  # per sequence: _Completion
  first_token_time: float | None = None
  finished_time: float | None = None


@dataclasses.dataclass(eq=False)
class _Completion:
  detokenizer: Detokenizer | None
  logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
  cumulative_logprob: float = 0.0
  finish_reason: str | None = None


class Engine:
  """Serves a Transformer: add_request / abort / step, or generate for an offline batch."""

  def __init__(self, module, tokenizer=None, config: EngineConfig = EngineConfig(),
               adapters: Mapping[str, str] | None = None):
    """adapters: name -> a PEFT LoRA directory; requests name one (add_request(..., adapter=name)), and
    rows of one step use different ones (model/multi_lora.py)."""
    if not isinstance(config, EngineConfig):
      raise ValueError(f"config must be an infer.EngineConfig, got {type(config).__name__}")
    self.adapter_names: tuple[str, ...] = ()
    if adapters:
      module, self.adapter_names = multi_lora.stack(module, dict(adapters))
    c = self.config = config
    self.tokenizer = tokenizer
    self.model_config = module.config
    self.max_model_len = c.max_model_len or module.config.max_position_embeddings
    self.blocks_per_seq = -(-self.max_model_len // c.block_size)
    num_blocks = c.num_blocks or c.max_num_seqs * self.blocks_per_seq
    if num_blocks < self.blocks_per_seq:
      raise ValueError(f"EngineConfig.num_blocks={num_blocks} cannot hold one sequence of max_model_len="
                       f"{self.max_model_len} ({self.blocks_per_seq} blocks of {c.block_size})")
    self.graphdef, self.params = nnx.split(module)
    self.mesh = mesh_of(self.params)
    self.rules = sharding.with_default_rules(sharding.DEFAULT_RULES) if self.mesh else None
    self.cache = empty_cache(config=module.config, num_blocks=num_blocks, block_size=c.block_size, mesh=self.mesh,
                             rules=self.rules)
    self.block_manager = BlockManager(num_blocks, c.block_size, c.enable_prefix_caching)
    self.scheduler = Scheduler(self.block_manager, max_num_seqs=c.max_num_seqs,
                               max_num_batched_tokens=c.max_num_batched_tokens)
    self._requests: dict[str, _Request] = {}
    self._ids = itertools.count()
    self._arrivals = itertools.count()
    # The distinct step variants used, each one compilation: (tokens, table width, history width,
    # kernel query length, filters, top log-probs).
    self.step_shapes: set[tuple] = set()
    self.counters = dict(prompt_tokens=0, generation_tokens=0, steps=0)

  # -- requests -------------------------------------------------------------------------------------

  def add_request(self, prompt: str | SequenceOf[int], params: SamplingParams | None = None,
                  request_id: str | None = None, *, adapter: str | None = None) -> str:
    """Queues a prompt (text, or token ids), generated with the LoRA adapter named (None: the base);
    returns its request id."""
    if adapter is not None and adapter not in self.adapter_names:
      raise ValueError(f"adapter {adapter!r} is not one of this engine's adapters {list(self.adapter_names)}")
    adapter_id = 0 if adapter is None else self.adapter_names.index(adapter) + 1
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
      raise ValueError(f"params must be an infer.SamplingParams, got {type(params).__name__}")
    check_token_ids(params, self.model_config.vocab_size)
    if len(self.scheduler.waiting) >= self.config.max_waiting:
      raise QueueFull(f"{len(self.scheduler.waiting)} sequences are waiting (EngineConfig.max_waiting="
                      f"{self.config.max_waiting})")
    request_id = str(next(self._ids)) if request_id is None else str(request_id)
    if request_id in self._requests:
      raise ValueError(f"request_id {request_id!r} is already in use")
    text, ids = self._prompt_ids(prompt)
    if len(ids) >= self.max_model_len:
      raise ValueError(f"the prompt has {len(ids)} tokens: at least the model's max_model_len={self.max_model_len}, "
                       "with no room for a token of output")
    max_tokens = params.max_tokens or self.max_model_len - len(ids)
    if len(ids) + max_tokens > self.max_model_len:
      raise ValueError(f"the prompt has {len(ids)} tokens and max_tokens={max_tokens}: together more than the "
                       f"model's max_model_len={self.max_model_len}")
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos and self.tokenizer is not None and self.tokenizer.eos_id >= 0:
      stop_ids.add(self.tokenizer.eos_id)
    seed = params.seed if params.seed is not None else zlib.crc32(f"{self.config.seed}:{request_id}".encode())
    request = _Request(request_id, text, ids, dataclasses.replace(params, max_tokens=max_tokens),
                       seed & 0xFFFFFFFF, frozenset(stop_ids), time.monotonic())
    for index in range(params.n):
      arrival = next(self._arrivals)
      seq = Sequence(request, index, list(ids), len(ids), arrival, fork_of=request.sequences[0] if index else None,
                     cache_key=adapter_id)
      request.sequences.append(seq)
      detokenizer = Detokenizer(self.tokenizer, params.stop, request.stop_ids, ids) if self.tokenizer else None
      request.completions.append(_Completion(detokenizer))
      self.scheduler.add(seq)
    self._requests[request_id] = request
    self.counters["prompt_tokens"] += len(ids)
    return request_id

  def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("a text prompt needs the engine's tokenizer; give token ids or a tokenizer")
      ids = list(self.tokenizer.encode(prompt))
      if self.config.add_bos and self.tokenizer.bos_id >= 0:
        ids = [self.tokenizer.bos_id, *ids]
      if not ids:
        raise ValueError("the prompt is empty and there is no bos token to start from")
      return prompt, ids
    ids = np.asarray(prompt)
    vocab = self.model_config.vocab_size
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"a prompt is a string or a non-empty flat list of token ids, got {prompt!r:.80}")
    if ids.min() < 0 or ids.max() >= vocab:
      raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab})")
    return None, ids.tolist()

  def abort(self, request_id: str) -> None:
    """Stops a request and frees its blocks (unknown or finished ids are ignored)."""
    request = self._requests.pop(str(request_id), None)
    if request is None:
      return
    for seq, completion in zip(request.sequences, request.completions):
      if not seq.finished:
        completion.finish_reason = "abort"
        self._finish(seq)

  def has_unfinished(self) -> bool:
    return self.scheduler.has_work()

  @property
  def num_waiting(self) -> int:
    return len({seq.request.request_id for seq in self.scheduler.waiting})

  @property
  def num_running(self) -> int:
    return len({seq.request.request_id for seq in self.scheduler.running})

  # -- steps ----------------------------------------------------------------------------------------

  def step(self) -> list[RequestOutput]:
    """One step of every scheduled sequence; the outputs of requests that produced tokens or finished."""
    schedule = self.scheduler.schedule()
    if not schedule.scheduled:
      return []
    inputs, shape = self._inputs(schedule)
    self.step_shapes.add(shape)
    self.cache, sampled = paged_step(self.graphdef, self.params, self.cache, inputs, max_q_len=shape[3],
                                     filters=shape[4], top_logprobs=shape[5], mesh=self.mesh, rules=self.rules)
    sampled = jax.device_get(sampled)
    self.counters["steps"] += 1
    now, touched = time.monotonic(), {}
    for row, item in enumerate(schedule.scheduled):
      self.scheduler.computed(item)
      if item.samples:
        self._append(item.sequence, row, sampled, now)
        touched[item.sequence.request.request_id] = item.sequence.request
    return [self._output(r) for r in touched.values()]

  def warmup(self) -> int:
    """Compiles the step for every (tokens, block-table width) bucket a greedy request can need, on
    all-padding inputs (nothing is written or sampled), so that no compilation stalls serving later.
    Returns how many step variants there are now."""
    c, buckets = self.config, []
    total = bucket(1)
    while True:
      buckets.append(total)
      if total >= c.max_num_batched_tokens:
        break
      total *= 2
    widths = sorted({min(self.blocks_per_seq, 1 << i) for i in range(self.blocks_per_seq.bit_length() + 1)})
    for total in buckets:
      rows = min(total, bucket(c.max_num_seqs))
      for width in widths:
        max_q_len = None if self.model_config.attention_impl != "pallas" else power_of_two(
            min(total, c.max_num_batched_tokens))  # the kernel's other query lengths compile when met
        shape = (total, width, None, max_q_len, False, False)
        if shape in self.step_shapes:
          continue
        inputs = StepInputs(
            np.zeros(total, np.int32), np.full(total, -1, np.int32), np.zeros(total, np.int32),
            np.zeros((rows, width), np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.int32),
            np.full(rows, self.block_manager.num_blocks, np.int32),
            self._row_sampling([], rows)[0], None, np.zeros(total, np.int32) if self.adapter_names else None)
        self.cache, sampled = paged_step(self.graphdef, self.params, self.cache, inputs, max_q_len=max_q_len,
                                         filters=False, top_logprobs=False, mesh=self.mesh, rules=self.rules)
        jax.block_until_ready(sampled)
        self.step_shapes.add(shape)
    return len(self.step_shapes)

  def generate(self, prompts, params: SamplingParams | SequenceOf[SamplingParams] | None = None) -> list[RequestOutput]:
    """Runs prompts (texts or token-id lists) to completion; their final RequestOutputs, in order."""
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
      raise ValueError("prompts must be a list of prompts (each a string or a list of token ids)")
    params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(params) != len(prompts):
      raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
    ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
    final = {}
    while len(final) < len(ids):
      for output in self.step():
        if output.finished:
          final[output.request_id] = output
    return [final[i] for i in ids]

  def _inputs(self, schedule) -> tuple[StepInputs, tuple]:
    scheduled = schedule.scheduled
    counts = [s.count for s in scheduled]
    total = bucket(sum(counts))
    rows = min(total, bucket(self.config.max_num_seqs))
    tokens = np.zeros(total, np.int32)
    positions = np.full(total, -1, np.int32)
    seq_ids = np.zeros(total, np.int32)
    adapter_ids = np.zeros(total, np.int32) if self.adapter_names else None
    # The table's width: a bucket of the longest sequence's blocks (the jnp attention gathers them all).
    width = min(self.blocks_per_seq, power_of_two(max(len(s.sequence.blocks) for s in scheduled)))
    tables = np.zeros((rows, width), np.int32)
    sample_at = np.zeros(rows, np.int32)
    start = 0
    for row, item in enumerate(scheduled):
      seq = item.sequence
      tokens[start: start + item.count] = seq.tokens[item.start: item.start + item.count]
      positions[start: start + item.count] = np.arange(item.start, item.start + item.count)
      seq_ids[start: start + item.count] = row
      if adapter_ids is not None:
        adapter_ids[start: start + item.count] = seq.cache_key
      tables[row, : len(seq.blocks)] = seq.blocks
      sample_at[row] = start + item.count - 1
      start += item.count
    copy_from = np.zeros(rows, np.int32)
    copy_to = np.full(rows, self.block_manager.num_blocks, np.int32)
    for i, (source, destination) in enumerate(schedule.copies):
      copy_from[i], copy_to[i] = source, destination
    sampling, history = self._row_sampling(scheduled, rows)
    # The kernel tiles queries by the most tokens one sequence has (1 when every row decodes).
    max_q_len = power_of_two(max(counts)) if self.model_config.attention_impl == "pallas" else None
    inputs = StepInputs(tokens, positions, seq_ids, tables, sample_at, copy_from, copy_to, sampling, history,
                        adapter_ids)
    params = [item.sequence.request.params for item in scheduled]
    filters = any(p.top_k or p.top_p < 1 or p.min_p for p in params)
    top_logprobs = any(p.logprobs for p in params)
    shape = (total, width, None if history is None else history.shape[1], max_q_len, filters, top_logprobs)
    return inputs, shape

  def _row_sampling(self, scheduled, rows: int) -> tuple[RowSampling, np.ndarray | None]:
    fields = {f.name: np.zeros(rows, np.uint32 if f.name == "seed" else np.int32 if f.name in (
        "top_k", "completion", "output_index") else np.float32) for f in dataclasses.fields(RowSampling)}
    fields["top_p"][:] = 1.0
    penalized = []
    for row, item in enumerate(scheduled):
      seq, p = item.sequence, item.sequence.request.params
      for name in ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
        fields[name][row] = getattr(p, name)
      fields["seed"][row] = seq.request.seed
      fields["completion"][row] = seq.index
      fields["output_index"][row] = seq.num_output
      if p.presence_penalty or p.frequency_penalty:
        penalized.append((row, seq))
    history = None
    if penalized:
      history = np.full((rows, bucket(max(seq.num_output for _, seq in penalized))), -1, np.int32)
      for row, seq in penalized:
        history[row, : seq.num_output] = seq.tokens[seq.prompt_len:]
    return RowSampling(**fields), history

  def _append(self, seq: Sequence, row: int, sampled, now: float) -> None:
    request = seq.request
    completion = request.completions[seq.index]
    token = int(sampled["tokens"][row])
    seq.tokens.append(token)
    self.counters["generation_tokens"] += 1
    request.first_token_time = request.first_token_time or now
    logprob = float(sampled["logprobs"][row])
    completion.cumulative_logprob += logprob
    if request.params.logprobs is not None:
      k = request.params.logprobs
      top = [] if not k else [(int(t), float(lp)) for t, lp in zip(sampled["top_tokens"][row][:k],
                                                                   sampled["top_logprobs"][row][:k])]
      completion.logprobs.append(TokenLogprob(token, logprob, top))
    reason = None
    if completion.detokenizer is not None and completion.detokenizer.add(token):
      reason = "stop"  # a stop string
    elif token in request.stop_ids:
      reason = "stop"
    elif seq.num_output >= request.params.max_tokens or len(seq.tokens) >= self.max_model_len:
      reason = "length"
    if reason:
      completion.finish_reason = reason
      self._finish(seq)

  def _finish(self, seq: Sequence) -> None:
    seq.finished = True
    self.scheduler.remove(seq)
    request = seq.request
    if all(s.finished for s in request.sequences):
      request.finished_time = time.monotonic()
      self._requests.pop(request.request_id, None)

  def _output(self, request: _Request) -> RequestOutput:
    outputs = []
    for seq, completion in zip(request.sequences, request.completions):
      finished = completion.finish_reason is not None
      text = completion.detokenizer.text(final=finished) if completion.detokenizer else ""
      outputs.append(CompletionOutput(
          seq.index, text, seq.tokens[seq.prompt_len:], completion.finish_reason,
          list(completion.logprobs) if request.params.logprobs is not None else None, completion.cumulative_logprob))
    return RequestOutput(request.request_id, request.prompt, request.prompt_ids, outputs,
                         request.finished_time is not None, request.arrival_time, request.first_token_time,
                         request.finished_time)
