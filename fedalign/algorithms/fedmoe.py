"""FedMoE's modular aggregation (fedalign-moe.md section 5) [ours].

Each routed expert is averaged only over the clients that selected it this round, weighted by
their selection counts c_i(e); an expert no participating client selected keeps its
parameters (and, with a server optimizer, its optimizer state). Routers and every other trained
leaf (attention, embeddings, shared experts, ...) are averaged FedAvg-style with weights n_i.

    theta_e <- theta_e + sum_i c_i(e) Delta_i(e) / sum_j c_j(e)

Only ``select_count`` is read from the routing statistics. Config fields read: ``server.*``.

Example:
  >>> import jax.numpy as jnp
  >>> params = {'moe': {'router': {'kernel': jnp.zeros((1, 2))},
  ...                   'experts': {'wo': jnp.zeros((2, 1, 1))}}}
  >>> deltas = {'moe': {'router': {'kernel': jnp.zeros((2, 1, 2))},
  ...                   'experts': {'wo': jnp.array([[1., 5.], [3., 7.]])[..., None, None]}}}
  >>> stats = {'moe': {'select_count': jnp.array([[1., 0.], [3., 0.]])}}
  >>> agg = modular_aggregator()
  >>> new, _, _ = agg.aggregate(agg.init(params), params, deltas, stats, jnp.ones(2))
  >>> new['moe']['experts']['wo'].ravel().tolist()  # (1*1 + 3*3) / 4; expert 1 unselected
  [2.5, 0.0]
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
from fedalign.algorithms.fedavg import fedavg_deltas

PyTree = Any


def expert_keep_mask(kept: jax.Array, leaf: jax.Array) -> jax.Array:
  """(E,) bool -> (E, 1, ...) broadcastable to an expert leaf (E, ...)."""
  return kept.reshape(kept.shape + (1,) * (jnp.ndim(leaf) - 1))


def modular_aggregator(
    trainable: PyTree | None = None, optimizer: optax.GradientTransformation | None = None
) -> Aggregator:
  """FedMoE-style modular aggregation.

  Args:
    trainable: the trainable partition (``None`` at frozen leaves) sizing the server optimizer
      state (with LoRA: adapters and routers only); None = every leaf.
    optimizer: optax transformation on the aggregated delta; None = plain averaging.
  """

  def init(params: PyTree) -> dict:
    mb.moe_blocks(params, "modular_aggregator.init")
    return {"opt": mb.init_server_optimizer(optimizer, params, trainable)}

  def aggregate(state, global_params, deltas, stats, weights, client_state_deltas=None):
    del client_state_deltas
    blocks = mb.moe_blocks(global_params, "modular_aggregator.aggregate")
    prep = mb.prepare(global_params, deltas, weights)
    agg = fedavg_deltas(prep)
    keep: dict = {}
    diag: dict[str, jax.Array] = {}
    for blk in blocks:
      c = mb.block_stats(stats, blk, prep, ("select_count",))["select_count"]  # (C, E)
      c_tot = jnp.sum(c, axis=0)
      kept = c_tot <= 0
      w = mb.normalize(c, axis=0)
      for k in blk.expert_keys:
        d = prep.flat_deltas[k]
        if d is not None:
          agg[k] = mb.expert_sum(w, d)
          keep[k] = expert_keep_mask(kept, d[0])
      diag[f"{blk.path}/kept_frac"] = jnp.mean(kept.astype(jnp.float32))
      diag[f"{blk.path}/P_size_mean"] = jnp.mean(jnp.sum((c > 0).astype(jnp.float32), axis=0))
    new_params, opt = mb.finish(prep, agg, optimizer, state["opt"], keep)
    diag["num_participating"] = jnp.sum(prep.part.astype(jnp.float32))
    return new_params, {"opt": opt}, diag

  return Aggregator(init, aggregate)


def make_fedmoe(
    config: ml_collections.ConfigDict, trainable: PyTree, num_clients: int
) -> Algorithm:
  """FedMoE's modular aggregation (+ ``config.server.optimizer``)."""
  del num_clients
  return Algorithm(
      config.method, modular_aggregator(trainable, server_optimizer_from_config(config))
  )
