"""FedAvg (McMahan et al., 2017): the example-weighted mean of the client deltas.

    theta <- theta + sum_i n_i Delta_i / sum_i n_i          (clients with weight 0 excluded)

With ``config.server.optimizer`` other than 'none' the mean delta goes through that optax
server optimizer as a negated gradient (FedOpt; :mod:`fedalign.algorithms.fedopt` names the
usual combinations). Config fields read: ``method``, ``server.*``.

Example:
  >>> import jax.numpy as jnp
  >>> agg = fedavg_aggregator()
  >>> params = {'w': jnp.zeros(2)}
  >>> deltas = {'w': jnp.array([[1.0, 0.0], [3.0, 2.0]])}
  >>> new, _, _ = agg.aggregate(agg.init(params), params, deltas, {}, jnp.array([1.0, 1.0]))
  >>> new['w'].tolist()
  [2.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fedalign.aggregation import moe_blocks as mb
from fedalign.aggregation.base import Aggregator
from fedalign.algorithms.base import Algorithm, server_optimizer_from_config

PyTree = Any


def fedavg_deltas(prep: mb.Prepared) -> dict:
  """{leaf key: sum_i nw_i Delta_i, or None for a frozen leaf}.

  Reads the deltas as sent (``prep.raw_deltas``) with the participation mask, so that the
  non-participants' rows are never copied out to be zeroed (:func:`mb.client_sum`).
  """
  return {
      k: None if d is None else mb.client_sum(prep.nw, d, prep.part)
      for k, d in prep.raw_deltas.items()
  }


def update_norm(agg: dict) -> jax.Array:
  """L2 norm of an aggregated (flat) delta."""
  sq = [jnp.sum(jnp.square(d)) for d in agg.values() if d is not None]
  return jnp.sqrt(sum(sq)) if sq else jnp.zeros(())


def fedavg_aggregator(
    trainable: PyTree | None = None, optimizer: optax.GradientTransformation | None = None
) -> Aggregator:
  """Example-weighted FedAvg, optionally followed by a server optimizer (FedOpt).

  Args:
    trainable: the trainable partition of the params (``None`` at frozen leaves), sizing the
      optimizer state; None = every leaf trains.
    optimizer: optax server optimizer applied to the mean delta (None = plain FedAvg).
  """

  def init(params: PyTree) -> dict:
    return {"opt": mb.init_server_optimizer(optimizer, params, trainable)}

  def aggregate(state, global_params, deltas, stats, weights, client_state_deltas=None):
    del stats, client_state_deltas
    prep = mb.prepare(global_params, deltas, weights)
    agg = fedavg_deltas(prep)
    new_params, opt = mb.finish(prep, agg, optimizer, state["opt"])
    return new_params, {"opt": opt}, {"update_norm": update_norm(agg)}

  return Aggregator(init, aggregate)


def make_fedavg(
    config: ml_collections.ConfigDict, trainable: PyTree, num_clients: int
) -> Algorithm:
  """FedAvg (and FedAvg + ``config.server.optimizer``)."""
  del num_clients
  return Algorithm(
      config.method, fedavg_aggregator(trainable, server_optimizer_from_config(config))
  )
