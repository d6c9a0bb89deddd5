"""Federated algorithms: an aggregator plus what clients need from the server.

An :class:`Algorithm` bundles the server's :class:`~fedalign.aggregation.base.Aggregator` with
the client-side pieces some methods need: a term added to the local loss (FedProx's proximal
term, FedAlign-MoE's gating regularizer), a broadcast computed from the aggregator state, and
per-client persistent state (SCAFFOLD's control variates). The engine never special-cases a
method: it calls these hooks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedalign.aggregation.base import Aggregator
from fedalign.aggregation.fedavg import fedavg_aggregator, server_optimizer
from fedalign.aggregation.scaffold import (
    scaffold_aggregator,
    scaffold_correct_grads,
    scaffold_new_client_control,
)

PyTree = Any
METHODS = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "scaffold",
    "fedmoe",
    "fedalign",
)


def _no_broadcast(state: PyTree) -> PyTree:
  del state
  return {}


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A federated method as hooks for the engine.

  Attributes:
    name: the method's name.
    aggregator: server-side init/aggregate.
    broadcast: aggregator state -> pytree sent to every client with the model.
    client_loss: (params, global_params, broadcast, aux) -> scalar added to the local loss.
    init_client_state: trainable params -> one client's persistent state (None = stateless).
    correct_grads: (grads, broadcast, client_state) -> grads.
    update_client_state: (client_state, broadcast, delta, num_steps, lr) -> new state.
  """

  name: str
  aggregator: Aggregator
  broadcast: Callable[[PyTree], PyTree] = _no_broadcast
  client_loss: Callable[..., jax.Array] | None = None
  init_client_state: Callable[[PyTree], PyTree] | None = None
  correct_grads: Callable[..., PyTree] | None = None
  update_client_state: Callable[..., PyTree] | None = None


def proximal_term(mu: float) -> Callable[..., jax.Array]:
  """FedProx: mu / 2 * ||w - w_global||^2 over the trainable leaves."""

  def loss(params, global_params, broadcast, aux):
    del broadcast, aux
    sq = jax.tree.map(lambda a, b: jnp.sum(jnp.square(a - b)), params, global_params)
    return 0.5 * mu * sum(jax.tree.leaves(sq))

  return loss


def make_algorithm(config: Any, trainable: PyTree, num_clients: int) -> Algorithm:
  """Builds the method named ``config.method`` (see :data:`METHODS`).

  Args:
    config: the run's ml_collections config (fields ``method``, ``server``, ``fedprox``,
      ``fedalign`` are read).
    trainable: the trainable partition of the params (``None`` at frozen leaves).
    num_clients: total number of clients (SCAFFOLD's control update).
  """
  method = config.method
  srv = config.server
  opt_names = {"fedavgm": "momentum", "fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}
  if method in opt_names:
    opt = server_optimizer(
        opt_names[method], srv.learning_rate, srv.momentum, srv.b1, srv.b2, srv.eps
    )
  elif srv.optimizer not in ("none", "sgd") or srv.learning_rate != 1.0:
    opt = server_optimizer(
        srv.optimizer if srv.optimizer != "none" else "sgd",
        srv.learning_rate,
        srv.momentum,
        srv.b1,
        srv.b2,
        srv.eps,
    )
  else:
    opt = None

  if method in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
    return Algorithm(method, fedavg_aggregator(opt, trainable))
  if method == "fedprox":
    return Algorithm(
        method, fedavg_aggregator(opt, trainable), client_loss=proximal_term(config.fedprox.mu)
    )
  if method == "scaffold":
    agg = scaffold_aggregator(num_clients, opt, trainable)
    return Algorithm(
        method,
        agg,
        broadcast=lambda state: {"control": state["control"]},
        init_client_state=lambda t: jax.tree.map(jnp.zeros_like, t),
        correct_grads=lambda g, b, cs: scaffold_correct_grads(g, b["control"], cs),
        update_client_state=lambda cs, b, d, k, lr: scaffold_new_client_control(
            cs, b["control"], d, k, lr
        ),
    )
  if method == "fedmoe":
    from fedalign.aggregation.modular import modular_aggregator

    return Algorithm(method, modular_aggregator(server_optimizer=opt))
  if method == "fedalign":
    from fedalign.aggregation import fedalign as fa

    fields = dict(config.fedalign.to_dict())
    if not fields.get("centroid_clip"):
      fields["centroid_clip"] = None  # 0 in the config means 'no clipping'
    fa_cfg = fa.as_fedalign_config(
        dict(fields, server_optimizer=opt, seed=int(config.get("seed", 0)))
    )
    lam = fa_cfg.lambda_reg

    def reg(params, global_params, broadcast, aux):
      del params, global_params
      return lam * fa.gating_regularizer(aux["routing"], broadcast["p_g"], broadcast["alpha"])

    fa_agg = fa.fedalign_aggregator(fa_cfg)
    agg = Aggregator(lambda params: fa_agg.init(params, trainable), fa_agg.aggregate)
    return Algorithm(method, agg, broadcast=fa.broadcast, client_loss=reg)
  raise ValueError(f"config.method={method!r} is unknown: expected one of {METHODS}.")
