"""The client update: a pure function that the round vmaps over clients.

``client_update(global_trainable, frozen, batches, broadcast, client_state, rng)
-> (delta, routing_stats, metrics, new_client_state)``

* ``global_trainable`` / ``frozen``: the global model split by
  :func:`fedalign.models.lora.partition`; only the trainable part is differentiated and
  returned as a delta, the frozen base weights are shared by every client.
* ``batches``: fixed-shape arrays (steps, batch, seq) per key plus ``step_mask`` (steps,);
  a padded step (mask 0) leaves params, optimizer state and statistics unchanged.
* ``broadcast``: what the algorithm sends with the model (e.g. FedAlign-MoE's p_g and alpha).
* routing statistics are summed over every real step of local training (section 3.1).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fedalign.algorithms.base import Algorithm
from fedalign.models.lora import combine

PyTree = Any


def _select(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def make_client_update(
    task: Any,
    algorithm: Algorithm,
    optimizer: optax.GradientTransformation,
    *,
    load_balance_coef: float = 0.01,
    z_loss_coef: float = 0.0,
) -> Callable[..., tuple]:
  """Builds the pure client update for a task, an algorithm and an optax client optimizer.

  Args:
    task: has ``loss(params, batch, rng) -> (loss, aux)`` with ``aux['routing']`` and the
      auxiliary router losses (see :mod:`fedalign.federated.task`).
    algorithm: the hooks of the federated method.
    optimizer: the local optimizer (optax).
    load_balance_coef / z_loss_coef: weights of the router auxiliary losses.
  """

  def total_loss(trainable, frozen, global_trainable, batch, broadcast, rng):
    params = combine(trainable, frozen)
    task_loss, aux = task.loss(params, batch, rng)
    loss = (
        task_loss
        + load_balance_coef * aux["load_balance_loss"]
        + z_loss_coef * aux["router_z_loss"]
    )
    if algorithm.client_loss is not None:
      loss = loss + algorithm.client_loss(trainable, global_trainable, broadcast, aux)
    return loss, (task_loss, aux["routing"])

  grad_fn = jax.value_and_grad(total_loss, has_aux=True)

  def client_update(global_trainable, frozen, batches, broadcast, client_state, rng):
    step_mask = batches["step_mask"].astype(bool)
    data = {k: v for k, v in batches.items() if k != "step_mask"}
    first = jax.tree.map(lambda x: x[0], data)
    stats_shape = jax.eval_shape(
        lambda: total_loss(global_trainable, frozen, global_trainable, first, broadcast, rng)[1][1]
    )
    zero_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)
    opt_state = optimizer.init(global_trainable)

    def step(i, carry):
      params, opt_state, stats_acc, loss_acc = carry
      batch = jax.tree.map(lambda x: x[i], data)
      real = step_mask[i]
      (_, (task_loss, stats)), grads = grad_fn(
          params, frozen, global_trainable, batch, broadcast, jax.random.fold_in(rng, i)
      )
      if algorithm.correct_grads is not None:
        grads = algorithm.correct_grads(grads, broadcast, client_state)
      updates, new_opt_state = optimizer.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      params = _select(real, new_params, params)
      opt_state = _select(real, new_opt_state, opt_state)
      stats_acc = jax.tree.map(lambda a, s: a + jnp.where(real, s, 0), stats_acc, stats)
      loss_acc = loss_acc + jnp.where(real, task_loss, 0.0)
      return params, opt_state, stats_acc, loss_acc

    # The loop runs up to the last real step only (a dynamic trip count): under vmap it runs
    # to the longest client of the vmapped group, so grouping clients of similar size into
    # chunks (see round.make_round_fn) skips most padded steps instead of computing them.
    last = jnp.max(jnp.where(step_mask, jnp.arange(step_mask.shape[0]) + 1, 0))
    init = (global_trainable, opt_state, zero_stats, jnp.zeros((), jnp.float32))
    params, _, stats, loss_sum = jax.lax.fori_loop(0, last, step, init)
    delta = jax.tree.map(lambda a, b: a - b, params, global_trainable)
    num_steps = jnp.sum(step_mask.astype(jnp.float32))
    metrics = {"train_loss": loss_sum / jnp.maximum(num_steps, 1.0), "num_steps": num_steps}
    new_state = client_state
    if algorithm.update_client_state is not None:
      new_state = algorithm.update_client_state(client_state, broadcast, delta, num_steps)
    return delta, stats, metrics, new_state

  return client_update


def client_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The local optimizer of ``config.train``: AdamW or SGD, after global-norm clipping when
  ``grad_clip`` > 0.

  >>> from fedalign.config_files import load_config
  >>> opt = client_optimizer(load_config('configs/default.py:runlocal'))
  >>> callable(opt.update)
  True
  """
  t = config.train
  if t.optimizer == "adamw":
    opt = optax.adamw(t.learning_rate, weight_decay=t.weight_decay)
  else:
    opt = optax.sgd(t.learning_rate)
  if t.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip), opt)
  return opt
