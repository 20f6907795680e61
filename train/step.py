"""The pure train and eval steps: `train_step(state, rest, batch) -> (state, metrics)`.

State is a plain pytree (a dict): step, params, opt_state, rng, and counters of skipped
non-finite updates. `rest` is the model's variables that are not trained (a frozen reference
or teacher, buffers): an argument, not a closure, so large frozen weights are never baked into
the compiled program as constants. The model's structure (graphdef) is closed over.

Gradient accumulation is exact: with grad_accum_steps=A the batch splits into A micro-batches,
each loss is told the whole batch (`LossFn`) and returns its micro-batch's share of the whole
batch's loss, and the step sums the shares and their gradients, which equal one step's over the
whole batch. Averaging micro-batch means weighted by one scalar is not exact in general: the weight
must be the loss's own normalizer (a GRPO sequence mean weighted by tokens biases the gradient), and
a loss whose terms have different normalizers (distillation step by step: token means over two
different sets of tokens) has no right weight at all.
"""

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model import peft


class LossFn(Protocol):
  """`loss_fn(model, batch, rng, *, whole_batch=None) -> (loss, metrics)`, what a method plugs in.

  `batch` may be a micro-batch of `whole_batch` (None: `batch` is the whole batch). The loss is
  then the micro-batch's share of the whole batch's loss: each term's numerator summed over
  `batch` (its tokens, sequences or pairs), over its normalizer counted on `whole_batch`, so the
  shares of the micro-batches sum to the whole batch's loss, in value and in gradient.
  metrics:
    'tokens'  the tokens that count in `batch` (its loss mask's sum), for throughput. Required.
    'weight'  the loss's normalizer on `batch` alone (its tokens, sequences or pairs; default 1):
              how much a batch counts when losses of batches computed apart are averaged (the
              eval step), and the weight of the other metrics, means over `batch` alone, when the
              train step averages them over micro-batches.
  """

  def __call__(self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array, *,
               whole_batch: dict[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    ...


_ADAPTER_DROPOUT_STREAM = 0x5EF7


def _weight(metrics: dict[str, jax.Array]) -> jax.Array:
  return jnp.asarray(metrics.get("weight", 1.0), jnp.float32)


def init_state(params: nnx.State, optimizer: optax.GradientTransformation, seed: int) -> dict[str, Any]:
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": optimizer.init(params),
      "rng": jax.random.PRNGKey(seed),  # raw uint32[2]: serializable as is
      "nonfinite_in_row": jnp.zeros((), jnp.int32),
      "nonfinite_total": jnp.zeros((), jnp.int32),
  }


def state_shardings(params: nnx.State, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Where `init_state(params)` lives: each optimizer moment on its parameter's shards (so fsdp
  splits Adam's mu and nu as it splits the weights), counters and the rng replicated.

  `params` are arrays or ShapeDtypeStructs with shardings. Left to the compiler, a jitted
  init_state replicates the moments (zeros_like's result is not tied to its input's placement).
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  opt_shapes = jax.eval_shape(optimizer.init, params)
  opt_shardings = optax.tree_map_params(optimizer, lambda _, placed: placed, opt_shapes, param_shardings,
                                        transform_non_params=lambda _: replicated)
  return {"step": replicated, "params": param_shardings, "opt_state": opt_shardings, "rng": replicated,
          "nonfinite_in_row": replicated, "nonfinite_total": replicated}


def _split_micro_batches(batch: dict[str, jax.Array], num: int) -> dict[str, jax.Array]:
  """[B, T] -> [A, B/A, T]; micro-batch i takes rows i, i + A, ... so the sharded B/A axis stays in place."""

  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into grad_accum_steps={num} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum_steps: int = 1,
) -> Callable[[dict[str, Any], dict[str, jax.Array]], tuple[dict[str, Any], dict[str, jax.Array]]]:
  """A pure train step: the micro-batches' losses and gradients (shares of the whole batch's, see
  `LossFn`) are summed; their other metrics averaged weighted by metrics['weight']; tokens summed."""

  def loss_of_params(params, rest, batch, whole_batch, rng):
    model = nnx.merge(graphdef, params, rest)
    # Adapter dropout (model.peft) draws from its own stream: the loss's rng stays as it was.
    peft.with_dropout(model, jax.random.fold_in(rng, _ADAPTER_DROPOUT_STREAM))
    loss, metrics = loss_fn(model, batch, rng, whole_batch=whole_batch)
    return loss, (loss, metrics)

  # `rest` is differentiated too and its gradient dropped (dead code, pruned by the compiler): nnx
  # transforms inside the loss (the layer scan) refuse a module whose variables hold tracers of
  # another trace level than the gradient's, which non-differentiated inputs would. Frozen
  # modules cut their outputs with stop_gradient (a teacher's log-probs), so nothing flows there.
  # allow_int: `rest` may hold integer arrays (a quantized base's codes); their gradient is empty.
  grad_fn = jax.grad(loss_of_params, argnums=(0, 1), has_aux=True, allow_int=True)

  def train_step(state, rest, batch):
    rng, step_rng = jax.random.split(state["rng"])
    micro_batches = _split_micro_batches(batch, grad_accum_steps)
    micro_rngs = jax.random.split(step_rng, grad_accum_steps)

    def accumulate(sums, inputs):
      micro_batch, micro_rng = inputs
      (grads, _), (loss, metrics) = grad_fn(state["params"], rest, micro_batch, batch, micro_rng)
      weight = _weight(metrics)
      return {
          "grads": jax.tree.map(jnp.add, sums["grads"], grads),
          "loss": sums["loss"] + loss,
          "tokens": sums["tokens"] + jnp.asarray(metrics["tokens"], jnp.float32),
          "weight": sums["weight"] + weight,
          "metrics": {k: v + metrics[k] * weight for k, v in sums["metrics"].items()},
      }, None

    # The metric names come from one abstract evaluation of the loss (no compute).
    _, (_, metric_shapes) = jax.eval_shape(
        loss_of_params, state["params"], rest, jax.tree.map(lambda x: x[0], micro_batches), batch, micro_rngs[0]
    )
    if "tokens" not in metric_shapes:
      raise ValueError(f"the loss function's metrics {sorted(metric_shapes)} lack 'tokens', the number of tokens "
                       "that count in its batch (for throughput); see train.step.LossFn")
    zero = jnp.zeros((), jnp.float32)
    sums = {
        "grads": jax.tree.map(jnp.zeros_like, state["params"]),
        "loss": zero, "tokens": zero, "weight": zero,
        "metrics": {k: zero for k in metric_shapes if k not in ("loss", "tokens", "weight")},
    }
    sums, _ = jax.lax.scan(accumulate, sums, (micro_batches, micro_rngs))
    grads = sums["grads"]
    metrics = {k: v / jnp.maximum(sums["weight"], 1e-9) for k, v in sums["metrics"].items()}
    metrics["loss"] = sums["loss"]
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    # A non-finite loss or gradient skips the update: parameters and moments stay as they were.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, state["params"]),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "rng": rng,
        "nonfinite_in_row": jnp.where(finite, 0, state["nonfinite_in_row"] + 1),
        "nonfinite_total": state["nonfinite_total"] + jnp.where(finite, 0, 1),
    }
    metrics.update(
        grad_norm=grad_norm,
        learning_rate=schedule(state["step"]),
        tokens=sums["tokens"],
        skipped=jnp.where(finite, 0.0, 1.0),
        param_norm=optax.tree.norm(state["params"]),
    )
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn):
  """eval_step(params, rest, batch) -> (loss * weight, weight): summed over batches by the caller,
  so batches combine by their loss's normalizer (metrics['weight'], see `LossFn`)."""

  def eval_step(params, rest, batch):
    loss, metrics = loss_fn(nnx.merge(graphdef, params, rest), batch, jax.random.PRNGKey(0))
    weight = _weight(metrics)
    return loss * weight, weight

  return eval_step
