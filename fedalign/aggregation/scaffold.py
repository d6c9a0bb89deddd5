"""SCAFFOLD (Karimireddy et al., 2020), option II control variates.

Clients correct every local gradient by ``c - c_i``; after K local steps with learning rate
eta they set ``c_i+ = c_i - c - delta_i / (K * eta)``. The server applies the averaged delta
and moves ``c += (1 / N) * sum_i (c_i+ - c_i)`` over the sampled clients (N = all clients).
The engine keeps each client's ``c_i`` across rounds and passes ``c_i+ - c_i`` to the
aggregator under ``stats[CLIENT_STATE_DELTA]``.

Example:
  >>> import jax.numpy as jnp
  >>> agg = scaffold_aggregator(num_clients=4)
  >>> params = {'w': jnp.zeros(1)}
  >>> stats = {CLIENT_STATE_DELTA: {'w': jnp.array([[2.0], [4.0]])}}
  >>> new, state, _ = agg.aggregate(agg.init(params), params, {'w': jnp.array([[1.0], [3.0]])},
  ...                               stats, jnp.array([1.0, 1.0]))
  >>> new['w'].tolist(), state['control']['w'].tolist()
  ([2.0], [1.5])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedalign.aggregation.base import Aggregator, weighted_mean
from fedalign.aggregation.fedavg import (apply_server_update, init_server_optimizer, trainable_like)

PyTree = Any
CLIENT_STATE_DELTA = "_client_state_delta"


def scaffold_aggregator(
    num_clients: int,
    optimizer: optax.GradientTransformation | None = None,
    trainable: PyTree | None = None,
) -> Aggregator:
  """SCAFFOLD's server step; the client step lives in :func:`scaffold_correct_grads`."""

  def init(params):
    sub = trainable_like(params, trainable)
    return {
        "opt": init_server_optimizer(optimizer, params, trainable),
        "control": jax.tree.map(jnp.zeros_like, sub),
    }

  def aggregate(state, global_params, deltas, stats, weights):
    mean_delta = weighted_mean(deltas, weights)
    new_params, opt = apply_server_update(optimizer, state["opt"], global_params, mean_delta)
    participating = (jnp.asarray(weights) > 0).astype(jnp.float32)
    dc = stats[CLIENT_STATE_DELTA]
    control = jax.tree.map(
        lambda c, d: c + jnp.tensordot(participating, d, axes=1) / num_clients, state["control"], dc
    )
    return new_params, {"opt": opt, "control": control}, {}

  return Aggregator(init, aggregate)


def scaffold_correct_grads(grads: PyTree, server_control: PyTree, client_control: PyTree) -> PyTree:
  """g + c - c_i."""
  return jax.tree.map(lambda g, c, ci: g + c - ci, grads, server_control, client_control)


def scaffold_new_client_control(
    client_control: PyTree,
    server_control: PyTree,
    delta: PyTree,
    num_steps: jax.Array,
    learning_rate: float,
) -> PyTree:
  """c_i+ = c_i - c - delta / (K * eta); unchanged when the client took no step."""
  k = jnp.maximum(num_steps, 1.0) * learning_rate
  return jax.tree.map(
      lambda ci, c, d: jnp.where(num_steps > 0, ci - c - d / k, ci),
      client_control,
      server_control,
      delta,
  )
