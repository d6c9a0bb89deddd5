"""SCAFFOLD (Karimireddy et al., 2020), option II control variates.

Client side: every local gradient is corrected by ``c - c_i``; after K real local steps with
learning rate eta the client sets ``c_i+ = c_i - c - Delta_i / (K * eta)`` (unchanged when it
took no step). Server side: FedAvg of the deltas (weights n_i, optionally through
``server.optimizer``) and ``c += (1 / N) * sum_i (c_i+ - c_i)`` over the participating clients
(N = all clients). The engine keeps every client's c_i across rounds (``client_states``) and
hands the aggregator the changes ``c_i+ - c_i`` as ``client_state_deltas``.

Conventions to know: the model update is weighted by n_i but the control update uniformly (as
in the paper's algorithm); option II assumes plain SGD with learning rate
``train.learning_rate`` on the client, so with another client optimizer the control variates
are only an approximation. Config fields read: ``train.learning_rate``, ``server.*``.

Example:
  >>> import jax.numpy as jnp
  >>> agg = scaffold_aggregator(num_clients=4)
  >>> params = {'w': jnp.zeros(1)}
  >>> deltas, dc = {'w': jnp.array([[1.0], [3.0]])}, {'w': jnp.array([[2.0], [4.0]])}
  >>> new, state, _ = agg.aggregate(agg.init(params), params, deltas, {}, jnp.ones(2), dc)
  >>> new['w'].tolist(), state['control']['w'].tolist()
  ([2.0], [1.5])
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fedalign.aggregation import moe_blocks as mb
from fedalign.aggregation.base import Aggregator
from fedalign.algorithms.base import Algorithm, server_optimizer_from_config
from fedalign.algorithms.fedavg import fedavg_deltas, update_norm

PyTree = Any


def scaffold_aggregator(
    num_clients: int,
    trainable: PyTree | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> Aggregator:
  """SCAFFOLD's server step over ``num_clients`` clients in total."""

  def init(params: PyTree) -> dict:
    sub = mb.restrict(params, trainable)
    return {
        "opt": mb.init_server_optimizer(optimizer, params, trainable),
        "control": jax.tree.map(jnp.zeros_like, sub),
    }

  def aggregate(state, global_params, deltas, stats, weights, client_state_deltas=None):
    del stats
    if client_state_deltas is None:
      raise ValueError("SCAFFOLD's aggregate needs client_state_deltas (c_i+ - c_i per client)")
    prep = mb.prepare(global_params, deltas, weights)
    agg = fedavg_deltas(prep)
    new_params, opt = mb.finish(prep, agg, optimizer, state["opt"])
    part = prep.part.astype(jnp.float32)
    dc = mb.mask_clients(prep.part, client_state_deltas)
    control = jax.tree.map(
        lambda c, d: c + mb.client_sum(part, d) / num_clients, state["control"], dc
    )
    return new_params, {"opt": opt, "control": control}, {"update_norm": update_norm(agg)}

  return Aggregator(init, aggregate)


def correct_grads(grads: PyTree, server_control: PyTree, client_control: PyTree) -> PyTree:
  """g + c - c_i."""
  return jax.tree.map(lambda g, c, ci: g + c - ci, grads, server_control, client_control)


def new_client_control(
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


def make_scaffold(
    config: ml_collections.ConfigDict, trainable: PyTree, num_clients: int
) -> Algorithm:
  """SCAFFOLD with the client learning rate ``config.train.learning_rate``.

  Warns (``UserWarning``) when ``config.train.optimizer`` is not 'sgd': option II assumes
  plain SGD on the client (a warning, not an error, so that existing AdamW runs still run).
  """
  lr = float(config.train.learning_rate)
  if config.train.get("optimizer", "sgd") != "sgd":
    warnings.warn(
        f"SCAFFOLD with config.train.optimizer={config.train.optimizer!r}: its option-II "
        "control variate c_i+ = c_i - c - delta / (K * lr) assumes plain SGD on the client, so "
        "the correction is only an approximation; use --config.train.optimizer=sgd for "
        "SCAFFOLD as published (docs/algorithms.md).",
        UserWarning,
        stacklevel=2,
    )
  agg = scaffold_aggregator(num_clients, trainable, server_optimizer_from_config(config))
  return Algorithm(
      config.method,
      agg,
      broadcast=lambda state: {"control": state["control"]},
      init_client_state=lambda t: jax.tree.map(jnp.zeros_like, t),
      correct_grads=lambda g, b, cs: correct_grads(g, b["control"], cs),
      update_client_state=lambda cs, b, d, k: new_client_control(cs, b["control"], d, k, lr),
  )
