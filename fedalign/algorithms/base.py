"""What the engine needs from a federated method: :class:`Algorithm` and the server optimizer.

A method is one module of :mod:`fedalign.algorithms` that ends in a constructor
``make_<method>(config, trainable, num_clients) -> Algorithm`` (fedjax's shape): the server's
:class:`~fedalign.aggregation.base.Aggregator` plus the client-side hooks some methods need.
The engine (:mod:`fedalign.federated.client`, :mod:`fedalign.federated.round`) only calls these
hooks; it never branches on the method's name.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp  # noqa: F401 (used by the doctests)
import ml_collections
import optax

from fedalign.aggregation.base import Aggregator

PyTree = Any
SERVER_OPTIMIZERS = ("none", "sgd", "momentum", "adam", "yogi", "adagrad")
SERVER_LR_SCHEDULES = ("constant", "cosine")


def no_broadcast(state: PyTree) -> PyTree:
  """The broadcast of methods that send clients nothing but the model."""
  del state
  return {}


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A federated method as hooks for the engine.

  Attributes:
    name: the method's name (``config.method``).
    aggregator: server side, ``init(params) -> state`` and ``aggregate(state, global_params,
      deltas, stats, weights, client_state_deltas=None) -> (params, state, diagnostics)``.
    broadcast: aggregator state -> pytree sent to every client with the model.
    client_loss: (params, global_params, broadcast, aux) -> scalar added to the local loss.
    init_client_state: trainable params -> one client's persistent state (None = stateless).
    correct_grads: (grads, broadcast, client_state) -> grads, at every local step.
    update_client_state: (client_state, broadcast, delta, num_steps) -> the client's new state
      after local training; the engine stores it and hands the aggregator the change
      (new - old) of every participating client as ``client_state_deltas``.
  """

  name: str
  aggregator: Aggregator
  broadcast: Callable[[PyTree], PyTree] = no_broadcast
  client_loss: Callable[..., jax.Array] | None = None
  init_client_state: Callable[[PyTree], PyTree] | None = None
  correct_grads: Callable[..., PyTree] | None = None
  update_client_state: Callable[..., PyTree] | None = None


def server_optimizer(
    name: str = "sgd",
    learning_rate: float = 1.0,
    momentum: float = 0.9,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
) -> optax.GradientTransformation:
  """A FedOpt server optimizer (Reddi et al., 2021; eps = their tau, default 1e-3).

  Conventions (optax's, stated because Flower and the paper differ): FedAdam / FedYogi are
  optax's bias-corrected ``adam`` / ``yogi``; FedAdagrad is optax's ``adagrad``, whose eps sits
  inside the square root and which has no first moment.

  >>> server_optimizer('momentum', 1.0).init({'w': jnp.zeros(2)})[0].trace['w'].tolist()
  [0.0, 0.0]
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
  raise ValueError(
      f"config.server.optimizer={name!r} is invalid: expected one of {SERVER_OPTIMIZERS}."
  )


def server_optimizer_from_config(
    config: ml_collections.ConfigDict, implied: str | None = None
) -> optax.GradientTransformation | None:
  """The run's server optimizer from ``config.server`` (None = plain averaging).

  Args:
    config: reads ``method``, ``train.rounds`` and ``server.{optimizer, learning_rate,
      lr_schedule, lr_final_fraction, momentum, b1, b2, eps}``.
    implied: the optimizer a FedOpt method name stands for (``fedadam`` -> 'adam'); then
      ``server.optimizer`` must be 'none' or the same name (one way to ask for each thing).

  'none' or 'sgd' with a constant learning rate 1 is plain averaging (returns None).
  """
  srv = config.server
  name = srv.optimizer
  if name not in SERVER_OPTIMIZERS:
    raise ValueError(
        f"config.server.optimizer={name!r} is invalid: expected one of {SERVER_OPTIMIZERS}."
    )
  if implied is not None:
    if name not in ("none", implied):
      raise ValueError(
          f"config.server.optimizer={name!r} contradicts config.method={config.method!r}, "
          f"which is FedAvg with the {implied!r} server optimizer: leave server.optimizer="
          f"'none', or use method='fedavg' with server.optimizer={name!r}."
      )
    name = implied
  schedule = srv.get("lr_schedule", "constant")
  if schedule not in SERVER_LR_SCHEDULES:
    raise ValueError(
        f"config.server.lr_schedule={schedule!r} is invalid: expected one of "
        f"{SERVER_LR_SCHEDULES}."
    )
  if name in ("none", "sgd") and srv.learning_rate == 1.0 and schedule == "constant":
    return None
  if name == "none":  # documented, but easy to get by overriding only server.optimizer
    logging.getLogger(__name__).warning(
        "config.server.optimizer='none' with server.learning_rate=%s and lr_schedule=%r: the "
        "average is applied as an sgd step of that size, not as plain averaging (set "
        "server.learning_rate=1.0 and lr_schedule='constant' for plain averaging).",
        srv.learning_rate,
        schedule,
    )
  lr = srv.learning_rate
  if schedule != "constant":
    lr = server_learning_rate(lr, schedule, config.train.rounds, srv.get("lr_final_fraction", 0.0))
  return server_optimizer(
      "sgd" if name == "none" else name, lr, srv.momentum, srv.b1, srv.b2, srv.eps
  )


def server_learning_rate(
    learning_rate: float, schedule: str, rounds: int, final_fraction: float = 0.0
) -> float | optax.Schedule:
  """The server learning rate over rounds: ``constant``, or ``cosine`` decay from
  ``learning_rate`` at the first round to ``final_fraction * learning_rate`` after ``rounds``
  (optax's ``cosine_decay_schedule``; the step is the number of rounds applied so far, kept in
  the server optimizer state, so a resumed run continues the schedule).

  >>> lr = server_learning_rate(1.0, 'cosine', 10, 0.1)
  >>> [round(float(lr(r)), 3) for r in (0, 5, 9)]
  [1.0, 0.55, 0.122]
  """
  if schedule == "constant":
    return learning_rate
  if schedule == "cosine":
    return optax.cosine_decay_schedule(learning_rate, decay_steps=rounds, alpha=final_fraction)
  raise ValueError(
      f"config.server.lr_schedule={schedule!r} is invalid: expected one of {SERVER_LR_SCHEDULES}."
  )
