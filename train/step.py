"""The pure train and eval steps: `train_step(state, rest, batch) -> (state, metrics)`.

State is a plain pytree (a dict): step, params, opt_state, rng, and counters of skipped
non-finite updates. `rest` is the model's variables that are not trained (a frozen reference
or teacher, buffers): an argument, not a closure, so large frozen weights are never baked into
the compiled program as constants. The model's structure (graphdef) is closed over.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossFn = Callable[[nnx.Module, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def init_state(params: nnx.State, optimizer: optax.GradientTransformation, seed: int) -> dict[str, Any]:
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": optimizer.init(params),
      "rng": jax.random.PRNGKey(seed),  # raw uint32[2]: serializable as is
      "nonfinite_in_row": jnp.zeros((), jnp.int32),
      "nonfinite_total": jnp.zeros((), jnp.int32),
  }


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
  """A pure train step; micro-batch losses and gradients are averaged weighted by metrics['weight']."""

  def loss_of_params(params, rest, batch, rng):
    loss, metrics = loss_fn(nnx.merge(graphdef, params, rest), batch, rng)
    weight = metrics.get("weight", jnp.ones((), jnp.float32))
    return loss * weight, (loss, metrics, weight)

  # `rest` is differentiated too and its gradient dropped (dead code, pruned by the compiler): nnx
  # transforms inside the loss (the layer scan) refuse a module whose variables hold tracers of
  # another trace level than the gradient's, which non-differentiated inputs would. Frozen
  # modules cut their outputs with stop_gradient (a teacher's log-probs), so nothing flows there.
  grad_fn = jax.grad(loss_of_params, argnums=(0, 1), has_aux=True)

  def train_step(state, rest, batch):
    rng, step_rng = jax.random.split(state["rng"])
    micro_batches = _split_micro_batches(batch, grad_accum_steps)
    micro_rngs = jax.random.split(step_rng, grad_accum_steps)

    def accumulate(carry, inputs):
      grad_sum, metric_sums, weight_sum = carry
      micro_batch, micro_rng = inputs
      (grads, _), (loss, metrics, weight) = grad_fn(state["params"], rest, micro_batch, micro_rng)
      metrics = {**metrics, "loss": loss}
      metric_sums = {k: metric_sums[k] + metrics[k] * weight for k in metric_sums}
      return (jax.tree.map(jnp.add, grad_sum, grads), metric_sums, weight_sum + weight), None

    # The metric names come from one abstract evaluation of the loss (no compute).
    _, (_, metric_shapes, _) = jax.eval_shape(
        loss_of_params, state["params"], rest, jax.tree.map(lambda x: x[0], micro_batches), micro_rngs[0]
    )
    names = [k for k in metric_shapes if k != "weight"] + ["loss"]
    zeros = (
        jax.tree.map(jnp.zeros_like, state["params"]),
        {k: jnp.zeros((), jnp.float32) for k in names},
        jnp.zeros((), jnp.float32),
    )
    (grad_sum, metric_sums, weight_sum), _ = jax.lax.scan(accumulate, zeros, (micro_batches, micro_rngs))
    denom = jnp.maximum(weight_sum, 1e-9)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    metrics = {k: v / denom for k, v in metric_sums.items()}

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
        tokens=weight_sum,
        skipped=jnp.where(finite, 0.0, 1.0),
        param_norm=optax.tree.norm(state["params"]),
    )
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn):
  """eval_step(params, rest, batch) -> (weighted loss sum, weight): summed over batches by the caller."""

  def eval_step(params, rest, batch):
    loss, metrics = loss_fn(nnx.merge(graphdef, params, rest), batch, jax.random.PRNGKey(0))
    weight = metrics.get("weight", jnp.ones((), jnp.float32))
    return loss * weight, weight

  return eval_step
