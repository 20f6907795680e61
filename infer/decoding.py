"""Generation with a KV cache: prefill the prompts, then decode on device until every row is done.

Prompts of different lengths are right-padded into one [B, T] batch (T rounded up to a bucket, so a
few shapes cover all calls); cache slot s of a row holds that row's position s (model/kv_cache.py).
Prefill runs the prompts through the model once and picks each row's first token from the logits
of its last prompt token; decode is a `lax.while_loop` that feeds each row its last token, samples
the next, and stops when every row has met a stop token or its budget. Both are jitted once per
(batch, prompt bucket, output bucket) and run on whatever mesh the parameters live on: the
training mesh during RL rollouts, with no copy of the weights.
"""

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from infer.sampling import Sampling, sample, sampling_logprobs, token_statistics
from model import sharding
from model.transformer import Transformer, unstacked

_MIN_BUCKET = 16
STATISTICS = ("logprobs", "model_logprobs", "entropies", "top1_probs")


class Controller(Protocol):
  """Rewrites sampled tokens on device (budget forcing); must be hashable (it is a static jit argument)."""

  def init(self, batch_size: int) -> Any: ...

  def step(self, state: Any, tokens: jax.Array, active: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
    """(state, sampled tokens [B], rows still generating [B]) -> (tokens to emit [B], forced [B] bool, state)."""


@dataclasses.dataclass
class Generation:
  """What `generate` returns; per row, the generated tokens only (the prompt is excluded)."""

  tokens: list[list[int]]
  logprobs: list[np.ndarray]  # log-prob of each token under the sampling distribution (0 for forced tokens)
  model_logprobs: list[np.ndarray]  # ... under the raw model (temperature 1, no filter)
  entropies: list[np.ndarray]  # entropy of the raw model's next-token distribution at each step (nats)
  top1_probs: list[np.ndarray]  # the raw model's largest next-token probability at each step
  lengths: np.ndarray  # [B] number of generated tokens
  finish_reasons: list[str]  # "stop" (a stop token, which is kept in tokens) or "length"
  stats: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def confidence(self) -> np.ndarray:
    """[B] mean log-prob per token under the raw model (the sequence's confidence); nan for empty rows."""
    return np.array([lp.mean() if lp.size else np.nan for lp in self.model_logprobs], np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """Everything the decode loop carries; all of it lives on device."""

  cache: Any
  last: jax.Array  # [B] int32: the token to feed next ...
  positions: jax.Array  # [B] int32: ... and its position (= its cache slot)
  lengths: jax.Array  # [B] int32: tokens generated so far
  done: jax.Array  # [B] bool
  stopped: jax.Array  # [B] bool: done because of a stop token
  keys: jax.Array  # [B] PRNG keys, one per row
  tokens: jax.Array  # [B, N] int32 output buffer
  statistics: dict[str, jax.Array]  # STATISTICS -> [B, N] float32
  control: Any  # the controller's state (or None)
  step: jax.Array  # [] int32: decode steps taken


def power_of_two(n: int) -> int:
  """The least power of two >= n (1 for n <= 1)."""
  return 1 << (max(n, 1) - 1).bit_length()


def bucket(n: int) -> int:
  """The padded size for a length n: a power of two, at least _MIN_BUCKET."""
  return max(_MIN_BUCKET, power_of_two(n))


def row_keys(rng, batch_size: int) -> jax.Array:
  """[B] keys: from per-row int seeds, one key (split by row index), an int seed, or None (seed 0)."""
  if rng is None:
    rng = 0
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.key(int(rng))
  if isinstance(rng, (list, tuple, np.ndarray)) and not isinstance(rng, jax.Array):
    seeds = list(rng)
    if len(seeds) != batch_size:
      raise ValueError(f"rng has {len(seeds)} per-row seeds for {batch_size} prompts")
    return jnp.stack([jax.random.key(int(s)) for s in seeds])
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # a raw uint32 PRNGKey
  if rng.shape == (batch_size,):
    return rng
  if rng.shape != ():
    raise ValueError(f"rng must be one key or [B={batch_size}] keys, got shape {rng.shape}")
  return _fold_in_rows(rng, batch_size)


@functools.partial(jax.jit, static_argnums=1)
def _fold_in_rows(key: jax.Array, batch_size: int) -> jax.Array:
  """[B] keys fold_in(key, row); jitted, since tracing the vmap anew took ~3 ms of every call."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, length: int | None = None):
  """Right-padded [B, T] int32 tokens (T a bucket unless given) and [B] lengths; validates the ids."""
  if isinstance(prompts, (str, bytes)) or not len(prompts):
    raise ValueError("prompts must be a non-empty list of token-id lists")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError(f"prompt {int(lengths.argmin())} is empty; every prompt needs at least one token")
  tokens = np.zeros((len(prompts), length or bucket(int(lengths.max()))), np.int32)
  for row, prompt in enumerate(prompts):
    ids = np.asarray(prompt)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"prompt {row} must be a flat list of int token ids, got {prompt!r:.80}")
    if ids.min() < 0 or ids.max() >= vocab_size:
      raise ValueError(f"prompt {row} has token id {int(ids.max() if ids.max() >= vocab_size else ids.min())} "
                       f"outside the vocabulary [0, {vocab_size})")
    tokens[row, : len(ids)] = ids
  return tokens, lengths


def mesh_of(params) -> jax.sharding.Mesh | None:
  """The mesh the parameters are sharded on, if any (generation then runs there)."""
  for leaf in jax.tree.leaves(params):
    if isinstance(getattr(leaf, "sharding", None), NamedSharding):
      return leaf.sharding.mesh
  return None


def decoding_view(model: nnx.Module, mesh=None) -> nnx.Module:
  """The model as the decode loop should run it: on one CPU device, a scanned decoder with its
  layers unstacked (`model.transformer.unstacked`: a copy of the layer weights per call, which
  halves a decode step's memory traffic there); anywhere else, and on a mesh, the model itself."""
  if not isinstance(model, Transformer) or not model.config.scan_layers or mesh is not None:
    return model
  params = nnx.state(model, nnx.Param)
  if mesh_of(params) is not None:
    return model
  devices = {device for leaf in jax.tree.leaves(params) for device in leaf.devices()}
  return unstacked(model) if len(devices) == 1 and devices.pop().platform == "cpu" else model


def _in_rules(mesh, rules):
  return sharding.axis_rules(mesh, rules) if mesh is not None else _nullcontext()


class _nullcontext:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def emit(state: DecodeState, logits: jax.Array, *, sampling, stop_tokens, controller, max_new_tokens) -> DecodeState:
  """Picks each active row's next token from logits [B, V] and appends it; finished rows stay as they are."""
  batch = logits.shape[0]
  active = ~state.done
  keys = jax.vmap(jax.random.fold_in)(state.keys, state.lengths)  # a row's draw depends on its seed and index
  logprobs = sampling_logprobs(logits, sampling)
  tokens = sample(keys, logprobs, sampling)
  forced = jnp.zeros_like(active)
  control = state.control
  if controller is not None:
    tokens, forced, control = controller.step(control, tokens, active)
  chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
  values = {"logprobs": jnp.where(forced, 0.0, chosen), **token_statistics(logits, tokens)}
  rows = jnp.arange(batch)
  column = jnp.where(active, state.lengths, state.tokens.shape[1])  # out of range: dropped
  out_tokens = state.tokens.at[rows, column].set(tokens, mode="drop")
  statistics = {k: state.statistics[k].at[rows, column].set(values[k], mode="drop") for k in STATISTICS}
  lengths = state.lengths + active
  is_stop = jnp.isin(tokens, jnp.asarray(stop_tokens, jnp.int32)) & active if stop_tokens else jnp.zeros_like(active)
  return dataclasses.replace(
      state,
      last=jnp.where(active, tokens, state.last),
      positions=state.positions + active,
      lengths=lengths,
      done=state.done | is_stop | (lengths >= max_new_tokens),
      stopped=state.stopped | is_stop,
      tokens=out_tokens,
      statistics=statistics,
      control=control,
  )


@functools.partial(
    jax.jit, static_argnames=("graphdef", "buffer", "cache_length", "sampling", "stop_tokens", "controller", "mesh", "rules")
)
def prefill(graphdef, params, tokens, lengths, keys, max_new_tokens, *, buffer, cache_length, sampling, stop_tokens,
            controller, mesh, rules) -> DecodeState:
  """Runs the prompts [B, T] through the model, fills the cache, and emits each row's first token."""
  with _in_rules(mesh, rules):
    model = nnx.merge(graphdef, params)
    batch = tokens.shape[0]
    cache = model.init_cache(batch, cache_length)
    features, cache = model.features(tokens, cache=cache)  # a prefill: positions 0 .. T - 1
    last_features = jnp.take_along_axis(features, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = model.logits(last_features)[:, 0]
    state = DecodeState(
        cache=cache,
        last=jnp.zeros((batch,), jnp.int32),
        positions=lengths.astype(jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        stopped=jnp.zeros((batch,), bool),
        keys=keys,
        tokens=jnp.zeros((batch, buffer), jnp.int32),
        statistics={k: jnp.zeros((batch, buffer), jnp.float32) for k in STATISTICS},
        control=None if controller is None else controller.init(batch),
        step=jnp.zeros((), jnp.int32),
    )
    state = emit(state, logits, sampling=sampling, stop_tokens=stop_tokens, controller=controller,
                 max_new_tokens=max_new_tokens)
    # The first token sits at the position after the prompt; emit advanced `positions` past it.
    return dataclasses.replace(state, positions=lengths.astype(jnp.int32))


@functools.partial(
    jax.jit, static_argnames=("graphdef", "sampling", "stop_tokens", "controller", "mesh", "rules"), donate_argnames=("state",)
)
def decode(graphdef, params, state: DecodeState, max_new_tokens, until_step, *, sampling, stop_tokens, controller,
           mesh, rules) -> DecodeState:
  """Decode steps on device until every row is done or `until_step` steps have been taken in all."""
  with _in_rules(mesh, rules):

    def cond(carry):
      state, _ = carry
      return (state.step < until_step) & ~jnp.all(state.done)

    # The parameters ride in the carry (unchanged): nnx transforms inside the loop refuse
    # variables that hold tracers of the enclosing jit.
    def body(carry):
      state, params = carry
      model = nnx.merge(graphdef, params)
      logits, cache = model(state.last[:, None], positions=state.positions[:, None], cache=state.cache)
      state = dataclasses.replace(state, cache=cache, step=state.step + 1)
      state = emit(state, logits[:, 0], sampling=sampling, stop_tokens=stop_tokens, controller=controller,
                   max_new_tokens=max_new_tokens)
      return state, params

    return jax.lax.while_loop(cond, body, (state, params))[0]


def to_generation(state: DecodeState) -> Generation:
  lengths, tokens, stopped = (sharding.to_host(x) for x in (state.lengths, state.tokens, state.stopped))
  statistics = {k: sharding.to_host(v) for k, v in state.statistics.items()}
  return Generation(
      tokens=[tokens[b, :n].tolist() for b, n in enumerate(lengths)],
      **{k: [statistics[k][b, :n] for b, n in enumerate(lengths)] for k in STATISTICS},
      lengths=lengths,
      finish_reasons=["stop" if s else "length" for s in stopped],
  )


@dataclasses.dataclass(frozen=True)
class _Job:
  graphdef: Any
  params: Any
  static: dict
  max_new_tokens: int


def _start(model, prompts, *, max_new_tokens, sampling=Sampling(), rng=None, stop_tokens=(), controller=None, mesh=None,
           rules=None, extra_slots=0):
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
  if not isinstance(sampling, Sampling):
    raise ValueError(f"sampling must be an infer.Sampling, got {type(sampling).__name__}")
  vocab_size = model.config.vocab_size
  stop_tokens = tuple(int(t) for t in stop_tokens)
  bad = [t for t in stop_tokens if not 0 <= t < vocab_size]
  if bad:
    raise ValueError(f"stop_tokens {bad} are outside the vocabulary [0, {vocab_size})")
  tokens, lengths = pad_prompts(prompts, vocab_size)
  graphdef, params = nnx.split(decoding_view(model, mesh))
  mesh = mesh if mesh is not None else mesh_of(params)
  rules = sharding.with_default_rules(rules if rules is not None else sharding.DEFAULT_RULES) if mesh else None
  buffer = bucket(max_new_tokens)
  static = dict(sampling=sampling, stop_tokens=stop_tokens, controller=controller, mesh=mesh, rules=rules)
  keys = row_keys(rng, len(prompts))
  state = prefill(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), keys, max_new_tokens,
                  buffer=buffer, cache_length=tokens.shape[1] + buffer + extra_slots, **static)
  return _Job(graphdef, params, static, max_new_tokens), state


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    rng=None,
    stop_tokens: Sequence[int] = (),
    controller: Controller | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
) -> Generation:
  """Generates up to max_new_tokens after each prompt (token-id lists of any lengths).

  rng: None (seed 0), an int seed, one key, or per-row seeds / [B] keys (a row's samples then depend
  only on its own seed). Generation runs on the mesh the parameters are sharded on (or `mesh`),
  with activations and the cache placed by `rules` (default: model.sharding.DEFAULT_RULES).
  On a mesh that spans processes every process calls this with the same prompts and gets every
  row back (the outputs are gathered from all of them).
  """
  job, state = _start(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, rng=rng,
                      stop_tokens=stop_tokens, controller=controller, mesh=mesh, rules=rules)
  state = decode(job.graphdef, job.params, state, max_new_tokens, max_new_tokens, **job.static)
  return to_generation(state)


class stream:
  """As `generate`, but iterating yields each row's newly generated tokens after every `chunk`
  decode steps; once the iteration ends, `.generation` holds the full `Generation`.

      tokens = infer.stream(model, prompts, max_new_tokens=64)
      for new in tokens: ...
      tokens.generation.confidence

  Uses the same compiled decode as `generate` (the step budget is a traced argument).
  """

  def __init__(self, model, prompts, *, max_new_tokens: int, chunk: int = 4, **kwargs):
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
      raise ValueError(f"chunk={chunk!r} must be a positive int")
    self._job, self._state = _start(model, prompts, max_new_tokens=max_new_tokens, **kwargs)
    self._chunk, self._rows = int(chunk), len(prompts)
    self.generation: Generation | None = None

  def __iter__(self) -> Iterator[list[list[int]]]:
    job, state = self._job, self._state
    shown = np.zeros(self._rows, np.int64)
    while True:
      lengths, tokens = sharding.to_host(state.lengths), sharding.to_host(state.tokens)
      yield [tokens[b, shown[b]: lengths[b]].tolist() for b in range(self._rows)]
      shown = lengths
      if bool(np.all(sharding.to_host(state.done))):
        self.generation = to_generation(state)
        return
      state = decode(job.graphdef, job.params, state, job.max_new_tokens, int(state.step) + self._chunk, **job.static)
