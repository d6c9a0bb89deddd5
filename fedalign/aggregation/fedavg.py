"""FedAvg and the FedOpt family (FedAvgM, FedAdam, FedYogi, FedAdagrad) as one aggregator.

The server averages the client deltas weighted by n_i and hands the negated average to an optax
optimizer as a pseudo-gradient (Reddi et al., "Adaptive Federated Optimization", 2021). Plain
FedAvg is ``optax.sgd(1.0)``: new = global + mean delta.

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
import optax

from fedalign.aggregation.base import Aggregator, apply_delta, weighted_mean

PyTree = Any
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")


def server_optimizer(
    name: str = "sgd",
    learning_rate: float = 1.0,
    momentum: float = 0.9,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
) -> optax.GradientTransformation:
  """The server optimizer of a FedOpt method (eps = tau of Reddi et al., default 1e-3).

  FedAdam / FedYogi are optax's adam / yogi (bias-corrected); FedAdagrad is optax's adagrad,
  whose eps sits inside the square root and which has no first moment (Reddi et al. put tau
  outside and use momentum): a documented simplification.
  """
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "momentum":
    return optax.sgd(learning_rate, momentum=momentum)
  if name == "adam":
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == "yogi":
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == "adagrad":
    return optax.adagrad(learning_rate, initial_accumulator_value=0.0, eps=eps)
  raise ValueError(f"server optimizer {name!r} is unknown: expected one of {SERVER_OPTIMIZERS}.")


def trainable_like(params: PyTree, deltas_template: PyTree | None) -> PyTree:
  """params restricted to the leaves that have a delta (None elsewhere)."""
  if deltas_template is None:
    return params
  return jax.tree.map(
      lambda p, d: None if d is None else p, params, deltas_template, is_leaf=lambda x: x is None
  )


def apply_server_update(
    optimizer: optax.GradientTransformation | None,
    opt_state: PyTree,
    params: PyTree,
    mean_delta: PyTree,
) -> tuple[PyTree, PyTree]:
  """global + optimizer(-mean_delta); plain addition when ``optimizer`` is None."""
  if optimizer is None:
    return apply_delta(params, mean_delta), opt_state
  grads = jax.tree.map(lambda d: -d, mean_delta)
  sub = trainable_like(params, mean_delta)
  updates, opt_state = optimizer.update(grads, opt_state, sub)
  return apply_delta(params, updates), opt_state


def init_server_optimizer(
    optimizer: optax.GradientTransformation | None, params: PyTree, mask: PyTree | None = None
) -> PyTree:
  if optimizer is None:
    return ()
  return optimizer.init(trainable_like(params, mask))


def fedavg_aggregator(
    optimizer: optax.GradientTransformation | None = None, trainable: PyTree | None = None
) -> Aggregator:
  """Example-weighted FedAvg, optionally followed by a server optimizer (FedOpt).

  Args:
    optimizer: optax server optimizer applied to the averaged delta (None = plain FedAvg).
    trainable: a tree with ``None`` at frozen leaves (e.g. the trainable partition), used to
      size the optimizer state; None = every leaf trains.
  """

  def init(params):
    return {"opt": init_server_optimizer(optimizer, params, trainable)}

  def aggregate(state, global_params, deltas, stats, weights):
    del stats
    mean_delta = weighted_mean(deltas, weights)
    new_params, opt = apply_server_update(optimizer, state["opt"], global_params, mean_delta)
    sq = [jnp.sum(jnp.square(d)) for d in jax.tree.leaves(mean_delta)]
    diag = {"update_norm": jnp.sqrt(sum(sq)) if sq else jnp.zeros(())}
    return new_params, {"opt": opt}, diag

  return Aggregator(init, aggregate)
