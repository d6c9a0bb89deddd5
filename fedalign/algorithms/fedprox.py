"""FedProx (Li et al., 2020): FedAvg whose clients add a proximal term to their local loss.

    local loss = task loss + mu / 2 * ||w - w_global||^2   (over the trainable leaves)

Config fields read: ``fedprox.mu`` (> = 0), ``server.*`` (a server optimizer, as FedAvg).

Example:
  >>> import jax.numpy as jnp
  >>> term = proximal_term(0.5)
  >>> float(term({'w': jnp.array([1.0, 2.0])}, {'w': jnp.zeros(2)}, {}, {}))  # 0.25 * 5
  1.25
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from fedalign.algorithms.base import Algorithm, server_optimizer_from_config
from fedalign.algorithms.fedavg import fedavg_aggregator

PyTree = Any


def proximal_term(mu: float) -> Callable[..., jax.Array]:
  """The client-loss hook mu / 2 * ||w - w_global||^2."""

  def loss(params, global_params, broadcast, aux):
    del broadcast, aux
    sq = jax.tree.map(lambda a, b: jnp.sum(jnp.square(a - b)), params, global_params)
    return 0.5 * mu * sum(jax.tree.leaves(sq))

  return loss


def make_fedprox(
    config: ml_collections.ConfigDict, trainable: PyTree, num_clients: int
) -> Algorithm:
  """FedProx with ``config.fedprox.mu``."""
  del num_clients
  mu = float(config.fedprox.mu)
  if not mu >= 0:
    raise ValueError(f"config.fedprox.mu={mu!r} is invalid: expected a float >= 0.")
  agg = fedavg_aggregator(trainable, server_optimizer_from_config(config))
  return Algorithm(config.method, agg, client_loss=proximal_term(mu))
