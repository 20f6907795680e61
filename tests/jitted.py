"""Jitted helpers the tests share: a value and its vjp in one compile (eager ops compile one by one)."""

import jax
import jax.numpy as jnp
import numpy as np


def output_and_vjp(fn, args, cotangent, *traced):
  """fn(*args, *traced) and its vjp in args at `cotangent`, as numpy: (out, [one gradient per arg]).
  `traced`: more arguments, tracers inside the jit (not differentiated)."""

  @jax.jit
  def run(args, cotangent, traced):
    out, vjp = jax.vjp(lambda *a: fn(*a, *traced), *args)
    return out, vjp(cotangent)

  out, grads = run(tuple(jnp.asarray(x) for x in args), jnp.asarray(cotangent), traced)
  return np.asarray(out), [np.asarray(g) for g in grads]
