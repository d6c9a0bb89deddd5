"""Modular aggregation (FedMoE's aggregation step; fedalign-moe.md section 5) [ours].

Each routed expert is averaged only over the clients that selected it this round, weighted by
their selection counts c_i(e); an expert no participating client selected keeps its
parameters. Routers and every other trained leaf (attention, embeddings, shared experts, ...)
are averaged FedAvg-style with weights n_i. An optional optax server optimizer is applied to the
aggregated delta (used as the negated gradient).

    theta_e_new = theta_e + sum_i c_i(e) Delta_i(e) / sum_j c_j(e)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from fedalign.aggregation.base import Aggregator
from fedalign.aggregation.fedalign import (
    _block_layout,
    _check_stats,
    _esum,
    _fedavg_deltas,
    _finish,
    _init_server_opt,
    _moe_blocks,
    _prepare,
    _sanitize_stats,
)

PyTree = Any


def modular_aggregator(server_optimizer: optax.GradientTransformation | None = None) -> Aggregator:
  """FedMoE-style modular aggregation as an :class:`Aggregator`.

  Only ``select_count`` is read from the routing statistics.

  Args:
    server_optimizer: optax transformation on the aggregated delta; None = plain averaging.

  Returns:
    ``Aggregator(init, aggregate)``; ``init(params, trainable=None)`` (see
    :func:`fedalign.aggregation.fedalign.fedalign_aggregator` for ``trainable``).

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

  def init(params: PyTree, trainable: PyTree | None = None) -> dict:
    _moe_blocks(params, "modular_aggregator.init")
    return {"server_opt": _init_server_opt(server_optimizer, params, trainable)}

  def aggregate(
      state: Mapping[str, Any],
      global_params: PyTree,
      deltas: PyTree,
      stats: Mapping[str, Any],
      weights: jax.Array,
  ) -> tuple[PyTree, dict, dict[str, jax.Array]]:
    blocks = _moe_blocks(global_params, "modular_aggregator.aggregate")
    prep = _prepare(global_params, deltas, weights)
    num_clients = prep.part.shape[0]
    agg = _fedavg_deltas(prep)
    diag: dict[str, jax.Array] = {}
    for path in blocks:
      blk = _block_layout(prep.flat_params, path)
      raw = _sanitize_stats(_check_stats(stats, blk, num_clients, ("select_count",)), prep.part)
      c = raw["select_count"]  # (C, E), 0 for excluded clients
      c_tot = jnp.sum(c, axis=0)
      w = c / jnp.where(c_tot > 0, c_tot, 1.0)[None]
      for k in blk.expert_keys:
        d = prep.flat_deltas[k]
        if d is not None:
          agg[k] = _esum(w, d)
      diag[f"{path}/kept_frac"] = jnp.mean((c_tot <= 0).astype(jnp.float32))
      diag[f"{path}/P_size_mean"] = jnp.mean(jnp.sum((c > 0).astype(jnp.float32), axis=0))
    new_params, server_opt = _finish(
        prep.flat_params, agg, prep.any_part, server_optimizer, state["server_opt"]
    )
    diag["num_participating"] = jnp.sum(prep.part.astype(jnp.float32))
    return new_params, {"server_opt": server_opt}, diag

  return Aggregator(init, aggregate)


__all__ = ["modular_aggregator"]
